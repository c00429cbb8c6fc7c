"""``hf_win.Win(base)``: exact against hf_win's own optimizers where the math says it must be, within the stated
float32 bound, and a torch.optim citizen (groups, schedulers, state dicts, hooks, pickling, closures)."""

import copy
import pickle

import pytest
import torch

import hf_win
from hf_win import Win

STEPS = 25


def _params(dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(5, 3), (4,), (2, 2), (3,)]
    return [torch.nn.Parameter(torch.randn(s, generator=g, dtype=dtype)) for s in shapes]


def _groups(ps, base: bool, wd=0.1):
    """Three groups: different lr and decay; ``base``: the decay moves to Win's ``win_weight_decay``."""
    key = "win_weight_decay" if base else "weight_decay"
    return [{"params": ps[:2], key: wd}, {"params": ps[2:3], key: 0.0, "lr": 3e-3}, {"params": ps[3:], key: wd / 2}]


def _run(opts_and_params, steps=STEPS, dtype=torch.float64, missing=True, schedule=True, grad_seed=1):
    """Step every (optimizer, params) with the same gradients (independent of the parameters); some parameters
    miss their gradient on some steps; a linear warmup from lr = 0 (LambdaLR) when ``schedule``."""
    scheds = [torch.optim.lr_scheduler.LambdaLR(o, lambda s: min(1.0, s / 5)) for o, _ in opts_and_params] if schedule else []
    g = torch.Generator().manual_seed(grad_seed)
    ref_params = opts_and_params[0][1]
    for t in range(steps):
        grads = [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in ref_params]
        for opt, ps in opts_and_params:
            for i, (p, gr) in enumerate(zip(ps, grads)):
                p.grad = None if (missing and t % 4 == 2 and i in (1, 3)) else gr.to(p.dtype, copy=True)
            opt.step()
        for s in scheds:
            s.step()


def _max_diff(a, b):
    return max(float((x.detach() - y.detach()).abs().max()) for x, y in zip(a, b))


@pytest.fixture
def kernel_cache(monkeypatch, tmp_path):
    """Kernels built into this test's own cache folder, none left in the process afterwards."""
    from hf_win.optim import kernels

    monkeypatch.setenv("HF_WIN_CACHE_DIR", str(tmp_path / "kernels"))
    kernels.reset()
    yield kernels
    kernels.reset()


#: The wrapper's paths: its pass as the C kernel (the default on CPU), Triton's (its interpreter on CPU,
#: TRITON_INTERPRET=1 from conftest.py), foreach.
WRAPPER_PATHS = {"c": ("c", None), "triton": ("triton", True), "foreach": ("auto", False)}


@pytest.mark.parametrize("mode", ["win", "win2"])
@pytest.mark.parametrize("torch_flags", [dict(foreach=False), dict(foreach=True), dict(fused=True)])
@pytest.mark.parametrize("ours_flags", [dict(foreach=False), dict(foreach=True), dict(fused=True)])
def test_win_around_torch_adamw_equals_hf_win_adamw_float64(mode, torch_flags, ours_flags, kernel_cache):
    a, b = _params(), _params()
    ref = hf_win.AdamW(_groups(a, base=False), lr=1e-2, acceleration_mode=mode, **ours_flags)
    base = torch.optim.AdamW(_groups(b, base=True), lr=1e-2, weight_decay=0.0, **torch_flags)
    # the groups' own win_weight_decay wins over the constructor's
    wrapped = Win(base, acceleration_mode=mode, weight_decay=0.5)
    _run([(ref, a), (wrapped, b)])
    assert _max_diff(a, b) < 1e-12
    assert wrapped.step_path() == f"AdamW step, then {mode} on c kernel"
    for pa, pb in zip(a, b):
        for k in ("x", "y") if mode == "win2" else ("x",):
            assert float((ref.state[pa][k] - wrapped.state[pb][k]).abs().max()) < 1e-12


@pytest.mark.parametrize("mode", ["win", "win2"])
@pytest.mark.parametrize("path", sorted(WRAPPER_PATHS))
def test_win_around_torch_sgd_nesterov_equals_hf_win_sgd_float64(mode, path, kernel_cache, monkeypatch):
    backend, fused = WRAPPER_PATHS[path]
    if path == "triton":
        pytest.importorskip("triton")
    monkeypatch.setenv("HF_WIN_FUSED_BACKEND", backend)
    a, b = _params(), _params()
    ref = hf_win.SGD(_groups(a, base=False), lr=0.05, momentum=0.9, nesterov=True, acceleration_mode=mode,
                     foreach=True)
    base = torch.optim.SGD(_groups(b, base=True), lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.0)
    wrapped = Win(base, acceleration_mode=mode, fused=fused)
    _run([(ref, a), (wrapped, b)])
    assert _max_diff(a, b) < 1e-12
    assert wrapped.step_path() == f"SGD step, then {mode} on {'foreach' if path == 'foreach' else path + ' kernel'}"
    # one kernel per structure: the decay (lam != 0 or 0) is its one guard, the schedule builds nothing more
    assert kernel_cache.counters()["kernels"] == (0 if path == "foreach" else 2)


def test_maximize_and_complex_parameters_are_the_base_s_business():
    for maximize in (False, True):
        a = _params() + [torch.nn.Parameter(torch.randn(3, dtype=torch.complex128))]
        b = [torch.nn.Parameter(p.detach().clone()) for p in a]
        ref = hf_win.AdamW(a, lr=1e-2, weight_decay=0.1, maximize=maximize, acceleration_mode="win2")
        wrapped = Win(torch.optim.AdamW(b, lr=1e-2, weight_decay=0.0, maximize=maximize), "win2", weight_decay=0.1)
        _run([(ref, a), (wrapped, b)], missing=False)
        assert _max_diff(a, b) < 1e-12


def test_keep_base_weight_decay_is_lam_zero():
    """Adam's L2 decay stays in the base's step: Win(torch Adam) = hf_win.Adam (lam = 0); eps = 0 because torch
    adds eps after the bias correction and hf_win.Adam before it."""
    a, b = _params(), _params()
    ref = hf_win.Adam(a, lr=1e-2, eps=0.0, weight_decay=0.1, acceleration_mode="win")
    wrapped = Win(torch.optim.Adam(b, lr=1e-2, eps=0.0, weight_decay=0.1), "win", keep_base_weight_decay=True)
    _run([(ref, a), (wrapped, b)], missing=False)
    assert _max_diff(a, b) < 1e-12


@pytest.mark.parametrize("mode", ["win", "win2"])
def test_float32_within_the_recovery_bound(mode):
    """The recovered step differs from lr*u by at most half an ulp of the parameter per step (the base's own
    rounding of p + step), so over T steps with parameter-independent gradients the float32 trajectory stays
    within T/2 ulp(max |p|) of the float64 one; hf_win.AdamW in float32 is held to the same bound."""
    truth = _params()
    a, b = _params(torch.float32), _params(torch.float32)
    runs = [(hf_win.AdamW(_groups(truth, base=False), lr=1e-2, acceleration_mode=mode, foreach=True), truth),
            (hf_win.AdamW(_groups(a, base=False), lr=1e-2, acceleration_mode=mode, foreach=True), a),
            (Win(torch.optim.AdamW(_groups(b, base=True), lr=1e-2, weight_decay=0.0), mode), b)]
    _run(runs)
    scale = max(float(p.detach().abs().max()) for p in truth)
    bound = STEPS / 2 * torch.finfo(torch.float32).eps * scale
    err_ours = _max_diff([p.double() for p in a], truth)
    err_wrapped = _max_diff([p.double() for p in b], truth)
    assert err_ours < bound and err_wrapped < bound
    assert err_wrapped > 0  # float32 differs from float64: the bound is not met trivially


def test_param_groups_state_and_scheduler_are_the_base_s():
    ps = _params()
    base = torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.0)
    opt = Win(base, "win2", weight_decay=0.1)
    assert opt.param_groups is base.param_groups and opt.state is base.state
    assert opt.defaults["lr"] == 1e-2 and opt.defaults["acceleration_mode"] == "win2"
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    for p in ps:
        p.grad = torch.ones_like(p)
    opt.step()
    sched.step()
    assert base.param_groups[0]["lr"] == pytest.approx(5e-3)
    opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))], "win_weight_decay": 0.2})
    assert len(base.param_groups) == 2 and base.param_groups[1]["win_weight_decay"] == 0.2
    assert base.param_groups[1]["acceleration_mode"] == "win2"
    opt.zero_grad()
    assert all(p.grad is None for p in ps)


@pytest.mark.parametrize("name", ["adamw", "muon_win", "adafactor_win"])
def test_state_dict_resumes_bitwise(name):
    """Five steps, state_dict through pickle into a fresh optimizer, five more = ten uninterrupted, bitwise."""
    def build(ps):
        if name == "adamw":
            return Win(torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.0), "win2", weight_decay=0.1)
        return hf_win.create_optimizer(name, ps, acceleration_mode="win2", lr=1e-2, weight_decay=0.1)

    def grads(n):
        g = torch.Generator().manual_seed(1)
        return [[torch.randn(p.shape, generator=g) for p in _params(torch.float32)] for _ in range(n)]

    def steps(opt, ps, gs):
        for gr in gs:
            for p, x in zip(ps, gr):
                p.grad = x.clone()
            opt.step()

    gs = grads(10)
    whole_ps, first_ps = _params(torch.float32), _params(torch.float32)
    whole, first = build(whole_ps), build(first_ps)
    steps(whole, whole_ps, gs)
    steps(first, first_ps, gs[:5])
    saved = pickle.loads(pickle.dumps(first.state_dict()))
    assert saved["hf_win"]["class"] == "Win" and {"x", "y"} <= set(saved["state"][0])
    resumed_ps = [torch.nn.Parameter(p.detach().clone()) for p in first_ps]
    resumed = build(resumed_ps)
    resumed.load_state_dict(saved)
    assert "loaded as saved" in resumed.last_load_report
    steps(resumed, resumed_ps, gs[5:])
    assert all(torch.equal(p, q) for p, q in zip(whole_ps, resumed_ps))
    for p, q in zip(whole_ps, resumed_ps):
        assert all(torch.equal(whole.state[p][k], resumed.state[q][k]) for k in whole.state[p])


def test_plain_base_state_dict_starts_x_from_the_parameters_and_mismatches_are_refused():
    ps = _params()
    plain = torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.0)
    _run([(plain, ps)], steps=3, schedule=False)
    qs = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    opt = Win(torch.optim.AdamW(qs, lr=1e-2, weight_decay=0.0), "win")
    opt.load_state_dict(plain.state_dict())
    assert "without Win's sequences" in opt.last_load_report
    assert opt.param_groups[0]["acceleration_mode"] == "win" and "x" not in opt.state[qs[0]]
    for p in qs:
        p.grad = torch.ones_like(p)
    before = qs[0].detach().clone()
    opt.step()
    assert "x" in opt.state[qs[0]] and not torch.equal(before, qs[0])
    sd = opt.state_dict()
    other = Win(torch.optim.SGD([torch.nn.Parameter(p.detach().clone()) for p in qs], lr=0.1), "win")
    with pytest.raises(ValueError, match="base torch.optim.adamw.AdamW.*torch.optim.sgd.SGD"):
        other.load_state_dict(sd)
    win2 = Win(torch.optim.AdamW([torch.nn.Parameter(p.detach().clone()) for p in qs], lr=1e-2, weight_decay=0.0), "none")
    win2.load_state_dict(sd)
    assert "acceleration_mode='win'" in win2.last_load_report and "x" not in win2.state[win2.param_groups[0]["params"][0]]


def test_hooks_pickling_deepcopy_and_closure():
    ps = _params()
    opt = Win(torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.0), "win2", weight_decay=0.1)
    calls = []
    opt.register_step_pre_hook(lambda o, a, k: calls.append("pre"))
    opt.register_step_post_hook(lambda o, a, k: calls.append("post"))
    opt.register_state_dict_post_hook(lambda o, sd: calls.append("sd"))
    target = torch.randn(5, 3, dtype=torch.float64)

    def closure():
        opt.zero_grad()
        loss = sum((p ** 2).sum() for p in ps[1:]) + ((ps[0] - target) ** 2).sum()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert calls == ["pre", "post"] and float(loss.detach()) > 0
    opt.state_dict()
    assert calls[-1] == "sd"
    twin = copy.deepcopy(opt)
    thawed = pickle.loads(pickle.dumps(opt))
    for o in (opt, twin, thawed):
        for p in o.param_groups[0]["params"]:
            p.grad = torch.ones_like(p)
        o.step()
    for o in (twin, thawed):
        assert all(torch.equal(p, q) for p, q in zip(ps, o.param_groups[0]["params"]))


def test_bad_input_is_refused_before_anything_changes():
    ps = _params()
    groups_before = set(torch.optim.AdamW(ps, weight_decay=0.0).param_groups[0])
    with pytest.raises(ValueError, match=r"weight_decay=0\.01.*Win's weight_decay=0\.0.*keep_base_weight_decay"):
        Win(torch.optim.AdamW(ps))  # torch's default decay 1e-2 in the base
    base = torch.optim.AdamW(ps, weight_decay=0.0)
    for kwargs, match in ((dict(acceleration_mode="nope"), "acceleration_mode must be one of"),
                          (dict(reckless_steps=(2.0,)), "reckless_steps must be two positive numbers"),
                          (dict(weight_decay=-1.0), "weight_decay .* must be a number >= 0"),
                          (dict(acceleration_mode="none", weight_decay=0.1), "acceleration_mode='none'"),
                          (dict(weight_decay=0.1, keep_base_weight_decay=True), "not both")):
        with pytest.raises(ValueError, match=match):
            Win(base, **kwargs)
    assert set(base.param_groups[0]) == groups_before
    with pytest.raises(ValueError, match="Win-accelerated already"):
        Win(hf_win.AdamW(ps))
    with pytest.raises(ValueError, match="LBFGS"):
        Win(torch.optim.LBFGS(ps))
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        Win(ps)
    opt = Win(base, "win")
    with pytest.raises(ValueError, match=r"weight_decay=0\.3 \(param group 1\)"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2))], "weight_decay": 0.3})
    assert len(opt.param_groups) == 1
    opt.param_groups[0]["weight_decay"] = 0.2  # set on the base's group later: refused at the step
    for p in ps:
        p.grad = torch.ones_like(p)
    before = [p.detach().clone() for p in ps]
    with pytest.raises(ValueError, match=r"weight_decay=0\.2 \(param group 0\)"):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(ps, before))


def test_low_precision_parameters_step_in_float32():
    a = [torch.nn.Parameter(p.detach().to(torch.bfloat16)) for p in _params(torch.float32)]
    b = [torch.nn.Parameter(p.detach().to(torch.bfloat16)) for p in _params(torch.float32)]
    ref = hf_win.AdamW(a, lr=1e-2, weight_decay=0.1, acceleration_mode="win2", foreach=True)
    wrapped = Win(torch.optim.AdamW(b, lr=1e-2, weight_decay=0.0), "win2", weight_decay=0.1)
    _run([(ref, a), (wrapped, b)], steps=5, missing=False, schedule=False)
    assert all(p.dtype == torch.bfloat16 and wrapped.state[p]["x"].dtype == torch.bfloat16 for p in b)
    # the base's bf16 step rounds its update: both stay within a few bf16 ulps of each other
    assert _max_diff([p.float() for p in a], [p.float() for p in b]) < 5 * 2 ** -8 * 4
