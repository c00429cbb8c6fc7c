"""WinTrainer builds the requested Win optimizer, with the Trainer's parameter groups, and trains."""

from __future__ import annotations

import logging
import warnings

import pytest
import torch
from transformers import Trainer, TrainingArguments

import hf_win
from hf_win import OPTIMIZERS, WinTrainer, WinTrainingArguments, get_optimizer_cls_and_kwargs
from trainer_testing import TinyImages, base_args, fast_cpu, tiny_vit  # noqa: F401 (fixture)

pytestmark = pytest.mark.usefixtures("fast_cpu")

MODES = ("win", "win2", "none")


def _inner(opt):
    return getattr(opt, "optimizer", opt)


#: hf_win's own optimizers; the Win(base) names (no optimizer clipping, decay integrated per group under another
#: key) train under the Trainer in test_wrapped_optimizers.py.
OWN = [name for name, spec in OPTIMIZERS.items() if not spec.wraps_base]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", OWN)
def test_every_registry_optimizer_trains_under_trainer(tmp_path, name, mode, caplog):
    # Linear warmup from lr 0: the first Win step has lr == 0 (the public code divides by zero there).
    betas = {} if name == "sgd_win" else dict(adam_beta1=0.85, adam_beta2=0.95)
    args = WinTrainingArguments(**base_args(tmp_path, optim=name, acceleration_mode=mode, warmup_steps=2, **betas))
    model = tiny_vit()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = WinTrainer(model=model, args=args, train_dataset=TinyImages())
    with caplog.at_level(logging.INFO, logger="transformers.trainer"):
        trainer.train()
    opt = _inner(trainer.optimizer)
    assert type(opt) is OPTIMIZERS[name].cls
    assert trainer.state.global_step == 3
    assert trainer.state.log_history[0]["learning_rate"] == 0.0

    decay = set(trainer.get_decay_parameter_names(model))
    names = {id(p): n for n, p in model.named_parameters()}
    assert len(opt.param_groups) == 2
    seen = set()
    for group in opt.param_groups:
        assert group["acceleration_mode"] == mode
        assert group["initial_lr"] == pytest.approx(1e-2)
        assert group["max_grad_norm"] == 0.0  # the Trainer clips, not the optimizer
        assert tuple(group["reckless_steps"]) == (2.0, 8.0)
        if "betas" in group:
            assert tuple(group["betas"][:2]) == (0.85, 0.95)
        group_names = {names[id(p)] for p in group["params"]}
        seen |= group_names
        expect_wd = 0.05 if group_names <= decay else 0.0
        assert group_names <= decay or not (group_names & decay)
        assert group["weight_decay"] == expect_wd
    assert seen == set(names.values())
    assert any(n.endswith("bias") for n in seen - decay) and any("layernorm" in n for n in seen - decay)

    # Parameters moved and stay finite; the Win state is there for every stepped parameter.
    moved = [n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])]
    assert len(moved) > len(before) // 2
    assert all(torch.isfinite(p).all() for p in model.parameters())
    extra = {"win": {"x"}, "win2": {"x", "y"}, "none": set()}[mode]
    for p in model.parameters():
        keys = set(opt.state[p])
        assert extra <= keys and (mode == "win2" or "y" not in keys) and (mode != "none" or "x" not in keys)

    # Logged once at train start: name, mode, reckless steps, state memory.
    msgs = [r.getMessage() for r in caplog.records if r.getMessage().startswith("hf_win optimizer:")
            and "first step took" not in r.getMessage()]
    assert len(msgs) == 1
    assert name in msgs[0] and f"acceleration_mode={mode}" in msgs[0] and "(2.0, 8.0)" in msgs[0]
    assert trainer.win_optimizer_summary["state_bytes"] == opt.state_bytes()
    # and the path the steps take: on CPU with no path flags, the C kernel (tests/test_kernels.py)
    assert msgs[0].endswith("step: c kernel")
    # and, after the first step, the path the steps actually took
    taken = [r.getMessage() for r in caplog.records if "first step took" in r.getMessage()]
    assert taken == ["hf_win optimizer: the first step took: c kernel"]
    assert trainer.win_optimizer_summary["step_path_taken"] == opt.step_path() == "c kernel"


def test_plain_trainer_with_optimizer_cls_and_kwargs_gives_the_same_optimizer_and_result(tmp_path):
    kw = base_args(tmp_path, optim="adan_win", acceleration_mode="win2", optim_args="beta3=0.95", warmup_steps=1,
                   max_grad_norm=0.5)
    args = WinTrainingArguments(**kw)
    cls, kwargs = get_optimizer_cls_and_kwargs(args)
    assert cls is hf_win.Adan
    assert kwargs["betas"] == (0.9, 0.999, 0.95) and kwargs["max_grad_norm"] == 0.0

    win_model, plain_model = tiny_vit(), tiny_vit()
    t1 = WinTrainer(model=win_model, args=args, train_dataset=TinyImages())
    t1.train()
    t2 = Trainer(model=plain_model, args=WinTrainingArguments(**kw), train_dataset=TinyImages(),
                 optimizer_cls_and_kwargs=(cls, kwargs))
    t2.train()
    o1, o2 = _inner(t1.optimizer), _inner(t2.optimizer)
    assert type(o1) is type(o2)
    for g1, g2 in zip(o1.param_groups, o2.param_groups):
        assert {k: v for k, v in g1.items() if k != "params"} == {k: v for k, v in g2.items() if k != "params"}
        assert [p.shape for p in g1["params"]] == [p.shape for p in g2["params"]]
    for (n, p1), (_, p2) in zip(win_model.named_parameters(), plain_model.named_parameters()):
        assert torch.equal(p1, p2), n


def test_builtin_optimizer_names_still_work(tmp_path):
    args = WinTrainingArguments(**base_args(tmp_path, optim="adamw_torch", max_steps=1))
    cls, kwargs = get_optimizer_cls_and_kwargs(args)
    assert cls is torch.optim.AdamW
    trainer = WinTrainer(model=tiny_vit(), args=args, train_dataset=TinyImages())
    trainer.train()
    assert type(_inner(trainer.optimizer)) is torch.optim.AdamW
    # A plain TrainingArguments goes through Transformers' own mapping.
    cls2, _ = get_optimizer_cls_and_kwargs(TrainingArguments(**base_args(tmp_path, optim="sgd")))
    assert cls2 is torch.optim.SGD


@pytest.mark.parametrize("name", OWN)
def test_optimizer_own_clipping_is_off_and_standard_fields_map(tmp_path, name):
    args = WinTrainingArguments(**base_args(tmp_path, optim=name, learning_rate=0.3, weight_decay=0.2,
                                            adam_epsilon=1e-5 if name != "sgd_win" else 1e-8))
    cls, kwargs = get_optimizer_cls_and_kwargs(args)
    assert cls is OPTIMIZERS[name].cls
    assert kwargs["lr"] == 0.3 and kwargs["weight_decay"] == 0.2 and kwargs["max_grad_norm"] == 0.0
    opt = cls([torch.nn.Parameter(torch.ones(2))], **kwargs)
    assert opt.defaults["max_grad_norm"] == 0.0  # LAMB's constructor default is 1.0
    if name != "sgd_win":
        assert opt.defaults["eps"] == 1e-5


def test_always_adapt_is_reachable_from_the_trainers_optim_args():
    args = WinTrainingArguments(output_dir="x", report_to="none", optim="lamb_win", optim_args="always_adapt=true")
    cls, kw = get_optimizer_cls_and_kwargs(args)
    assert cls is hf_win.LAMB and kw["always_adapt"] is True and kw["weight_decay"] == 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the trust ratio is on: no warning
        opt = cls([torch.nn.Parameter(torch.ones(2))], **kw)
    assert opt.defaults["always_adapt"] is True
    with pytest.raises(ValueError, match=r"capturable is not an --optim_args key"):
        WinTrainingArguments(output_dir="x", report_to="none", optim="adamw_win", optim_args="capturable=true")


def _lion_win():
    """The extension example's optimizer (examples/extending/lion_win.py)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples" / "extending"))
    from lion_win import LionWin

    return LionWin


def test_lion_win_under_the_trainer(tmp_path, caplog):
    LionWin = _lion_win()
    model = tiny_vit()
    before = [p.detach().clone() for p in model.parameters()]
    args = WinTrainingArguments(**base_args(tmp_path, max_steps=2))
    with caplog.at_level(logging.INFO, logger="transformers.trainer"):
        trainer = WinTrainer(model=model, args=args, train_dataset=TinyImages(n=16),
                             optimizer_cls_and_kwargs=(LionWin, {"lr": 1e-3, "weight_decay": 0.1, "acceleration_mode": "win2"}))
        trainer.train()
    inner = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    assert type(inner) is LionWin and trainer.win_optimizer_summary["class"] == "LionWin"
    assert all({"exp_avg", "x", "y"} <= set(inner.state[p]) for p in model.parameters())
    assert any(not torch.equal(p, b) for p, b in zip(model.parameters(), before))
