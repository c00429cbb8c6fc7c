"""The Win optimizers in timm's optimizer registry: ``import hf_win.timm`` and timm knows them.

    import hf_win.timm  # registers adamw-win, adamw-win2, adam-win, ..., adan-win2, muon-win2, adafactor-win, ...
    from timm.optim import create_optimizer_v2
    optimizer = create_optimizer_v2(model, opt="adamw-win2", lr=2e-3, weight_decay=0.05)

Names are the hyphenated ones of the authors' timm fork: ``<optimizer>-win`` and ``<optimizer>-win2`` for each
optimizer of :data:`hf_win.registry.OPTIMIZERS` (timm splits ``--opt`` on ``_`` to find a ``lookahead_``
prefix, so ``adamw_win`` could not be a timm name). ``create_optimizer_v2`` builds the hf_win class with
``acceleration_mode`` from the name (a keyword ``acceleration_mode=...`` still wins), over timm's own
parameter groups (no weight decay on biases, norm weights and the model's ``no_weight_decay()``), and passes
``eps`` / ``betas`` / ``momentum`` only to the optimizers that take them, as for timm's own. After the import,
timm's ``train.py --opt adamw-win2 [--opt-kwargs reckless_steps=...]`` trains with AdamW-Win2.

Needs timm >= 1.0.12 (``OptimInfo`` and the registry). Nothing else in hf_win imports timm.
"""

from __future__ import annotations

from typing import List

from .registry import OPTIMIZERS

try:
    from timm.optim._optim_factory import OptimInfo, default_registry
except ImportError as err:  # timm missing, or older than 1.0.12 (no optimizer registry)
    raise ImportError(
        f"hf_win.timm needs timm >= 1.0.12 (its optimizer registry: OptimInfo, default_registry); {err}. "
        "Install it with: pip install 'hf-win[timm]'"
    ) from err

__all__ = ["TIMM_NAMES", "timm_optimizer_infos", "register"]

_MODES = ("win", "win2")


def _timm_name(name: str, mode: str) -> str:
    return f"{name[:-len('_win')]}-{mode}"  # adamw_win, win2 -> adamw-win2


def timm_optimizer_infos() -> List[OptimInfo]:
    """One ``OptimInfo`` per registry optimizer and mode (win, win2), described from the registry's spec."""
    infos = []
    for name, spec in OPTIMIZERS.items():
        keys = spec.accepted_keys
        betas = spec.hyperparameters.get("betas")
        for mode in _MODES:
            infos.append(OptimInfo(
                name=_timm_name(name, mode),
                opt_class=spec.cls,
                description=f"hf_win {spec.summary}, {mode.capitalize()} acceleration",
                has_eps="eps" in keys,
                has_momentum="momentum" in keys,
                has_betas=betas is not None,
                num_betas=len(betas) if betas is not None else 2,
                defaults={"acceleration_mode": mode},
            ))
    return infos


TIMM_NAMES = tuple(info.name for info in timm_optimizer_infos())


def register(registry=None) -> None:
    """Register every Win optimizer in ``registry`` (default: timm's ``default_registry``, the one
    ``create_optimizer_v2`` and ``train.py`` use). Done once on ``import hf_win.timm``."""
    registry = default_registry if registry is None else registry
    for info in timm_optimizer_infos():
        registry.register(info)


register()
