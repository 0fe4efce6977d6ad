#!/usr/bin/env bash
# accelerate launch with a config file (see launch/accelerate_*.yaml):
#   launch/accelerate.sh launch/accelerate_cpu.yaml parallel.tp=2          # 2 CPU processes (gloo)
#   launch/accelerate.sh launch/accelerate_gpu.yaml parallel.tp=4          # one node, 8 GPUs
#   MACHINE_RANK=1 MAIN_IP=node0 launch/accelerate.sh launch/accelerate_multi_node.yaml parallel.tp=8
# The run directory is named by the config (or $TP_RUN_ID), the same on every rank.
set -euo pipefail
config=${1:?usage: $0 CONFIG.yaml [hydra overrides...]}
shift
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
extra=()
if grep -q '^use_cpu: true' "$config"; then
  export ACCELERATE_USE_CPU=1  # with distributed_type MULTI_GPU this starts N CPU processes on gloo
fi
if [ -n "${MACHINE_RANK:-}" ]; then
  extra+=(--machine_rank "$MACHINE_RANK" --main_process_ip "${MAIN_IP:?set MAIN_IP}")
fi
exec accelerate launch --config_file "$config" "${extra[@]}" -m train "$@"
