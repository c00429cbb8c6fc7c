"""Low-precision state and parameters: ``state_dtype``, ``bf16_stochastic_round``, ``rounding_seed``.

What is checked: the keywords reach every optimizer and are validated before any state exists; buffers live
in the state dtype; a bfloat16 parameter under a step far below half an ulp moves as the float32 one does
with stochastic rounding, and not at all without it; bfloat16-state trajectories stay close to
float32-state ones; every path rounds the same way; the state dict round trip and a resumed run are
bitwise; the memory accounting follows the state dtype. (The same keys through the Trainer's
``--optim_args``: test_trainer_args.py.)
"""

import copy
import io

import pytest
import torch

import hf_win
from hf_win.optim._win import extra_state_keys
from hf_win.registry import OPTIMIZERS

CLASSES = [spec.cls for spec in OPTIMIZERS.values() if not spec.wraps_base]  # Win(base): no state_dtype


MODES = ("none", "win", "win2")
# The execution paths; ``{}`` is the default (the C kernel on CPU where a compiler exists).
PATHS = [("per-tensor", dict(foreach=False)), ("foreach", dict(foreach=True)), ("kernel", {})]
LOW = dict(state_dtype="bfloat16", bf16_stochastic_round=True)


def _lr(cls):
    return dict(lr=1e-2) if cls is hf_win.SGD else {}


def _ulps(a, b):
    """|a - b| in bfloat16 ulps, per element (both bfloat16, same sign)."""
    return (a.view(torch.int16).int() - b.view(torch.int16).int()).abs()


def _tensors(opt, params):
    """Parameters, then every state buffer in a fixed order."""
    out = [p.detach() for p in params]
    for p in params:
        out += [v for _, v in sorted(opt.state[p].items()) if torch.is_tensor(v)]
    return out


SHAPES = [(64, 33), (257,), (3, 5, 7)]


def _problem(seed=0, steps=6):
    g = torch.Generator().manual_seed(seed)
    init = [torch.randn(s, generator=g) for s in SHAPES]
    grads = [[torch.randn(s, generator=g) for s in SHAPES] for _ in range(steps)]
    return init, grads


def _run(cls, mode, init, grads, param_dtype=torch.bfloat16, opt=None, params=None, **kw):
    if params is None:
        params = [torch.nn.Parameter(x.to(param_dtype, copy=True)) for x in init]
    if opt is None:
        opt = cls(params, acceleration_mode=mode, **_lr(cls), **kw)
    for g in grads:
        for p, gg in zip(params, g):
            p.grad = gg.to(p.dtype)
        opt.step()
    return params, opt


# ----------------------------------------------------------------------------------------- keywords
@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_keywords_are_group_keys_and_buffers_use_the_state_dtype(cls):
    p = torch.nn.Parameter(torch.randn(10, 3))
    opt = cls([p], acceleration_mode="win2", state_dtype=torch.bfloat16, bf16_stochastic_round=True,
              rounding_seed=123, **_lr(cls))
    group = opt.param_groups[0]
    assert (group["state_dtype"], group["bf16_stochastic_round"], group["rounding_seed"]) == (torch.bfloat16, True, 123)
    p.grad = torch.randn(10, 3)
    opt.step()
    buffers = {k: v for k, v in opt.state[p].items() if torch.is_tensor(v)}
    expected = set(cls._state_keys(group)) | set(extra_state_keys("win2", differences=True))  # x - p, y - p
    assert set(buffers) == expected
    assert all(v.dtype == torch.bfloat16 and v.shape == p.shape for v in buffers.values())
    assert p.dtype == torch.float32
    # the defaults change nothing: buffers in the parameter's dtype
    q = torch.nn.Parameter(torch.randn(4, dtype=torch.float64))
    opt = cls([q], **_lr(cls))
    assert opt.defaults["state_dtype"] is None and opt.defaults["bf16_stochastic_round"] is False
    assert opt.defaults["rounding_seed"] == 0
    q.grad = torch.randn(4, dtype=torch.float64)
    opt.step()
    assert all(v.dtype == torch.float64 for v in opt.state[q].values() if torch.is_tensor(v))


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
@pytest.mark.parametrize("kw, match", [
    (dict(state_dtype="float16"), r"state_dtype must be None \(the parameter's dtype\), 'float32' or 'bfloat16'"),
    (dict(state_dtype=torch.float64), "state_dtype must be None"),
    (dict(state_dtype=8), "state_dtype must be None"),
    (dict(bf16_stochastic_round="yes"), "bf16_stochastic_round must be True or False"),
    (dict(bf16_stochastic_round=1), "bf16_stochastic_round must be True or False"),
    (dict(rounding_seed=-1), r"rounding_seed must be an int in \[0, 2\*\*31\)"),
    (dict(rounding_seed=2**31), "rounding_seed must be an int"),
    (dict(rounding_seed=1.0), "rounding_seed must be an int"),
    (dict(rounding_seed=True), "rounding_seed must be an int"),
])
def test_bad_values_are_refused_with_the_argument_named(cls, kw, match):
    p = torch.nn.Parameter(torch.ones(3))
    with pytest.raises(ValueError, match=f"{cls.__name__}: {match}"):
        cls([p], **_lr(cls), **kw)
    opt = cls([p], **_lr(cls))
    q = torch.nn.Parameter(torch.ones(3))
    key, value = next(iter(kw.items()))
    with pytest.raises(ValueError, match=rf"{key} \(param group 1\)"):
        opt.add_param_group({"params": [q], key: value})
    assert len(opt.param_groups) == 1 and not opt.state


def test_the_state_dtype_names_and_dtypes_are_the_same():
    init, grads = _problem(steps=3)
    a = _run(hf_win.AdamW, "win2", init, grads, state_dtype="bfloat16")
    b = _run(hf_win.AdamW, "win2", init, grads, state_dtype=torch.bfloat16)
    assert all(torch.equal(x, y) for x, y in zip(_tensors(a[1], a[0]), _tensors(b[1], b[0])))


def test_complex_parameters_keep_complex_state():
    p = torch.nn.Parameter(torch.randn(8, dtype=torch.complex64))
    opt = hf_win.AdamW([p], acceleration_mode="win2", state_dtype="bfloat16")
    p.grad = torch.randn(8, dtype=torch.complex64)
    opt.step()
    assert all(v.dtype == torch.complex64 for v in opt.state[p].values() if torch.is_tensor(v))


# ------------------------------------------------------------------ bfloat16 parameters that move
N = 16384


def _movement(cls, mode, param_dtype, **kw):
    """Mean decrease of parameters starting at 1.0 after 200 steps at lr 1e-4 with positive-mean gradients."""
    g = torch.Generator().manual_seed(0)
    p = torch.nn.Parameter(torch.ones(N, dtype=param_dtype))
    opt = cls([p], lr=1e-4, acceleration_mode=mode, weight_decay=0.0, **kw)
    for _ in range(200):
        p.grad = (torch.randn(N, generator=g) * 0.1 + 0.5).to(param_dtype)
        opt.step()
    return float((1.0 - p.detach().double()).mean()), p.detach()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("state_dtype", [None, "float32"])
def test_a_bf16_parameter_moves_on_average_as_the_fp32_one(mode, state_dtype):
    # lr 1e-4 is ~1/40 of half a bfloat16 ulp at 1.0: rounded to nearest, plain AdamW never moves.
    ref, _ = _movement(hf_win.AdamW, mode, torch.float32)
    assert 0.015 < ref < 0.025
    moved, p = _movement(hf_win.AdamW, mode, torch.bfloat16, state_dtype=state_dtype, bf16_stochastic_round=True)
    assert abs(moved / ref - 1) < 0.03, (moved, ref)
    assert (p != 1).float().mean() > 0.9


@pytest.mark.parametrize("state_dtype", [None, "float32"])
def test_without_stochastic_rounding_plain_adamw_does_not_move_a_bf16_parameter(state_dtype):
    moved, p = _movement(hf_win.AdamW, "none", torch.bfloat16, state_dtype=state_dtype)
    assert moved == 0.0 and bool((p == 1).all())


# --------------------------------------------------------------- bf16 state close to fp32 state
@pytest.mark.parametrize("cls", [hf_win.AdamW, hf_win.SGD], ids=lambda c: c.__name__)
@pytest.mark.parametrize("mode", ["win", "win2"])
def test_bf16_state_trajectories_stay_close_to_fp32_state(cls, mode):
    # least squares: 300 steps; the bf16-state run ends near the fp32-state one, relative to how far both moved
    g = torch.Generator().manual_seed(0)
    a = torch.randn(256, 64, generator=g)
    w_true = torch.randn(64, generator=g)
    b = a @ w_true
    w0 = torch.zeros(64)

    def train(**kw):
        w = torch.nn.Parameter(w0.clone())
        opt = cls([w], lr=1e-2 if cls is hf_win.AdamW else 2e-3, acceleration_mode=mode, weight_decay=0.0, **kw)
        losses = []
        for _ in range(300):
            loss = ((a @ w - b) ** 2).mean()
            w.grad, = torch.autograd.grad(loss, w)
            opt.step()
            losses.append(float(loss.detach()))
        return w.detach(), losses

    w32, l32 = train()
    w16, l16 = train(state_dtype="bfloat16")
    moved = float((w32 - w0).norm())
    assert l32[-1] < 0.05 * l32[0]  # it trains
    assert float((w16 - w32).norm()) < 0.02 * moved
    assert l16[-1] < 0.05 * l16[0]


# -------------------------------------------------------------------------- every path agrees
@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("param_dtype", [torch.bfloat16, torch.float32], ids=["bf16-params", "fp32-params"])
def test_every_path_rounds_the_same_way(cls, mode, param_dtype):
    init, grads = _problem()
    runs = {}
    for name, path in PATHS:
        params, opt = _run(cls, mode, init, grads, param_dtype, **LOW, **path)
        runs[name] = (_tensors(opt, params), opt.step_path())
    if "kernel" not in runs["kernel"][1]:
        pytest.skip(f"no kernel here: {runs['kernel'][1]}")
    ref = runs["foreach"][0]
    assert all(t.dtype == torch.bfloat16 for t in ref[len(SHAPES):])
    # the eager paths do the same float32 operations, so they round the same values the same way: bitwise
    assert all(torch.equal(x, y) for x, y in zip(runs["per-tensor"][0], ref))
    _assert_one_rounding_apart(runs["kernel"][0], ref)


def _assert_one_rounding_apart(got, ref):
    """Where two paths' float32 values differ by a float32 rounding, a stochastic rounding whose random bits
    sit at that boundary goes the other way: at most one bf16 ulp apart, on a small fraction of elements.
    (A value that cancels to about zero, e.g. a moment of opposite gradients, may land on either side of
    zero: there the two differ by a float32 rounding of the operands, 1e-7 absolute, not by bf16 ulps. The
    Win sequences of float32 parameters are bf16 differences from the parameter, small numbers whose ulp is
    far below the parameter's float32 precision: there a flip carried through later steps is allowed up
    to 1e-6, a few float32 ulps of the parameters, which are near 1.)"""
    n = differ = 0
    for x, y in zip(got, ref):
        if x.dtype == torch.bfloat16:
            far = (_ulps(x, y) > 1) & ((x.float() - y.float()).abs() > 1e-6)
            assert not bool(far.any()), (x[far], y[far])
            differ += int((x != y).sum())
            n += x.numel()
        else:  # float32 parameters: float32 rounding differences, but for where a flip above moved them
            loose = ~torch.isclose(x, y, rtol=1e-5, atol=1e-6)
            assert float((x - y).abs().max()) < 1e-4 and int(loose.sum()) <= max(2, x.numel() // 1000)
    assert differ <= max(2, n // 1000), (differ, n)


def test_the_seed_changes_the_rounding_and_only_the_seed():
    init, grads = _problem(steps=3)
    a = _tensors(*reversed(_run(hf_win.AdamW, "win2", init, grads, **LOW, rounding_seed=1)))
    b = _tensors(*reversed(_run(hf_win.AdamW, "win2", init, grads, **LOW, rounding_seed=1)))
    c = _tensors(*reversed(_run(hf_win.AdamW, "win2", init, grads, **LOW, rounding_seed=2)))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))
    # only the rounding changes: the trajectories stay within a few ulps of each other
    assert all(float((x.float() - y.float()).abs().max()) < 0.05 for x, y in zip(a, c))


# ------------------------------------------------------------------------ state dict and resume
def _roundtrip(sd):
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
@pytest.mark.parametrize("param_dtype", [torch.bfloat16, torch.float32], ids=["bf16-params", "fp32-params"])
@pytest.mark.parametrize("path", [p for _, p in PATHS], ids=[n for n, _ in PATHS])
def test_resume_from_the_state_dict_is_bitwise(cls, param_dtype, path):
    init, grads = _problem(steps=8)
    kw = dict(LOW, rounding_seed=7, **path)
    whole_params, whole = _run(cls, "win2", init, grads, param_dtype, **kw)

    params, opt = _run(cls, "win2", init, grads[:4], param_dtype, **kw)
    sd = _roundtrip(opt.state_dict())
    assert sd["param_groups"][0]["rounding_seed"] == 7
    assert sd["param_groups"][0]["bf16_stochastic_round"] is True
    saved_params = [p.detach().clone() for p in params]
    # a fresh process: new parameters from the checkpoint, a new optimizer built with the defaults
    fresh = [torch.nn.Parameter(p.clone()) for p in saved_params]
    opt2 = cls(fresh, acceleration_mode="win2", **_lr(cls), **path)
    opt2.load_state_dict(sd)
    # the state comes back in the dtype it was saved in (torch would cast it to the parameter's)
    assert [t.dtype for t in _tensors(opt2, fresh)] == [t.dtype for t in _tensors(opt, params)]
    assert all(torch.equal(x, y) for x, y in zip(_tensors(opt2, fresh), _tensors(opt, params)))
    _run(cls, "win2", init, grads[4:], opt=opt2, params=fresh)
    got, want = _tensors(opt2, fresh), _tensors(whole, whole_params)
    assert [t.dtype for t in got] == [t.dtype for t in want]
    assert all(torch.equal(x, y) for x, y in zip(got, want))


def test_fp32_state_of_bf16_parameters_survives_the_state_dict():
    init, grads = _problem(steps=2)
    params, opt = _run(hf_win.AdamW, "win", init, grads, torch.bfloat16, state_dtype="float32")
    opt2 = hf_win.AdamW([torch.nn.Parameter(p.detach().clone()) for p in params], acceleration_mode="win")
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    a, b = _tensors(opt, params), _tensors(opt2, opt2.param_groups[0]["params"])
    assert [t.dtype for t in a] == [t.dtype for t in b] and all(torch.equal(x, y) for x, y in zip(a, b))
    assert any(t.dtype == torch.float32 for t in b)


# ----------------------------------------------------------------------------------- memory
@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("state_dtype", [None, "float32", "bfloat16"])
def test_state_bytes_follow_the_state_dtype(cls, mode, state_dtype):
    params = [torch.nn.Parameter(torch.randn(s)) for s in SHAPES]
    opt = cls(params, acceleration_mode=mode, state_dtype=state_dtype, **_lr(cls))
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    n = sum(p.numel() for p in params)
    per = cls.state_bytes_per_parameter(mode, torch.float32, state_dtype=state_dtype)
    assert opt.state_bytes() == per * n
    assert per == cls.buffers_per_parameter(mode) * (2 if state_dtype == "bfloat16" else 4)
    from hf_win.trainer import optimizer_state_bytes

    assert optimizer_state_bytes(cls, dict(acceleration_mode=mode, state_dtype=state_dtype), params) == per * n


def test_adamw_win2_with_bf16_state_holds_torch_adamw_fp32_state():
    params = [torch.nn.Parameter(torch.randn(s)) for s in SHAPES]
    ours = hf_win.AdamW(params, acceleration_mode="win2", state_dtype="bfloat16")
    theirs = torch.optim.AdamW(params)
    for p in params:
        p.grad = torch.randn_like(p)
    ours.step()
    theirs.step()
    torch_bytes = sum(v.numel() * v.element_size() for st in theirs.state.values() for k, v in st.items()
                      if k != "step")
    assert ours.state_bytes() == torch_bytes == 8 * sum(p.numel() for p in params)


@pytest.mark.parametrize("path", [dict(foreach=False), dict(foreach=True)], ids=["per-tensor", "foreach"])
def test_rounding_in_chunks_is_bitwise_the_same(monkeypatch, path):
    from hf_win.optim import _rounding

    init, grads = _problem(steps=3)
    whole = _tensors(*reversed(_run(hf_win.AdamW, "win2", init, grads, **LOW, **path)))
    monkeypatch.setattr(_rounding, "SR_CHUNK", 100)  # every tensor in several chunks, the last one partial
    chunked = _tensors(*reversed(_run(hf_win.AdamW, "win2", init, grads, **LOW, **path)))
    assert all(torch.equal(x, y) for x, y in zip(whole, chunked))


# ------------------------------------------------------------------ the Triton kernel (interpreter)
@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_the_triton_kernel_rounds_as_foreach_and_resumes_bitwise(cls, monkeypatch):
    """The CUDA kernel, run on CPU tensors by Triton's interpreter: bf16 parameters with stochastic
    rounding and bf16 state, Win2, against foreach (one rounding apart at most, as the C kernel), and a
    resume through the state dict bitwise equal to the uninterrupted run."""
    init, grads = _problem(steps=4)
    _, ref = _run(cls, "win2", init, grads, **LOW, foreach=True)
    ref = _tensors(ref, _)
    monkeypatch.setenv("HF_WIN_FUSED_BACKEND", "triton")
    params, opt = _run(cls, "win2", init, grads, **LOW)
    assert opt.step_path() == "triton kernel"
    _assert_one_rounding_apart(_tensors(opt, params), ref)
    half, opt1 = _run(cls, "win2", init, grads[:2], **LOW)
    fresh = [torch.nn.Parameter(p.detach().clone()) for p in half]
    opt2 = cls(fresh, acceleration_mode="win2", **_lr(cls), **LOW)
    opt2.load_state_dict(_roundtrip(opt1.state_dict()))
    _run(cls, "win2", init, grads[2:], opt=opt2, params=fresh)
    assert all(torch.equal(x, y) for x, y in zip(_tensors(opt2, fresh), _tensors(opt, params)))


# ------------------------------------------- bfloat16 state that keeps float32 parameters float32-precise
@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
@pytest.mark.parametrize("mode", ["win", "win2"])
def test_bf16_state_keeps_the_sequences_of_fp32_parameters_as_differences(cls, mode):
    # float32 and float64 parameters: x - p (and y - p) in bfloat16; bfloat16 parameters: x (and y) as before
    wide = [torch.nn.Parameter(torch.randn(6)), torch.nn.Parameter(torch.randn(5, dtype=torch.float64))]
    narrow = torch.nn.Parameter(torch.randn(7).bfloat16())
    opt = cls([*wide, narrow], acceleration_mode=mode, state_dtype="bfloat16", **_lr(cls))
    for p in (*wide, narrow):
        p.grad = torch.randn_like(p)
    opt.step()
    plain = {"win": {"x"}, "win2": {"x", "y"}}[mode]
    for p in wide:
        assert {k for k in opt.state[p] if k in ("x", "y", "x_delta", "y_delta")} == {k + "_delta" for k in plain}
    assert {k for k in opt.state[narrow] if k in ("x", "y", "x_delta", "y_delta")} == plain
    assert all(v.dtype == torch.bfloat16 for p in (*wide, narrow) for k, v in opt.state[p].items() if k != "step")


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("path", [p for _, p in PATHS], ids=[n for n, _ in PATHS])
def test_a_step_at_lr_0_with_zero_gradients_changes_no_bit_of_fp32_parameters(cls, mode, path):
    # what torch.distributed.checkpoint does to create the state before loading into it; with the sequences
    # kept as bfloat16 copies of x, about a third of the elements moved by up to 0.36 %
    g = torch.Generator().manual_seed(3)
    params = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in SHAPES]
    before = [p.detach().clone() for p in params]
    opt = cls(params, acceleration_mode=mode, lr=0.0, weight_decay=0.05, state_dtype="bfloat16", **path)
    for p in params:
        p.grad = torch.zeros_like(p)
    opt.step()
    assert all(torch.equal(p.detach(), b) for p, b in zip(params, before)), opt.step_path()


def _distance_to_float64(cls, mode, param_dtype, **kw):
    """``benchmarks/state_precision.py``'s measure (the one definition): ``|p - p64|`` after 200 steps at lr
    1e-3 on a noisy quadratic, ``p64`` the same run in float64."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "state_precision.py"
    spec = importlib.util.spec_from_file_location("state_precision_bench", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench.distance(cls, mode, param_dtype, 200, **kw)


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
@pytest.mark.parametrize("mode", ["win", "win2"])
def test_bf16_state_keeps_fp32_parameters_as_precise_as_the_base_optimizer_does(cls, mode):
    # The bfloat16 moments cost what they cost the base optimizer (mode "none", same state); the Win sequences
    # add nothing of their own (measured: 0.99-1.01x). Kept as bfloat16 copies of x, they gave the parameters
    # bfloat16 precision: as far from float64 as bfloat16 parameters are (56x the base optimizer's distance
    # for AdamW, 37x LAMB, 2.3x SGD).
    win = _distance_to_float64(cls, mode, torch.float32, state_dtype="bfloat16")
    base = _distance_to_float64(cls, "none", torch.float32, state_dtype="bfloat16")
    assert win <= 1.25 * base, (win, base)


def _saved(cls, mode, **kw):
    init, grads = _problem(steps=3)
    params, opt = _run(cls, mode, init, grads, torch.float32, **kw)
    return [p.detach().clone() for p in params], _roundtrip(opt.state_dict()), opt


@pytest.mark.parametrize("mode", ["win", "win2"])
def test_a_checkpoint_with_x_and_y_loads_into_bf16_state_as_differences(mode):
    values, sd, _ = _saved(hf_win.AdamW, mode, state_dtype=None)  # float32 x (and y)
    params = [torch.nn.Parameter(v.clone()) for v in values]
    opt = hf_win.AdamW(params, acceleration_mode=mode, state_dtype="bfloat16")
    with pytest.warns(UserWarning, match="x -> x_delta"):
        opt.load_state_dict(sd)
    for i, p in enumerate(params):
        for k in extra_state_keys(mode):
            got = opt.state[p][k + "_delta"]
            assert got.dtype == torch.bfloat16 and k not in opt.state[p]
            assert torch.equal(got, (sd["state"][i][k] - p.detach()).bfloat16())
    # and back: a float32-state optimizer rebuilds x = p + x_delta
    back = hf_win.AdamW(params, acceleration_mode=mode, state_dtype="float32")
    with pytest.warns(UserWarning, match="x_delta -> x"):
        back.load_state_dict(_roundtrip(opt.state_dict()))
    for p in params:
        for k in extra_state_keys(mode):
            assert torch.equal(back.state[p][k], p.detach() + opt.state[p][k + "_delta"].float())
            assert k + "_delta" not in back.state[p]


def test_an_older_bf16_checkpoint_with_absolute_x_is_converted_to_differences():
    # hf_win before the difference form kept x as a bfloat16 copy; such a checkpoint still loads
    values, sd, opt = _saved(hf_win.AdamW, "win2", state_dtype="bfloat16")
    for i, v in enumerate(values):
        st = sd["state"][i]
        for k in ("x", "y"):
            st[k] = (v + st.pop(k + "_delta").float()).bfloat16()
    params = [torch.nn.Parameter(v.clone()) for v in values]
    fresh = hf_win.AdamW(params, acceleration_mode="win2", state_dtype="bfloat16")
    with pytest.warns(UserWarning, match="x -> x_delta"):
        fresh.load_state_dict(sd)
    for i, p in enumerate(params):
        for k in ("x", "y"):
            assert torch.equal(fresh.state[p][k + "_delta"], (sd["state"][i][k].float() - p.detach()).bfloat16())
