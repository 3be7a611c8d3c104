#!/usr/bin/env bash
# Installs sae-kit (first use only) and runs the test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# Triton: tests/conftest.py picks the CPU interpreter (TRITON_INTERPRET=1) unless a GPU is present.
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# The repository root must not be on sys.path: its kernels/ folder (installed as sae_kit.kernels)
# would shadow the `kernels` package that recent transformers imports. Subprocesses inherit this.
export PYTHONSAFEPATH=1
exec .venv/bin/python -m pytest -q "$@"
