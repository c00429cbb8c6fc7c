"""Test-wide settings: never touch the Hugging Face Hub, keep runs small and deterministic on 2 cores."""

import os
import sys
from pathlib import Path

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
