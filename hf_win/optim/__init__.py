"""Win / Win2-accelerated optimizers: one shared mechanism (``_win``), thin base optimizers, and ``Win``
around any other optimizer (``wrapper``; the registry's ``Win(base)`` optimizers in ``wrapped``)."""

from ._base import WinOptimizer
from ._sharding import ShardingError, check_partitioned
from ._win import MODES
from .adam import Adam
from .adamw import AdamW
from .adan import Adan
from .lamb import LAMB
from .sgd import SGD
from .wrapped import AdafactorWin, MuonWin, NAdamWin, RAdamWin
from .wrapper import Win

# Drop-in names of the authors' public code (same constructor keywords).
AdamW_Win = AdamW
Adam_Win = Adam
LAMB_Win = LAMB
Lamb_Win = LAMB
SGD_Win = SGD
Adan_Win = Adan

__all__ = [
    "MODES", "WinOptimizer", "ShardingError", "check_partitioned", "AdamW", "Adam", "LAMB", "SGD", "Adan",
    "AdamW_Win", "Adam_Win", "LAMB_Win", "Lamb_Win", "SGD_Win", "Adan_Win",
    "Win", "AdafactorWin", "NAdamWin", "RAdamWin", "MuonWin",
]
