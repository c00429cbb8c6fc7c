"""Training throughput (samples/second) of the example's training loop with each optimizer, against AdamW.

Runs ``examples/image_classification/run_image_classification.py`` (its offline default: a small ViT
trained from scratch on scikit-learn's digits) in this process, once per contender and round; rounds
interleave the contenders, round 0 is a warm-up (it includes the kernel's build) and is not counted.
A contender's path is chosen by ``HF_WIN_FUSED_BACKEND`` (set for its runs only) and ``--optim_args``.
Reports the Trainer's ``train_samples_per_second`` (median over rounds) and its ratio to
``--optim adamw_torch_fused``, the fastest torch AdamW, measured in the same run.

    python benchmarks/train_throughput.py                  # writes benchmarks/results/train_throughput_cpu.{csv,md}
    python benchmarks/train_throughput.py --quick          # 1 counted round of 10 steps
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "examples" / "image_classification"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from step_time import machine  # noqa: E402

# (label, --optim, extra flags, HF_WIN_FUSED_BACKEND or None). The default path of every Win optimizer on
# CPU is the generated C kernel (fused=None, backend auto); HF_WIN_FUSED_BACKEND=foreach turns every
# kernel off (the default then runs foreach).
CONTENDERS = [
    ("torch AdamW (fused)", "adamw_torch_fused", ["--acceleration_mode", "win"], None),  # (the example defaults to win2)
    ("torch AdamW (foreach)", "adamw_torch", ["--acceleration_mode", "win", "--optim_args", "foreach=True"], None),
    ("AdamW-Win win, default (kernel)", "adamw_win", ["--acceleration_mode", "win"], None),
    ("AdamW-Win win2, default (kernel)", "adamw_win", ["--acceleration_mode", "win2"], None),
    ("AdamW-Win win, foreach", "adamw_win", ["--acceleration_mode", "win", "--optim_args", "foreach=True"], None),
    ("AdamW-Win win, HF_WIN_FUSED_BACKEND=foreach", "adamw_win", ["--acceleration_mode", "win"], "foreach"),
]


def one_run(optim, extra, steps, out_dir, model_args, backend=None):
    import run_image_classification as example

    argv = ["--output_dir", out_dir, "--do_train", "--max_steps", str(steps), "--optim", optim,
            "--report_to", "none", "--save_strategy", "no", "--eval_strategy", "no", "--logging_strategy", "no",
            "--disable_tqdm", "true", "--do_eval", "false", "--log_level", "error", "--seed", "0", *model_args, *extra]
    from step_time import backend as fused_backend

    with fused_backend(backend), contextlib.redirect_stdout(io.StringIO()):
        metrics = example.run(argv)
    return metrics["train_samples_per_second"]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=60, help="optimizer steps per run")
    ap.add_argument("--rounds", type=int, default=3, help="counted rounds (after one warm-up round)")
    ap.add_argument("--model_args", default="", help="extra example flags, e.g. '--per_device_train_batch_size 64'")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    ap.add_argument("--quick", action="store_true", help="10 steps, 1 counted round")
    args = ap.parse_args(argv)
    if args.quick:
        args.steps, args.rounds = 10, 1
    model_args = args.model_args.split()
    import torch

    info = machine(torch.device("cpu"))
    results = {label: [] for label, _, _, _ in CONTENDERS}
    wall0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds + 1):
            order = CONTENDERS[r % len(CONTENDERS):] + CONTENDERS[: r % len(CONTENDERS)]
            for label, optim, extra, env in order:
                sps = one_run(optim, extra, args.steps, os.path.join(tmp, "run"), model_args, backend=env)
                print(f"round {r}{' (warm-up)' if r == 0 else ''}: {label:<26} {sps:8.1f} samples/s", flush=True)
                if r > 0:
                    results[label].append(sps)
    info["torch_threads_in_runs"] = "1 (the example's choice for its tiny default model)" if "OMP_NUM_THREADS" not in os.environ else os.environ["OMP_NUM_THREADS"]
    info["load_average_end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    info["wall_s"] = round(time.perf_counter() - wall0, 1)
    base = statistics.median(results[CONTENDERS[0][0]])
    rows = [{"contender": label, "optim": optim, "flags": " ".join(extra),
             "samples_per_s": round(statistics.median(results[label]), 2),
             "ratio_to_torch_fused_adamw": round(statistics.median(results[label]) / base, 3),
             "rounds": ";".join(f"{x:.1f}" for x in results[label])} for label, optim, extra, _ in CONTENDERS]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "train_throughput_cpu"
    with open(out / f"{stem}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    md = ["# Training throughput: the example's default (small ViT on digits), samples/s", "",
          "Command: `python benchmarks/train_throughput.py " + " ".join(argv if argv is not None else sys.argv[1:]) + "`", "",
          "| machine | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in info.items()]
    md += ["", f"{args.steps} steps per run; median of {args.rounds} interleaved rounds after a warm-up round.", "",
           "| contender | samples/s | x torch fused AdamW | rounds |", "|---|---:|---:|---|"]
    md += [f"| {r['contender']} | {r['samples_per_s']} | {r['ratio_to_torch_fused_adamw']:.3f} | {r['rounds']} |" for r in rows]
    (out / f"{stem}.md").write_text("\n".join(md) + "\n")
    for r in rows:
        print(f"{r['contender']:<26} {r['samples_per_s']:8.1f} samples/s  x{r['ratio_to_torch_fused_adamw']}")
    return rows


if __name__ == "__main__":
    main()
