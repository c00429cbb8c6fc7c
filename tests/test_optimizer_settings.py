"""Settings said when the optimizer is built (a bad HF_WIN_FUSED_BACKEND raises, bf16_stochastic_round over
parameters that are not bfloat16 warns once), and the load_state_dict rules for how the state is stored and
rounded: a state_dtype the optimizer was built with converts the loaded state, None keeps the checkpoint's,
the rounding settings are the checkpoint's (torch's rule), each said in the load report."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import hf_win


def _stepped(dtype=torch.float32, steps=2, **kw):
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(5, 3).to(dtype)), torch.nn.Parameter(torch.randn(7).to(dtype))]
    opt = hf_win.AdamW(params, **kw)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    return params, opt


def _fresh(params, **kw):
    return hf_win.AdamW([torch.nn.Parameter(p.detach().clone()) for p in params], **kw)


def _state(opt):
    return [(k, v) for p in opt.param_groups[0]["params"] for k, v in opt.state[p].items() if k != "step"]


def _caught(fn):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = fn()
    return result, [str(w.message) for w in caught]


# ------------------------------------------------------------------------------- at construction
def test_stochastic_rounding_of_float32_parameters_warns_once_naming_their_dtype():
    fp32 = [torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2))]
    opt, said = _caught(lambda: hf_win.AdamW([{"params": fp32[:1]}, {"params": fp32[1:]}], bf16_stochastic_round=True))
    assert len(said) == 1 and "bf16_stochastic_round=True rounds bfloat16 parameters only" in said[0]
    assert "these parameters are float32: it does nothing here" in said[0]

    bf16 = torch.nn.Parameter(torch.ones(3, dtype=torch.bfloat16))
    opt, said = _caught(lambda: hf_win.AdamW([bf16], bf16_stochastic_round=True))
    assert said == []
    _, said = _caught(lambda: opt.add_param_group({"params": [torch.nn.Parameter(torch.ones(2, dtype=torch.float64))]}))
    assert len(said) == 1 and "these parameters are float64" in said[0]
    _, said = _caught(lambda: hf_win.AdamW(fp32, bf16_stochastic_round=False))
    assert said == []


def test_a_bad_backend_variable_fails_when_the_optimizer_is_built(monkeypatch):
    monkeypatch.setenv("HF_WIN_FUSED_BACKEND", "cuda")
    p = torch.nn.Parameter(torch.ones(3))
    with pytest.raises(ValueError, match="HF_WIN_FUSED_BACKEND must be one of auto, c, triton, foreach, got 'cuda'"):
        hf_win.SGD([p], lr=0.1)
    with pytest.raises(ValueError, match="invalid hyper-parameters for --optim adamw_win: HF_WIN_FUSED_BACKEND must be"):
        hf_win.WinTrainingArguments(output_dir="unused", report_to="none")
    monkeypatch.setenv("HF_WIN_FUSED_BACKEND", "Foreach")  # case and spaces do not matter
    hf_win.SGD([p], lr=0.1)


# ------------------------------------------------------------------------------- load_state_dict
@pytest.mark.parametrize("saved, built", [("bfloat16", "float32"), ("float32", "bfloat16")])
def test_a_state_dtype_the_optimizer_was_built_with_converts_the_loaded_state(saved, built):
    params, opt = _stepped(state_dtype=saved)
    sd = copy.deepcopy(opt.state_dict())
    fresh = _fresh(params, state_dtype=built)
    _, said = _caught(lambda: fresh.load_state_dict(sd))
    target = getattr(torch, built)
    assert fresh.param_groups[0]["state_dtype"] == built
    for p, q in zip(fresh.param_groups[0]["params"], opt.param_groups[0]["params"]):
        got, want = fresh.state[p], opt.state[q]
        for k in ("exp_avg", "exp_avg_sq"):
            assert got[k].dtype == target and torch.equal(got[k], want[k].to(target)), k  # rounded to nearest
        # bfloat16 state keeps x as its difference from the float32 parameter (computed in float32)
        if built == "bfloat16":
            assert set(got) - {"exp_avg", "exp_avg_sq", "step"} == {"x_delta"}
            assert torch.equal(got["x_delta"], (want["x"] - p.detach()).to(target))
        else:
            assert set(got) - {"exp_avg", "exp_avg_sq", "step"} == {"x"}
            assert got["x"].dtype == target and torch.equal(got["x"], p.detach() + want["x_delta"].float())
    assert f"the state saved in {saved} is converted to {built}" in fresh.last_load_report and len(said) == 1
    assert "converted with the current parameters" in fresh.last_load_report
    # and the saved dict is untouched, so it still loads exactly into an optimizer built like the saving one
    same = _fresh(params, state_dtype=saved)
    same.load_state_dict(sd)
    assert "loaded as saved" in same.last_load_report
    assert all(torch.equal(a, b) and a.dtype == b.dtype for (_, a), (_, b) in zip(_state(same), _state(opt)))


def test_built_with_none_the_checkpoints_state_dtype_and_rounding_are_loaded_and_said():
    params, opt = _stepped(state_dtype="bfloat16", rounding_seed=7)
    fresh = _fresh(params)
    _caught(lambda: fresh.load_state_dict(copy.deepcopy(opt.state_dict())))
    group = fresh.param_groups[0]
    assert (group["state_dtype"], group["rounding_seed"]) == ("bfloat16", 7)
    assert all(v.dtype == torch.bfloat16 and torch.equal(v, w) for (_, v), (_, w) in zip(_state(fresh), _state(opt)))
    report = fresh.last_load_report
    assert "was saved with state_dtype=bfloat16 and this optimizer was built with None: the checkpoint's is loaded" in report
    assert "was saved with rounding_seed=7 and this optimizer was built with 0: the checkpoint's 7 is loaded" in report


def test_a_converted_mode_starts_its_new_sequence_in_the_state_dtype():
    params, opt = _stepped(acceleration_mode="win", state_dtype="bfloat16")
    fresh = _fresh(params, acceleration_mode="win2", state_dtype="bfloat16")
    _caught(lambda: fresh.load_state_dict(copy.deepcopy(opt.state_dict())))
    for p in fresh.param_groups[0]["params"]:  # y = p: a difference of 0
        assert fresh.state[p]["y_delta"].dtype == torch.bfloat16 and not fresh.state[p]["y_delta"].any()
