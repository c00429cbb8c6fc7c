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
    # timm for tests/test_timm.py only, without its dependencies and outside the venv's site-packages: timm
    # imports torchvision, whose wheels pin another torch (a bare install would replace the CPU torch), so timm
    # cannot import here; installed in the venv it would break accelerate's CLI, which imports timm wherever it
    # is installed. The test imports it from this folder, with a labelled test-only torchvision stand-in.
    timm_dir="$(cd "$venv" && pwd)/timm-for-tests"
    if [ ! -d "$timm_dir/timm" ]; then
      "$vpy" -m pip install -q --disable-pip-version-check --no-deps --target "$timm_dir" "timm>=1.0.12"
    fi
    if "$vpy" -c "import importlib.util as u, sys; sys.exit(not (u.find_spec('timm') and not u.find_spec('torchvision')))"; then
      echo "[bootstrap] removing timm from $venv (an earlier bootstrap put it there; without torchvision it breaks accelerate's CLI)"
      "$vpy" -m pip uninstall -q -y timm
    fi
    exec "$vpy" -m pytest -q "$@"
    ;;
  *)
    echo "usage: bash scripts/bootstrap.sh {demo|test} [args...]" >&2
    exit 2
    ;;
esac
