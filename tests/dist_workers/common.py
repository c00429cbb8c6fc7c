"""Shared pieces of the multi-process tests: a tiny deterministic model, its data, the optimizer set-up,
and the single-process reference that every multi-process run is compared with.

Imported both by the pytest process (the reference) and by the launched workers (``torchrun`` /
``accelerate launch`` put this directory on ``sys.path`` as the script's own directory).
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from hf_win.registry import available_optimizers, get_optimizer_spec

IN, HIDDEN, OUT = 8, 32, 4
STEPS = 4            # optimizer steps per run
GLOBAL_BATCH = 8     # samples per optimizer step, all processes together
LR = 1e-2
WEIGHT_DECAY = 0.1
MODES = ("win", "win2")
CLIP = 0.3  # max_grad_norm where clipping is on: below the gradient norms here (0.59-0.75), so it acts
TRAINER_MAX_GRAD_NORM = CLIP  # the Trainer's own clipping (the optimizer's is 0 under the Trainer)


class TinyNet(nn.Module):
    """Linear -> LayerNorm -> Tanh -> Linear -> Tanh -> Linear. Biases and the LayerNorm weight go into the
    no-decay group (as the Trainer does), so both parameter groups are exercised. Several equal-sized
    hidden layers so that sharding a whole-parameter optimizer state (ZeroRedundancyOptimizer) balances."""

    def __init__(self):
        super().__init__()
        # DeepSpeed "auto" bucket sizes are filled from config.hidden_size by the Trainer, as for HF models.
        from transformers import PretrainedConfig

        self.config = PretrainedConfig(hidden_size=HIDDEN)
        self.inp = nn.Linear(IN, HIDDEN)
        self.norm = nn.LayerNorm(HIDDEN)
        self.h1 = nn.Linear(HIDDEN, HIDDEN)
        self.h2 = nn.Linear(HIDDEN, HIDDEN)
        self.out = nn.Linear(HIDDEN, OUT)

    def forward(self, x, labels=None):
        h = torch.tanh(self.norm(self.inp(x)))
        h = torch.tanh(self.h1(h))
        h = torch.tanh(self.h2(h))
        logits = self.out(h)
        loss = None if labels is None else nn.functional.cross_entropy(logits, labels)
        return {"loss": loss, "logits": logits}


def make_model(seed: int = 0) -> TinyNet:
    torch.manual_seed(seed)
    return TinyNet()


def make_data(n: int = STEPS * GLOBAL_BATCH, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, IN, generator=g)
    labels = torch.randint(0, OUT, (n,), generator=g)
    return x, labels


def combos(names=None):
    """(registry name, mode) pairs; names default to hf_win's own registry optimizers (the Win(base) names,
    whose step is their base's, are not run across processes here)."""
    own = [n for n in available_optimizers() if not get_optimizer_spec(n).wraps_base]
    return [(name, mode) for name in (names or own) for mode in MODES]


def optimizer_kwargs(name: str, mode: str, max_grad_norm: float = 0.0) -> dict:
    kw = dict(lr=LR, acceleration_mode=mode, max_grad_norm=max_grad_norm)
    if "weight_decay" in get_optimizer_spec(name).accepted_keys:
        kw["weight_decay"] = WEIGHT_DECAY
    return kw


def param_groups(model: nn.Module, weight_decay: float = WEIGHT_DECAY):
    """Decay on matrices, none on biases and LayerNorm weights (the Trainer's split)."""
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


@functools.lru_cache(maxsize=None)
def reference_params(name: str, mode: str, max_grad_norm: float = 0.0, steps: int = STEPS):
    """One process, the whole global batch each step: the answer every distributed run must give
    (cached: callers must not modify the returned tensors)."""
    model = make_model()
    spec = get_optimizer_spec(name)
    opt = spec.cls(param_groups(model), **optimizer_kwargs(name, mode, max_grad_norm))
    x, labels = make_data()
    for step in range(steps):
        sl = slice(step * GLOBAL_BATCH, (step + 1) * GLOBAL_BATCH)
        opt.zero_grad(set_to_none=True)
        model(x[sl], labels[sl])["loss"].backward()
        opt.step()
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def max_abs_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys(), (sorted(a), sorted(b))
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


@functools.lru_cache(maxsize=None)
def trainer_reference(name: str, mode: str, steps: int = STEPS):
    """One process, a plain loop, the optimizer ``WinTrainer`` builds for these arguments (from
    ``hf_win.get_optimizer_cls_and_kwargs``), the Trainer's decay / no-decay groups and its gradient
    clipping (``max_grad_norm`` on the whole gradient): what every ``WinTrainer`` run must give."""
    import tempfile

    from hf_win import WinTrainingArguments, get_optimizer_cls_and_kwargs

    with tempfile.TemporaryDirectory() as out:
        args = WinTrainingArguments(output_dir=out, optim=name, acceleration_mode=mode, learning_rate=LR,
                                    weight_decay=WEIGHT_DECAY, use_cpu=True, report_to="none")
        cls, kwargs = get_optimizer_cls_and_kwargs(args)
    model = make_model()
    opt = cls(param_groups(model, kwargs.get("weight_decay", WEIGHT_DECAY)), **kwargs)
    x, labels = make_data()
    for step in range(steps):
        sl = slice(step * GLOBAL_BATCH, (step + 1) * GLOBAL_BATCH)
        opt.zero_grad(set_to_none=True)
        model(x[sl], labels[sl])["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), TRAINER_MAX_GRAD_NORM)
        opt.step()
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@functools.lru_cache(maxsize=None)
def trainer_reference_per_shard_norms(name: str, mode: str, shards: int = 2, steps: int = STEPS):
    """As :func:`trainer_reference`, but every parameter is split along dim 0 into ``shards`` pieces (the
    pieces FSDP2 gives each process) and the optimizer steps the pieces as separate parameters: what a
    sharded run would give if per-parameter norms (LAMB's trust ratio) were taken over the local shard
    only. The model's forward sees the concatenated pieces; clipping is over all pieces (the whole gradient)."""
    import tempfile

    from hf_win import WinTrainingArguments, get_optimizer_cls_and_kwargs

    with tempfile.TemporaryDirectory() as out:
        args = WinTrainingArguments(output_dir=out, optim=name, acceleration_mode=mode, learning_rate=LR,
                                    weight_decay=WEIGHT_DECAY, use_cpu=True, report_to="none")
        cls, kwargs = get_optimizer_cls_and_kwargs(args)
    model = make_model()
    pieces = {n: [c.detach().clone().requires_grad_(True) for c in p.chunk(shards, dim=0)]
              for n, p in model.named_parameters()}
    decay = [c for n, cs in pieces.items() for c in cs if cs[0].ndim >= 2]
    no_decay = [c for n, cs in pieces.items() for c in cs if cs[0].ndim < 2]
    opt = cls([{"params": decay, "weight_decay": kwargs.get("weight_decay", WEIGHT_DECAY)},
               {"params": no_decay, "weight_decay": 0.0}], **kwargs)
    x, labels = make_data()
    for step in range(steps):
        sl = slice(step * GLOBAL_BATCH, (step + 1) * GLOBAL_BATCH)
        opt.zero_grad(set_to_none=True)
        full = {n: torch.cat(cs, dim=0) for n, cs in pieces.items()}
        torch.func.functional_call(model, full, (x[sl], labels[sl]))["loss"].backward()
        torch.nn.utils.clip_grad_norm_(decay + no_decay, TRAINER_MAX_GRAD_NORM)
        opt.step()
    return {n: torch.cat(cs, dim=0).detach().clone() for n, cs in pieces.items()}


def param_count() -> int:
    return sum(p.numel() for p in make_model().parameters())


def buffers(name: str, mode: str) -> int:
    return get_optimizer_spec(name).cls.buffers_per_parameter(mode)
