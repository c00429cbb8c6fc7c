"""Single-process checks of what the optimizers do on sharded parameters, emulating exactly what DeepSpeed
ZeRO does to a client optimizer (the multi-process tests run the real thing):

- stage 1/2: each param group's parameters become one flattened fp32 partition, and ``step()`` is called
  once per group with ``optimizer.param_groups`` narrowed to that group;
- stage 3: ``step()`` is called once per sub-group with that group's ``params = [partition]`` and every
  other group's ``params = []``.
"""

import pytest
import torch

from hf_win.optim import LAMB, Adan, AdamW
from hf_win.optim._sharding import ShardingError


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3))


def _groups(model, wd=0.1):
    return [
        {"params": [p for p in model.parameters() if p.ndim == 2], "weight_decay": wd},
        {"params": [p for p in model.parameters() if p.ndim == 1], "weight_decay": 0.0},
    ]


def _grads(model, step):
    g = torch.Generator().manual_seed(100 + step)
    return [torch.randn(p.shape, generator=g) for p in model.parameters()]


def _reference(cls, kwargs, steps):
    model = _model()
    opt = cls(_groups(model, kwargs.get("weight_decay", 0.1)), **kwargs)
    for s in range(steps):
        for p, g in zip(model.parameters(), _grads(model, s)):
            p.grad = g
        opt.step()
    return torch.cat([p.detach().flatten() for grp in _groups(model) for p in grp["params"]])


def _flattened(cls, kwargs, steps, stage):
    """The same training with each group flattened into one partition, stepped the way ZeRO does."""
    model = _model()
    opt = cls(_groups(model, kwargs.get("weight_decay", 0.1)), **kwargs)
    groups = _groups(model)
    flats = [torch.cat([p.detach().flatten() for p in g["params"]]).clone() for g in groups]
    for s in range(steps):
        grads = dict(zip(map(id, model.parameters()), _grads(model, s)))
        for flat, g in zip(flats, groups):
            flat.grad = torch.cat([grads[id(p)].flatten() for p in g["params"]])
        if stage in (1, 2):
            original = opt.param_groups
            for i, flat in enumerate(flats):
                original[i]["params"] = [flat]
            for i in range(len(flats)):
                opt.param_groups = [original[i]]
                opt.step()
            opt.param_groups = original
        else:
            for i, flat in enumerate(flats):
                for j, group in enumerate(opt.param_groups):
                    group["params"] = [flat] if j == i else []
                opt.step()
    return torch.cat(flats)


@pytest.mark.parametrize("stage", [1, 3])
@pytest.mark.parametrize("cls,kwargs", [
    (Adan, dict(lr=1e-2, acceleration_mode="win2")),   # step count in the group
    (AdamW, dict(lr=1e-2, acceleration_mode="win")),   # step count per parameter
    (LAMB, dict(lr=1e-2, weight_decay=0.0, max_grad_norm=0.0)),  # no trust ratio: element-wise only
])
def test_flattened_partitions_give_the_same_parameters(cls, kwargs, stage):
    ref = _reference(cls, kwargs, steps=3)
    got = _flattened(cls, kwargs, steps=3, stage=stage)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-6)


@pytest.mark.parametrize("stage", [1, 3])
def test_lamb_trust_ratio_on_partitions_is_refused_before_any_state(stage):
    with pytest.raises(ShardingError, match=r"trust ratio.*flattened partitions.*FSDP2"):
        _flattened(LAMB, dict(lr=1e-2, weight_decay=0.01, max_grad_norm=0.0), steps=1, stage=stage)
    # always_adapt uses the ratio even without weight decay
    with pytest.raises(ShardingError, match="trust ratio"):
        _flattened(LAMB, dict(lr=1e-2, weight_decay=0.0, always_adapt=True, max_grad_norm=0.0), steps=1, stage=stage)


@pytest.mark.parametrize("cls", [AdamW, LAMB])
def test_own_clipping_on_partitions_is_refused(cls):
    with pytest.raises(ShardingError, match=r"max_grad_norm=1.0.*partition.*gradient_clipping"):
        _flattened(cls, dict(lr=1e-2, weight_decay=0.0, max_grad_norm=1.0), steps=1, stage=1)


def test_refusal_touches_no_state():
    model = _model()
    opt = LAMB(model.parameters(), lr=1e-2)  # weight_decay 0.01 -> trust ratio
    flat = torch.cat([p.detach().flatten() for p in model.parameters()]).clone()
    flat.grad = torch.ones_like(flat)
    before = flat.clone()
    opt.param_groups[0]["params"] = [flat]
    with pytest.raises(ShardingError):
        opt.step()
    assert len(opt.state) == 0 and "step" not in opt.param_groups[0]
    assert torch.equal(flat, before)


def test_own_parameters_and_clipping_are_fine_unsharded():
    model = _model()
    opt = LAMB(model.parameters(), lr=1e-2)  # trust ratio and clipping on, whole parameters: allowed
    for p, g in zip(model.parameters(), _grads(model, 0)):
        p.grad = g
    opt.step()
    assert opt.param_groups[0]["step"] == 1


def test_resume_on_flattened_partitions_keeps_per_partition_step_counts():
    """DeepSpeed restores a ZeRO checkpoint with optimizer.load_state_dict() on the flattened partitions;
    the optimizer must still treat them as partitions (Adan's step count lives in their state then)."""
    kwargs = dict(lr=1e-2, acceleration_mode="win2")

    def fresh():
        model = _model()
        opt = Adan(_groups(model), **kwargs)
        flats = [torch.cat([p.detach().flatten() for p in g["params"]]).clone() for g in _groups(model)]
        for group, flat in zip(opt.param_groups, flats):
            group["params"] = [flat]
        return model, opt, flats

    def step(model, opt, flats, s):
        grads = dict(zip(map(id, model.parameters()), _grads(model, s)))
        for flat, g in zip(flats, _groups(model)):
            flat.grad = torch.cat([grads[id(p)].flatten() for p in g["params"]])
        opt.step()

    model, opt, flats = fresh()
    for s in range(3):
        step(model, opt, flats, s)
    uninterrupted = torch.cat(flats)

    model, opt, flats = fresh()
    step(model, opt, flats, 0)
    saved_state, saved_flats = opt.state_dict(), [f.detach().clone() for f in flats]
    model, opt, flats = fresh()
    for f, saved in zip(flats, saved_flats):
        f.data.copy_(saved)
    opt.load_state_dict(saved_state)
    for s in (1, 2):
        step(model, opt, flats, s)
    assert torch.equal(torch.cat(flats), uninterrupted)
    torch.testing.assert_close(uninterrupted, _reference(Adan, kwargs, steps=3), rtol=0, atol=1e-6)
