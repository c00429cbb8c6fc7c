#!/usr/bin/env bash
# Set up a virtual environment for hf-win (if needed) and run one job in it.
#   bash scripts/bootstrap.sh demo    the main job: the ViT example on its built-in offline dataset
#   bash scripts/bootstrap.sh test    the test suite
# The environment lives in .venv (override with HF_WIN_VENV). PyTorch is installed first, pinned to the
# CPU build 2.13.0 when no torch is present (a bare "torch" requirement pulls a multi-GB CUDA build);
# set HF_WIN_TORCH to another requirement (e.g. "torch==2.13.0" from your CUDA index) to change that.
set -euo pipefail
cd "$(dirname "$0")/.."
job="${1:-demo}"; shift || true
venv="${HF_WIN_VENV:-.venv}"
py="${PYTHON:-python3}"

if [ ! -x "$venv/bin/python" ]; then
  echo "[bootstrap] creating $venv"
  "$py" -m venv "$venv"
fi
vpy="$venv/bin/python"
if ! "$vpy" -c "import torch" >/dev/null 2>&1; then
  echo "[bootstrap] installing ${HF_WIN_TORCH:-torch==2.13.0}"
  "$vpy" -m pip install -q --disable-pip-version-check "${HF_WIN_TORCH:-torch==2.13.0}"
fi
case "$job" in
  demo)
    "$vpy" -m pip install -q --disable-pip-version-check -e ".[examples]"
    exec "$vpy" examples/image_classification/run_image_classification.py "$@"
    ;;
  test)
    "$vpy" -m pip install -q --disable-pip-version-check -e ".[test]"
    # timm without its dependencies: it requires torchvision, whose wheels pin another torch (a bare
    # install would replace the CPU torch); the timm tests give it a labelled test-only stand-in instead.
    "$vpy" -m pip install -q --disable-pip-version-check --no-deps "timm>=1.0.12"
    exec "$vpy" -m pytest -q "$@"
    ;;
  *)
    echo "usage: bash scripts/bootstrap.sh {demo|test} [args...]" >&2
    exit 2
    ;;
esac
