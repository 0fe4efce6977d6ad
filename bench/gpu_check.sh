#!/usr/bin/env bash
# The GPU check: bench/gpu_check.sh on a CUDA machine (results in bench/results/gpu.md, gpu.json);
# bench/gpu_check.sh --dry-run anywhere (every stage on the CPU, tiny shapes). Exit status: failed stages.
#
# The GPU machine reaches no package registry. Its python3 has torch (CUDA), accelerate, transformers,
# safetensors, tokenizers, tqdm, matplotlib, pytest, hypothesis; hydra-core and omegaconf travel as wheels
# in bench/wheels/ (git-ignored; bench/fetch_gpu_wheels.sh fetches them where a registry is reachable)
# and go into .gpu_deps/ with --no-index. The project runs from this checkout (PYTHONPATH), not installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import hydra, omegaconf" 2>/dev/null; then
  if ! compgen -G "bench/wheels/*.whl" >/dev/null; then
    echo "gpu_check: hydra-core/omegaconf are not installed and bench/wheels/ has no wheels:" \
         "run bench/fetch_gpu_wheels.sh where a registry is reachable, and bring bench/wheels along" >&2
    exit 2
  fi
  "$PY" -m pip install --quiet --no-deps --no-index --target .gpu_deps bench/wheels/*.whl
  export PYTHONPATH="$PWD/.gpu_deps${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "$PY" -m bench.gpu "$@"
