"""How far low-precision state takes a float32 parameter from a float64 run: no timing, only numbers.

For every optimizer of the registry (not the ``Win(base)`` ones, which keep their base's state) and each
mode, one float32 parameter of 2048 elements takes ``--steps`` steps at lr 1e-3 (SGD: 1e-2, weight decay
1e-2) on a noisy quadratic (gradient ``0.5*p + noise``, the noise from one seeded generator), and the table
gives the distance ``||p - p64||`` to the same run in float64, with float32 state, with bfloat16 state,
and for bfloat16 parameters with bfloat16 state. The ratio column divides the bfloat16-state distance by
the base optimizer's (mode ``none``) with the same state: what the Win sequences add to the rounding of the
bfloat16 moments. ``tests/test_low_precision.py`` asserts the same comparison.

    python benchmarks/state_precision.py     # writes benchmarks/results/state_precision_cpu.md
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import hf_win  # noqa: E402
from hf_win.registry import OPTIMIZERS  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step_time import machine  # noqa: E402


def distance(cls, mode: str, dtype: torch.dtype, steps: int, state_dtype=None) -> float:
    def run(dtype, **kw):
        g = torch.Generator().manual_seed(11)
        p = torch.nn.Parameter(torch.randn(2048, generator=g, dtype=torch.float64).to(dtype))
        opt = cls([p], acceleration_mode=mode, lr=1e-2 if cls is hf_win.SGD else 1e-3, weight_decay=1e-2,
                  foreach=True, **kw)
        for _ in range(steps):
            noise = torch.randn(2048, generator=g, dtype=torch.float64)
            p.grad = (0.5 * p.detach().double() + noise).to(dtype)
            opt.step()
        return p.detach().double()

    return float((run(dtype, state_dtype=state_dtype) - run(torch.float64)).norm())


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "state_precision_cpu.md"))
    args = ap.parse_args(argv)
    rows = []
    for name, spec in OPTIMIZERS.items():
        if spec.wraps_base:
            continue
        base = distance(spec.cls, "none", torch.float32, args.steps, "bfloat16")
        for mode in ("none", "win", "win2"):
            fp32 = distance(spec.cls, mode, torch.float32, args.steps)
            bf16 = distance(spec.cls, mode, torch.float32, args.steps, "bfloat16")
            both = distance(spec.cls, mode, torch.bfloat16, args.steps, "bfloat16")
            rows.append(f"| {name} | {mode} | {fp32:.3g} | {bf16:.4g} | {bf16 / base:.2f} | {both:.4g} |")
            print(rows[-1], flush=True)
    info = machine(torch.device("cpu"))
    text = "\n".join([
        f"# Distance to a float64 run after {args.steps} steps (float32 parameter, 2048 elements)", "",
        f"Command: `python benchmarks/state_precision.py --steps {args.steps}` (deterministic: no timing). "
        f"torch {info.get('torch')}, {info.get('cpu')}.", "",
        "| optimizer | mode | fp32 state | bf16 state | bf16 state / mode none's | bf16 params + bf16 state |",
        "|---|---|---:|---:|---:|---:|", *rows, ""])
    Path(args.out).write_text(text)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
