"""The contract of a ``torch.optim`` optimizer, as torch's ``OptimizerInfo`` tests (test/test_optim.py)
and timm's ``tests/test_optim.py`` check it, written here for the Win optimizers (and for Lion-Win, the
extension example): constructor keywords, lr in param groups only, per-group options, ``maximize``,
complex parameters, state dicts (round trip and resume, deepcopy, pickle, conversions, refusals),
``add_param_group`` after steps, parameters without / with zero gradients, non-contiguous parameters,
torch's and transformers' schedulers changing any hyper-parameter, closures, hooks,
``torch.compile(opt.step)``, Rosenbrock, a small model, every path agreeing with every other.
"""

from __future__ import annotations

import copy
import functools
import io
import pickle
import sys
import warnings
from pathlib import Path

import pytest
import torch

import hf_win
from hf_win import available_optimizers, create_optimizer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples" / "extending"))
from lion_win import LionWin  # noqa: E402

#: The execution paths every contract test runs on. The default is the generated CPU kernel where it
#: applies. Add a path here (e.g. ``"triton": dict(fused=True)``) and every test below runs it too.
PATHS = {"per_tensor": dict(foreach=False), "foreach": dict(foreach=True, fused=False), "default": {}}
NAMES = [n for n in available_optimizers() if not hf_win.get_optimizer_spec(n).wraps_base]  # Win(base): test_wrapper.py
MODES = ("none", "win", "win2")
#: name -> (class, keywords every construction gets): the registry's plus the extension example.
CLASSES = {n: (hf_win.get_optimizer_spec(n).cls, {"lr": 1e-2}) for n in NAMES}
CLASSES["sgd_win"] = (hf_win.SGD, {"lr": 1e-2})
CLASSES["lion_win"] = (LionWin, {"lr": 1e-3})
ALL = list(CLASSES)


def make(name, params, **kw):
    cls, base = CLASSES[name]
    kwargs = dict(base)
    kwargs.update(kw)
    if cls is hf_win.LAMB:
        kwargs.setdefault("max_grad_norm", 0.0)
    return cls(params, **kwargs)


def make_params(seed=0, dtype=torch.float64, shapes=((4, 3), (5,), (2, 3, 2))):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, generator=g, dtype=dtype).requires_grad_(True) for s in shapes]


def clone_params(params):
    return [p.detach().clone().requires_grad_(True) for p in params]


def grads_for(params, t):
    g = torch.Generator().manual_seed(1000 + t)
    return [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in params]


def set_grads(params, grads):
    for p, g in zip(params, grads):
        p.grad = None if g is None else g.clone()


def train(opt, params, steps, start=0):
    for t in range(start, start + steps):
        set_grads(params, grads_for(params, t))
        opt.step()


def assert_params_equal(a, b):
    for p, q in zip(a, b):
        assert torch.equal(p.detach(), q.detach())


def assert_state_dicts_equal(a, b):
    assert a["param_groups"] == b["param_groups"]
    assert a["state"].keys() == b["state"].keys()
    for i in a["state"]:
        assert a["state"][i].keys() == b["state"][i].keys()
        for k, v in a["state"][i].items():
            w = b["state"][i][k]
            assert torch.equal(v, w) if torch.is_tensor(v) else v == w, (i, k)


@pytest.fixture(autouse=True)
def _quiet_lamb():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*trust ratio is never applied")
        yield


# =========================================================================== constructors
@pytest.mark.parametrize("name", ALL)
def test_lr_given_only_in_the_param_groups(name):
    cls, _ = CLASSES[name]
    params, ref = make_params(), make_params()
    opt = cls([{"params": params[:2], "lr": 0.03}, {"params": params[2:], "lr": 0.01}])
    ref_opt = cls([{"params": ref[:2], "lr": 0.03}, {"params": ref[2:]}], lr=0.01)
    assert [g["lr"] for g in opt.param_groups] == [0.03, 0.01]
    train(opt, params, 3)
    train(ref_opt, ref, 3)
    assert_params_equal(params, ref)


def test_sgd_lr_is_required_only_where_a_group_has_none():
    w, b = make_params()[:2]
    with pytest.raises(ValueError, match=r"SGD: lr is required \(param group 0\)"):
        hf_win.SGD([w])
    with pytest.raises(ValueError, match=r"SGD: lr is required \(param group 1\)"):
        hf_win.SGD([{"params": [w], "lr": 0.1}, {"params": [b]}])
    opt = hf_win.SGD([{"params": [w], "lr": 0.1}])
    with pytest.raises(ValueError, match=r"lr is required \(param group 1\)"):
        opt.add_param_group({"params": [b]})
    assert len(opt.param_groups) == 1
    opt.add_param_group({"params": [b], "lr": 0.2})
    assert [g["lr"] for g in opt.param_groups] == [0.1, 0.2]


@pytest.mark.parametrize("name", ALL)
def test_torch_keywords_at_their_defaults_are_accepted_and_kept(name):
    opt = make(name, make_params(), maximize=False, capturable=False, differentiable=False, foreach=None, fused=None)
    for g in opt.param_groups:
        assert (g["maximize"], g["capturable"], g["differentiable"], g["foreach"], g["fused"]) == (False, False, False, None, None)
    assert make(name, make_params(), maximize=True).param_groups[0]["maximize"] is True


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("key, instead", [("capturable", r"torch\.optim\.AdamW or torch\.optim\.Adam with capturable=True"),
                                          ("differentiable", r"torch\.optim\.AdamW\(differentiable=True\)")])
def test_capturable_and_differentiable_true_are_refused_naming_what_to_use(name, key, instead):
    with pytest.raises(ValueError, match=rf"{key}=True is not supported .*use {instead}"):
        make(name, make_params(), **{key: True})
    opt = make(name, make_params()[:1])
    with pytest.raises(ValueError, match=rf"{key} \(param group 1\) must be False"):
        opt.add_param_group({"params": make_params(1)[:1], key: True})
    assert len(opt.param_groups) == 1


@pytest.mark.parametrize("name", ALL)
def test_maximize_must_be_a_bool(name):
    with pytest.raises(ValueError, match=r"maximize must be True or False, got 'yes'"):
        make(name, make_params(), maximize="yes")


# =========================================================================== param-group keys
#: per optimizer: a non-default value for each per-group hyper-parameter
PER_GROUP = {
    "adamw_win": dict(betas=(0.8, 0.99), eps=1e-3, weight_decay=0.3, amsgrad=True, reckless_steps=(1.0, 4.0)),
    "adam_win": dict(betas=(0.8, 0.99), eps=1e-3, weight_decay=0.3, amsgrad=True, reckless_steps=(1.0, 4.0)),
    "lamb_win": dict(betas=(0.8, 0.99), eps=1e-3, weight_decay=0.3, bias_correction=False, grad_averaging=False,
                     trust_clip=True, always_adapt=True, reckless_steps=(1.0, 4.0)),
    "sgd_win": dict(momentum=0.5, dampening=0.2, nesterov=False, weight_decay=0.3, reckless_steps=(1.0, 4.0)),
    "adan_win": dict(betas=(0.9, 0.8, 0.9), eps=1e-3, weight_decay=0.3, reckless_steps=(1.0, 4.0)),
    "lion_win": dict(betas=(0.99, 0.5), weight_decay=0.3, reckless_steps=(1.0, 4.0)),
}
CASES = [(n, k, v) for n, kv in PER_GROUP.items() for k, v in kv.items()]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("name, key, value", CASES, ids=[f"{n}-{k}" for n, k, _ in CASES])
def test_every_per_group_hyper_parameter_takes_effect_in_its_group_only(name, key, value, path):
    base = dict(weight_decay=0.05, acceleration_mode="win2", **PATHS[path])
    if name == "lamb_win" and key == "always_adapt":
        base["weight_decay"] = 0.0
    params = make_params()
    opt = make(name, [{"params": params[:2]}, {"params": params[2:], key: value}], **base)
    alone = clone_params(params)
    alone_opt = make(name, alone[2:], **dict(base, **{key: value}))
    default = clone_params(params)
    default_opt = make(name, default, **base)
    for t in range(4):
        grads = grads_for(params, t)
        for ps, o in ((params, opt), (default, default_opt)):
            set_grads(ps, grads)
            o.step()
        set_grads(alone[2:], grads[2:])
        alone_opt.step()
    torch.testing.assert_close(params[2], alone[2], rtol=1e-12, atol=1e-12)  # honoured in its group
    if key == "amsgrad":  # 4 steps of growing second moments: the maximum is the moment itself
        assert "max_exp_avg_sq" in opt.state[params[2]] and "max_exp_avg_sq" not in opt.state[params[0]]
    else:
        assert not torch.allclose(params[2], default[2])  # ... where it makes a difference
    for p, q in zip(params[:2], default[:2]):  # and not elsewhere
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ALL)
def test_max_grad_norm_per_group_is_refused_unless_it_is_the_constructors(name):
    params = make_params()
    opt = make(name, params[:1], max_grad_norm=1.0)
    with pytest.raises(ValueError, match=r"max_grad_norm \(param group 1\) = 0.5 differs from the constructor's 1.0"):
        opt.add_param_group({"params": params[1:2], "max_grad_norm": 0.5})
    assert len(opt.param_groups) == 1 and not opt.state
    opt.add_param_group({"params": params[1:2], "max_grad_norm": 1.0})
    with pytest.raises(ValueError, match=r"max_grad_norm \(param group 0\) = 2.0 differs"):
        make(name, [{"params": params, "max_grad_norm": 2.0}], max_grad_norm=1.0)


def test_sgd_eps_is_only_the_clippings_so_it_is_one_value():
    with pytest.raises(ValueError, match=r"eps \(param group 0\) = 0.1 differs from the constructor's 1e-08"):
        hf_win.SGD([{"params": make_params(), "eps": 0.1}], lr=0.1)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("name", ALL)
def test_unknown_group_keys_are_kept_and_change_nothing(name, path):
    params, ref = make_params(), make_params()
    opt = make(name, [{"params": params, "name": "backbone", "layer_ids": [0, 1], "lr_scale": 0.5}], **PATHS[path])
    ref_opt = make(name, ref, **PATHS[path])
    train(opt, params, 3)
    train(ref_opt, ref, 3)
    assert_params_equal(params, ref)
    group = opt.state_dict()["param_groups"][0]
    assert (group["name"], group["layer_ids"], group["lr_scale"]) == ("backbone", [0, 1], 0.5)


# =========================================================================== maximize
TORCH_TWINS = {  # hf_win name -> (torch class, shared keywords): mode "none" is the torch optimizer
    "adamw_win": (torch.optim.AdamW, dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.05)),
    # Adam-Win adds eps before the bias correction, torch after: equal with a negligible eps
    "adam_win": (torch.optim.Adam, dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-16, weight_decay=0.05)),
    "sgd_win": (torch.optim.SGD, dict(lr=1e-2, momentum=0.9, nesterov=True, weight_decay=0.05)),
}


def _torch_twin(name, params, **kw):
    cls, shared = TORCH_TWINS[name]
    return cls(params, **shared, **kw)


def _win_twin(name, params, **kw):
    _, shared = TORCH_TWINS[name]
    return make(name, params, acceleration_mode="none", **shared, **kw)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("name", list(TORCH_TWINS))
def test_maximize_matches_torch(name, path):
    ours, theirs = make_params(), make_params()
    opt = _win_twin(name, ours, maximize=True, **PATHS[path])
    ref = _torch_twin(name, theirs, maximize=True, foreach=False)
    for t in range(5):
        grads = grads_for(ours, t)
        set_grads(ours, grads)
        set_grads(theirs, grads)
        opt.step()
        ref.step()
        for p, g in zip(ours, grads):
            assert torch.equal(p.grad, g)  # the gradient is not negated in place
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", ALL)
def test_maximize_steps_as_minimizing_the_negated_gradient(name, mode, path):
    ours, neg = make_params(), make_params()
    opt = make(name, ours, maximize=True, acceleration_mode=mode, weight_decay=0.05, **PATHS[path])
    ref = make(name, neg, acceleration_mode=mode, weight_decay=0.05, **PATHS[path])
    for t in range(4):
        grads = grads_for(ours, t)
        set_grads(ours, grads)
        set_grads(neg, [-g for g in grads])
        opt.step()
        ref.step()
    for p, q in zip(ours, neg):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-12)


# =========================================================================== complex parameters
@pytest.mark.parametrize("name", list(TORCH_TWINS))
def test_complex_parameters_match_torch(name):
    g = torch.Generator().manual_seed(3)
    ours = [torch.randn(4, 3, dtype=torch.complex128, generator=g).requires_grad_(True)]
    theirs = clone_params(ours)
    opt, ref = _win_twin(name, ours), _torch_twin(name, theirs, foreach=False)
    for t in range(5):
        grads = [torch.randn(4, 3, dtype=torch.complex128, generator=g)]
        set_grads(ours, grads)
        set_grads(theirs, grads)
        opt.step()
        ref.step()
    torch.testing.assert_close(ours[0], theirs[0], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", ALL)
def test_complex_parameters_step_as_their_real_view(name, mode, path):
    g = torch.Generator().manual_seed(4)
    shapes = [(4, 3), (5,)]
    cplx = [torch.randn(*s, dtype=torch.complex128, generator=g).requires_grad_(True) for s in shapes]
    real = [torch.view_as_real(c.detach()).clone().requires_grad_(True) for c in cplx]
    opt = make(name, cplx, acceleration_mode=mode, weight_decay=0.05, **PATHS[path])
    ref = make(name, real, acceleration_mode=mode, weight_decay=0.05, **PATHS[path])
    for t in range(4):
        grads = [torch.randn(*s, dtype=torch.complex128, generator=g) for s in shapes]
        set_grads(cplx, grads)
        set_grads(real, [torch.view_as_real(x) for x in grads])
        opt.step()
        ref.step()
    for c, r in zip(cplx, real):
        torch.testing.assert_close(torch.view_as_real(c.detach()), r.detach(), rtol=1e-12, atol=1e-12)


# =========================================================================== state dicts
def _closure(opt, params, t):
    def closure():
        opt.zero_grad()
        loss = sum(((p - 0.1 * t) ** 2 * (i + 1)).sum() for i, p in enumerate(params))
        loss.backward()
        return loss
    return closure


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", ALL)
def test_state_dict_round_trip_deepcopy_pickle_and_reload_mid_run_are_bitwise(name, mode, path):
    # timm's _test_state_dict / torch's test_state_dict_deterministic, with a bitwise comparison: a run
    # resumed from state_dict() (in memory, through torch.save/torch.load, deepcopy, pickle) continues
    # bitwise as the uninterrupted one, global-norm clipping on
    kw = dict(acceleration_mode=mode, weight_decay=0.05, max_grad_norm=1.0, **PATHS[path])
    params = make_params()
    opt = make(name, [{"params": params[:2]}, {"params": params[2:], "lr": 3e-3}], **kw)
    for t in range(4):
        opt.step(_closure(opt, params, t))
    saved = opt.state_dict()
    untouched = copy.deepcopy(saved)
    buf = io.BytesIO()
    torch.save(saved, buf)
    buf.seek(0)
    from_disk = torch.load(buf, weights_only=True)

    copies = []
    for how in ("load_state_dict", "torch.load", "deepcopy", "pickle"):
        q = clone_params(params)
        if how in ("deepcopy", "pickle"):
            c = copy.deepcopy(opt) if how == "deepcopy" else pickle.loads(pickle.dumps(opt))
            q = [p for g in c.param_groups for p in g["params"]]
            assert type(c) is type(opt) and c.defaults.items() >= opt.defaults.items()
        else:
            c = make(name, [{"params": q[:2]}, {"params": q[2:], "lr": 3e-3}], **kw)
            c.load_state_dict(copy.deepcopy(saved) if how == "load_state_dict" else from_disk)
            assert "loaded as saved" in c.last_load_report
        copies.append((c, q))
    assert_state_dicts_equal(saved, untouched)  # loading does not modify what it is given
    for t in range(4, 8):
        opt.step(_closure(opt, params, t))
        for c, q in copies:
            c.step(_closure(c, q, t))
            assert_params_equal(params, q)
    for c, _ in copies:
        assert_state_dicts_equal(opt.state_dict(), c.state_dict())
    # deepcopy copies all public attributes (torch's test_deepcopy_copies_all_public_attrs)
    public = lambda o: {k for k in o.__dict__ if not k.startswith("_")}  # noqa: E731
    assert public(opt) == public(copy.deepcopy(opt))


@pytest.mark.parametrize("name", ALL)
def test_zero_grad_to_none_then_a_step_without_gradients_moves_nothing(name):
    params = make_params()
    opt = make(name, params, acceleration_mode="win2", weight_decay=0.05)
    train(opt, params, 2)
    opt.zero_grad(set_to_none=True)
    assert all(p.grad is None for p in params)
    before = clone_params(params)
    opt.step()  # no gradients: nothing moves, nothing fails
    assert_params_equal(params, before)


def _torch_to_win(name, mode, steps=3):
    """A torch optimizer trained ``steps`` steps, its state dict, and the parameters (cloned)."""
    params = make_params()
    ref = _torch_twin(name, params, foreach=False)
    train(ref, params, steps)
    return ref, params, copy.deepcopy(ref.state_dict())  # load_state_dict keeps the tensors it is given


@pytest.mark.parametrize("name", list(TORCH_TWINS))
def test_torch_state_dict_is_converted_and_mode_none_continues_as_torch(name):
    ref, params, sd = _torch_to_win(name, "none")
    ours = clone_params(params)
    opt = _win_twin(name, ours)
    with pytest.warns(UserWarning, match=rf"converted a torch\.optim\.{TORCH_TWINS[name][0].__name__} state dict"):
        opt.load_state_dict(sd)
    assert isinstance(opt.param_groups[0]["maximize"], bool) and opt.param_groups[0]["acceleration_mode"] == "none"
    train(ref, params, 3, start=3)
    train(opt, ours, 3, start=3)
    for p, q in zip(ours, params):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("mode", ("win", "win2"))
@pytest.mark.parametrize("name", list(TORCH_TWINS))
def test_torch_state_dict_into_win_starts_the_sequences_from_the_parameters(name, mode):
    _, params, sd = _torch_to_win(name, mode)
    ours = clone_params(params)
    opt = make(name, ours, acceleration_mode=mode)
    with pytest.warns(UserWarning, match="Win sequences start from the current parameters"):
        opt.load_state_dict(sd)
    for p in ours:
        st = opt.state[p]
        for k in ("x", "y") if mode == "win2" else ("x",):
            assert torch.equal(st[k], p.detach()) and st[k].data_ptr() != p.data_ptr()
        assert isinstance(st["step"], int)
    train(opt, ours, 2, start=3)  # steps with the converted groups (a torch state dict has no Win keys)
    assert all(torch.isfinite(p).all() for p in ours)


@pytest.mark.parametrize("torch_cls, target, message", [
    (torch.optim.Adam, "adamw_win", r"torch\.optim\.Adam state dict; AdamW converts torch\.optim\.AdamW only"),
    (torch.optim.AdamW, "adam_win", r"torch\.optim\.AdamW state dict; Adam converts torch\.optim\.Adam only"),
    (torch.optim.SGD, "adamw_win", r"torch\.optim\.SGD state dict; AdamW converts torch\.optim\.AdamW only"),
    (torch.optim.AdamW, "lamb_win", r"torch\.optim\.AdamW state dict; LAMB converts no torch\.optim state dict"),
    (torch.optim.RMSprop, "adamw_win", r"not from an hf_win optimizer nor from a torch\.optim class it converts"),
])
def test_other_torch_state_dicts_are_refused_before_anything_is_loaded(torch_cls, target, message):
    params = make_params()
    ref = torch_cls(params, lr=1e-2)
    train(ref, params, 2)
    opt = make(target, clone_params(params))
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match=message):
        opt.load_state_dict(ref.state_dict())
    assert_state_dicts_equal(opt.state_dict(), before)


@pytest.mark.parametrize("source, target", [("sgd_win", "adamw_win"), ("adam_win", "adamw_win"),
                                            ("adamw_win", "adam_win"), ("adan_win", "lamb_win")])
def test_another_hf_win_class_is_refused_naming_both(source, target):
    params = make_params()
    src = make(source, params)
    train(src, params, 2)
    opt = make(target, clone_params(params))
    s, t = CLASSES[source][0].__name__, CLASSES[target][0].__name__
    with pytest.raises(ValueError, match=rf"saved by hf_win {s}, and this optimizer is {t}"):
        opt.load_state_dict(src.state_dict())
    assert not opt.state


def test_a_state_missing_a_buffer_or_holding_a_foreign_one_is_refused():
    params = make_params()
    src = make("adamw_win", params)
    train(src, params, 2)
    sd = src.state_dict()
    del sd[hf_win.optim._state_dict.MARK]  # as the authors' code writes it
    broken = copy.deepcopy(sd)
    del broken["state"][0]["exp_avg_sq"]
    with pytest.raises(ValueError, match=r"has no \['exp_avg_sq'\]"):
        make("adamw_win", clone_params(params)).load_state_dict(broken)
    with pytest.raises(ValueError, match=r"holds \['exp_avg', 'exp_avg_sq'\], which SGD does not keep"):
        make("sgd_win", clone_params(params)).load_state_dict(sd)
    with pytest.raises(ValueError, match=r"has no \['max_exp_avg_sq'\].*amsgrad=True"):
        amsgrad = copy.deepcopy(sd)
        for g in amsgrad["param_groups"]:
            g["amsgrad"] = True
        make("adamw_win", clone_params(params)).load_state_dict(amsgrad)


@pytest.mark.parametrize("saved, built", [("win", "win2"), ("win2", "win"), ("win2", "none"), ("none", "win")])
@pytest.mark.parametrize("name", ["adamw_win", "lamb_win"])
def test_another_acceleration_mode_is_converted_to_the_built_one_with_a_warning(name, saved, built):
    params = make_params()
    src = make(name, params, acceleration_mode=saved)
    train(src, params, 3)
    sd = src.state_dict()
    ours = clone_params(params)
    opt = make(name, ours, acceleration_mode=built)
    with pytest.warns(UserWarning, match=rf"saved with acceleration_mode='{saved}' and this optimizer was built with '{built}'"):
        opt.load_state_dict(sd)
    assert {g["acceleration_mode"] for g in opt.param_groups} == {built}
    assert "acceleration_mode='%s'" % saved in opt.last_load_report
    for p, q in zip(ours, params):
        st = opt.state[p]
        want = {"none": set(), "win": {"x"}, "win2": {"x", "y"}}[built]
        assert want == {k for k in st if k in ("x", "y")}
        for k in want:  # kept where the checkpoint had it, else the current parameter
            expected = src.state[q][k] if k in src.state[q] else p.detach()
            assert torch.equal(st[k], expected)
        for k in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(st[k], src.state[q][k])
    train(opt, ours, 2, start=3)


def test_a_checkpoints_other_max_grad_norm_is_replaced_by_the_constructors_with_a_warning():
    params = make_params()
    src = make("adamw_win", params, max_grad_norm=1.0)
    train(src, params, 2)
    opt = make("adamw_win", clone_params(params), max_grad_norm=0.5)
    with pytest.warns(UserWarning, match=r"saved with max_grad_norm=1.0.*0.5 is kept"):
        opt.load_state_dict(src.state_dict())
    assert {g["max_grad_norm"] for g in opt.param_groups} == {0.5}


# =========================================================================== groups, grads, layouts
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("name", ALL)
def test_add_param_group_after_steps(name, path):
    kw = dict(acceleration_mode="win2", weight_decay=0.05, **PATHS[path])
    params = make_params()
    first, late = params[:2], params[2:]
    opt = make(name, first, **kw)
    ref_first = clone_params(first)
    ref_first_opt = make(name, ref_first, **kw)
    train(opt, first, 3)
    train(ref_first_opt, ref_first, 3)
    opt.add_param_group({"params": late, "lr": 3e-3, "weight_decay": 0.0})
    ref_late = clone_params(late)
    ref_late_opt = make(name, ref_late, **dict(kw, lr=3e-3, weight_decay=0.0))
    for t in range(3, 6):
        grads = grads_for(params, t)
        set_grads(params, grads)
        set_grads(ref_first, grads[:2])
        set_grads(ref_late, grads[2:])
        opt.step()
        ref_first_opt.step()
        ref_late_opt.step()
    if name in ("lamb_win", "adan_win"):  # group step counts: the new group starts at 1 too
        assert [g["step"] for g in opt.param_groups] == [6, 3]
    for p, q in zip(params, ref_first + ref_late):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", ALL)
def test_zero_gradients_without_weight_decay_leave_the_parameters(name, mode):
    # torch's test_step_is_noop_for_zero_grads (to rounding: Win recombines p and x == p)
    params = make_params(dtype=torch.float32)
    before = [p.detach().clone() for p in params]
    opt = make(name, params, acceleration_mode=mode, weight_decay=0.0)
    for _ in range(3):
        set_grads(params, [torch.zeros_like(p) for p in params])
        opt.step()
    for p, b in zip(params, before):
        torch.testing.assert_close(p.detach(), b)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("name", ALL)
def test_non_contiguous_parameters(name, path):
    # timm's basic case with weight = randn(10, 5, 2)[..., 0]: same steps as contiguous copies
    g = torch.Generator().manual_seed(5)
    weight = torch.randn(10, 5, 2, generator=g)[..., 0].requires_grad_(True)
    bias = torch.randn(10, 2, generator=g)[..., 0].requires_grad_(True)
    assert not weight.is_contiguous() and not bias.is_contiguous()
    dense = [weight.detach().contiguous().requires_grad_(True), bias.detach().contiguous().requires_grad_(True)]
    opt = make(name, [weight, bias], acceleration_mode="win2", **PATHS[path])
    ref = make(name, dense, acceleration_mode="win2", **PATHS[path])
    x = torch.randn(5, generator=g)
    losses = []
    for _ in range(5):
        for o, (w, b) in ((opt, (weight, bias)), (ref, dense)):
            o.zero_grad()
            loss = (w.mv(x) + b).pow(2).sum()
            loss.backward()
            o.step()
        losses.append(loss.item())
    assert not weight.is_contiguous()  # stepped in place
    for p, q in zip((weight, bias), dense):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=2e-6, atol=2e-6)
    assert losses[-1] < losses[0]


# =========================================================================== schedulers, closures, hooks
def _transformers_schedule(kind, **kw):
    def factory(o):
        import transformers

        return getattr(transformers, f"get_{kind}_schedule_with_warmup")(o, **kw)
    return factory


SCHEDULED = {  # case -> (optimizer, scheduler factory, the group keys it changes)
    "OneCycleLR": ("adamw_win", lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.05, total_steps=10, cycle_momentum=True), ("lr", "betas")),
    "CyclicLR": ("sgd_win", lambda o: torch.optim.lr_scheduler.CyclicLR(o, base_lr=0.01, max_lr=0.05, step_size_up=3, base_momentum=0.5, max_momentum=0.9), ("lr", "momentum")),
    "LambdaLR": ("lamb_win", lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda t: 1.0 / (1 + t)), ("lr",)),
    "StepLR": ("adamw_win", lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5), ("lr",)),
    "transformers-linear": ("adamw_win", _transformers_schedule("linear", num_warmup_steps=3, num_training_steps=8), ("lr",)),
    "transformers-cosine": ("adamw_win", _transformers_schedule("cosine", num_warmup_steps=2, num_training_steps=8), ("lr",)),
}


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("mode", ("win", "win2"))
@pytest.mark.parametrize("case", list(SCHEDULED))
def test_schedulers_changing_any_hyper_parameter_drive_the_step(case, mode, path):
    name, factory, keys = SCHEDULED[case]
    params = make_params()
    opt = make(name, params, acceleration_mode=mode, **PATHS[path])
    sched = factory(opt)
    seen = []
    for t in range(6):
        seen.append({k: opt.param_groups[0][k] for k in keys})
        set_grads(params, grads_for(params, t))
        opt.step()
        sched.step()
    for k in keys:
        assert len({repr(s[k]) for s in seen}) > 1, k  # the scheduler did change it
    # the same values set by hand each step give the same parameters
    manual = make_params()
    mopt = make(name, manual, acceleration_mode=mode, **PATHS[path])
    for t in range(6):
        mopt.param_groups[0].update(seen[t])
        set_grads(manual, grads_for(manual, t))
        mopt.step()
    assert_params_equal(params, manual)
    # and keeping them fixed does not: they took effect
    fixed = make_params()
    fopt = make(name, fixed, acceleration_mode=mode, **PATHS[path])
    fopt.param_groups[0].update({k: seen[0][k] for k in keys if k != "lr"})
    for t in range(6):
        fopt.param_groups[0]["lr"] = seen[t]["lr"]
        set_grads(fixed, grads_for(fixed, t))
        fopt.step()
    if keys != ("lr",):
        assert not all(torch.equal(p, q) for p, q in zip(params, fixed))


@pytest.mark.parametrize("path", PATHS)
def test_tensor_lr_is_the_same_as_a_float_lr(path):
    a, b = make_params(), make_params()
    oa = make("adamw_win", a, lr=torch.tensor(0.01, dtype=torch.float64), **PATHS[path])
    ob = make("adamw_win", b, lr=0.01, **PATHS[path])
    train(oa, a, 3)
    train(ob, b, 3)
    assert_params_equal(a, b)


@pytest.mark.parametrize("name", ALL)
def test_closure_loss_is_returned_and_its_gradients_are_used(name):
    params, ref = make_params(), make_params()
    opt, ref_opt = make(name, params), make(name, ref)
    for t in range(3):
        loss = opt.step(_closure(opt, params, t))
        ref_loss = _closure(ref_opt, ref, t)()
        ref_opt.step()
        assert torch.equal(loss, ref_loss)
    assert_params_equal(params, ref)


def test_step_hooks_run_around_every_step_and_state_dict_hooks_apply():
    params = make_params()
    opt = make("adamw_win", params)
    calls = []
    opt.register_step_pre_hook(lambda o, a, k: calls.append(("pre", len(o.state))))
    opt.register_step_post_hook(lambda o, a, k: calls.append(("post", len(o.state))))
    from torch.optim.optimizer import register_optimizer_step_post_hook

    h = register_optimizer_step_post_hook(lambda o, a, k: calls.append(("global", 0)))
    try:
        train(opt, params, 2)
    finally:
        h.remove()
    assert calls == [("pre", 0), ("post", 3), ("global", 0), ("pre", 3), ("post", 3), ("global", 0)]

    def post(o, sd):
        sd["extra"] = 1
        return sd
    opt.register_state_dict_post_hook(post)
    sd = opt.state_dict()
    assert sd["extra"] == 1 and sd["hf_win"] == {"class": "AdamW"}
    seen = []
    fresh = make("adamw_win", clone_params(params))
    fresh.register_load_state_dict_post_hook(lambda o: seen.append(len(o.state)))
    fresh.load_state_dict(sd)
    assert seen == [3]


@pytest.mark.parametrize("path", ["foreach", "default"])
def test_torch_compile_of_step(path):
    torch._dynamo.reset()
    params, ref = make_params(dtype=torch.float32), make_params(dtype=torch.float32)
    opt = make("adamw_win", params, acceleration_mode="win2", **PATHS[path])
    ref_opt = make("adamw_win", ref, acceleration_mode="win2", **PATHS[path])
    step = torch.compile(opt.step, backend="eager")
    for t in range(3):
        grads = grads_for(params, t)
        set_grads(params, grads)
        set_grads(ref, grads)
        step()
        ref_opt.step()
    for p, q in zip(params, ref):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-6)


# =========================================================================== convergence
def _rosenbrock(t):
    x, y = t
    return (1 - x) ** 2 + 100 * (y - x**2) ** 2


ROSENBROCK_LR = {"adamw_win": 5e-2, "adam_win": 5e-2, "lamb_win": 5e-2, "sgd_win": 1e-4, "adan_win": 5e-2, "lion_win": 1e-2}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", ALL)
def test_rosenbrock_gets_closer_to_the_minimum(name, mode):
    # timm's _test_rosenbrock: cyclic coordinate descent from (1.5, 1.5), one coordinate's gradient a step
    p = torch.tensor([1.5, 1.5], dtype=torch.float64, requires_grad=True)
    opt = make(name, [p], lr=ROSENBROCK_LR[name], acceleration_mode=mode, weight_decay=0.0)
    solution = torch.tensor([1.0, 1.0], dtype=torch.float64)
    initial = p.detach().dist(solution)

    def closure(w):
        opt.zero_grad()
        loss = _rosenbrock(p)
        loss.backward()
        with torch.no_grad():
            p.grad[1 - w] = 0.0
        return loss

    for i in range(1000):
        opt.step(functools.partial(closure, i % 2))
    assert p.detach().dist(solution) < initial


MODEL_LR = {"adamw_win": 5e-2, "adam_win": 5e-2, "lamb_win": 5e-2, "sgd_win": 1e-2, "adan_win": 5e-2, "lion_win": 5e-3}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", ALL)
def test_small_model_loss_decreases_every_step(name, mode):
    # timm's _test_model: a fixed 2-3-1 sigmoid network, loss = output.sum(), 20 steps, each lower
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Sigmoid(), torch.nn.Linear(3, 1), torch.nn.Sigmoid())
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[-0.2109, -0.4976], [-0.1413, -0.3420], [-0.2524, 0.6976]]))
        model[0].bias.copy_(torch.tensor([-0.1085, -0.2979, 0.6892]))
        model[2].weight.copy_(torch.tensor([[-0.0508, -0.3941, -0.2843]]))
        model[2].bias.copy_(torch.tensor([-0.0711]))
    x = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5, 0.6]).reshape(3, 2)
    opt = make(name, model.parameters(), lr=MODEL_LR[name], acceleration_mode=mode)
    previous = float("inf")
    for _ in range(20):
        opt.zero_grad()
        loss = model(x).sum()
        loss.backward()
        assert loss.item() < previous
        previous = loss.item()
        opt.step()


# =========================================================================== every path agrees
@pytest.mark.parametrize("dtype", (torch.float32, torch.float64))
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", ALL)
def test_every_path_agrees_to_rounding(name, mode, dtype):
    # foreach and per-tensor run the same operations in the same order: equal to 1e-12 in float64; the
    # default (the generated C kernel on CPU, tests/test_kernels.py) within float32 rounding
    results = {}
    for path, flags in PATHS.items():
        params = make_params(dtype=dtype)
        opt = make(name, [{"params": params[:2]}, {"params": params[2:], "lr": 3e-3, "weight_decay": 0.0}],
                   acceleration_mode=mode, weight_decay=0.05, max_grad_norm=1.0, **flags)
        train(opt, params, 5)
        results[path] = [p.detach() for p in params]
    reference = results.pop("per_tensor")
    for path, got in results.items():
        tol = 1e-12 if dtype == torch.float64 and path == "foreach" else 2e-6
        for a, b in zip(got, reference):
            torch.testing.assert_close(a, b, rtol=tol, atol=tol, msg=lambda m: f"{path}: {m}")


# =========================================================================== LAMB without weight decay
def test_lamb_without_weight_decay_warns_once_and_is_adamw_win():
    params, ref = make_params(), make_params()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lamb = hf_win.LAMB(params, lr=1e-2, weight_decay=0.0, max_grad_norm=0.0)
        hf_win.LAMB(make_params(), weight_decay=0.01)  # applies it: quiet
        hf_win.LAMB(make_params(), weight_decay=0.0, always_adapt=True)  # applies it: quiet
    assert [str(w.message) for w in caught if "trust ratio" in str(w.message)] == [
        str(caught[0].message)] and "always_adapt=True" in str(caught[0].message)
    adamw = hf_win.AdamW(ref, lr=1e-2, weight_decay=0.0, eps=1e-6)
    train(lamb, params, 4)
    train(adamw, ref, 4)
    for p, q in zip(params, ref):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-12)


# =========================================================================== extension contract
class HalfStepAdamW(hf_win.AdamW):
    """A subclass that overrides the direction and calls super(): half of AdamW's direction."""

    def _direction(self, ops, group, params, grads, states, steps):
        u = super()._direction(ops, group, params, grads, states, steps)
        ops.mul_(u, 0.5)
        return u


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("mode", MODES)
def test_subclass_calling_super_works_on_every_path(mode, path):
    params, ref = make_params(), make_params()
    opt = HalfStepAdamW(params, lr=2e-2, weight_decay=0.0, acceleration_mode=mode, **PATHS[path])
    ref_opt = hf_win.AdamW(ref, lr=1e-2, weight_decay=0.0, acceleration_mode=mode, **PATHS[path])
    train(opt, params, 4)  # several steps: the steps after the first are checked too
    train(ref_opt, ref, 4)
    for p, q in zip(params, ref):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-12)
    assert opt.state_dict()["hf_win"] == {"class": "HalfStepAdamW"}


def _lion_reference(p, m, g, lr, betas, wd):
    c = betas[0] * m + (1 - betas[0]) * g
    p = p * (1 - lr * wd) - lr * torch.sign(c)
    m = betas[1] * m + (1 - betas[1]) * g
    return p, m


@pytest.mark.parametrize("path", PATHS)
def test_lion_win_mode_none_is_lion(path):
    params = make_params()
    expected = [p.detach().clone() for p in params]
    moments = [torch.zeros_like(p) for p in params]
    opt = LionWin(params, lr=1e-2, weight_decay=0.1, acceleration_mode="none", **PATHS[path])
    for t in range(5):
        grads = grads_for(params, t)
        set_grads(params, grads)
        opt.step()
        for i, g in enumerate(grads):
            expected[i], moments[i] = _lion_reference(expected[i], moments[i], g, 1e-2, (0.9, 0.99), 0.1)
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.detach(), e, rtol=1e-12, atol=1e-12)
    assert set(opt.state[params[0]]) == {"step", "exp_avg"}


@pytest.mark.parametrize("path", PATHS)
def test_lion_win_gets_win2_from_the_shared_step(path):
    # Win2 by ALGORITHM.md's formulas, over Lion's direction, written out here
    params = make_params()
    lr, wd, r1, r2 = 1e-2, 0.1, 2.0, 8.0
    ps = [p.detach().clone() for p in params]
    xs, ys = [p.clone() for p in ps], [p.clone() for p in ps]
    ms = [torch.zeros_like(p) for p in ps]
    opt = LionWin(params, lr=lr, weight_decay=wd, acceleration_mode="win2", **PATHS[path])
    for t in range(4):
        grads = grads_for(params, t)
        set_grads(params, grads)
        opt.step()
        for i, g in enumerate(grads):
            c = 0.9 * ms[i] + 0.1 * g
            u = torch.sign(c)
            ms[i] = 0.99 * ms[i] + 0.01 * g
            xs[i] = (xs[i] - lr * u) / (1 + lr * wd)
            c1 = 1 / (1 + r1 + r1 * lr * wd)
            ys[i] = c1 * (ys[i] + r1 * xs[i] - r1 * lr * u)
            c2 = 1 / (1 + r2 + r2 / r1 + r2 * lr * wd)
            ps[i] = c2 * (ps[i] + r2 * xs[i] + (r2 / r1) * ys[i] - r2 * lr * u)
    for p, e in zip(params, ps):
        torch.testing.assert_close(p.detach(), e, rtol=1e-10, atol=1e-12)
