"""Step time of two revisions of hf-win, measured in one run: did a change make the step slower?

Each revision is checked out into a temporary git worktree and ``benchmarks/step_time.py`` of that
checkout (which imports that checkout's ``hf_win``) runs over the same parameter set, the revisions
alternating round by round (A B A B ...), so that both see the same machine. Every step_time run
measures ``torch.optim.AdamW(fused=True)`` beside our optimizer in its own interleaved group, so the
comparison uses the ratio to fused AdamW (which cancels most of the machine's drift between runs) as
well as the raw milliseconds.

    python benchmarks/compare_revisions.py --before 13609f0 --after HEAD --params vit_s --threads 1

Writes ``<out>/step_time_revisions_<params>_<device>.md`` and ``.csv``.
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(REPO), *args], check=True, capture_output=True, text=True).stdout.strip()


def _run_step_time(checkout: Path, out: Path, tag: str, args: argparse.Namespace) -> list:
    cmd = [sys.executable, str(checkout / "benchmarks" / "step_time.py"), "--params", args.params,
           "--threads", str(args.threads), "--repeats", str(args.repeats), "--no_memory",
           "--paths", *args.paths, "--baselines", "fused", "--out", str(out), "--tag", tag]
    if args.optimizers:
        cmd += ["--optimizers", *args.optimizers]
    if args.modes:
        cmd += ["--modes", *args.modes]
    env = dict(os.environ, HF_WIN_CACHE_DIR=tempfile.mkdtemp(prefix="hf_win_cmp_"))
    env.pop("PYTHONPATH", None)  # each checkout's step_time.py puts its own tree first
    subprocess.run(cmd, check=True, env=env, cwd=str(checkout))
    csv_path = next(out.glob(f"step_time_{args.params}_*_{tag}.csv"))
    with open(csv_path) as f:
        return list(csv.DictReader(f))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", required=True, help="the revision to compare against (e.g. a commit)")
    ap.add_argument("--after", default="HEAD")
    ap.add_argument("--params", default="vit_s")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=2, help="step_time runs per revision, alternating")
    ap.add_argument("--repeats", type=int, default=5, help="step_time's interleaved rounds per run")
    ap.add_argument("--paths", nargs="+", default=["fused", "foreach"])
    ap.add_argument("--optimizers", nargs="*", default=None)
    ap.add_argument("--modes", nargs="*", default=None)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    args = ap.parse_args()

    revs = {"before": _git("rev-parse", "--short", args.before), "after": _git("rev-parse", "--short", args.after)}
    started = time.time()
    load_start = os.getloadavg()
    rows: dict = {}  # (optimizer, mode, path) -> {label: [(ms, ratio), ...]}
    with tempfile.TemporaryDirectory(prefix="hf_win_revs_") as tmp:
        trees = {}
        for label, rev in revs.items():
            trees[label] = Path(tmp) / label
            _git("worktree", "add", "--detach", str(trees[label]), rev)
        try:
            for r in range(args.rounds):
                for label in ("before", "after") if r % 2 == 0 else ("after", "before"):
                    out = Path(tmp) / f"out_{label}_{r}"
                    out.mkdir()
                    for row in _run_step_time(trees[label], out, f"{label}{r}", args):
                        if row["optimizer"] == "torch.optim.AdamW":
                            continue
                        key = (row["optimizer"], row["mode"], row["path"])
                        rows.setdefault(key, {}).setdefault(label, []).append(
                            (float(row["median_ms"]), float(row["ratio_to_torch_fused_adamw"])))
        finally:
            for tree in trees.values():
                _git("worktree", "remove", "--force", str(tree))

    import torch  # the machine's description, as step_time.py writes it

    sys.path.insert(0, str(REPO / "benchmarks"))
    from step_time import machine

    info = machine(torch.device("cpu"))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"step_time_revisions_{args.params}_cpu"
    table = []
    for (opt, mode, path), by in rows.items():
        b_ms = statistics.median(m for m, _ in by["before"])
        a_ms = statistics.median(m for m, _ in by["after"])
        b_ratio = statistics.median(x for _, x in by["before"])
        a_ratio = statistics.median(x for _, x in by["after"])
        table.append(dict(optimizer=opt, mode=mode, path=path, before_ms=round(b_ms, 3), after_ms=round(a_ms, 3),
                          after_over_before_ms=round(a_ms / b_ms, 3), before_x_fused_adamw=round(b_ratio, 3),
                          after_x_fused_adamw=round(a_ratio, 3),
                          after_over_before_ratio=round(a_ratio / b_ratio, 3)))
    with open(f"{stem}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(table[0]))
        w.writeheader()
        w.writerows(table)
    cmd = "python benchmarks/compare_revisions.py " + " ".join(sys.argv[1:])
    lines = [
        f"# Step time before/after: `{args.params}`, {revs['before']} against {revs['after']}", "",
        f"Command: `{cmd}`", "",
        "| machine | |", "|---|---|",
        *(f"| {k} | {v} |" for k, v in info.items() if k not in ("load_average", "hf_win_cache")),
        f"| torch_threads (step_time) | {args.threads} |",
        f"| load_average | {' '.join(f'{x:.2f}' for x in load_start)} |",
        f"| load_average_end | {' '.join(f'{x:.2f}' for x in os.getloadavg())} |",
        f"| wall_s | {time.time() - started:.0f} |", "",
        f"Each revision's `benchmarks/step_time.py` ran {args.rounds} times, alternating; each run's value is the "
        f"median of {args.repeats} interleaved rounds, and the table gives the median over runs. "
        "`x fused AdamW` is the ratio to `torch.optim.AdamW(fused=True)` measured in the same group of the same "
        "run; `after/before` compares those ratios (1.00 = unchanged).", "",
        "| optimizer | mode | path | before ms | after ms | before x fused AdamW | after x fused AdamW | after/before |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for t in table:
        lines.append(f"| {t['optimizer']} | {t['mode']} | {t['path']} | {t['before_ms']:.2f} | {t['after_ms']:.2f} | "
                     f"{t['before_x_fused_adamw']:.2f} | {t['after_x_fused_adamw']:.2f} | "
                     f"{t['after_over_before_ratio']:.2f} |")
    Path(f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
