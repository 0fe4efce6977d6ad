#!/usr/bin/env bash
# One machine, NPROC ranks: NPROC GPUs (nccl), or NPROC CPU processes (gloo) on a machine without GPUs.
#   launch/torchrun_single_node.sh NPROC [hydra overrides...]
#   launch/torchrun_single_node.sh 2 parallel.tp=2                 # dp=1 x tp=2
#   launch/torchrun_single_node.sh 8 parallel.tp=4 model=gpt2      # dp=2 x tp=4 on 8 GPUs
set -euo pipefail
nproc=${1:?usage: $0 NPROC [hydra overrides...]}
shift
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # one thread per rank: CPU ranks share the cores
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-110}  # time to save on SIGTERM
exec torchrun --standalone --nproc_per_node "$nproc" -m train "$@"
