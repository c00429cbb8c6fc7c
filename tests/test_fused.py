"""The ``fused=True`` path (hf_win/optim/_fused.py): same results as foreach, no recompilation when the
learning rate changes, validation, the Trainer flag, and the step-time benchmark's outputs.

Compiling with inductor on 2 cores takes tens of seconds, so most tests compile with the ``eager``
backend (dynamo traces the same function into the same graph; only the code generation differs) and
small buckets; one test compiles with inductor for real.
"""

import csv
import math

import pytest
import torch

import hf_win
from hf_win.optim import _fused

from _golden import cases, replay

MODES = ("win", "win2", "none")
SHAPES = [(6, 5), (7,), (1,), (3, 2, 2), (9,)]  # (1,) is too small for the graph: stepped eagerly


@pytest.fixture
def eager_backend(monkeypatch):
    monkeypatch.setattr(_fused, "BACKEND", "eager")
    monkeypatch.setattr(_fused, "BUCKET", 2)


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


def _one_case_per_optimizer_and_mode():
    seen, out = set(), []
    for case in cases():
        key = (case["optimizer"], case["acceleration_mode"])
        if key not in seen:
            seen.add(key)
            out.append(pytest.param(case, id=f"{case['optimizer']}-{case['acceleration_mode']}"))
    return out


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
    from transformers import get_cosine_schedule_with_warmup

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))
    opt = hf_win.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05, fused=True)
    sched = get_cosine_schedule_with_warmup(opt, num_warmup_steps=10, num_training_steps=100)
    x, y = torch.randn(32, 8), torch.randn(32, 4)
    before = _fused.compile_counter()
    lrs = set()
    for _ in range(100):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        lrs.add(opt.param_groups[0]["lr"])
        sched.step()
    after = _fused.compile_counter()
    assert len(lrs) > 50  # the learning rate really changed (from 0: linear warmup)
    assert after["compiles"] - before["compiles"] <= 1  # at most the first compile (0 if cached here)
    assert after["calls"] - before["calls"] == 99 * 2  # step 1 eager; 4 tensors in buckets of 2
    assert after["direct_calls"] - before["direct_calls"] >= 98 * 2  # all but the first compiled step


def test_inductor_fused_matches_foreach(monkeypatch):
    """One real compile: the generated kernels give foreach's results within float32 tolerance."""
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


def test_step_time_quick_writes_well_formed_outputs(tmp_path, eager_backend):
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
    assert float(ours["fused"]["compile_s"]) > 0
    assert float(ours["foreach"]["state_bytes_per_param_byte"]) == 3.0  # exp_avg, exp_avg_sq, x
    md = md_file.read_text()
    assert "| torch |" in md and "| cpu_cores |" in md and "x fused AdamW" in md
