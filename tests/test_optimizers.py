"""The optimizers' own behaviour beyond the reference trajectories: the registry and the authors' names,
defaults, argument validation, step semantics (lr 0, missing gradients, per-group modes, ``p.grad``
untouched), the state each keeps, and the authors' state-dict layout. What any ``torch.optim`` optimizer
must do (state-dict round trips and conversions, schedulers, pickling, every path agreeing) is in
``test_torch_contract.py``."""

import warnings

import pytest
import torch

import hf_win
from hf_win import available_optimizers, create_optimizer
from _golden import build, cases, set_grads

NAMES = [n for n in available_optimizers() if not hf_win.get_optimizer_spec(n).wraps_base]  # Win(base): test_wrapper.py
MODES = ("none", "win", "win2")
BASE_KEYS = {
    "adamw_win": {"exp_avg", "exp_avg_sq"},
    "adam_win": {"exp_avg", "exp_avg_sq"},
    "lamb_win": {"exp_avg", "exp_avg_sq"},
    "sgd_win": {"momentum"},
    "adan_win": {"exp_avg", "exp_avg_diff", "exp_avg_sq", "pre_grad"},
}
PER_PARAM_STEP = {"adamw_win", "adam_win", "sgd_win"}


def make_params(seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, generator=g, dtype=dtype).requires_grad_(True) for s in [(4, 3), (5,), (2, 3, 2)]]


def random_grads(params, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in params]


def run(name, mode, steps=6, lr=1e-2, seed=0, opt_kwargs=None):
    params = make_params(seed)
    opt = create_optimizer(name, params, lr=lr, acceleration_mode=mode, weight_decay=0.05, **(opt_kwargs or {}))
    for t in range(steps):
        for p, g in zip(params, random_grads(params, 100 + t)):
            p.grad = g
        opt.step()
    return params, opt


# --------------------------------------------------------------------------- registry and names
def test_registry_names_and_aliases():
    assert NAMES == ["adamw_win", "adam_win", "lamb_win", "sgd_win", "adan_win"]
    assert hf_win.LAMB_Win is hf_win.Lamb_Win is hf_win.LAMB
    for alias, cls in [("AdamW_Win", hf_win.AdamW), ("Adam_Win", hf_win.Adam), ("SGD_Win", hf_win.SGD), ("Adan_Win", hf_win.Adan)]:
        assert getattr(hf_win, alias) is cls


def test_authors_readme_construction_lines_work_with_only_the_import_changed():
    from types import SimpleNamespace

    from hf_win import Adam_Win, AdamW_Win, LAMB_Win, SGD_Win

    args = SimpleNamespace(lr=1e-3, reckless_steps=(2.0, 8.0), weight_decay=0.05, max_grad_norm=0.0, acceleration_mode="win")
    params = make_params()
    optimizers = [
        AdamW_Win(params, lr=args.lr, betas=(0.9, 0.999), reckless_steps=args.reckless_steps, weight_decay=args.weight_decay, max_grad_norm=args.max_grad_norm, acceleration_mode=args.acceleration_mode),
        Adam_Win(params, lr=args.lr, betas=(0.9, 0.999), reckless_steps=args.reckless_steps, weight_decay=args.weight_decay, max_grad_norm=args.max_grad_norm, acceleration_mode=args.acceleration_mode),
        LAMB_Win(params, lr=args.lr, betas=(0.9, 0.999), reckless_steps=args.reckless_steps, weight_decay=args.weight_decay, max_grad_norm=args.max_grad_norm, acceleration_mode=args.acceleration_mode),
        SGD_Win(params, lr=args.lr, momentum=0.9, reckless_steps=args.reckless_steps, weight_decay=args.weight_decay, max_grad_norm=args.max_grad_norm, nesterov=True, acceleration_mode=args.acceleration_mode),
    ]
    for opt in optimizers:
        for p, g in zip(params, random_grads(params, 1)):
            p.grad = g
        opt.step()
        assert all(torch.isfinite(p).all() for p in params)


def test_create_optimizer_rejects_unknown_name_and_keyword():
    with pytest.raises(ValueError, match="unknown optimizer 'adamx_win'; available: adamw_win, adam_win"):
        create_optimizer("adamx_win", make_params())
    with pytest.raises(ValueError, match=r"adamw_win does not take momentum; accepted keywords: lr, betas"):
        create_optimizer("adamw_win", make_params(), momentum=0.9)


def test_default_mode_is_win_and_defaults_follow_the_spec():
    p = make_params()
    assert hf_win.AdamW(p).defaults["acceleration_mode"] == "win"
    d = hf_win.AdamW(p).defaults
    assert (d["lr"], d["betas"], d["eps"], d["weight_decay"], d["amsgrad"], d["max_grad_norm"]) == (1e-3, (0.9, 0.999), 1e-8, 1e-2, False, 0.0)
    assert hf_win.Adam(p).defaults["weight_decay"] == 0.0
    d = hf_win.LAMB(p).defaults
    assert (d["eps"], d["weight_decay"], d["max_grad_norm"], d["bias_correction"], d["grad_averaging"], d["trust_clip"], d["always_adapt"]) == (1e-6, 0.01, 1.0, True, True, False, False)
    d = hf_win.SGD(p, lr=0.1).defaults
    assert (d["momentum"], d["dampening"], d["weight_decay"], d["nesterov"], d["max_grad_norm"]) == (0.9, 0.0, 0.0, True, 0.0)
    d = hf_win.Adan(p).defaults
    assert (d["betas"], d["eps"], d["weight_decay"], d["max_grad_norm"]) == ((0.98, 0.92, 0.99), 1e-8, 0.0, 0.0)
    for cls in (hf_win.AdamW, hf_win.Adam, hf_win.LAMB, hf_win.Adan):
        assert cls(p).defaults["reckless_steps"] == (2.0, 8.0)


# --------------------------------------------------------------------------- validation
BAD_INPUTS = [
    ("adamw_win", dict(acceleration_mode="nesterov"), r"acceleration_mode must be one of 'win', 'win2', 'none', got 'nesterov'"),
    ("adam_win", dict(acceleration_mode=None), r"acceleration_mode must be one of 'win', 'win2', 'none', got None"),
    ("lamb_win", dict(reckless_steps=(2.0,)), r"reckless_steps must be two positive numbers"),
    ("sgd_win", dict(reckless_steps=(0.0, 8.0)), r"reckless_steps must be two positive numbers"),
    ("adan_win", dict(reckless_steps=(2.0, -1.0)), r"reckless_steps must be two positive numbers"),
    ("adamw_win", dict(reckless_steps="2,8"), r"reckless_steps must be two positive numbers"),
    ("adamw_win", dict(lr=-1e-3), r"lr must be a number >= 0, got -0.001"),
    ("adam_win", dict(eps=-1e-8), r"eps must be a number >= 0"),
    ("lamb_win", dict(weight_decay=-0.1), r"weight_decay must be a number >= 0"),
    ("sgd_win", dict(momentum=-0.9), r"momentum must be a number >= 0"),
    ("sgd_win", dict(momentum=1.0), r"momentum must be in \[0, 1\)"),
    ("adamw_win", dict(betas=(0.9, 1.0)), r"betas must be 2 numbers each in \[0, 1\)"),
    ("adamw_win", dict(betas=(-0.1, 0.999)), r"betas must be 2 numbers each in \[0, 1\)"),
    ("adan_win", dict(betas=(0.98, 0.92)), r"betas must be 3 numbers each in \[0, 1\)"),
    ("adamw_win", dict(amsgrad="yes"), r"amsgrad must be True or False"),
    ("adamw_win", dict(foreach="fast"), r"foreach must be None, True or False"),
    ("lamb_win", dict(max_grad_norm="1"), r"max_grad_norm must be a number"),
]


@pytest.mark.parametrize("name,kwargs,message", BAD_INPUTS, ids=[f"{n}-{'-'.join(k)}" for n, k, _ in BAD_INPUTS])
def test_bad_input_raises_value_error_naming_the_argument(name, kwargs, message):
    kwargs = dict(kwargs)
    kwargs.setdefault("lr", 1e-2)
    with pytest.raises(ValueError, match=message):
        create_optimizer(name, make_params(), **kwargs)


def test_bad_param_group_is_rejected_before_any_state_is_touched():
    params = make_params()
    opt = create_optimizer("adamw_win", params[:2], lr=1e-2)
    with pytest.raises(ValueError, match=r"acceleration_mode \(param group 1\) must be one of"):
        opt.add_param_group({"params": [params[2]], "acceleration_mode": "win3"})
    assert len(opt.param_groups) == 1 and len(opt.state) == 0


@pytest.mark.parametrize("name", NAMES)
def test_sparse_gradients_raise_at_step(name):
    emb = torch.nn.Embedding(10, 3, sparse=True)
    opt = create_optimizer(name, emb.parameters(), lr=1e-2)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="does not support sparse gradients"):
        opt.step()


# --------------------------------------------------------------------------- step semantics
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", NAMES)
def test_lr_zero_step_is_finite_and_a_no_op(name, mode):
    # The first step of a linear warmup has lr == 0; the authors' code divides by it.
    params = make_params()
    before = [p.detach().clone() for p in params]
    opt = create_optimizer(name, params, lr=0.0, acceleration_mode=mode, weight_decay=0.05)
    for p, g in zip(params, random_grads(params, 3)):
        p.grad = g
    opt.step()
    for p, b in zip(params, before):
        torch.testing.assert_close(p.detach(), b, rtol=1e-15, atol=1e-15)
    # and training continues normally afterwards
    for group in opt.param_groups:
        group["lr"] = 1e-2
    opt.step()
    assert all(torch.isfinite(p).all() for p in params)
    assert any(not torch.equal(p.detach(), b) for p, b in zip(params, before))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", NAMES)
def test_parameters_without_grad_are_skipped_the_first_time_too(name, mode):
    params = make_params()
    frozen = params[1]
    before = frozen.detach().clone()
    opt = create_optimizer(name, params, lr=1e-2, acceleration_mode=mode, weight_decay=0.05)
    for t in range(3):
        for p, g in zip(params, random_grads(params, t)):
            p.grad = None if p is frozen else g
        opt.step()
    assert torch.equal(frozen.detach(), before)
    assert frozen not in opt.state or len(opt.state[frozen]) == 0
    # When it gets a gradient, it starts from step 1 (per-parameter counters) and its own x/y copies.
    frozen.grad = random_grads(params, 9)[1]
    for p in (params[0], params[2]):
        p.grad = None
    opt.step()
    state = opt.state[frozen]
    if name in PER_PARAM_STEP:
        assert state["step"] == 1 and opt.state[params[0]]["step"] == 3
    else:
        assert opt.param_groups[0]["step"] == 4
    if mode != "none":
        assert "x" in state


@pytest.mark.parametrize("name", NAMES)
def test_param_groups_with_different_lr_decay_and_modes_step_independently(name):
    # One optimizer with three groups == three optimizers with one group each (clipping off: a global
    # norm couples the groups, as it should).
    params = make_params()
    settings = [dict(lr=1e-2, weight_decay=0.1, acceleration_mode="win", max_grad_norm=0.0),
                dict(lr=3e-3, weight_decay=0.0, acceleration_mode="win2", max_grad_norm=0.0),
                dict(lr=2e-2, weight_decay=0.01, acceleration_mode="none", max_grad_norm=0.0)]
    shared = create_optimizer(name, [dict(params=[p], **s) for p, s in zip(params, settings)], lr=1.0, max_grad_norm=0.0)
    singles_params = [p.detach().clone().requires_grad_(True) for p in params]
    singles = [create_optimizer(name, [q], **s) for q, s in zip(singles_params, settings)]
    for t in range(4):
        grads = random_grads(params, t)
        for p, q, g in zip(params, singles_params, grads):
            p.grad, q.grad = g, g.clone()
        shared.step()
        for o in singles:
            o.step()
    for p, q in zip(params, singles_params):
        assert torch.equal(p.detach(), q.detach())
    assert [len([k for k in shared.state[p] if k in ("x", "y")]) for p in params] == [1, 2, 0]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", NAMES)
def test_grad_is_not_modified(name, mode):
    params = make_params()
    kwargs = dict(max_grad_norm=0.5)
    if name in ("adam_win", "sgd_win"):
        kwargs["weight_decay"] = 0.1  # Adam and vanilla SGD fold decay into the gradient (a copy)
    opt = create_optimizer(name, params, lr=1e-2, acceleration_mode=mode, **kwargs)
    for t in range(2):
        grads = random_grads(params, t)
        for p, g in zip(params, grads):
            p.grad = g
        refs = [p.grad for p in params]
        values = [p.grad.clone() for p in params]
        opt.step()
        for p, r, v in zip(params, refs, values):
            assert p.grad is r
            assert torch.equal(p.grad, v)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", NAMES)
def test_persistent_state_is_exactly_what_the_spec_lists(name, mode):
    params, opt = run(name, mode, steps=2)
    extra = {"none": set(), "win": {"x"}, "win2": {"x", "y"}}[mode]
    for p in params:
        state = opt.state[p]
        sized = {k for k, v in state.items() if torch.is_tensor(v) and v.shape == p.shape}
        assert sized == BASE_KEYS[name] | extra
        assert set(state) == sized | ({"step"} if name in PER_PARAM_STEP else set())
    base = len(BASE_KEYS[name])
    assert opt.buffers_per_parameter(mode) == base + len(extra)
    n = sum(p.numel() for p in params)
    assert opt.state_bytes() == (base + len(extra)) * n * 8


def test_amsgrad_adds_its_buffer():
    params, opt = run("adamw_win", "win2", steps=2, opt_kwargs=dict(amsgrad=True))
    assert set(opt.state[params[0]]) == {"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq", "x", "y"}
    assert hf_win.AdamW.buffers_per_parameter("win2", amsgrad=True) == 5


def test_x_and_y_start_as_copies_of_the_parameter():
    params = make_params()
    before = [p.detach().clone() for p in params]
    opt = create_optimizer("adamw_win", params, lr=0.0, acceleration_mode="win2")
    for p, g in zip(params, random_grads(params, 0)):
        p.grad = g
    opt.step()
    for p, b in zip(params, before):
        # lr == 0: x stays p exactly; y = (y + r1*x)/(1 + r1) = p up to one rounding
        assert torch.equal(opt.state[p]["x"], b)
        torch.testing.assert_close(opt.state[p]["y"], b, rtol=1e-15, atol=1e-15)
        assert opt.state[p]["x"].data_ptr() != p.data_ptr()


# --------------------------------------------------------------------------- the authors' state dicts, clipping
@pytest.mark.parametrize("case_id", ["adamw-win2-9", "sgd-win-44", "lamb-win2-35", "adam-win-17"])
def test_state_dict_laid_out_as_the_authors_code_loads(case_id):
    # The authors' optimizers keep python-int 'step' per parameter (LAMB: in the group), buffers under
    # the names of ALGORITHM.md, and param groups without our 'foreach' key. Build such a state dict
    # from a golden run after 2 steps, load it into a fresh optimizer, and finish the golden trajectory.
    case = next(c for c in cases() if c["id"] == case_id)
    params, opt = build(case)
    for k in range(2):
        for group in opt.param_groups:
            group["lr"] = case["lr_per_step"][k]
        set_grads(params, case["grads_per_step"][k])
        opt.step()
    ours = opt.state_dict()
    authors = {"state": {}, "param_groups": []}
    for idx, st in ours["state"].items():
        authors["state"][idx] = {k: (int(v) if k == "step" else v.clone()) for k, v in st.items()}
    for g in ours["param_groups"]:
        authors["param_groups"].append({k: v for k, v in g.items() if k not in ("foreach",)})
    expected_keys = {"adamw": {"step", "exp_avg", "exp_avg_sq"}, "sgd": {"step", "momentum"}, "lamb": {"exp_avg", "exp_avg_sq"}, "adam": {"step", "exp_avg", "exp_avg_sq"}}[case["optimizer"]]
    expected_keys |= {"win": {"x"}, "win2": {"x", "y"}}[case["acceleration_mode"]]
    assert all(set(st) == expected_keys for st in authors["state"].values())

    params2 = [p.detach().clone().requires_grad_(True) for p in params]
    _, template = build(case)
    # built with the checkpoint's mode: an optimizer built with another one converts the state to its own
    # (tests/test_torch_contract.py)
    fresh = type(template)([{"params": [params2[i] for i in g["param_indices"]], "weight_decay": g["weight_decay"]} for g in case["param_groups"]], **{k: v for k, v in template.defaults.items() if k in ("lr", "acceleration_mode")})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # loaded as saved: no conversion
        fresh.load_state_dict(authors)
    assert "loaded as saved" in fresh.last_load_report
    for k in range(2, len(case["lr_per_step"])):
        for group in fresh.param_groups:
            group["lr"] = case["lr_per_step"][k]
        set_grads(params2, case["grads_per_step"][k])
        fresh.step()
    for p, e in zip(params2, case["expected_params_per_step"][-1]):
        torch.testing.assert_close(p.detach().flatten(), torch.tensor(e, dtype=torch.float64), rtol=1e-9, atol=0)


def test_clipping_off_at_zero_for_lamb():
    # The authors' LAMB zeroes every gradient when max_grad_norm == 0; ours treats <= 0 as "no clipping".
    a, _ = run("lamb_win", "win", steps=3, opt_kwargs=dict(max_grad_norm=0.0))
    b, _ = run("lamb_win", "win", steps=3, opt_kwargs=dict(max_grad_norm=1e9))
    for p, q in zip(a, b):
        assert torch.equal(p.detach(), q.detach())
    moved = make_params()
    assert any(not torch.equal(p.detach(), q.detach()) for p, q in zip(a, moved))
