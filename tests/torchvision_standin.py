"""TEST-ONLY stand-in for torchvision, so that timm imports where torchvision does not.

timm imports torchvision at import time (``torchvision.ops.misc.FrozenBatchNorm2d`` in ``timm.layers``, the
transforms and datasets in ``timm.data``), but the optimizer factory these tests exercise uses none of it. PyPI's
torchvision wheels are built against one torch release and do not import beside the project's CPU torch wheel,
so where ``import torchvision`` fails, :func:`installed` puts placeholder modules in ``sys.modules`` while timm
is imported, and takes them out again (others, e.g. transformers' ``is_torchvision_available()``, must keep
seeing no torchvision): every name they are asked for is a placeholder class that raises if it is ever
instantiated or called. Nothing in hf_win uses this; it is never installed when the real torchvision imports.
"""

from __future__ import annotations

import contextlib
import sys
import types

MODULES = ("torchvision", "torchvision.ops", "torchvision.ops.misc", "torchvision.transforms",
           "torchvision.transforms.functional", "torchvision.transforms.v2", "torchvision.datasets",
           "torchvision.models", "torchvision.models.feature_extraction", "torchvision.utils", "torchvision.io")


class _Placeholder(type):
    def __getattr__(cls, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _placeholder(f"{cls.__qualname__}.{name}")

    def __call__(cls, *args, **kwargs):
        raise RuntimeError(f"{cls.__qualname__} is part of the test-only torchvision stand-in (tests/torchvision_standin.py)")


def _placeholder(name):
    return _Placeholder(name, (), {"__qualname__": name})


class _Module(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _placeholder(f"{self.__name__}.{name}")


@contextlib.contextmanager
def installed():
    """Within the block, ``import torchvision`` gives the stand-in if the real one does not import. Yields True
    if the stand-in was installed."""
    try:
        import torchvision  # noqa: F401

        yield False
        return
    except Exception:  # ImportError, or the RuntimeError of a torchvision built for another torch
        pass
    _remove()
    for name in MODULES:
        module = _Module(name)
        module.__path__ = []  # a package, so submodules resolve
        module.__version__ = "0.0+hf_win_test_standin"
        sys.modules[name] = module
        parent, _, child = name.rpartition(".")
        if parent:
            setattr(sys.modules[parent], child, module)
    try:
        yield True
    finally:
        _remove()


def _remove():
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]
