"""The convergence benchmark's report: tables (``summary*.md``, csv files) and plots from the raw runs.

Every cell is a mean and sample standard deviation over seeds; the target loss of an optimizer is where its
vanilla run at 1x has made ``TARGET_FRACTION`` of its loss reduction; the paired tables compare the same seed
(same initial weights and batch order) across modes.
"""

from __future__ import annotations

import csv
import json
import math
import statistics
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch

from hf_win import get_optimizer_spec
from convergence_runner import LOG_EVERY, MAX_GRAD_NORM, PRECISIONS, TARGET_FRACTION, TUNING_SEED, WEIGHT_DECAY, lr_grid
from convergence_tasks import Task

def _mean_std(xs: List[float]):
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    if not xs:
        return float("nan"), float("nan"), 0
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0), len(xs)


def _lt(a: float, b: float) -> bool:
    """a < b, where a non-finite value (a diverged run) loses to any finite one."""
    fa, fb = math.isfinite(a), math.isfinite(b)
    return (fa and not fb) or (fa and fb and a < b)


def steps_to_target(curve, target) -> Optional[int]:
    for step, loss in curve:
        if math.isfinite(loss) and loss <= target:
            return int(step)
    return None


def fmt(m, s, n, total, digits=3):
    if n == 0:
        return "—"
    txt = f"{m:.{digits}f} ± {s:.{digits}f}"
    return txt if n == total else f"{txt} ({n}/{total})"


def report(out: Path, tasks: List[Task], opts, modes, mults, seeds, meta: dict, suffix: str = "") -> None:
    """``runs<suffix>.csv``, ``curves<suffix>.csv``, ``tuning<suffix>.csv``, ``summary<suffix>.md`` and the
    plots, from ``runs<suffix>.jsonl`` (``suffix``: ``""`` for the main grid, ``"_wrapped"`` for that arm)."""
    rows = [json.loads(l) for l in (out / f"runs{suffix}.jsonl").read_text().splitlines() if l.strip()]
    tune_rows = [r for r in rows if r["stage"] == "tune"]
    g = [r for r in rows if r["stage"] == "grid"]
    by = {}
    for r in g:
        by.setdefault((r["task"], r["optimizer"], r["mode"], r["lr_mult"]), []).append(r)

    # per-optimizer target: the loss at which the vanilla optimizer at its tuned lr (1x) has made
    # TARGET_FRACTION of its reduction from the first logged loss to its final loss (means over seeds).
    # A fraction of the reduction, not a ratio of the loss: an LM's loss has a large offset (entropy).
    targets = {}
    for task in tasks:
        for opt in opts:
            van = by.get((task.name, opt, "none", 1), [])
            final, _, n = _mean_std([r["final_train_loss"] for r in van])
            first, _, n0 = _mean_std([r["curve"][0][1] for r in van if r["curve"]])
            targets[(task.name, opt)] = first - TARGET_FRACTION * (first - final) if n and n0 else float("nan")
    for r in g:
        r["target_loss"] = targets[(r["task"], r["optimizer"])]
        r["steps_to_target"] = steps_to_target(r["curve"], r["target_loss"])

    cols = ["task", "optimizer", "mode", "lr_mult", "base_lr", "lr", "seed", "steps", "final_train_loss",
            "metric_name", "heldout_metric", "target_loss", "steps_to_target", "diverged", "train_wall_s",
            "train_cpu_s", "run_wall_s", "optimizer_class", "step_path"]
    with (out / f"runs{suffix}.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        w.writerows(g)
    with (out / f"tuning{suffix}.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["task", "optimizer", "lr", "seed", "final_train_loss", "metric_name",
                                          "heldout_metric", "diverged"], extrasaction="ignore")
        w.writeheader()
        w.writerows(tune_rows)
    with (out / f"curves{suffix}.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["task", "optimizer", "mode", "lr_mult", "seed", "step", "train_loss"])
        for r in g:
            for step, loss in r["curve"]:
                w.writerow([r["task"], r["optimizer"], r["mode"], r["lr_mult"], r["seed"], step, loss])

    cpu_txt = "" if meta.get("cpu_min") is None else f", training CPU time of all runs {meta['cpu_min']:.1f} min"
    md = [f"# Convergence: vanilla vs Win vs Win2 ({meta['date']})", ""]
    md += [f"Command: `{meta['command']}`", "",
           f"Machine: {meta['machine']}; torch {torch.__version__}; torch threads {meta['threads']}; "
           f"trainer: {meta['trainer']}; wall time of this invocation {meta['wall_min']:.1f} min{cpu_txt}.", "",
           f"Every cell: mean ± sample std over seeds {list(seeds)}; `(k/n)` = only k of n runs finite "
           f"(diverged runs are counted in the `div` column, their numbers stay in the mean when finite).",
           f"Weight decay {WEIGHT_DECAY} for every optimizer (not on biases/LayerNorm: the Trainer's groups), "
           f"gradient clipping {MAX_GRAD_NORM} by the Trainer, cosine schedule with 10 % linear warmup, "
           f"reckless steps (2, 8). Final training loss = mean logged loss over the last 10 % of steps. "
           f"Target loss (per optimizer) = the loss at which the vanilla optimizer at 1x has made "
           f"{TARGET_FRACTION:.0%} of its reduction from its first logged loss (step {LOG_EVERY}) to its final loss "
           f"(means over seeds); steps are counted on the logged curve (every {LOG_EVERY} steps).", ""]
    for task in tasks:
        better = "higher" if task.higher_is_better else "lower"
        md += [f"## {task.name} ({task.steps if not meta['steps'] else meta['steps']} steps, batch {task.batch_size})", ""]
        md += ["Base learning rates (tuned on vanilla, mode `none`, seed "
               f"{TUNING_SEED}, lowest final training loss over {', '.join(f'{o}: {list(lr_grid(o))}' for o in opts)}"
               f"{'; from the fallback table: no tuning in this run' if not tune_rows else ''}):", ""]
        md += ["| optimizer | base lr | target loss |", "|---|---|---|"]
        for opt in opts:
            base = next((r["base_lr"] for r in g if r["task"] == task.name and r["optimizer"] == opt), float("nan"))
            edge = ""
            if tune_rows and base in (min(lr_grid(opt)), max(lr_grid(opt))):
                edge = " (edge of the grid)"
            md.append(f"| {opt} | {base:g}{edge} | {targets[(task.name, opt)]:.4f} |")
        md.append("")
        for title, field_, digits in (
            ("final training loss (lower is better)", "final_train_loss", 4),
            (f"held-out {task.metric} ({better} is better)", "heldout_metric", 4),
            ("steps to target loss (fewer is better; `—` = never reached)", "steps_to_target", 0),
        ):
            md += [f"### {title}", "",
                   "| optimizer | lr x | " + " | ".join(modes) + " | div (" + "/".join(modes) + ") |",
                   "|---|---|" + "---|" * len(modes) + "---|"]
            for opt in opts:
                for mult in mults:
                    cells, divs = [], []
                    for mode in modes:
                        rs = by.get((task.name, opt, mode, mult), [])
                        vals = [r[field_] for r in rs]
                        vals = [float(v) for v in vals if v is not None]
                        m, s, n = _mean_std(vals)
                        cells.append(fmt(m, s, n, len(rs), digits) if rs else "")
                        divs.append(str(sum(r["diverged"] for r in rs)))
                    md.append(f"| {opt} | {mult} | " + " | ".join(cells) + " | " + "/".join(divs) + " |")
            md.append("")
        # paired view: the same seed gives the same initial weights and batch order to every mode
        accel = [m for m in modes if m != "none"]
        if "none" in modes and accel:
            md += ["### paired by seed: in how many seeds the Win variant ends lower than vanilla "
                   f"(final training loss; held-out {task.metric})", "",
                   "| optimizer | lr x | " + " | ".join(f"{m} < none (loss) | {m} better ({task.metric})" for m in accel) + " |",
                   "|---|---|" + "---|---|" * len(accel)]
            for opt in opts:
                for mult in mults:
                    van = {r["seed"]: r for r in by.get((task.name, opt, "none", mult), [])}
                    cells = []
                    for m in accel:
                        acc = {r["seed"]: r for r in by.get((task.name, opt, m, mult), [])}
                        common = sorted(set(van) & set(acc))
                        lw = sum(_lt(acc[s]["final_train_loss"], van[s]["final_train_loss"]) for s in common)
                        sign = 1 if task.higher_is_better else -1
                        mw = sum(_lt(sign * van[s]["heldout_metric"], sign * acc[s]["heldout_metric"]) for s in common)
                        cells += [f"{lw}/{len(common)}", f"{mw}/{len(common)}"]
                    md.append(f"| {opt} | {mult} | " + " | ".join(cells) + " |")
            md.append("")
    (out / f"summary{suffix}.md").write_text("\n".join(md) + "\n")
    plots(out, tasks, opts, modes, mults, by, suffix)


def _curves(rs):
    """The logged steps of the first run and every run's losses on them (NaN where not finite)."""
    steps = [s for s, _ in rs[0]["curve"]]
    ys = np.array([[l for _, l in r["curve"]][: len(steps)] for r in rs], dtype=float)
    return steps, np.where(np.isfinite(ys), ys, np.nan)


def _bytes_per_parameter(opt: str, mode: str, precision: str) -> tuple:
    """(parameter bytes, optimizer-state bytes) per parameter element in ``precision``."""
    param_dtype, lowp = PRECISIONS[precision]
    param_dtype = param_dtype or torch.float32
    cls = get_optimizer_spec(opt).cls
    return param_dtype.itemsize, cls.state_bytes_per_parameter(mode, param_dtype, **lowp)


def report_lowp(out: Path, tasks: List[Task], opts, modes, seeds, meta: dict) -> None:
    """``summary_low_precision.md``, ``runs_low_precision.csv`` and ``loss_curves_low_precision_<task>.png``."""
    rows = [json.loads(l) for l in (out / "runs_low_precision.jsonl").read_text().splitlines() if l.strip()]
    by: Dict[tuple, Dict[int, dict]] = {}
    for r in rows:
        by.setdefault((r["task"], r["optimizer"], r["mode"], r["precision"]), {})[int(r["seed"])] = r
    cols = ["task", "optimizer", "mode", "precision", "lr", "seed", "steps", "final_train_loss", "metric_name",
            "heldout_metric", "diverged", "param_dtypes", "state_dtypes", "step_path", "train_wall_s", "train_cpu_s"]
    with (out / "runs_low_precision.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    cpu_txt = "" if meta.get("cpu_min") is None else f", training CPU time of all runs {meta['cpu_min']:.1f} min"
    md = [f"# Convergence in low precision: fp32 vs bf16 state vs bf16 parameters ({meta['date']})", "",
          f"Command: `{meta['command']}`", "",
          f"Machine: {meta['machine']}; torch {torch.__version__}; torch threads {meta['threads']}; "
          f"trainer: {meta['trainer']}; wall time of this invocation {meta['wall_min']:.1f} min{cpu_txt}.", "",
          "Same setup as `summary.md` (weight decay, clipping, schedule, steps, batch), at each optimizer's base "
          "learning rate (1x; `tuned_lr.json`), seeds " + str(list(seeds)) + ". Precisions: `fp32` (reference, "
          "this run), `bf16_state` (`--optim_args state_dtype=bfloat16`), `bf16_params_sr` (model in bfloat16, "
          "`state_dtype=bfloat16,bf16_stochastic_round=True`), `bf16_params_nearest` (model in bfloat16, bf16 "
          "state, parameters rounded to nearest). Model in bfloat16 = forward and backward in bfloat16 too. "
          "Cells: mean ± sample std over seeds; `Δ vs fp32`: mean ± std over seeds of the paired difference "
          "(same seed = same initial weights, rounded for bf16 models, and same batches).", ""]
    for task in tasks:
        better = "higher" if task.higher_is_better else "lower"
        md += [f"## {task.name}", "",
               f"| optimizer | mode | precision | bytes/param (param + state) | final training loss | Δ loss vs fp32 | "
               f"held-out {task.metric} ({better} is better) | Δ {task.metric} vs fp32 | div |",
               "|---|---|---|---|---|---|---|---|---|"]
        for opt in opts:
            for mode in modes:
                ref = by.get((task.name, opt, mode, "fp32"), {})
                for precision in PRECISIONS:
                    rs = by.get((task.name, opt, mode, precision), {})
                    if not rs:
                        continue
                    pb, sb = _bytes_per_parameter(opt, mode, precision)
                    cells = []
                    for field_, digits in (("final_train_loss", 4), ("heldout_metric", 4)):
                        m, sd, n = _mean_std([r[field_] for r in rs.values()])
                        cells.append(fmt(m, sd, n, len(rs), digits))
                        common = sorted(set(rs) & set(ref))
                        if precision == "fp32" or not common:
                            cells.append("")
                        else:
                            dm, ds, dn = _mean_std([rs[k][field_] - ref[k][field_] for k in common])
                            cells.append(f"{dm:+.{digits}f} ± {ds:.{digits}f}" if dn else "—")
                    div = sum(r["diverged"] for r in rs.values())
                    md.append(f"| {opt} | {mode} | {precision} | {pb} + {sb} = {pb + sb} | " + " | ".join(cells)
                              + f" | {div} |")
        md.append("")
    (out / "summary_low_precision.md").write_text("\n".join(md) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"fp32": "black", "bf16_state": "tab:blue", "bf16_params_sr": "tab:green",
              "bf16_params_nearest": "tab:red"}
    for task in tasks:
        panels = [(o, m) for o in opts for m in modes]
        fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
        for ax, (opt, mode) in zip(axes[0], panels):
            for precision in PRECISIONS:
                rs = list(by.get((task.name, opt, mode, precision), {}).values())
                if not rs:
                    continue
                steps, ys = _curves(rs)
                with np.errstate(all="ignore"):
                    ax.plot(steps, np.nanmean(ys, 0), color=colors[precision], lw=1.3, label=precision)
                    ax.fill_between(steps, np.nanmin(ys, 0), np.nanmax(ys, 0), color=colors[precision], alpha=0.12)
            ax.set_title(f"{opt} {mode}")
            ax.set_xlabel("step")
            ax.set_yscale("log")
            ax.grid(alpha=0.3)
        axes[0][0].set_ylabel("training loss")
        axes[0][-1].legend(fontsize=7)
        fig.suptitle(f"{task.name}: training loss by precision (mean over seeds, band = min..max)", fontsize=9)
        fig.tight_layout()
        fig.savefig(out / f"loss_curves_low_precision_{task.name}.png", dpi=110)
        plt.close(fig)


def plots(out: Path, tasks, opts, modes, mults, by, suffix: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"none": "tab:gray", "win": "tab:blue", "win2": "tab:red"}
    for task in tasks:
        # loss curves per optimizer: 1x solid, the largest multiplier dashed; mean over seeds, band = min..max
        fig, axes = plt.subplots(1, len(opts), figsize=(3.4 * len(opts), 3.2), squeeze=False)
        for ax, opt in zip(axes[0], opts):
            for mult, ls in ((mults[0], "-"), (mults[-1], "--")):
                for mode in modes:
                    rs = by.get((task.name, opt, mode, mult), [])
                    if not rs:
                        continue
                    steps, ys = _curves(rs)
                    with np.errstate(all="ignore"):
                        mean = np.nanmean(ys, 0)
                    ax.plot(steps, mean, ls, color=colors.get(mode), lw=1.3, label=f"{mode} {mult}x")
                    if mult == mults[0]:
                        ax.fill_between(steps, np.nanmin(ys, 0), np.nanmax(ys, 0), color=colors.get(mode), alpha=0.15)
            ax.set_title(opt)
            ax.set_xlabel("step")
            ax.set_yscale("log")
            ax.grid(alpha=0.3)
        axes[0][0].set_ylabel("training loss")
        axes[0][-1].legend(fontsize=7)
        fig.suptitle(f"{task.name}: training loss (mean over seeds; solid {mults[0]}x with min-max band, dashed {mults[-1]}x)",
                     fontsize=9)
        fig.tight_layout()
        fig.savefig(out / f"loss_curves{suffix}_{task.name}.png", dpi=110)
        plt.close(fig)

        # robustness: final metric vs lr multiplier
        fig, axes = plt.subplots(2, len(opts), figsize=(3.4 * len(opts), 5.6), squeeze=False)
        for j, opt in enumerate(opts):
            for i, (field_, label) in enumerate((("final_train_loss", "final training loss"),
                                                 ("heldout_metric", f"held-out {task.metric}"))):
                ax = axes[i][j]
                for mode in modes:
                    ms, ss, xs = [], [], []
                    for mult in mults:
                        rs = by.get((task.name, opt, mode, mult), [])
                        m, s, n = _mean_std([r[field_] for r in rs])
                        if n:
                            ms.append(m), ss.append(s), xs.append(mult)
                    if xs:
                        ax.errorbar(xs, ms, yerr=ss, marker="o", ms=3, capsize=2, color=colors.get(mode), label=mode)
                ax.set_xscale("log", base=2)
                ax.set_xticks(list(mults))
                ax.set_xticklabels([f"{m}x" for m in mults])
                if field_ == "final_train_loss" or task.metric == "perplexity":
                    ax.set_yscale("log")
                ax.grid(alpha=0.3)
                if i == 0:
                    ax.set_title(opt)
                if j == 0:
                    ax.set_ylabel(label)
                if i == 1:
                    ax.set_xlabel("lr multiplier (x tuned vanilla lr)")
        axes[0][-1].legend(fontsize=7)
        fig.suptitle(f"{task.name}: robustness to the learning rate (mean ± std over seeds)", fontsize=9)
        fig.tight_layout()
        fig.savefig(out / f"robustness{suffix}_{task.name}.png", dpi=110)
        plt.close(fig)
