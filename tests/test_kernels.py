"""The fused kernels (hf_win/optim/kernels/): the C kernel (CPU) and the Triton kernel (run here on CPU
tensors by Triton's interpreter, TRITON_INTERPRET=1, set in conftest.py) against foreach and the golden
file; schedules that move every hyper-parameter compile nothing; layouts, replaced storage, the kernel
bound, fallbacks and the path reported. Never timed.
"""

import logging
import os
import shutil

import pytest
import torch

import hf_win
from hf_win.optim import kernels
from hf_win.optim.kernels import cache

from _golden import cases, replay

MODES = ("win", "win2", "none")
NAMES = [n for n in hf_win.available_optimizers() if not hf_win.get_optimizer_spec(n).wraps_base]  # no kernel of their own
SHAPES = [(6, 5), (7,), (1,), (3, 2, 2), (9,)]
BACKENDS = ("c", "triton")

pytestmark = pytest.mark.usefixtures("fresh_kernel_cache")  # each test: its own cache folder, no kernel loaded


def use(monkeypatch, backend):
    monkeypatch.setenv("HF_WIN_FUSED_BACKEND", backend)


def _kwargs(name, mode, **extra):
    kw = dict(acceleration_mode=mode, **extra)
    if name == "sgd_win":
        kw.setdefault("lr", 0.05)
        kw.setdefault("dampening", 0.1)  # the first step's buffer differs from later ones
    if name != "lamb_win":
        kw.setdefault("weight_decay", 0.03)
    return kw


def _train(name, mode, steps=4, dtype=torch.float32, two_groups=False, **flags):
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, dtype=dtype)) for s in SHAPES]
    grads = [[torch.randn(s, dtype=dtype) for s in SHAPES] for _ in range(steps)]
    # optionally a second group with another weight decay, as the Trainer makes (decay / no decay)
    groups = [{"params": params[:3]}, {"params": params[3:], "weight_decay": 0.0}] if two_groups else params
    opt = hf_win.create_optimizer(name, groups, **_kwargs(name, mode, **flags))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 + 0.1 * s)  # lr changes every step
    for k in range(steps):
        for p, g in zip(params, grads[k]):
            p.grad = g
        opt.step()
        sched.step()
    return [p.detach().clone() for p in params], opt


def _assert_same_state(opt, ref, tol):
    for p_state, r_state in zip(opt.state.values(), ref.state.values()):
        assert set(p_state) == set(r_state)
        for key, v in p_state.items():
            if isinstance(v, torch.Tensor) and v.dim() > 0:
                torch.testing.assert_close(v, r_state[key], rtol=tol, atol=tol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", NAMES)
def test_kernel_matches_foreach_float32(name, mode, backend, monkeypatch):
    use(monkeypatch, backend)
    two = name in ("adamw_win", "sgd_win")  # two groups with different weight decay
    fused, opt = _train(name, mode, two_groups=two)
    assert opt.step_path() == f"{backend} kernel"
    # one call per group and step, whatever the number of tensors
    assert kernels.counters()["calls"] == 4 * (2 if two else 1)
    reference, ref = _train(name, mode, foreach=True, two_groups=two)
    for a, b in zip(fused, reference):
        torch.testing.assert_close(a, b, rtol=2e-6, atol=2e-6)
    _assert_same_state(opt, ref, 2e-6)


def _one_case_per_optimizer_and_mode():
    seen, out = set(), []
    for case in cases():
        key = (case["optimizer"], case["acceleration_mode"])
        if key not in seen:
            seen.add(key)
            out.append(pytest.param(case, id=f"{case['optimizer']}-{case['acceleration_mode']}"))
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", _one_case_per_optimizer_and_mode())
def test_kernel_replays_golden_float64(case, backend, monkeypatch):
    use(monkeypatch, backend)
    for k, params, expected in replay(case):
        for p, e in zip(params, expected):
            torch.testing.assert_close(p.detach().reshape(-1), e.reshape(-1), rtol=1e-9, atol=1e-9,
                                       msg=lambda m: f"step {k}: {m}")
    assert kernels.counters()["calls"] >= len(case["lr_per_step"])


def _every_hyperparameter_moves(opt, k):
    """Change every number of every group (as schedules, Lookahead or a weight-decay ramp do)."""
    for g in opt.param_groups:
        g["lr"] = 0.01 * (1 + 0.3 * k)
        if "betas" in g:
            g["betas"] = tuple(b - 0.01 * k for b in g["betas"])
        for key in ("eps", "momentum", "dampening"):
            if key in g:
                g[key] = g[key] * 1.1 + (0.01 if key != "eps" else 0.0)
        g["weight_decay"] = 0.01 + 0.01 * k
        g["reckless_steps"] = (2.0 + 0.1 * k, 8.0 - 0.2 * k)
    opt.defaults["max_grad_norm"] = 1.0 + 0.5 * k


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", NAMES)
def test_schedule_moving_every_hyperparameter_compiles_nothing(name, backend, monkeypatch):
    use(monkeypatch, backend)
    steps = 6 if backend == "c" else 4
    results = []
    for flags in ({}, dict(foreach=True)):
        torch.manual_seed(1)
        params = [torch.nn.Parameter(torch.randn(s)) for s in SHAPES]
        opt = hf_win.create_optimizer(name, params, **_kwargs(name, "win2", max_grad_norm=1.0, **flags))
        for k in range(steps):
            _every_hyperparameter_moves(opt, k)
            for p in params:
                p.grad = torch.randn_like(p)
            opt.step()
            if flags == {} and k == 1:
                built = kernels.counters()["kernels"]
        results.append(params)
    # SGD's first step (its buffer starts as the gradient) is its own kernel; nothing after step 2
    assert built == (2 if name == "sgd_win" else 1)
    assert kernels.counters()["kernels"] == built
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=5e-6, atol=5e-6)


def test_onecycle_with_cycling_betas_builds_one_kernel():
    """The case that rebuilt a kernel every step (OneCycleLR moves betas[0] every step)."""
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Linear(32, 4))
    opt = hf_win.AdamW(model.parameters(), lr=1e-3, acceleration_mode="win2")
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=30, cycle_momentum=True)
    for _ in range(30):
        model(torch.randn(8, 16)).square().mean().backward()
        opt.step()
        opt.zero_grad()
        sched.step()
    assert kernels.counters() == {"kernels": 1, "traces": 1, "calls": 30}
    assert cache.counters()["builds"] == 1


def test_weight_decay_ramp_from_zero_builds_two_kernels():
    """A branch on a number (``if weight_decay != 0``) is a guard: wd = 0 and wd > 0 are two kernels."""
    p = torch.nn.Parameter(torch.randn(10))
    opt = hf_win.AdamW([p], weight_decay=0.0)
    for k in range(5):
        opt.param_groups[0]["weight_decay"] = 0.01 * k
        p.grad = torch.randn_like(p)
        opt.step()
    assert kernels.counters()["kernels"] == 2 and kernels.counters()["calls"] == 5


def test_kernel_bound_falls_back_with_one_warning(monkeypatch, caplog):
    monkeypatch.setenv("HF_WIN_MAX_KERNELS", "1")
    ps = [torch.nn.Parameter(torch.randn(8)) for _ in range(2)]
    opt = hf_win.AdamW([{"params": [ps[0]]}, {"params": [ps[1]], "amsgrad": True}])
    ref = hf_win.AdamW([{"params": [p.detach().clone().requires_grad_() for p in ps][:1]}], foreach=True)
    with caplog.at_level(logging.WARNING, logger="hf_win.kernels"):
        for _ in range(3):
            for p in ps:
                p.grad = torch.ones_like(p)
            opt.step()
    warnings = [r for r in caplog.records if "HF_WIN_MAX_KERNELS=1" in r.getMessage()]
    assert len(warnings) == 1
    assert kernels.counters()["kernels"] == 1
    assert "c kernel" in opt.step_path() and "HF_WIN_MAX_KERNELS=1" in opt.step_path()
    del ref


def test_float32_and_float64_in_one_group_with_missing_grads_and_changing_hyperparameters(monkeypatch):
    use(monkeypatch, "triton")
    results = []
    for flags in ({}, dict(foreach=True)):
        torch.manual_seed(2)
        params = [torch.nn.Parameter(torch.randn(5, dtype=d)) for d in (torch.float32, torch.float64)] * 1
        params += [torch.nn.Parameter(torch.randn(3, 3)), torch.nn.Parameter(torch.randn(4, dtype=torch.float64))]
        opt = hf_win.Adan(params, lr=0.01, weight_decay=0.02, acceleration_mode="win2", **flags)
        for k in range(4):
            for i, p in enumerate(params):
                p.grad = None if (i + k) % 3 == 0 else torch.randn_like(p)
            opt.param_groups[0]["betas"] = (0.98 - 0.01 * k, 0.92, 0.99)
            opt.param_groups[0]["lr"] = 0.01 * (k + 1)
            opt.step()
        results.append(params)
        if not flags:
            assert opt.step_path() == "triton kernel"
    for a, b in zip(*results):
        tol = 1e-12 if a.dtype == torch.float64 else 2e-6
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


@pytest.mark.parametrize("backend", BACKENDS)
def test_channels_last_param_with_contiguous_grad(backend, monkeypatch):
    """A param made channels_last (``.data``) with a contiguous grad is paired element by element."""
    use(monkeypatch, backend)
    out = []
    for flags in ({}, dict(foreach=False)):
        torch.manual_seed(3)
        conv = torch.nn.Conv2d(3, 4, 3)
        conv.weight.data = conv.weight.data.contiguous(memory_format=torch.channels_last)
        opt = hf_win.AdamW(conv.parameters(), lr=0.1, acceleration_mode="win2", **flags)
        for _ in range(3):
            for p in conv.parameters():
                p.grad = torch.randn(p.shape)  # contiguous
            opt.step()
        out.append([p.detach().clone() for p in conv.parameters()])
    for a, b in zip(*out):
        torch.testing.assert_close(a, b, rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_replaced_storage_and_model_to_are_picked_up(backend, monkeypatch):
    use(monkeypatch, backend)
    out = []
    for flags in ({}, dict(foreach=True)):
        torch.manual_seed(4)
        model = torch.nn.Linear(4, 3)
        opt = hf_win.AdamW(model.parameters(), lr=0.1, acceleration_mode="win", **flags)
        for k in range(4):
            if k == 1:
                model.weight.data = torch.randn(3, 4)  # new storage
            if k == 2:
                model.to(torch.float64)  # every parameter gets new storage, state stays float32
            for p in model.parameters():
                p.grad = torch.ones_like(p) * (k + 1)
            opt.step()
        out.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*out):
        torch.testing.assert_close(a, b, rtol=2e-6, atol=2e-6)


def test_threads_do_not_change_results():
    """Chunks, not threads, decide the summation order of a norm: 1 and 2 threads agree bitwise."""
    n = torch.get_num_threads()
    out = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            torch.manual_seed(5)
            ps = [torch.nn.Parameter(torch.randn(70000)), torch.nn.Parameter(torch.randn(33))]
            opt = hf_win.LAMB(ps, lr=0.01, weight_decay=0.01, acceleration_mode="win2")
            for _ in range(3):
                for p in ps:
                    p.grad = torch.randn_like(p)
                opt.step()
            out.append([p.detach().clone() for p in ps])
    finally:
        torch.set_num_threads(n)
    for a, b in zip(*out):
        assert torch.equal(a, b)


def test_no_compiler_falls_back_to_foreach_and_says_why(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("PATH", str(tmp_path))
    p = torch.nn.Parameter(torch.randn(6))
    q = torch.nn.Parameter(p.detach().clone())
    opt, ref = hf_win.AdamW([p]), hf_win.AdamW([q], foreach=True)
    with caplog.at_level(logging.WARNING, logger="hf_win.kernels"):
        for _ in range(3):
            p.grad = torch.ones_like(p)
            q.grad = torch.ones_like(q)
            opt.step()
            ref.step()
    assert torch.equal(p, q)
    assert "no C compiler" in opt.step_path() and opt.step_path().startswith("foreach (")
    assert len([r for r in caplog.records if "no C compiler" in r.getMessage()]) == 1


def test_backend_variable_forces_foreach_and_is_validated(monkeypatch):
    p = torch.nn.Parameter(torch.randn(4))
    opt = hf_win.AdamW([p])
    use(monkeypatch, "foreach")
    p.grad = torch.ones_like(p)
    opt.step()
    assert opt.step_path() == "foreach (HF_WIN_FUSED_BACKEND=foreach)"
    assert kernels.counters()["calls"] == 0
    use(monkeypatch, "cuda")
    with pytest.raises(ValueError, match="HF_WIN_FUSED_BACKEND must be one of auto, c, triton, foreach"):
        opt.step()


def test_explicit_eager_flags_are_honoured():
    for flags, path in ((dict(foreach=True), "foreach"), (dict(foreach=False), "per-tensor"),
                        (dict(fused=False), "foreach")):
        p = torch.nn.Parameter(torch.randn(4))
        opt = hf_win.AdamW([p], **flags)
        p.grad = torch.ones_like(p)
        opt.step()
        assert opt.step_path() == path
    assert kernels.counters()["calls"] == 0
    for foreach in (True, False):  # as torch.optim refuses fused with foreach
        with pytest.raises(ValueError, match=f"fused=True cannot be combined with foreach={foreach}"):
            hf_win.AdamW([p], fused=True, foreach=foreach)


@pytest.mark.parametrize("backend", BACKENDS)
def test_subclass_calling_super_works_on_every_step(backend, monkeypatch):
    """The tracer runs the optimizer's own ``_direction`` (no stand-in instance)."""
    use(monkeypatch, backend)

    class HalfAdamW(hf_win.AdamW):
        def _direction(self, ops, group, params, grads, states, steps):
            u = super()._direction(ops, group, params, grads, states, steps)
            ops.mul_(u, 0.5)
            return u

    out = []
    for flags in ({}, dict(foreach=True)):
        torch.manual_seed(6)
        p = torch.nn.Parameter(torch.randn(7))
        opt = HalfAdamW([p], lr=0.1, **flags)
        for _ in range(3):
            p.grad = torch.randn_like(p)
            opt.step()
        out.append(p.detach().clone())
    assert kernels.counters()["calls"] == 3
    torch.testing.assert_close(out[0], out[1], rtol=2e-6, atol=2e-6)


def test_a_damaged_cache_file_is_rebuilt_not_loaded():
    """A truncated library in the cache (a full disk, a killed process) is caught by its hash and rebuilt;
    the step runs (a truncated library mapped by dlopen kills the process with SIGBUS)."""
    p = torch.nn.Parameter(torch.randn(6))
    opt = hf_win.AdamW([p])
    p.grad = torch.ones_like(p)
    opt.step()
    folder = cache.cache_dir()
    libs = [f for f in os.listdir(folder) if f.endswith(".so")]
    assert libs
    for f in libs:  # a truncated file takes its place (a new file, as a killed writer leaves one; the
        path = os.path.join(folder, f)  # library this process has mapped is not touched)
        with open(path, "rb") as fh:
            data = fh.read()
        with open(path + ".tmp", "wb") as fh:
            fh.write(data[: len(data) // 2])
        os.replace(path + ".tmp", path)
    kernels.reset()
    cache._reset_for_tests()
    p.grad = torch.ones_like(p)
    with pytest.warns(cache.KernelCacheWarning):
        opt.step()
    assert opt.step_path() == "c kernel" and cache.counters()["builds"] == 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_is_never_written_with_clipping_maximize_and_l2(backend, monkeypatch):
    use(monkeypatch, backend)
    p = torch.nn.Parameter(torch.randn(9))
    opt = hf_win.Adam([{"params": [p], "maximize": True}], weight_decay=0.1, max_grad_norm=0.5)
    g = torch.randn(9)
    p.grad = g.clone()
    opt.step()
    opt.step()
    assert torch.equal(p.grad, g) and kernels.counters()["calls"] == 2


@pytest.mark.parametrize("backend", BACKENDS)
def test_complex_parameters_step_as_torch_does(backend, monkeypatch):
    use(monkeypatch, backend)
    torch.manual_seed(7)
    w = torch.randn(5, dtype=torch.complex64)
    p, q = torch.nn.Parameter(w.clone()), torch.nn.Parameter(w.clone())
    ours = hf_win.AdamW([p], lr=0.1, weight_decay=0.01, acceleration_mode="none")
    ref = torch.optim.AdamW([q], lr=0.1, weight_decay=0.01)
    for _ in range(5):
        g = torch.randn(5, dtype=torch.complex64)
        p.grad, q.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
    assert ours.step_path() == f"{backend} kernel"
    torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_lamb_is_fused_by_default():
    p = torch.nn.Parameter(torch.randn(9))
    opt = hf_win.LAMB([p], weight_decay=0.01)
    p.grad = torch.ones_like(p)
    opt.step()
    assert opt.step_path() == "c kernel"


@pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc to build with")
def test_cc_with_arguments_builds(monkeypatch):
    monkeypatch.setenv("CC", "gcc -O1")
    p = torch.nn.Parameter(torch.randn(4))
    opt = hf_win.SGD([p], lr=0.1)
    p.grad = torch.ones_like(p)
    opt.step()
    assert opt.step_path() == "c kernel"


def test_triton_block_table_addresses_tensors_past_2_31_elements():
    """Offsets are int64 end to end: the block table of a tensor of 2^31 + 5 elements reaches its end
    (the kernel adds ``tl.arange`` to these int64 starts); its whole blocks go to the unmasked kernel
    when it is aligned, its tail (and every block of a misaligned tensor) to the masked one."""
    from hf_win.optim.kernels.triton import BLOCK, block_tables

    n = 2**31 + 5
    bt, bs, first, numel, full, tail = block_tables([n, 3], [True, True])
    n_blocks = bt.numel()
    assert bs.dtype == torch.int64 and n_blocks == (n + BLOCK - 1) // BLOCK + 1
    assert int(bs[n_blocks - 2]) + BLOCK >= n > int(bs[n_blocks - 2]) >= 2**31
    assert int(bt[n_blocks - 1]) == 1 and int(bs[n_blocks - 1]) == 0 and first.tolist() == [0, n_blocks - 1, n_blocks]
    assert full.tolist() == list(range(n // BLOCK)) and tail.tolist() == [n_blocks - 2, n_blocks - 1]
    _, _, _, _, full, tail = block_tables([2 * BLOCK, 2 * BLOCK], [False, True])
    assert full.tolist() == [2, 3] and tail.tolist() == [0, 1]


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_reused_step_plan_notices_every_change(backend, monkeypatch):
    """A step reuses the previous one's plan and tables (``_dispatch.run_again``) while nothing changed;
    each change below must be seen: a parameter gaining its first gradient, a new group, replaced
    ``.data``, a transposed view at the same address, a loaded state dict, new hyper-parameters, a
    gradient set to None. Every step equals foreach's."""
    from hf_win.optim import _dispatch

    use(monkeypatch, backend)
    reused = []
    real = _dispatch.run_again
    monkeypatch.setattr(_dispatch, "run_again", lambda *a, **kw: reused.append(k) or real(*a, **kw))
    out = []
    for flags in ({}, dict(foreach=True)):
        torch.manual_seed(6)
        model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 3))
        extra = torch.nn.Parameter(torch.randn(5))
        params = list(model.parameters())
        opt = hf_win.AdamW(params[:3], lr=0.1, weight_decay=0.01, acceleration_mode="win2", **flags)
        for k in range(12):
            if k == 3:
                opt.add_param_group({"params": [params[3]], "lr": 0.05})
            if k == 4:
                model[0].weight.data = torch.randn(4, 4)
            if k == 5:
                model[0].weight.data = model[0].weight.data.t()  # same address, other strides
            if k == 6:
                model[0].weight.data = model[0].weight.data.contiguous()
                opt.load_state_dict(opt.state_dict())
            if k == 7:
                opt.param_groups[0]["lr"] = 0.02
                opt.param_groups[0]["betas"] = (0.8, 0.99)
            if k == 11 and not flags:
                opt.param_groups[0]["fused"] = False  # asks for the eager path from now on
            for i, p in enumerate(params):
                p.grad = None if (i == 2 and k < 2) or (i == 1 and k == 8) else torch.randn_like(p)
            extra.grad = torch.randn_like(extra)
            opt.step()
            out.append([p.detach().clone() for p in params])
            if k == 11 and not flags:
                assert opt.step_path().startswith("foreach")  # group 0 left the kernel
    n = len(out) // 2
    for a, b in zip(out[:n], out[n:]):
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y, rtol=2e-6, atol=2e-6)
    assert {1, 7, 10} <= set(reused)  # steps after which nothing but numbers changed did reuse
