#!/usr/bin/env bash
# Several machines with torchrun's c10d rendezvous. Run the same command on every node:
#   NNODES=2 NODE_RANK=0 NPROC=8 MASTER_ADDR=node0 MASTER_PORT=29500 launch/torchrun_multi_node.sh parallel.tp=8
#   NNODES=2 NODE_RANK=1 NPROC=8 MASTER_ADDR=node0 MASTER_PORT=29500 launch/torchrun_multi_node.sh parallel.tp=8
# Keep a TP group inside one node (tp <= NPROC): its all-reduces are the latency-bound ones.
# RUN_ID is the rendezvous id; the run directory is named by the config (a shared file system is assumed).
# On SIGTERM torchrun gives the workers TORCH_ELASTIC_SHUTDOWN_TIMEOUT s to save a checkpoint (default here 110).
set -euo pipefail
: "${NNODES:?set NNODES}" "${NODE_RANK:?set NODE_RANK}" "${MASTER_ADDR:?set MASTER_ADDR}"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-110}
exec torchrun --nnodes "$NNODES" --node_rank "$NODE_RANK" --nproc_per_node "${NPROC:-1}" \
  --rdzv_backend c10d --rdzv_endpoint "$MASTER_ADDR:${MASTER_PORT:-29500}" --rdzv_id "${RUN_ID:-tp-run}" \
  --max-restarts "${MAX_RESTARTS:-0}" -m train "$@"
