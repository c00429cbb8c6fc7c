"""Test-wide settings: never touch the Hugging Face Hub, keep runs small and deterministic on 2 cores."""

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Make the checkout importable (and visible to subprocesses) without an install.
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])

from hf_win._offline import use_offline_defaults  # noqa: E402  (imports neither transformers nor the Hub)

use_offline_defaults()

# The Triton kernel is checked on CPU tensors by Triton's interpreter (tests/test_kernels.py); the variable
# must be set before triton is first imported. On a machine with a GPU the kernels run compiled.
try:
    import torch  # noqa: E402

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
except ImportError:  # pragma: no cover
    pass


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory):
    """train/ and validation/ folders of small PNGs, one sub-folder per class (the ImageNet layout)."""
    import numpy as np
    from PIL import Image

    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for split, n in (("train", 8), ("validation", 4)):
        for c, name in enumerate(("bird", "cat", "dog")):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(n):
                h, w = rng.integers(12, 30, size=2)
                pixels = rng.integers(0, 60, size=(h, w, 3)).astype(np.uint8)
                pixels[..., c] += 150  # the class is the dominant channel
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


@pytest.fixture(autouse=True, scope="module")
def _fresh_kernels_per_module():
    """Each test module starts with no kernel in the process (the on-disk cache still serves them), so
    the per-process bound (HF_WIN_MAX_KERNELS) is never reached by what earlier modules built."""
    from hf_win.optim import kernels

    kernels.reset()
    yield


@pytest.fixture
def fresh_kernel_cache(monkeypatch, tmp_path_factory):
    """The test builds into its own kernel cache folder and starts with no kernel in the process."""
    from hf_win.optim import kernels
    from hf_win.optim.kernels import cache

    monkeypatch.setenv("HF_WIN_CACHE_DIR", str(tmp_path_factory.mktemp("kernels")))
    kernels.reset()
    cache._reset_for_tests()
    yield
    kernels.reset()
    cache._reset_for_tests()
