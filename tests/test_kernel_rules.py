"""The rules a direction's author relies on when the step runs as a kernel (docs/extending.md): what the
trace reads from ``self`` and from the param group is part of the kernel's key or an input of every call,
and what it cannot see is refused with the optimizer and the access named, never baked in silently.
Each case is checked against the same optimizer on foreach (C kernel; Triton's interpreter for one)."""

import logging

import pytest
import torch

import hf_win
from hf_win.optim import kernels

pytestmark = pytest.mark.usefixtures("fresh_kernel_cache")  # each test: its own cache folder, no kernel loaded


class Scaled(hf_win.AdamW):
    """AdamW whose direction is scaled by an instance attribute (as docs/extending.md shows)."""

    def __init__(self, params, scale, **kw):
        super().__init__(params, **kw)
        self.scale = scale

    def _direction(self, ops, group, params, grads, states, steps):
        u = super()._direction(ops, group, params, grads, states, steps)
        ops.mul_(u, self.scale)
        return u


class ItemsScaled(hf_win.AdamW):
    """AdamW scaled by a kept group key, read through ``group.items()``."""

    def _direction(self, ops, group, params, grads, states, steps):
        u = super()._direction(ops, group, params, grads, states, steps)
        scale = dict(group.items()).get("scale", 1.0)
        ops.mul_(u, scale)
        if len(group) and "scale" in list(group):  # len() and iteration see the group's keys too
            ops.mul_(u, 1.0)
        return u


class Lerped(hf_win.AdamW):
    """AdamW whose direction is interpolated towards the gradient by a group key (``ops.lerp_``)."""

    def _direction(self, ops, group, params, grads, states, steps):
        u = super()._direction(ops, group, params, grads, states, steps)
        ops.lerp_(u, grads, group["towards_grad"])
        return u


def _run(make, steps=3, shapes=((5, 3), (4,)), between=None):
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    opt = make(params)
    for k in range(steps):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
        if between:
            between(opt, k)
    return [p.detach().clone() for p in params], opt


def _close(got, ref):
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["c", "triton"])
def test_instances_with_different_attributes_each_get_their_own_numbers(backend, monkeypatch):
    monkeypatch.setenv("HF_WIN_FUSED_BACKEND", backend)
    for scale in (0.5, 3.0):  # one process, one class: the second must not run the first one's numbers
        got, opt = _run(lambda ps: Scaled(ps, scale, weight_decay=0.1))
        ref, _ = _run(lambda ps: Scaled(ps, scale, weight_decay=0.1, foreach=True))
        assert opt.step_path() == f"{backend} kernel"
        _close(got, ref)
    assert kernels.counters()["kernels"] == 1  # the attribute is an input of the kernel, not a constant


def test_an_attribute_changed_between_steps_is_read_at_every_step(monkeypatch):
    monkeypatch.setenv("HF_WIN_FUSED_BACKEND", "c")

    def schedule(opt, k):
        opt.scale = 0.25 * (k + 2)

    got, opt = _run(lambda ps: Scaled(ps, 1.0), steps=4, between=schedule)
    ref, _ = _run(lambda ps: Scaled(ps, 1.0, foreach=True), steps=4, between=schedule)
    assert opt.step_path() == "c kernel" and kernels.counters()["kernels"] == 1
    _close(got, ref)


@pytest.mark.parametrize("scale", [0.5, 3.0])
def test_a_group_key_read_through_items_len_and_iteration_is_seen(scale, monkeypatch):
    monkeypatch.setenv("HF_WIN_FUSED_BACKEND", "c")
    got, opt = _run(lambda ps: ItemsScaled([{"params": ps, "scale": scale}]))
    ref, _ = _run(lambda ps: ItemsScaled([{"params": ps, "scale": scale}], foreach=True))
    assert opt.step_path() == "c kernel"
    _close(got, ref)


def test_a_group_that_gains_a_key_read_by_iteration_is_another_kernel(monkeypatch):
    monkeypatch.setenv("HF_WIN_FUSED_BACKEND", "c")
    _run(lambda ps: ItemsScaled(ps))
    got, _ = _run(lambda ps: ItemsScaled([{"params": ps, "scale": 2.0}]))
    ref, _ = _run(lambda ps: ItemsScaled([{"params": ps, "scale": 2.0}], foreach=True))
    _close(got, ref)
    assert kernels.counters()["kernels"] == 2


class ReadsADict(hf_win.AdamW):
    def __init__(self, params, **kw):
        super().__init__(params, **kw)
        self.table = {"scale": 2.0}

    def _direction(self, ops, group, params, grads, states, steps):
        u = super()._direction(ops, group, params, grads, states, steps)
        ops.mul_(u, self.table["scale"])
        return u


class WritesItself(hf_win.AdamW):
    def _direction(self, ops, group, params, grads, states, steps):
        self.calls = getattr(self, "calls", 0) + 1
        return super()._direction(ops, group, params, grads, states, steps)


class WritesTheGroup(hf_win.AdamW):
    def _direction(self, ops, group, params, grads, states, steps):
        group["seen"] = True
        return super()._direction(ops, group, params, grads, states, steps)


class CountsTheGroupsTensors(hf_win.AdamW):
    def _direction(self, ops, group, params, grads, states, steps):
        u = super()._direction(ops, group, params, grads, states, steps)
        ops.mul_(u, 1.0 / len(group["params"]))
        return u


@pytest.mark.parametrize("cls, access", [(ReadsADict, "reads self.table"), (WritesItself, "writes self.calls"),
                                         (WritesTheGroup, "writes group['seen']"),
                                         (CountsTheGroupsTensors, "uses group['params']")])
def test_what_the_trace_cannot_see_is_refused_naming_the_optimizer_and_the_access(cls, access, monkeypatch, caplog):
    monkeypatch.setenv("HF_WIN_FUSED_BACKEND", "c")
    with caplog.at_level(logging.WARNING, logger="hf_win.kernels"):
        got, opt = _run(lambda ps: cls(ps))
    ref, _ = _run(lambda ps: cls(ps, foreach=True))
    _close(got, ref)
    path = opt.step_path()
    assert path.startswith("foreach (") and cls.__name__ in path and access in path
    assert len([r for r in caplog.records if access in r.getMessage()]) == 1


@pytest.mark.parametrize("env, flags, path", [("auto", {}, "c kernel"), ("auto", {"foreach": True}, "foreach"),
                                              ("foreach", {}, "foreach (HF_WIN_FUSED_BACKEND=foreach)")])
def test_the_path_reported_before_the_first_step_is_the_path_taken(env, flags, path, monkeypatch):
    monkeypatch.setenv("HF_WIN_FUSED_BACKEND", env)
    p = torch.nn.Parameter(torch.randn(4))
    opt = hf_win.AdamW([p], **flags)
    before = opt.step_path()
    p.grad = torch.ones_like(p)
    opt.step()
    assert before == opt.step_path() == path


@pytest.mark.parametrize("backend", ["c", "triton"])
def test_lerp_follows_torchs_two_formulas_on_both_sides_of_one_half(backend, monkeypatch):
    # the tracer spells torch's lerp: x + w*(y - x) below |w| = 0.5, y - (y - x)*(1 - w) from there (a guard)
    monkeypatch.setenv("HF_WIN_FUSED_BACKEND", backend)
    for weight in (0.25, 0.75):
        got, opt = _run(lambda ps: Lerped([{"params": ps, "towards_grad": weight}]))
        ref, _ = _run(lambda ps: Lerped([{"params": ps, "towards_grad": weight}], foreach=True))
        assert opt.step_path() == f"{backend} kernel"
        _close(got, ref)
    assert kernels.counters()["kernels"] == 2  # one per branch: the weight's side of 0.5 is the guard
