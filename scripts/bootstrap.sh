#!/usr/bin/env bash
# Set up .venv for fastinit on a fresh machine: Python venv, the CPU build of
# torch when torch is missing, then the package itself (editable).
#   bash scripts/bootstrap.sh        # runtime + the 'compare' extra (for `fastinit bench|compare`)
#   bash scripts/bootstrap.sh test   # + test dependencies (pytest, scipy, triton, transformers, ...)
# TORCH_INDEX_URL: an extra index that serves CPU wheels of torch, e.g.
#   https://download.pytorch.org/whl/cpu (not needed where a local wheel is configured).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
VPY=.venv/bin/python
export PIP_DISABLE_PIP_VERSION_CHECK=1
if ! "$VPY" -c "import torch" 2>/dev/null; then
    # A bare `torch` can resolve to a multi-GB CUDA build: ask for the CPU build.
    "$VPY" -m pip install -q "torch==2.13.0+cpu" ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"}
fi
extras=compare
if [ "${1:-}" = "test" ]; then
    extras=compare,test
fi
"$VPY" -m pip install -q -e ".[${extras}]"
