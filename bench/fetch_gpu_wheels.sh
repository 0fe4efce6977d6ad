#!/usr/bin/env bash
# The pure-Python wheels the GPU machine lacks (Python 3.12 there), into bench/wheels/ (git-ignored):
# hydra-core and omegaconf as published wheels; antlr4-python3-runtime (an sdist only) built into one here.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p bench/wheels
python -m pip download --quiet --only-binary=:all: --no-deps --python-version 3.12 -d bench/wheels \
  "hydra-core==1.3.*" "omegaconf==2.3.*"
python -m pip wheel --quiet --no-deps -w bench/wheels "antlr4-python3-runtime==4.9.3"
ls bench/wheels
