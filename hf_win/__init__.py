"""hf-win: Win and Win2 acceleration (Zhou, Xie, Yan; ICLR 2023 / JMLR 2024) for the Hugging Face stack."""

from .optim import (
    LAMB, MODES, SGD, AdafactorWin, Adam, Adam_Win, Adan, Adan_Win, AdamW, AdamW_Win, LAMB_Win, Lamb_Win, MuonWin,
    NAdamWin, RAdamWin, SGD_Win, Win, WinOptimizer,
)
from .registry import OPTIMIZERS, OptimizerSpec, available_optimizers, create_optimizer, get_optimizer_spec

# --- Hugging Face Trainer integration ---
# Imported on first use: `import hf_win` for the optimizers alone does not import the Trainer stack.
_LAZY = {
    "WinTrainer": ".trainer", "get_optimizer_cls_and_kwargs": ".trainer", "WinTrainingArguments": ".training_args",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))


# --- Multi-process training ---
from .optim import ShardingError

__version__ = "0.1.0"

__all__ = [
    "WinOptimizer", "AdamW", "Adam", "LAMB", "SGD", "Adan", "MODES",
    "Win", "AdafactorWin", "NAdamWin", "RAdamWin", "MuonWin",
    "AdamW_Win", "Adam_Win", "LAMB_Win", "Lamb_Win", "SGD_Win", "Adan_Win",
    "OPTIMIZERS", "OptimizerSpec", "available_optimizers", "create_optimizer", "get_optimizer_spec",
    "WinTrainingArguments", "WinTrainer", "get_optimizer_cls_and_kwargs",
    "ShardingError",
]
