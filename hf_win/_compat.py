"""The one place where hf_win relies on private Transformers internals.

Why this exists (transformers 5.x, seen with 5.23 and 5.24): ``save_pretrained`` writes checkpoints in
the *original* (legacy) parameter naming (``revert_weight_conversion``: for ViT,
``vit.layers.0.attention.q_proj.weight`` is saved as
``vit.encoder.layer.0.attention.attention.query.weight``). ``from_pretrained`` maps those names back, but
``Trainer._load_from_checkpoint`` / ``Trainer._load_best_model`` call ``model.load_state_dict(sd,
strict=False)`` on the raw file contents (and ``load_sharded_checkpoint`` does the same per shard), so
every renamed tensor is dropped with a "missing / unexpected keys" warning, and a resumed run silently
continues from freshly initialised encoder weights.

``checkpoint_key_mapping`` derives, for a model, the map "name in a saved checkpoint" -> "name in the
model" by running the library's own save-time conversion over the model's state dict and matching the
tensors by identity (pure renamings pass the very same tensor objects through). ``mapped_state_dict_loading``
then makes ``model.load_state_dict`` apply it for the duration of one Trainer load call, records what was
really loaded, and reports what is really missing or unexpected.

``OptimizerResumeLogMixin`` logs what loading the optimizer state on resume did (loaded as saved, or
converted: another acceleration_mode, a torch.optim checkpoint; see ``WinOptimizer.load_state_dict``).

Private API used here: ``transformers.core_model_loading.revert_weight_conversion`` and the Trainer
methods ``_load_from_checkpoint``, ``_load_best_model``, ``_issue_warnings_after_load``,
``_load_optimizer_and_scheduler`` (overridden in ``hf_win.trainer.WinTrainer``).

Also here: ``model_card_hyperparameters``. ``Trainer.create_model_card`` lists the hyper-parameters that
``transformers.modelcard.extract_hyperparameters_from_trainer`` reads from the arguments, whose optimizer line
knows only ``optim``, the betas, eps and ``optim_args``: a Win and a Win2 run got the same card. The context
manager wraps that module function for one ``create_model_card`` call so the card also says what
``WinTrainer`` adds (acceleration mode, reckless steps).
"""

from __future__ import annotations

import contextlib
import logging
from typing import Dict, List, Set

import torch

__all__ = ["checkpoint_key_mapping", "mapped_state_dict_loading", "LoadReport", "OptimizerResumeLogMixin",
           "model_card_hyperparameters"]

logger = logging.getLogger("transformers.trainer")


@contextlib.contextmanager
def model_card_hyperparameters(update):
    """For the duration, the model card's hyper-parameters (a dict, from the Trainer) go through
    ``update(trainer, hyperparameters) -> hyperparameters``."""
    from transformers import modelcard

    original = modelcard.extract_hyperparameters_from_trainer

    def extract(trainer):
        return update(trainer, original(trainer))

    modelcard.extract_hyperparameters_from_trainer = extract
    try:
        yield
    finally:
        modelcard.extract_hyperparameters_from_trainer = original


def checkpoint_key_mapping(model: torch.nn.Module) -> Dict[str, str]:
    """``{saved name: model name}`` for the names that ``save_pretrained`` renames on save ({} if none).

    Conversions that are not one-to-one renamings (fused / split tensors) produce new tensors and are
    not in the map; loading such a checkpoint reports its keys as unexpected.
    """
    try:
        from transformers import PreTrainedModel
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # pragma: no cover - older/newer layouts without weight conversions
        return {}
    if not isinstance(model, PreTrainedModel):
        return {}
    own = model.state_dict()
    saved = revert_weight_conversion(model, dict(own))
    by_id = {id(t): k for k, t in own.items()}
    mapping = {}
    for saved_key, tensor in saved.items():
        model_key = by_id.get(id(tensor))
        if model_key is not None and model_key != saved_key:
            mapping[saved_key] = model_key
    return mapping


class LoadReport:
    """What a mapped load really did (across shards)."""

    def __init__(self, model: torch.nn.Module):
        self.model_keys: List[str] = list(model.state_dict().keys())
        self.loaded: Set[str] = set()
        self.unexpected: Set[str] = set()
        self.renamed = 0
        self.calls = 0
        # Tied parameters: a key counts as loaded when another key holding the same tensor was loaded.
        by_param: Dict[int, List[str]] = {}
        for name, p in model.named_parameters(remove_duplicate=False):
            by_param.setdefault(id(p), []).append(name)
        self._aliases = {n: names for names in by_param.values() for n in names}

    @property
    def missing_keys(self) -> List[str]:
        loaded = set(self.loaded)
        for k in list(loaded):
            loaded.update(self._aliases.get(k, ()))
        return [k for k in self.model_keys if k not in loaded]

    @property
    def unexpected_keys(self) -> List[str]:
        return sorted(self.unexpected)

    def result(self):
        return torch.nn.modules.module._IncompatibleKeys(self.missing_keys, self.unexpected_keys)


@contextlib.contextmanager
def mapped_state_dict_loading(model: torch.nn.Module):
    """Within the block, ``model.load_state_dict(sd, strict=False)`` renames checkpoint keys saved in the
    original format to the model's names (in place copy, same Parameter objects). Yields a
    :class:`LoadReport`, or ``None`` when there is nothing to map."""
    mapping = checkpoint_key_mapping(model)
    if not mapping:
        yield None
        return
    report = LoadReport(model)
    original = model.load_state_dict  # bound method
    model_keys = set(report.model_keys)

    def load_state_dict(state_dict, strict: bool = True, assign: bool = False):
        report.calls += 1
        renamed = {}
        for key, value in state_dict.items():
            target = key if key in model_keys else mapping.get(key, key)
            if target != key:
                report.renamed += 1
            if target in renamed:
                raise RuntimeError(f"checkpoint holds both {key!r} and another name for model parameter {target!r}")
            renamed[target] = value
        result = original(renamed, strict=strict, assign=assign)
        report.loaded.update(k for k in renamed if k in model_keys)
        report.unexpected.update(k for k in renamed if k not in model_keys)
        return result

    model.load_state_dict = load_state_dict  # instance attribute shadows the method for this block only
    try:
        yield report
    finally:
        del model.load_state_dict


class CheckpointNamesMixin:
    """Trainer mixin: load checkpoints saved in the original parameter naming (see the module docstring)
    exactly, and fail loudly when a checkpoint does not match the model at all (some model tensors
    missing *and* some checkpoint tensors unknown: continuing would silently train from the initial
    weights). Only missing keys (e.g. tied weights) or only unexpected ones keep the Trainer's warnings."""

    _win_load_report = None

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        with self._win_mapped_load(self.model if model is None else model):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _load_best_model(self):
        with self._win_mapped_load(self.model):
            return super()._load_best_model()

    @contextlib.contextmanager
    def _win_mapped_load(self, model):
        with mapped_state_dict_loading(model) as report:
            previous, self._win_load_report = self._win_load_report, report
            try:
                yield report
            finally:
                self._win_load_report = previous

    def _issue_warnings_after_load(self, load_result):
        report = self._win_load_report
        if report is not None and report.calls:
            # The caller's lists were computed from the raw checkpoint names (load_sharded_checkpoint does it
            # from the index before loading): use what the mapped load really did.
            load_result = report.result()
        missing, unexpected = list(load_result.missing_keys), list(load_result.unexpected_keys)
        if missing and unexpected:
            raise RuntimeError(
                f"the checkpoint does not match the model: {len(missing)} model tensors are not in it "
                f"(e.g. {missing[:3]}) and {len(unexpected)} of its tensors are unknown to the model "
                f"(e.g. {unexpected[:3]}); resuming would continue from the initial weights of the missing ones"
            )
        return super()._issue_warnings_after_load(load_result)


class OptimizerResumeLogMixin:
    """Trainer mixin: after the Trainer loads ``optimizer.pt`` on resume, log what the Win optimizer's
    ``load_state_dict`` did (its ``last_load_report``): at INFO when loaded as saved, at WARNING when it
    converted the state (a checkpoint of another acceleration_mode or of torch.optim). Refusals raise
    from ``load_state_dict`` itself, before training starts. The report is also kept in
    ``self.win_optimizer_resume``."""

    win_optimizer_resume = None

    def _load_optimizer_and_scheduler(self, checkpoint):
        from .optim import Win, WinOptimizer

        inner = getattr(self.optimizer, "optimizer", self.optimizer)
        ours = isinstance(inner, (WinOptimizer, Win))
        if ours:
            inner.last_load_report = None
        result = super()._load_optimizer_and_scheduler(checkpoint)
        report = getattr(inner, "last_load_report", None) if ours else None
        if report is not None:
            groups = inner.param_groups
            now = (f" Now: acceleration_mode {'/'.join(sorted({g['acceleration_mode'] for g in groups}))}, "
                   f"reckless_steps {'/'.join(sorted({str(tuple(g['reckless_steps'])) for g in groups}))}.")
            self.win_optimizer_resume = report + now
            level = logging.INFO if "loaded as saved" in report else logging.WARNING
            logger.log(level, "hf_win optimizer state from %s: %s", checkpoint, self.win_optimizer_resume)
        return result
