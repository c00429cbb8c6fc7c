"""The CUDA path without a GPU: every Triton kernel the library generates compiled for sm_80 and sm_90
(``kernels/aot.py``) with the facts of its PTX asserted; the two kernel variants (whole aligned blocks,
masked tails and misaligned tensors) against foreach under Triton's interpreter. Never timed.
"""

import pytest
import torch

import hf_win
from hf_win.optim import kernels
from hf_win.optim.kernels.triton import BLOCK, aligned, block_tables

pytestmark = pytest.mark.usefixtures("fresh_kernel_cache")  # each test: its own cache folder, no kernel loaded


def _misaligned(n: int) -> torch.nn.Parameter:
    """A parameter viewing a storage at an offset of one float32 (4 bytes past a 16-byte boundary)."""
    base = torch.randn(n + 1)
    return torch.nn.Parameter(base[1:])


@pytest.mark.parametrize("mode", ["win", "win2", "none"])
@pytest.mark.parametrize("name", ["adamw_win", "lamb_win"])
def test_whole_block_and_masked_kernels_match_foreach(name, mode, monkeypatch):
    """Aligned tensors of several blocks plus a tail, a misaligned view, a tensor under one block: the
    unmasked kernel takes the whole blocks of the aligned ones, the masked kernel the rest, and every
    parameter and state buffer agrees with foreach."""
    monkeypatch.setenv("HF_WIN_FUSED_BACKEND", "triton")
    sizes = [2 * BLOCK + 7, BLOCK, 5]
    results = []
    for flags in ({"fused": True}, {"foreach": True, "fused": False}):
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(n)) for n in sizes] + [_misaligned(BLOCK + 3)]
        opt = hf_win.create_optimizer(name, params, lr=0.01, weight_decay=0.01, acceleration_mode=mode, **flags)
        for _ in range(3):
            for p in params:
                p.grad = torch.randn_like(p)
            opt.step()
        results.append((params, opt))
        if "fused" in flags and flags["fused"]:
            assert opt.step_path() == "triton kernel"
            arrays = [[p, p.grad, *[v for v in opt.state[p].values() if torch.is_tensor(v) and v.dim()]] for p in params]
            flags_aligned = [aligned([t.data_ptr() for t in a]) for a in arrays]
            assert flags_aligned == [True, True, True, False]
            _, _, _, _, full, tail = block_tables([p.numel() for p in params], flags_aligned)
            assert full.numel() == 3 and tail.numel() == 4  # both kernels ran
    (fp, fopt), (rp, ropt) = results
    for a, b in zip(fp, rp):
        torch.testing.assert_close(a, b, rtol=2e-6, atol=2e-6)
        for key, v in fopt.state[a].items():
            if torch.is_tensor(v) and v.dim():
                torch.testing.assert_close(v, ropt.state[b][key], rtol=2e-6, atol=2e-6)


# ------------------------------------------------------------------ a kernel cannot fail a step halfway
def _two_partition_run(monkeypatch, inject=None, steps=3, **flags):
    """AdamW-Win over float32 and float64 parameters of one group (two partitions, two kernels)."""
    torch.manual_seed(4)
    params = [torch.nn.Parameter(torch.randn(n, dtype=d)) for n, d in
              ((BLOCK + 9, torch.float32), (7, torch.float64), (33, torch.float32), (5, torch.float64))]
    opt = hf_win.AdamW(params, lr=0.02, weight_decay=0.01, acceleration_mode="win", **flags)
    for k in range(steps):
        for p in params:
            p.grad = torch.randn_like(p)
        if inject is not None:
            inject(k)
        opt.step()
    return params, opt


def _assert_same(a_params, b_params):
    for a, b in zip(a_params, b_params):
        tol = 1e-12 if a.dtype == torch.float64 else 2e-6
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def test_a_compile_error_falls_back_to_foreach_before_any_tensor_is_touched(monkeypatch, caplog):
    from hf_win.optim.kernels.triton import TritonKernel

    monkeypatch.setenv("HF_WIN_FUSED_BACKEND", "triton")
    ref, _ = _two_partition_run(monkeypatch, foreach=True, fused=False)

    def fail(self, device):
        raise RuntimeError("ptxas fatal: injected")

    monkeypatch.setattr(TritonKernel, "prepare", fail)
    with caplog.at_level("WARNING", logger="hf_win.kernels"):
        params, opt = _two_partition_run(monkeypatch)
    _assert_same(params, ref)
    path = opt.step_path()
    assert path == "foreach (AdamW: the triton kernel could not be compiled for cpu (RuntimeError: ptxas fatal: injected))"
    logged = [r for r in caplog.records if "injected" in r.getMessage()]
    assert len(logged) == 1  # once (the same reason for both structures), not once per step
    assert kernels.counters()["calls"] == 0


def test_a_launch_error_in_the_second_partition_steps_every_tensor_exactly_once(monkeypatch, caplog):
    from hf_win.optim.kernels.triton import TritonKernel

    monkeypatch.setenv("HF_WIN_FUSED_BACKEND", "triton")
    ref, ref_opt = _two_partition_run(monkeypatch, foreach=True, fused=False)
    real_run = TritonKernel.run
    calls = []

    def second_fails(self, *args, **kwargs):
        calls.append(self)
        if len(calls) == 2:  # the first step's second partition
            raise RuntimeError("CUDA error: injected launch failure")
        return real_run(self, *args, **kwargs)

    monkeypatch.setattr(TritonKernel, "run", second_fails)
    with caplog.at_level("WARNING", logger="hf_win.kernels"):
        params, opt = _two_partition_run(monkeypatch)
    _assert_same(params, ref)
    for p, r in zip(params, ref):
        assert opt.state[p]["step"] == ref_opt.state[r]["step"] == 3
        for key in ("exp_avg", "exp_avg_sq", "x"):
            tol = 1e-12 if p.dtype == torch.float64 else 2e-6
            torch.testing.assert_close(opt.state[p][key], ref_opt.state[r][key], rtol=tol, atol=tol)
    path = opt.step_path()
    assert path.startswith("triton kernel / foreach (AdamW: the triton kernel failed to launch")
    assert "injected launch failure" in path
    assert len([r for r in caplog.records if "injected launch failure" in r.getMessage()]) == 1
    # the broken kernel is never launched again; the other one still runs every step
    assert calls.count(calls[1]) == 1 and calls.count(calls[0]) == 3


# ------------------------------------------------------------------ no host-device synchronisation
@pytest.mark.parametrize("name", ["adamw_win", "lamb_win", "sgd_win"])
def test_a_step_reads_no_tensor_value_on_the_host(name, monkeypatch):
    """With clipping on, after the first step (which traces and builds), no step reads a tensor's value
    on the host (on a GPU: a synchronisation): the clipping coefficient is read by the kernel where it
    is. Results equal foreach's."""
    monkeypatch.setenv("HF_WIN_FUSED_BACKEND", "triton")
    out = []
    for flags in ({"fused": True}, {"foreach": True, "fused": False}):
        torch.manual_seed(5)
        params = [torch.nn.Parameter(torch.randn(n)) for n in (BLOCK + 3, 17)]
        kw = {"lr": 0.05} if name == "sgd_win" else {}
        opt = hf_win.create_optimizer(name, params, max_grad_norm=0.5, acceleration_mode="win2", **kw, **flags)
        for k in range(3):
            for p in params:
                p.grad = torch.randn_like(p) * (k + 1)  # the norm is past the bound: the clip is active
            if k and flags.get("fused"):
                with monkeypatch.context() as m:
                    for attr in ("__float__", "item", "tolist", "__bool__"):
                        m.setattr(torch.Tensor, attr, _no_host_read(attr))
                    opt.step()
            else:
                opt.step()
        out.append(params)
        if flags.get("fused"):
            assert opt.step_path() == "triton kernel"
    _assert_same(*out)


def _no_host_read(attr):
    def read(self, *args, **kwargs):
        raise AssertionError(f"Tensor.{attr} in a step: the host waits for the device")
    return read


# ------------------------------------------------------------------ every kernel compiled for real GPUs
def test_ptx_facts_read_access_widths_and_arithmetic():
    from hf_win.optim.kernels.aot import ptx_facts, ptxas_facts

    ptx = """
    @%p1 ld.global.v4.b32 { %r1, %r2, %r3, %r4 }, [ %rd1 + 0 ];
    ld.global.b64 %rd2, [ %rd3 + 0 ];
    @%p2 ld.global.L1::evict_last.v2.b64 { %rd4, %rd5 }, [ %rd6 + 0 ];
    st.global.b16 [ %rd7 + 0 ], %rs1;
    div.rn.f32 %r5, %r6, %r7;  sqrt.rn.f32 %r8, %r9;  fma.rn.f32 %r1, %r2, %r3, %r4;  div.full.f32 %r1, %r2, %r3;
    """
    facts = ptx_facts(ptx)
    assert facts["loads"] == {64: 1, 128: 2} and facts["stores"] == {16: 1}
    assert (facts["fma"], facts["div_rn"], facts["sqrt_rn"], facts["approx"]) == (1, 1, 1, 1)
    log = "ptxas info    : Used 72 registers, used 0 barriers\n    0 bytes stack frame, 8 bytes spill stores, 4 bytes spill loads"
    assert ptxas_facts(log) == {"registers": 72, "spill_stores": 8, "spill_loads": 4}


def test_every_generated_kernel_compiles_for_sm80_and_sm90_at_full_width(tmp_path):
    """``python -m hf_win.optim.kernels.aot --arch sm_80,sm_90``: every case (registry optimizers and
    Lion-Win x mode x precision x flags x clipping, and the Win(base) acceleration pass) fuses, every distinct kernel function compiles to a
    cubin for both targets with no spill, no FMA and no approximate division or root; every whole-block
    kernel moves every array byte in 128-bit accesses; every single-pass step moves the floor's bytes
    (AdamW 28, AdamW-Win 36, Win2 44 per float32 parameter)."""
    import json

    from hf_win.optim.kernels import aot

    assert aot.main(["--arch", "sm_80,sm_90", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["failures"] == []
    names = {c["case"].split(" ")[0] for c in report["cases"]}
    # the Win(base) wrappers (wraps_base) share one kernel, their acceleration pass (win_pass)
    own = {n for n in hf_win.available_optimizers() if not hf_win.get_optimizer_spec(n).wraps_base}
    assert names == own | {"lion_win", "win_pass"}
    assert len(report["cases"]) == len(aot.cases())
    for case in report["cases"]:
        for kid in case["kernels"]:
            assert set(report["kernels"][kid]) == {"sm_80", "sm_90"}, kid
    for kid, per in report["kernels"].items():
        for arch, f in per.items():
            assert f["spill_stores"] == 0 and f["spill_loads"] == 0, (kid, arch)
            assert f["fma"] == 0 and f["approx"] == 0, (kid, arch)
            assert (tmp_path / arch / f"{kid}.ptx").is_file()
            if kid.endswith("_full"):
                assert aot.full_width(f), (kid, arch, f["loads"], f["stores"], f["array_bytes_per_thread"])
    by_case = {c["case"]: c for c in report["cases"]}
    for mode, floor in (("none", 28), ("win", 36), ("win2", 44)):
        c = by_case[f"adamw_win {mode} float32"]
        assert c["bytes_per_element"] == c["floor"] == floor
    for c in report["cases"]:
        if not c["case"].startswith("lamb_win"):  # LAMB's norms need a second pass
            assert c["bytes_per_element"] == c["floor"], c
    assert "**0 failures**" in (tmp_path / "report.md").read_text()
