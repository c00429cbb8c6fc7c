#!/usr/bin/env python
"""Does Win converge faster? The paper's claims, reproduced at small scale, offline, on 2 CPU cores.

Tasks (``convergence_tasks.py``): a small ViT on scikit-learn's digits and a tiny GPT-2 on the Python
standard library's sources. For each base optimizer of the registry x acceleration mode (``none`` = the
vanilla optimizer, ``win``, ``win2``) x learning-rate multiplier (1x, 2x, 4x, 8x of a base learning rate
tuned for the *vanilla* optimizer) x seed, every run goes through ``hf_win.WinTrainer`` and records the
logged training-loss curve, the final training loss, the held-out metric and the number of steps to reach a
target loss (``convergence_runner.py``: runs and stages; ``convergence_report.py``: tables and plots).

Outputs (``--out``, default ``benchmarks/results/convergence``): ``runs.jsonl`` (raw, one run a line, with
its curve; the grid resumes from it), ``runs.csv``, ``curves.csv``, ``tuning.csv``, ``tuned_lr.json``,
``summary.md``, ``loss_curves_<task>.png``, ``robustness_<task>.png``, ``command.txt``.

Low-precision arm (``--stage lowp``, also part of ``--stage all``): AdamW-Win2 and SGD-Win2 at the base
learning rate, every seed, both tasks, each in four precisions: ``fp32`` (the reference, rerun with the
same code), ``bf16_state`` (``state_dtype=bfloat16``: fp32 parameters, bf16 moments and Win sequences),
``bf16_params_sr`` (the model in bfloat16, bf16 state, ``bf16_stochastic_round=True``) and
``bf16_params_nearest`` (the same without stochastic rounding: what pure-bf16 training did before).
Outputs ``runs_low_precision.jsonl``/``.csv``, ``summary_low_precision.md``,
``loss_curves_low_precision_<task>.png``, ``command_low_precision.txt``.

Wrapped arm (``--stage wrapped``): ``muon_win`` and ``adafactor_win`` (torch.optim's Muon and Adafactor
inside ``hf_win.Win``) on the GPT-2 task, tuned on vanilla, lr 1x/4x/8x, 3 seeds, every mode. Outputs the
same files with the suffix ``_wrapped``.

    python benchmarks/convergence.py                 # full grid (tune + 360 runs), < 1 h on 2 cores
    python benchmarks/convergence.py --quick --out /tmp/conv   # reduced grid, < 2 min
    python benchmarks/convergence.py --stage lowp              # the low-precision arm only (48 runs)
    python benchmarks/convergence.py --stage wrapped           # the Win(base) arm (13 tuning + 54 runs)
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import List

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for path in (str(ROOT), str(HERE)):
    if path not in sys.path:
        sys.path.insert(0, path)

from hf_win._offline import use_offline_defaults  # noqa: E402

use_offline_defaults()  # before transformers / datasets are imported

import torch  # noqa: E402

from hf_win import available_optimizers, get_optimizer_spec  # noqa: E402,F401  (get_optimizer_spec: tests)
from convergence_report import report, report_lowp  # noqa: E402
from convergence_runner import (  # noqa: E402,F401  (constants read by the tests)
    FALLBACK_BASE_LR, LOG_EVERY, LOWP, LR_MULTIPLIERS, MODES, QUICK, SEEDS, TARGET_FRACTION, TRAINER, WRAPPED,
    Runner, grid, lowp_grid, lr_grid, run_one, tune,
)
from convergence_tasks import TASKS, Task  # noqa: E402

DEFAULT_OUT = ROOT / "benchmarks" / "results" / "convergence"
STAGES = ("all", "tune", "grid", "report", "lowp", "lowp-report", "wrapped", "wrapped-report")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="reduced grid (2 optimizers, 3 modes, lr 1x/8x, 2 seeds, 20 steps, both tasks, no tuning): < 2 min")
    p.add_argument("--out", type=Path, default=None, help=f"output folder (default {DEFAULT_OUT.relative_to(ROOT)})")
    p.add_argument("--stage", choices=STAGES, default="all",
                   help="all = tune then grid then the low-precision arm then report; report = rebuild tables/plots "
                   "from runs.jsonl; lowp = the low-precision arm only (base lrs from tuned_lr.json); lowp-report = "
                   "rebuild its table and plots from runs_low_precision.jsonl; wrapped = the Win(base) arm (Muon, "
                   "Adafactor; tuned, then the grid); wrapped-report = rebuild its tables and plots")
    p.add_argument("--tasks", nargs="+", choices=list(TASKS), default=None)
    p.add_argument("--optimizers", nargs="+", choices=available_optimizers(), default=None)
    p.add_argument("--modes", nargs="+", choices=MODES, default=None)
    p.add_argument("--lr-multipliers", nargs="+", type=float, default=None)
    p.add_argument("--seeds", nargs="+", type=int, default=None)
    p.add_argument("--steps", type=int, default=None, help="override every task's number of steps")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: tiny models, shared cores)")
    p.add_argument("--resume", action="store_true", help="keep runs already in <out>/runs.jsonl and skip them")
    a = p.parse_args(argv)

    if a.quick:
        opts = a.optimizers or QUICK["optimizers"]
        mults = a.lr_multipliers or QUICK["lr_multipliers"]
        seeds = a.seeds or QUICK["seeds"]
        steps = a.steps or QUICK["steps"]
        tune_on = False
    else:
        opts = a.optimizers or available_optimizers()
        mults = a.lr_multipliers or list(LR_MULTIPLIERS)
        seeds = a.seeds or list(SEEDS)
        steps = a.steps
        tune_on = a.stage in ("all", "tune")
    mults = [int(m) if float(m).is_integer() else m for m in mults]
    modes = a.modes or list(MODES)
    tasks = [TASKS[t] for t in (a.tasks or list(TASKS))]
    out = a.out or DEFAULT_OUT
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(a.threads)
    try:
        import transformers

        transformers.logging.set_verbosity_error()
    except Exception:  # pragma: no cover
        pass

    command = "python " + " ".join(shlex.quote(x) for x in [os.path.relpath(__file__, ROOT)] + list(sys.argv[1:] if argv is None else argv))
    if a.stage in ("lowp", "lowp-report"):
        return main_lowp(a, out, tasks, command)
    if a.stage in ("wrapped", "wrapped-report"):
        return main_wrapped(a, out, command)
    t0 = time.perf_counter()
    if a.stage != "report":
        runner = Runner(out, steps, resume=a.resume or a.stage == "grid")
        base_lr = {t.name: {o: FALLBACK_BASE_LR[t.name][o] for o in opts} for t in tasks}
        tuned_file = out / "tuned_lr.json"
        if tune_on:
            base_lr = tune(runner, tasks, opts)
            tuned_file.write_text(json.dumps(base_lr, indent=1) + "\n")
        elif tuned_file.exists() and not a.quick:
            saved = json.loads(tuned_file.read_text())
            base_lr = {t.name: {o: saved[t.name][o] for o in opts} for t in tasks}
        if a.stage != "tune":
            grid(runner, tasks, opts, modes, mults, seeds, base_lr)
        runner.close()
        if a.stage == "all" and not a.quick:
            main_lowp(a, out, tasks, command)
    wall = (time.perf_counter() - t0) / 60
    meta_file = out / "meta.json"
    if a.stage == "report" and meta_file.exists():
        meta = json.loads(meta_file.read_text())
    else:
        meta = dict(
            date=_now(), command=command, machine=_machine(), threads=a.threads, wall_min=wall,
            steps=a.steps if not a.quick else steps,
            trainer=TRAINER,
            cpu_min=sum(r.get("train_cpu_s", 0) for r in runner.done.values()) / 60 if a.stage != "report" else None,
        )
        meta_file.write_text(json.dumps(meta, indent=1) + "\n")
        (out / "command.txt").write_text(command + "\n")
    if a.stage in ("all", "grid", "report"):
        report(out, tasks, opts, modes, mults, seeds, meta)
    print(f"done in {wall:.1f} min -> {out}")
    return 0


def main_lowp(a, out: Path, tasks: List[Task], command: str) -> int:
    """The low-precision arm (``--stage lowp``) and its report (``--stage lowp-report``)."""
    opts = a.optimizers or LOWP["optimizers"]
    modes = a.modes or LOWP["modes"]
    seeds = a.seeds or list(SEEDS)
    meta_file = out / "meta_low_precision.json"
    t0 = time.perf_counter()
    if a.stage == "lowp-report" and meta_file.exists():
        meta = json.loads(meta_file.read_text())
    else:
        if a.stage != "lowp-report":
            runner = Runner(out, a.steps, resume=a.resume, raw_name="runs_low_precision.jsonl")
            base_lr = {t.name: {o: FALLBACK_BASE_LR[t.name][o] for o in opts} for t in tasks}
            tuned_file = out / "tuned_lr.json"
            if tuned_file.exists():
                saved = json.loads(tuned_file.read_text())
                base_lr = {t.name: {o: saved[t.name][o] for o in opts} for t in tasks}
            lowp_grid(runner, tasks, opts, modes, seeds, base_lr)
            runner.close()
            cpu = sum(r.get("train_cpu_s", 0) for r in runner.done.values()) / 60
        else:
            cpu = None
        meta = _write_meta(a, out, "_low_precision", command, t0, cpu)
    report_lowp(out, tasks, opts, modes, seeds, meta)
    print(f"low-precision arm done in {(time.perf_counter() - t0) / 60:.1f} min -> {out}")
    return 0


def main_wrapped(a, out: Path, command: str) -> int:
    """The wrapped arm (``--stage wrapped``): Muon and Adafactor as ``Win(base)`` registry optimizers on the
    language-model task, tuned on vanilla like the main grid, then every mode at each lr multiplier and
    seed; ``--stage wrapped-report`` rebuilds its tables and plots. Files end in ``_wrapped``."""
    opts = a.optimizers or WRAPPED["optimizers"]
    tasks = [TASKS[t] for t in (a.tasks or WRAPPED["tasks"])]
    mults = [int(m) if float(m).is_integer() else m for m in (a.lr_multipliers or WRAPPED["lr_multipliers"])]
    modes = a.modes or list(MODES)
    seeds = a.seeds or list(SEEDS)
    meta_file = out / "meta_wrapped.json"
    t0 = time.perf_counter()
    if a.stage == "wrapped-report" and meta_file.exists():
        meta = json.loads(meta_file.read_text())
    else:
        runner = Runner(out, a.steps, resume=a.resume, raw_name="runs_wrapped.jsonl")
        base_lr = tune(runner, tasks, opts)
        (out / "tuned_lr_wrapped.json").write_text(json.dumps(base_lr, indent=1) + "\n")
        grid(runner, tasks, opts, modes, mults, seeds, base_lr)
        runner.close()
        meta = _write_meta(a, out, "_wrapped", command, t0,
                           sum(r.get("train_cpu_s", 0) for r in runner.done.values()) / 60)
    report(out, tasks, opts, modes, mults, seeds, meta, suffix="_wrapped")
    print(f"wrapped arm done in {(time.perf_counter() - t0) / 60:.1f} min -> {out}")
    return 0


def _write_meta(a, out: Path, suffix: str, command: str, t0: float, cpu_min) -> dict:
    """``meta<suffix>.json`` and ``command<suffix>.txt`` of an arm: when, how and on what it ran."""
    meta = dict(date=_now(), command=command, machine=_machine(), threads=a.threads,
                wall_min=(time.perf_counter() - t0) / 60, steps=a.steps, trainer=TRAINER, cpu_min=cpu_min)
    (out / f"meta{suffix}.json").write_text(json.dumps(meta, indent=1) + "\n")
    (out / f"command{suffix}.txt").write_text(command + "\n")
    return meta


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def _machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.python_implementation()} {platform.python_version()}"


if __name__ == "__main__":
    sys.exit(main())
