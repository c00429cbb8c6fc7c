"""The ``fused=True`` path: same results as foreach, nothing rebuilt when the learning rate changes,
validation, the Trainer flag, and the step-time benchmark's outputs.

Two implementations: on CPU the generated C kernel (hf_win/optim/_ckernel.py), tested first; elsewhere,
and on CPU for what the kernel cannot express, the ``torch.compile`` graph (hf_win/optim/_fused.py).
Compiling with inductor on 2 cores takes tens of seconds, so the graph tests compile with the ``eager``
backend (dynamo traces the same function into the same graph; only the code generation differs) and
small buckets; one test compiles with inductor for real.
"""

import csv
import math

import pytest
import torch

import hf_win
from hf_win.optim import _ckernel, _fused

from _golden import cases, replay

MODES = ("win", "win2", "none")
SHAPES = [(6, 5), (7,), (1,), (3, 2, 2), (9,)]  # (1,) is too small for the graph: stepped eagerly


@pytest.fixture
def eager_backend(monkeypatch):
    """The torch.compile path (the CPU kernel off), compiled with the eager backend."""
    monkeypatch.setattr(_fused, "CPU_KERNEL", False)
    monkeypatch.setattr(_fused, "BACKEND", "eager")
    monkeypatch.setattr(_fused, "BUCKET", 2)


@pytest.fixture
def kernel_cache(monkeypatch, tmp_path_factory):
    """The CPU kernel path, building into a fresh cache directory (so builds really happen)."""
    monkeypatch.setattr(_fused, "CPU_KERNEL", True)
    monkeypatch.setenv("HF_WIN_CACHE_DIR", str(tmp_path_factory.mktemp("hf_win_cache")))
    _ckernel.reset()
    yield
    _ckernel.reset()


def _kwargs(name, mode, **extra):
    kw = dict(acceleration_mode=mode, **extra)
    if name == "sgd_win":
        kw["lr"] = 0.05
    if name != "lamb_win":
        kw["weight_decay"] = 0.03
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


def _one_case_per_optimizer_and_mode():
    seen, out = set(), []
    for case in cases():
        key = (case["optimizer"], case["acceleration_mode"])
        if key not in seen:
            seen.add(key)
            out.append(pytest.param(case, id=f"{case['optimizer']}-{case['acceleration_mode']}"))
    return out


def _kernel_expressible(name):
    # LAMB's trust ratio (on with its default weight decay) needs per-tensor norms: the graph path
    return name != "lamb_win"


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", hf_win.available_optimizers())
def test_cpu_kernel_matches_foreach_float32(name, mode, kernel_cache, monkeypatch):
    monkeypatch.setattr(_fused, "BACKEND", "eager")  # for LAMB, which takes the graph path
    monkeypatch.setattr(_fused, "BUCKET", 2)
    before = _fused.compile_counter()
    two = name in ("adamw_win", "sgd_win")  # two groups with different weight decay: two kernels
    fused, opt = _train(name, mode, fused=True, two_groups=two)
    after = _fused.compile_counter()
    if _kernel_expressible(name):
        # 3 steps after the first (eager) one, one call per group and step, whatever the tensor count
        assert after["kernel_calls"] - before["kernel_calls"] == 3 * (2 if two else 1)
        assert after["calls"] == before["calls"], "the torch.compile path was taken"
    else:
        assert after["kernel_calls"] == before["kernel_calls"] and after["calls"] > before["calls"]
    reference, ref_opt = _train(name, mode, foreach=True, two_groups=two)
    for a, b in zip(fused, reference):
        torch.testing.assert_close(a, b, rtol=2e-6, atol=2e-6)
    for p_state, r_state in zip(opt.state.values(), ref_opt.state.values()):
        assert set(p_state) == set(r_state)
        for key in p_state:
            if isinstance(p_state[key], torch.Tensor) and p_state[key].dim() > 0:
                torch.testing.assert_close(p_state[key], r_state[key], rtol=2e-6, atol=2e-6)


def test_cpu_kernel_lamb_without_trust_ratio_uses_the_kernel(kernel_cache):
    """LAMB with weight_decay=0 and always_adapt=False is elementwise: the kernel takes it."""
    before = _fused.compile_counter()
    fused, _ = _train("lamb_win", "win2", fused=True, weight_decay=0.0)
    assert _fused.compile_counter()["kernel_calls"] - before["kernel_calls"] == 3
    reference, _ = _train("lamb_win", "win2", foreach=True, weight_decay=0.0)
    for a, b in zip(fused, reference):
        torch.testing.assert_close(a, b, rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("case", _one_case_per_optimizer_and_mode())
def test_cpu_kernel_replays_golden_float64(case, kernel_cache, monkeypatch):
    """float64 through the generated kernel (scalars computed in double from step and lr) matches the
    reference trajectories to 1e-9."""
    monkeypatch.setattr(_fused, "BACKEND", "eager")
    calls = _fused.compile_counter()["kernel_calls"] + _fused.compile_counter()["calls"]
    for k, params, expected in replay(case, fused=True):
        for p, e in zip(params, expected):
            torch.testing.assert_close(p.detach().reshape(-1), e.reshape(-1), rtol=1e-9, atol=1e-9,
                                       msg=lambda m: f"step {k}: {m}")
    if len(case["lr_per_step"]) > 1:
        assert _fused.compile_counter()["kernel_calls"] + _fused.compile_counter()["calls"] > calls


def _cosine_100_steps():
    """100 fused steps of a small MLP under a cosine schedule with warmup (lr from 0): returns the
    counters before and after, and a function making one more step. Checks p.grad is never written."""
    from transformers import get_cosine_schedule_with_warmup

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))
    opt = hf_win.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05, fused=True)
    sched = get_cosine_schedule_with_warmup(opt, num_warmup_steps=10, num_training_steps=100)
    x, y = torch.randn(32, 8), torch.randn(32, 4)

    def one_step():
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        grads = [p.grad.clone() for p in model.parameters()]
        opt.step()
        assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))  # p.grad untouched

    before = _fused.compile_counter()
    lrs = set()
    for _ in range(100):
        one_step()
        lrs.add(opt.param_groups[0]["lr"])
        sched.step()
    assert len(lrs) > 50  # the learning rate really changed (from 0: linear warmup)
    return before, _fused.compile_counter(), one_step


def test_cpu_kernel_builds_once_over_100_steps_of_cosine_with_warmup(kernel_cache):
    before, after, one_step = _cosine_100_steps()
    assert after["kernel_builds"] - before["kernel_builds"] == 1
    assert after["kernel_calls"] - before["kernel_calls"] == 99  # step 1 eager; then one call per step
    assert after["compiles"] == before["compiles"] and after["calls"] == before["calls"]
    # a later process (here: the in-process cache forgotten) loads the library instead of compiling it
    _ckernel.reset()
    one_step()
    assert _fused.compile_counter()["kernel_loads"] == 1 and _fused.compile_counter()["kernel_builds"] == 0


def test_cpu_kernel_threads_give_the_same_result(kernel_cache):
    """Two threads split each large tensor in two slices: bitwise the same as one thread."""
    shapes = [(300, 200), (70001,), (1,), (3, 2, 2), (40000,)]
    out = {}
    saved = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            torch.manual_seed(0)
            params = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
            opt = hf_win.AdamW(params, weight_decay=0.03, acceleration_mode="win2", fused=True)
            for _ in range(3):
                for p in params:
                    p.grad = torch.randn_like(p)
                opt.step()
            out[threads] = [p.detach().clone() for p in params]
    finally:
        torch.set_num_threads(saved)
    for a, b in zip(out[1], out[2]):
        assert torch.equal(a, b)


def test_cpu_kernel_without_a_compiler_falls_back_to_the_graph(kernel_cache, monkeypatch):
    monkeypatch.setattr(_fused, "BACKEND", "eager")
    monkeypatch.setattr(_ckernel, "_compiler", lambda: None)
    monkeypatch.setattr(_fused, "_WARNED", set())
    before = _fused.compile_counter()
    with pytest.warns(RuntimeWarning, match="CPU kernel could not be built"):
        fused, _ = _train("adamw_win", "win", fused=True)
    assert _fused.compile_counter()["calls"] > before["calls"]
    reference, _ = _train("adamw_win", "win", foreach=True)
    for a, b in zip(fused, reference):
        torch.testing.assert_close(a, b, rtol=2e-6, atol=2e-6)


def test_default_path_without_a_compiler_is_foreach_quietly(kernel_cache, monkeypatch):
    """fused=None never compiles a graph: without a kernel it is exactly the foreach path, no warning,
    and the failed build is not retried at every step."""
    import warnings

    attempts = []
    monkeypatch.setattr(_ckernel, "_compiler", lambda: attempts.append(1))  # returns None: no compiler
    before = _fused.compile_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        default, _ = _train("adamw_win", "win2", steps=5)
    after = _fused.compile_counter()
    assert after["calls"] == before["calls"] and after["kernel_calls"] == before["kernel_calls"]
    assert len(attempts) == 1
    reference, _ = _train("adamw_win", "win2", steps=5, foreach=True)
    for a, b in zip(default, reference):
        assert torch.equal(a, b)


def test_a_group_is_never_half_stepped_by_the_kernel(kernel_cache, monkeypatch):
    """float32 and float64 parameters in one group need two kernels: when one cannot be built, no tensor
    of the group is stepped by the other before the group falls back (it would be stepped twice)."""
    real_build = _ckernel.build

    def build(source):
        if "(double)" in source:
            raise RuntimeError("no double kernel in this test")
        return real_build(source)

    monkeypatch.setattr(_ckernel, "build", build)

    def run(**flags):
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(4, dtype=torch.float64))]
        opt = hf_win.AdamW(params, weight_decay=0.03, **flags)
        for _ in range(3):
            for p in params:
                p.grad = torch.randn_like(p)
            opt.step()
        return params

    before = _fused.compile_counter()["kernel_calls"]
    for a, b in zip(run(), run(foreach=True)):
        assert torch.equal(a, b)
    assert _fused.compile_counter()["kernel_calls"] == before


def test_default_path_on_cpu_is_the_kernel_and_explicit_flags_are_honoured(kernel_cache):
    before = _fused.compile_counter()["kernel_calls"]
    _train("adamw_win", "win", steps=3)
    assert _fused.compile_counter()["kernel_calls"] == before + 2  # default: the kernel (after step 1)
    for flags, path in ((dict(foreach=True), "foreach"), (dict(foreach=False), "per-tensor"),
                        (dict(fused=False), "foreach")):
        _, opt = _train("adamw_win", "win", steps=3, **flags)
        assert _fused.compile_counter()["kernel_calls"] == before + 2, flags
        assert opt.step_path() == path  # what the Trainer logs


def test_cpu_kernel_source_is_generated_from_the_optimizer_code():
    """The generated loop is the foreach path's sequence of operations: e.g. AdamW-Win2 loads 6 arrays,
    stores 5 (the gradient is read only), and the step count and lr are its only run-time scalars."""
    group = {k: v for k, v in hf_win.AdamW([torch.nn.Parameter(torch.zeros(2))], acceleration_mode="win2")
             .param_groups[0].items() if k not in ("params", "lr", "step")}
    src = _ckernel.trace(_fused._impl(hf_win.AdamW), group, ("exp_avg", "exp_avg_sq", "x", "y"), torch.float32)
    assert src.count("= a") == 6 and src.count("a1[i] =") == 0 and src.count("[i] = v") == 5
    assert "sqrtf(" in src and "sc[0]" in src and "sc[1]" in src and "sc[2]" not in src
    with pytest.raises(_ckernel.Unsupported, match="norm"):
        lamb = hf_win.LAMB([torch.nn.Parameter(torch.zeros(2))])
        g = {k: v for k, v in lamb.param_groups[0].items() if k not in ("params", "lr", "step")}
        _ckernel.trace(_fused._impl(hf_win.LAMB), g, ("exp_avg", "exp_avg_sq", "x"), torch.float32)
    with pytest.raises(_ckernel.Unsupported, match="dtype"):
        _ckernel.trace(_fused._impl(hf_win.AdamW), group, ("exp_avg", "exp_avg_sq", "x", "y"), torch.bfloat16)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", hf_win.available_optimizers())
def test_fused_matches_foreach_float32(name, mode, eager_backend):
    calls, direct = _fused.compile_counter()["calls"], _fused.compile_counter()["direct_calls"]
    two = name == "adamw_win"  # (golden cases cover several groups for every optimizer)
    fused, opt = _train(name, mode, fused=True, two_groups=two)
    assert _fused.compile_counter()["calls"] > calls, "the fused path was not taken"
    assert _fused.compile_counter()["direct_calls"] > direct, "the direct (unguarded) call was not taken"
    reference, _ = _train(name, mode, foreach=True, two_groups=two)
    for a, b in zip(fused, reference):
        torch.testing.assert_close(a, b, rtol=2e-6, atol=2e-6)
    # the state is the foreach path's state too
    ref_state = _train(name, mode, foreach=True, two_groups=two)[1].state
    for p_state, r_state in zip(opt.state.values(), ref_state.values()):
        assert set(p_state) == set(r_state)


@pytest.mark.parametrize("case", _one_case_per_optimizer_and_mode())
def test_fused_replays_golden_float64(case, eager_backend):
    """float64 through the compiled graph (scalars are float64 tensors) matches the reference to 1e-9."""
    calls = _fused.compile_counter()["calls"]
    for k, params, expected in replay(case, fused=True):
        for p, e in zip(params, expected):
            torch.testing.assert_close(p.detach().reshape(-1), e.reshape(-1), rtol=1e-9, atol=1e-9,
                                       msg=lambda m: f"step {k}: {m}")
    if len(case["lr_per_step"]) > 1 and any(math.prod(s) >= 2 for s in case["shapes"]):
        assert _fused.compile_counter()["calls"] > calls


def test_no_recompilation_over_100_steps_of_cosine_with_warmup(eager_backend):
    before, after, _ = _cosine_100_steps()
    assert after["compiles"] - before["compiles"] <= 1  # at most the first compile (0 if cached here)
    assert after["calls"] - before["calls"] == 99 * 2  # step 1 eager; 4 tensors in buckets of 2
    assert after["direct_calls"] - before["direct_calls"] >= 98 * 2  # all but the first compiled step


def test_inductor_fused_matches_foreach(monkeypatch):
    """One real compile: the generated kernels give foreach's results within float32 tolerance."""
    monkeypatch.setattr(_fused, "CPU_KERNEL", False)
    monkeypatch.setattr(_fused, "BACKEND", "inductor")
    monkeypatch.setattr(_fused, "BUCKET", 2)
    direct = _fused.compile_counter()["direct_calls"]
    fused, _ = _train("adamw_win", "win", steps=3, fused=True)
    assert _fused.compile_counter()["direct_calls"] > direct  # step 3 skips torch.compile's entry point
    reference, _ = _train("adamw_win", "win", steps=3, foreach=True)
    for a, b in zip(fused, reference):
        torch.testing.assert_close(a, b, rtol=2e-6, atol=2e-6)


def test_fused_validation():
    p = [torch.nn.Parameter(torch.zeros(2))]
    with pytest.raises(ValueError, match="fused must be None, True or False"):
        hf_win.AdamW(p, fused="yes")
    with pytest.raises(ValueError, match="fused=True.*foreach=False"):
        hf_win.Adan(p, fused=True, foreach=False)
    for spec in hf_win.OPTIMIZERS.values():
        assert spec.hyperparameters["fused"] is None  # every optimizer takes it; off by default


def test_optim_args_fused_reaches_the_optimizer(tmp_path):
    from hf_win import WinTrainingArguments, get_optimizer_cls_and_kwargs

    args = WinTrainingArguments(output_dir=str(tmp_path), optim="adamw_win", optim_args="fused=True",
                                report_to=[], use_cpu=True)
    cls, kwargs = get_optimizer_cls_and_kwargs(args)
    assert kwargs["fused"] is True
    opt = cls([torch.nn.Parameter(torch.zeros(3))], **kwargs)
    assert opt.param_groups[0]["fused"] is True


def test_step_time_quick_writes_well_formed_outputs(tmp_path, kernel_cache):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "step_time.py"
    spec = importlib.util.spec_from_file_location("step_time", path)
    step_time = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(step_time)
    rows = step_time.main(["--quick", "--out", str(tmp_path), "--paths", "fused", "foreach"])
    csv_file, md_file = tmp_path / "step_time_tiny_cpu.csv", tmp_path / "step_time_tiny_cpu.md"
    with open(csv_file) as f:
        table = list(csv.DictReader(f))
    assert len(table) == len(rows) == 4  # fused, foreach, torch fused, torch foreach
    assert {r["path"] for r in table} == {"fused", "foreach"}
    for r in table:
        assert float(r["median_ms"]) > 0 and float(r["ratio_to_torch_fused_adamw"]) > 0
    baseline = [r for r in table if r["optimizer"] == "torch.optim.AdamW" and r["path"] == "fused"]
    assert float(baseline[0]["ratio_to_torch_fused_adamw"]) == 1.0
    ours = {r["path"]: r for r in table if r["optimizer"] == "adamw_win"}
    assert float(ours["fused"]["compile_s"]) > 0  # the kernel built (a fresh cache)
    assert ours["fused"]["runs"] == "kernel" and ours["foreach"]["runs"] == "eager"  # what really ran
    assert float(ours["foreach"]["state_bytes_per_param_byte"]) == 3.0  # exp_avg, exp_avg_sq, x
    md = md_file.read_text()
    assert "| torch |" in md and "| cpu_cores |" in md and "x fused AdamW" in md
