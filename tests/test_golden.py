"""Every reference trajectory replays, through both execution paths."""

import pytest
import torch

from _golden import cases, replay

IDS = [c["id"] for c in cases()]


def test_golden_file_has_every_optimizer_and_mode():
    seen = {(c["optimizer"], c["acceleration_mode"]) for c in cases()}
    assert len(cases()) == 57
    assert seen == {(o, m) for o in ("adamw", "adam", "lamb", "sgd", "adan") for m in ("none", "win", "win2")}


@pytest.mark.parametrize("foreach", [False, True], ids=["per_tensor", "foreach"])
@pytest.mark.parametrize("case", cases(), ids=IDS)
def test_float64_replay(case, foreach):
    for k, params, expected in replay(case, foreach=foreach):
        for p, e in zip(params, expected):
            torch.testing.assert_close(p.detach().flatten(), e, rtol=1e-9, atol=0, msg=f"{case['id']} step {k + 1}")


@pytest.mark.parametrize("case", cases(), ids=IDS)
def test_float32_replay(case):
    # Parameters stay within |p| < 4, where a float32 ulp is <= 4.8e-7. A step performs about ten
    # float32 roundings per element (relative error 6e-8 each) on values of that size, and normalised
    # directions do not amplify them (u is bounded by the Adam-type ratio or the trust ratio), so five
    # steps accumulate at most ~5e-6. Measured worst case over the 57 cases: 7.4e-7.
    for k, params, expected in replay(case, dtype=torch.float32):
        for p, e in zip(params, expected):
            torch.testing.assert_close(p.detach().double().flatten(), e, rtol=0, atol=5e-6)
