#!/usr/bin/env python
"""Does Win converge faster? The paper's claims, reproduced at small scale, offline, on 2 CPU cores.

Two tasks on data nobody in this project wrote:

* ``vit_digits``: a small ViT (``transformers.ViTForImageClassification``, from a config, random init)
  trained from scratch on scikit-learn's 8x8 handwritten digits (1797 real images, shipped with
  scikit-learn); held-out metric: accuracy on a fixed stratified 20 % split.
* ``gpt2_stdlib``: a tiny GPT-2 (``transformers.GPT2LMHeadModel``, from a config) trained on the Python
  standard library's own source files, with a byte-level BPE tokenizer trained locally on those files
  (``tokenizers``); held-out metric: perplexity on other standard-library files.

For each base optimizer of the registry (``hf_win.available_optimizers()``) x acceleration mode
(``none`` = the vanilla optimizer, ``win``, ``win2``) x learning-rate multiplier (1x, 2x, 4x, 8x of a base
learning rate tuned for the *vanilla* optimizer) x seed, every run goes through the Hugging Face Trainer
(``hf_win.WinTrainer`` when the installed hf_win has it) and records the logged training-loss curve, the
final training loss, the held-out metric and the number of steps to reach a target loss.

Tuning (``--stage tune``, part of ``--stage all``): the vanilla optimizer (mode ``none``) only, on one
seed that is *not* one of the grid seeds, over a half-decade learning-rate grid; the base learning rate is
the one with the lowest final training loss. Win and Win2 are never tuned: they get the vanilla optimum.

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

    python benchmarks/convergence.py                 # full grid (tune + 360 runs), < 1 h on 2 cores
    python benchmarks/convergence.py --quick --out /tmp/conv   # reduced grid, < 2 min
    python benchmarks/convergence.py --stage lowp              # the low-precision arm only (48 runs)
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import math
import os
import platform
import shlex
import statistics
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from hf_win._offline import use_offline_defaults  # noqa: E402

use_offline_defaults()  # before transformers / datasets are imported

import numpy as np  # noqa: E402
import torch  # noqa: E402

import hf_win  # noqa: E402
from hf_win import available_optimizers, get_optimizer_spec  # noqa: E402

MODES = ("none", "win", "win2")
LR_MULTIPLIERS = (1, 2, 4, 8)
SEEDS = (0, 1, 2)
TUNING_SEED = 1000
WEIGHT_DECAY = 0.02          # the same for every optimizer (the Adan paper's ViT value)
MAX_GRAD_NORM = 1.0          # the Trainer's default, applied by the Trainer for every optimizer
TARGET_FRACTION = 0.9        # target loss: where the vanilla optimizer at 1x has made 90 % of its loss reduction
LOG_EVERY = 5                # Trainer logging_steps: the curve's resolution
# --quick: a smoke run of every stage (no tuning: base lrs from FALLBACK_BASE_LR), < 2 min on 2 cores
QUICK = dict(optimizers=["adamw_win", "sgd_win"], lr_multipliers=[1, 8], seeds=[0, 1], steps=20)
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "convergence"
# The low-precision arm: precision -> (model parameter dtype or None, extra optimizer keywords).
PRECISIONS = {
    "fp32": (None, {}),
    "bf16_state": (None, {"state_dtype": "bfloat16"}),
    "bf16_params_sr": (torch.bfloat16, {"state_dtype": "bfloat16", "bf16_stochastic_round": True}),
    "bf16_params_nearest": (torch.bfloat16, {"state_dtype": "bfloat16", "bf16_stochastic_round": False}),
}
LOWP = dict(optimizers=["adamw_win", "sgd_win"], modes=["win2"])

# Tuning grids (half-decades). SGD's step is not normalised, so its grid sits higher.
LR_GRID_ADAPTIVE = (3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
LR_GRID_SGD = (3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0)
# Base learning rates used when no tuning file exists (--quick, or --stage grid without tuning):
# the values the full tuning chose (see benchmarks/results/convergence/tuned_lr.json).
FALLBACK_BASE_LR = {
    "vit_digits": {"adamw_win": 1e-2, "adam_win": 3e-2, "lamb_win": 3e-2, "sgd_win": 1e-1, "adan_win": 1e-2},
    "gpt2_stdlib": {"adamw_win": 3e-2, "adam_win": 1e-2, "lamb_win": 3e-2, "sgd_win": 3e-1, "adan_win": 3e-2},
}


def lr_grid(opt: str) -> Sequence[float]:
    return LR_GRID_SGD if opt.startswith("sgd") else LR_GRID_ADAPTIVE


# ----------------------------------------------------------------------------------------------- data
class DictDataset(torch.utils.data.Dataset):
    def __init__(self, **tensors):
        self.tensors = tensors
        self.n = len(next(iter(tensors.values())))

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return {k: v[i] for k, v in self.tensors.items()}


@lru_cache(maxsize=None)
def digits_data():
    """scikit-learn's digits (offline), fixed stratified 80/20 split, standardised with train statistics."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = d.images.astype(np.float32) / 16.0
    y = d.target.astype(np.int64)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.2, random_state=0, stratify=y)
    mean, std = xtr.mean(), xtr.std()
    to_t = lambda a: torch.from_numpy((a - mean) / std).unsqueeze(1)  # noqa: E731  (N, 1, 8, 8)
    train = DictDataset(pixel_values=to_t(xtr), labels=torch.from_numpy(ytr))
    test = DictDataset(pixel_values=to_t(xte), labels=torch.from_numpy(yte))
    return train, test


STDLIB_TRAIN_FILES = (
    "argparse.py", "ast.py", "calendar.py", "configparser.py", "csv.py", "dataclasses.py",
    "difflib.py", "enum.py", "fractions.py", "functools.py", "heapq.py", "ipaddress.py",
)
STDLIB_HELDOUT_FILES = ("textwrap.py", "shlex.py", "string.py", "pprint.py")
LM_VOCAB = 512
LM_BLOCK = 64
LM_MAX_HELDOUT_BLOCKS = 128


@lru_cache(maxsize=None)
def stdlib_lm_data():
    """Blocks of token ids from the standard library's sources, byte-level BPE trained on the train files."""
    from tokenizers import ByteLevelBPETokenizer

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    read = lambda names: [(stdlib / n).read_text(encoding="utf-8") for n in names]  # noqa: E731
    train_texts, heldout_texts = read(STDLIB_TRAIN_FILES), read(STDLIB_HELDOUT_FILES)
    tok = ByteLevelBPETokenizer()
    tok.train_from_iterator(train_texts, vocab_size=LM_VOCAB, min_frequency=2, show_progress=False)

    def blocks(texts, limit=None):
        ids = [i for t in texts for i in tok.encode(t).ids]
        n = len(ids) // LM_BLOCK
        if limit is not None:
            n = min(n, limit)
        return torch.tensor(ids[: n * LM_BLOCK], dtype=torch.long).view(n, LM_BLOCK)

    tr, he = blocks(train_texts), blocks(heldout_texts, LM_MAX_HELDOUT_BLOCKS)
    return DictDataset(input_ids=tr, labels=tr), DictDataset(input_ids=he, labels=he)


# --------------------------------------------------------------------------------------------- models
def build_vit():
    from transformers import ViTConfig, ViTForImageClassification

    cfg = ViTConfig(
        image_size=8, patch_size=4, num_channels=1, hidden_size=64, num_hidden_layers=2,
        num_attention_heads=4, intermediate_size=128, num_labels=10,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    return ViTForImageClassification(cfg)


def build_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(
        vocab_size=LM_VOCAB, n_positions=LM_BLOCK, n_embd=32, n_layer=1, n_head=4,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
    )
    return GPT2LMHeadModel(cfg)


@torch.no_grad()
def eval_accuracy(model, ds) -> float:
    model.eval()
    t = ds.tensors
    logits = model(pixel_values=t["pixel_values"]).logits
    return float((logits.argmax(-1) == t["labels"]).float().mean())


@torch.no_grad()
def eval_perplexity(model, ds) -> float:
    model.eval()
    ids = ds.tensors["input_ids"]
    losses = [float(model(input_ids=ids[i:i + 32], labels=ids[i:i + 32]).loss) for i in range(0, len(ids), 32)]
    loss = sum(losses) / len(losses)  # equal-sized chunks except the last; close enough and identical for all runs
    return math.exp(loss) if loss < 50 else float("inf")


@dataclass(frozen=True)
class Task:
    name: str
    data: Callable
    model: Callable
    evaluate: Callable
    metric: str
    higher_is_better: bool
    steps: int
    batch_size: int


TASKS: Dict[str, Task] = {
    t.name: t
    for t in (
        Task("vit_digits", digits_data, build_vit, eval_accuracy, "accuracy", True, steps=120, batch_size=32),
        Task("gpt2_stdlib", stdlib_lm_data, build_gpt2, eval_perplexity, "perplexity", False, steps=120, batch_size=16),
    )
}


# ---------------------------------------------------------------------------------------- one run
BACKENDS = ("wintrainer", "trainer+registry")


def run_one(task: Task, opt: str, mode: str, lr: float, seed: int, steps: int, workdir: str,
            backend: str = "wintrainer", precision: str = "fp32") -> dict:
    """Train one model through the Hugging Face Trainer; return its record (curve included).

    ``backend="wintrainer"``: ``hf_win.WinTrainer`` + ``hf_win.WinTrainingArguments(optim=<registry name>)``
    (what the benchmark reports). ``"trainer+registry"``: the plain ``transformers.Trainer`` handed the
    registry class and the same keywords through ``optimizer_cls_and_kwargs`` (the stand-in used before
    the Trainer integration existed; kept to check that both give the same runs). ``precision``: one of
    :data:`PRECISIONS` (the model's dtype and the low-precision optimizer keywords).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    import transformers
    from transformers import PrinterCallback, TrainerCallback

    train_ds, heldout_ds = task.data()
    spec = get_optimizer_spec(opt)
    cls, hyper = spec.cls, spec.hyperparameters
    param_dtype, lowp = PRECISIONS[precision]
    torch.manual_seed(seed)
    model = task.model()
    if param_dtype is not None:  # initialised in float32 (the same weights as fp32), then rounded
        model.to(param_dtype)

    curve: List[List[float]] = []

    class Recorder(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                curve.append([state.global_step, float(logs["loss"])])

    common = dict(
        output_dir=workdir, max_steps=steps, per_device_train_batch_size=task.batch_size,
        learning_rate=lr, weight_decay=WEIGHT_DECAY, max_grad_norm=MAX_GRAD_NORM,
        lr_scheduler_type="cosine", warmup_steps=0.1, logging_steps=LOG_EVERY,
        logging_nan_inf_filter=False,  # keep divergence visible in the curve
        seed=seed, data_seed=seed, use_cpu=True, report_to="none", save_strategy="no",
        eval_strategy="no", disable_tqdm=True, dataloader_num_workers=0, log_level="error",
    )
    if backend == "wintrainer":
        extra = {}
        if "betas" in hyper:  # the base optimizer's own betas/eps, through the standard Trainer fields
            extra.update(adam_beta1=hyper["betas"][0], adam_beta2=hyper["betas"][1])
            optim_args = f"beta3={hyper['betas'][2]}" if len(hyper["betas"]) == 3 else None
            if optim_args:
                extra["optim_args"] = optim_args
        if lowp:  # what a user types: --optim_args state_dtype=bfloat16,bf16_stochastic_round=True
            items = [extra["optim_args"]] if "optim_args" in extra else []
            extra["optim_args"] = ",".join(items + [f"{k}={v}" for k, v in lowp.items()])
        if "eps" in hyper:
            extra["adam_epsilon"] = hyper["eps"]
        args = hf_win.WinTrainingArguments(optim=opt, acceleration_mode=mode, **common, **extra)
        trainer = hf_win.WinTrainer(model=model, args=args, train_dataset=train_ds, callbacks=[Recorder()])
    else:  # the stand-in: the same Trainer, the registry class handed to it
        args = transformers.TrainingArguments(**common)
        kwargs = dict(lr=lr, weight_decay=WEIGHT_DECAY, acceleration_mode=mode, max_grad_norm=0.0,
                      reckless_steps=(2.0, 8.0))
        kwargs.update({k: hyper[k] for k in ("betas", "eps") if k in hyper})
        kwargs.update(lowp)
        trainer = transformers.Trainer(
            model=model, args=args, train_dataset=train_ds, callbacks=[Recorder()],
            optimizer_cls_and_kwargs=(cls, kwargs),
        )
    trainer.remove_callback(PrinterCallback)
    t0, c0 = time.perf_counter(), time.process_time()
    trainer.train()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    metric = task.evaluate(model, heldout_ds)
    inner = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    state_dtypes = sorted({str(v.dtype) for st in inner.state.values() for v in st.values()
                           if isinstance(v, torch.Tensor) and v.dim() > 0})
    losses = [l for _, l in curve]
    tail = losses[-max(1, len(losses) // 10):]  # last 10 % of the logged points
    final = sum(tail) / len(tail)
    diverged = (not all(math.isfinite(l) for l in losses)) or (not math.isfinite(final)) or final > losses[0]
    return dict(
        task=task.name, optimizer=opt, mode=mode, lr=lr, seed=seed, steps=steps, precision=precision,
        final_train_loss=final, metric_name=task.metric, heldout_metric=metric, diverged=bool(diverged),
        train_wall_s=round(wall, 3), train_cpu_s=round(cpu, 3), backend=backend, optimizer_class=type(getattr(trainer.optimizer, "optimizer", trainer.optimizer)).__name__,
        param_dtypes=sorted({str(q.dtype) for q in model.parameters()}), state_dtypes=state_dtypes,
        step_path=inner.step_path() if hasattr(inner, "step_path") else None, curve=curve,
    )


def _key(r: dict, stage: str) -> tuple:
    precision = r.get("precision", "fp32")
    return (stage, r["task"], r["optimizer"], r["mode"], float(r["lr"]), int(r["seed"])) + (
        (precision,) if precision != "fp32" else ())


# ------------------------------------------------------------------------------------------- stages
class Runner:
    def __init__(self, out: Path, steps_override: Optional[int], resume: bool, backend: str,
                 raw_name: str = "runs.jsonl"):
        self.out = out
        self.backend = backend
        self.steps_override = steps_override
        self.raw = out / raw_name
        self.done: Dict[tuple, dict] = {}
        if resume and self.raw.exists():
            for line in self.raw.read_text().splitlines():
                if line.strip():
                    r = json.loads(line)
                    self.done[_key(r, r["stage"])] = r
        elif self.raw.exists():
            self.raw.unlink()
        self._tmp = tempfile.TemporaryDirectory(prefix="hfwin_conv_")  # the Trainer's output_dir (nothing is saved)
        self.workdir = self._tmp.name

    def get(self, stage: str, task: Task, opt: str, mode: str, lr: float, seed: int, precision: str = "fp32",
            **extra) -> dict:
        key = _key(dict(task=task.name, optimizer=opt, mode=mode, lr=lr, seed=seed, precision=precision), stage)
        if key in self.done:
            return self.done[key]
        steps = self.steps_override or task.steps
        t0 = time.perf_counter()
        r = run_one(task, opt, mode, lr, seed, steps, self.workdir, self.backend, precision)
        r.update(stage=stage, run_wall_s=round(time.perf_counter() - t0, 3), **extra)
        with self.raw.open("a") as f:
            f.write(json.dumps(r) + "\n")
        self.done[key] = r
        print(
            f"[{stage}] {task.name:11s} {opt:9s} {mode:4s} {precision:19s} lr={lr:<8.3g} seed={seed:<4d} "
            f"loss={r['final_train_loss']:.4f} {task.metric}={r['heldout_metric']:.4f}"
            f"{' DIVERGED' if r['diverged'] else ''} ({r['run_wall_s']:.1f}s)",
            flush=True,
        )
        return r


def tune(runner: Runner, tasks: List[Task], opts: List[str]) -> Dict[str, Dict[str, float]]:
    best: Dict[str, Dict[str, float]] = {}
    for task in tasks:
        best[task.name] = {}
        for opt in opts:
            rows = [runner.get("tune", task, opt, "none", lr, TUNING_SEED) for lr in lr_grid(opt)]
            ok = [r for r in rows if not r["diverged"]] or rows
            chosen = min(ok, key=lambda r: r["final_train_loss"] if math.isfinite(r["final_train_loss"]) else 1e30)
            best[task.name][opt] = chosen["lr"]
    return best


def grid(runner, tasks, opts, modes, mults, seeds, base_lr) -> None:
    for task in tasks:
        for opt in opts:
            for mult in mults:
                for mode in modes:
                    for seed in seeds:
                        runner.get("grid", task, opt, mode, base_lr[task.name][opt] * mult, seed,
                                   lr_mult=mult, base_lr=base_lr[task.name][opt])


def lowp_grid(runner, tasks, opts, modes, seeds, base_lr) -> None:
    for task in tasks:
        for opt in opts:
            for mode in modes:
                for precision in PRECISIONS:
                    for seed in seeds:
                        runner.get("lowp", task, opt, mode, base_lr[task.name][opt], seed, precision,
                                   lr_mult=1, base_lr=base_lr[task.name][opt])


# ------------------------------------------------------------------------------------------ report
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


def report(out: Path, tasks: List[Task], opts, modes, mults, seeds, meta: dict) -> None:
    rows = [json.loads(l) for l in (out / "runs.jsonl").read_text().splitlines() if l.strip()]
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
            "train_cpu_s", "run_wall_s", "backend", "optimizer_class"]
    with (out / "runs.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        w.writerows(g)
    with (out / "tuning.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["task", "optimizer", "lr", "seed", "final_train_loss", "metric_name",
                                          "heldout_metric", "diverged"], extrasaction="ignore")
        w.writeheader()
        w.writerows(tune_rows)
    with (out / "curves.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["task", "optimizer", "mode", "lr_mult", "seed", "step", "train_loss"])
        for r in g:
            for step, loss in r["curve"]:
                w.writerow([r["task"], r["optimizer"], r["mode"], r["lr_mult"], r["seed"], step, loss])

    cpu_txt = "" if meta.get("cpu_min") is None else f", training CPU time of all runs {meta['cpu_min']:.1f} min"
    md = [f"# Convergence: vanilla vs Win vs Win2 ({meta['date']})", ""]
    md += [f"Command: `{meta['command']}`", "",
           f"Machine: {meta['machine']}; torch {torch.__version__}; torch threads {meta['threads']}; "
           f"backend: {meta['backend']}; wall time of this invocation {meta['wall_min']:.1f} min{cpu_txt}.", "",
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
               f"{TUNING_SEED}, lowest final training loss over {list(LR_GRID_ADAPTIVE)} (SGD: {list(LR_GRID_SGD)})"
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
    (out / "summary.md").write_text("\n".join(md) + "\n")
    plots(out, tasks, opts, modes, mults, by)


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
          f"backend: {meta['backend']}; wall time of this invocation {meta['wall_min']:.1f} min{cpu_txt}.", "",
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


def plots(out: Path, tasks, opts, modes, mults, by) -> None:
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
        fig.savefig(out / f"loss_curves_{task.name}.png", dpi=110)
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
        fig.savefig(out / f"robustness_{task.name}.png", dpi=110)
        plt.close(fig)


# -------------------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="reduced grid (2 optimizers, 3 modes, lr 1x/8x, 2 seeds, 20 steps, both tasks, no tuning): < 2 min")
    p.add_argument("--out", type=Path, default=None, help=f"output folder (default {DEFAULT_OUT.relative_to(ROOT)})")
    p.add_argument("--stage", choices=("all", "tune", "grid", "report", "lowp", "lowp-report"), default="all",
                   help="all = tune then grid then the low-precision arm then report; report = rebuild tables/plots "
                   "from runs.jsonl; lowp = the low-precision arm only (base lrs from tuned_lr.json); lowp-report = "
                   "rebuild its table and plots from runs_low_precision.jsonl")
    p.add_argument("--tasks", nargs="+", choices=list(TASKS), default=None)
    p.add_argument("--optimizers", nargs="+", choices=available_optimizers(), default=None)
    p.add_argument("--modes", nargs="+", choices=MODES, default=None)
    p.add_argument("--lr-multipliers", nargs="+", type=float, default=None)
    p.add_argument("--seeds", nargs="+", type=int, default=None)
    p.add_argument("--steps", type=int, default=None, help="override every task's number of steps")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: tiny models, shared cores)")
    p.add_argument("--backend", choices=BACKENDS, default="wintrainer",
                   help="wintrainer (default, reported) or the plain Trainer handed the registry class (comparison)")
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
    t0 = time.perf_counter()
    if a.stage != "report":
        runner = Runner(out, steps, resume=a.resume or a.stage == "grid", backend=a.backend)
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
        runner._tmp.cleanup()
        if a.stage == "all" and not a.quick:
            main_lowp(a, out, tasks, command)
    wall = (time.perf_counter() - t0) / 60
    meta_file = out / "meta.json"
    if a.stage == "report" and meta_file.exists():
        meta = json.loads(meta_file.read_text())
    else:
        meta = dict(
            date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), command=command,
            machine=f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.python_implementation()} {platform.python_version()}",
            threads=a.threads, wall_min=wall, steps=a.steps if not a.quick else steps,
            backend={"wintrainer": "hf_win.WinTrainer + WinTrainingArguments(optim=<registry name>)",
                     "trainer+registry": "transformers.Trainer + registry class via optimizer_cls_and_kwargs"}[a.backend],
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
            runner = Runner(out, a.steps, resume=a.resume, backend=a.backend, raw_name="runs_low_precision.jsonl")
            base_lr = {t.name: {o: FALLBACK_BASE_LR[t.name][o] for o in opts} for t in tasks}
            tuned_file = out / "tuned_lr.json"
            if tuned_file.exists():
                saved = json.loads(tuned_file.read_text())
                base_lr = {t.name: {o: saved[t.name][o] for o in opts} for t in tasks}
            lowp_grid(runner, tasks, opts, modes, seeds, base_lr)
            runner._tmp.cleanup()
            cpu = sum(r.get("train_cpu_s", 0) for r in runner.done.values()) / 60
        else:
            cpu = None
        meta = dict(
            date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), command=command,
            machine=f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.python_implementation()} {platform.python_version()}",
            threads=a.threads, wall_min=(time.perf_counter() - t0) / 60, steps=a.steps,
            backend={"wintrainer": "hf_win.WinTrainer + WinTrainingArguments(optim=<registry name>)",
                     "trainer+registry": "transformers.Trainer + registry class via optimizer_cls_and_kwargs"}[a.backend],
            cpu_min=cpu,
        )
        meta_file.write_text(json.dumps(meta, indent=1) + "\n")
        (out / "command_low_precision.txt").write_text(command + "\n")
    report_lowp(out, tasks, opts, modes, seeds, meta)
    print(f"low-precision arm done in {(time.perf_counter() - t0) / 60:.1f} min -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
