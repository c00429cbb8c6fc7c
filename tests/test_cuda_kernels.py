"""The CUDA path without a GPU: every Triton kernel the library generates compiled for sm_80 and sm_90
(``kernels/aot.py``) with the facts of its PTX asserted; the two kernel variants (whole aligned blocks,
masked tails and misaligned tensors) against foreach under Triton's interpreter. Never timed.
"""

import pytest
import torch

import hf_win
from hf_win.optim import kernels
from hf_win.optim.kernels import cache
from hf_win.optim.kernels.triton import BLOCK, aligned, block_tables


@pytest.fixture(autouse=True)
def fresh_kernels(monkeypatch, tmp_path_factory):
    monkeypatch.setenv("HF_WIN_CACHE_DIR", str(tmp_path_factory.mktemp("kernels")))
    kernels.reset()
    cache._reset_for_tests()
    yield
    kernels.reset()
    cache._reset_for_tests()


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
