"""hf-win: Win and Win2 acceleration (Zhou, Xie, Yan; ICLR 2023 / JMLR 2024) for the Hugging Face stack."""

from .optim import (
    LAMB, MODES, SGD, Adam, Adam_Win, Adan, Adan_Win, AdamW, AdamW_Win, LAMB_Win, Lamb_Win, SGD_Win,
    WinOptimizer,
)
from .registry import OPTIMIZERS, OptimizerSpec, available_optimizers, create_optimizer, get_optimizer_spec

# --- Hugging Face Trainer integration (issue 3) ---
from .trainer import WinTrainer, get_optimizer_cls_and_kwargs
from .training_args import WinTrainingArguments

__version__ = "0.1.0"

__all__ = [
    "WinOptimizer", "AdamW", "Adam", "LAMB", "SGD", "Adan", "MODES",
    "AdamW_Win", "Adam_Win", "LAMB_Win", "Lamb_Win", "SGD_Win", "Adan_Win",
    "OPTIMIZERS", "OptimizerSpec", "available_optimizers", "create_optimizer", "get_optimizer_spec",
    "WinTrainingArguments", "WinTrainer", "get_optimizer_cls_and_kwargs",
]
