"""Adan as published (sail-sg/Adan) with its own gradient clipping: ``pre_grad`` starts from the *clipped* first
gradient (the published code sets ``neg_pre_grad = -clip * grad``), so the first gradient difference is zero,
on every path; a parameter first stepped later starts from its clipped gradient too."""

import math

import pytest
import torch

import hf_win

BETAS, EPS, WD, LR = (0.98, 0.92, 0.99), 1e-8, 0.02, 0.05


def _published(params, grads_seq, max_norm):
    """Adan (mode none, proximal decay) per ALGORITHM.md, float64, one group, the step count in the group."""
    b1, b2, b3 = BETAS
    ps = [p.detach().clone() for p in params]
    st = {}
    for t, grads in enumerate(grads_seq, 1):
        present = [(i, g) for i, g in enumerate(grads) if g is not None]
        norm = math.sqrt(sum(float(g.pow(2).sum()) for _, g in present))
        clip = min(max_norm / (norm + EPS), 1.0)
        for i, g in present:
            g = g * clip
            s = st.setdefault(i, dict(m=torch.zeros_like(g), d=torch.zeros_like(g), n=torch.zeros_like(g), prev=g.clone()))
            diff = g - s["prev"]
            s["m"] = b1 * s["m"] + (1 - b1) * g
            s["d"] = b2 * s["d"] + (1 - b2) * diff
            w = g + b2 * diff
            s["n"] = b3 * s["n"] + (1 - b3) * w * w
            u = (s["m"] / (1 - b1 ** t) + b2 * s["d"] / (1 - b2 ** t)) / (s["n"].sqrt() / math.sqrt(1 - b3 ** t) + EPS)
            s["prev"] = g
            ps[i] = (ps[i] - LR * u) / (1 + LR * WD)
    return ps


@pytest.mark.parametrize("flags", [dict(foreach=False), dict(foreach=True), dict(fused=True)])
def test_adan_with_active_clipping_follows_the_published_code(flags):
    g = torch.Generator().manual_seed(0)
    init = [torch.randn(s, generator=g, dtype=torch.float64) for s in ((4, 3), (5,), (2, 2))]
    grads_seq = [[torch.randn(p.shape, generator=g, dtype=torch.float64) * 3 for p in init] for _ in range(6)]
    for grads in grads_seq[:2]:
        grads[2] = None  # the third parameter is first stepped at step 3, with clipping active
    params = [torch.nn.Parameter(p.clone()) for p in init]
    opt = hf_win.Adan(params, lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, max_grad_norm=1.0,
                      acceleration_mode="none", **flags)
    for grads in grads_seq:
        for p, gr in zip(params, grads):
            p.grad = None if gr is None else gr.clone()
        opt.step()
    expected = _published(init, grads_seq, max_norm=1.0)
    assert max(float((p.detach() - e).abs().max()) for p, e in zip(params, expected)) < 1e-12
    # the clipping was active (norms ~ 3 sqrt(n) > 1), so starting from the raw gradient would differ
    raw = _published(init, grads_seq, max_norm=1e9)
    assert max(float((p.detach() - e).abs().max()) for p, e in zip(params, raw)) > 1e-3
