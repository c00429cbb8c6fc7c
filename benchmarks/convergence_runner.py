"""The convergence benchmark's runs: one training run through the Hugging Face Trainer, the runner that
records and resumes them, and the stages (tuning, the grid, the low-precision arm, the wrapped arm).

Tuning: the vanilla optimizer (mode ``none``) only, on one seed that is *not* one of the grid seeds, over a
half-decade learning-rate grid; the base learning rate is the one with the lowest final training loss. Win
and Win2 are never tuned: they get the vanilla optimum.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

import hf_win
from hf_win import get_optimizer_spec
from convergence_tasks import Task

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
# The low-precision arm: precision -> (model parameter dtype or None, extra optimizer keywords).
PRECISIONS = {
    "fp32": (None, {}),
    "bf16_state": (None, {"state_dtype": "bfloat16"}),
    "bf16_params_sr": (torch.bfloat16, {"state_dtype": "bfloat16", "bf16_stochastic_round": True}),
    "bf16_params_nearest": (torch.bfloat16, {"state_dtype": "bfloat16", "bf16_stochastic_round": False}),
}
LOWP = dict(optimizers=["adamw_win", "sgd_win"], modes=["win2"])

# Tuning grids (half-decades). SGD's step is not normalised, so its grid sits higher; Adafactor's lr is a
# relative step (a fraction of the parameter's RMS), so its grid does too.
LR_GRID_ADAPTIVE = (3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
LR_GRID_SGD = (3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0)
LR_GRID_ADAFACTOR = (3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0, 3.0)
# The wrapped arm (--stage wrapped): registry optimizers built as Win(base) around torch.optim's Muon and
# Adafactor, on the language-model task, at the tuned vanilla lr and two larger ones.
WRAPPED = dict(optimizers=["muon_win", "adafactor_win"], tasks=["gpt2_stdlib"], lr_multipliers=[1, 4, 8])
# Base learning rates used when no tuning file exists (--quick, or --stage grid without tuning):
# the values the full tuning chose (see benchmarks/results/convergence/tuned_lr.json).
FALLBACK_BASE_LR = {
    "vit_digits": {"adamw_win": 1e-2, "adam_win": 3e-2, "lamb_win": 3e-2, "sgd_win": 1e-1, "adan_win": 1e-2},
    "gpt2_stdlib": {"adamw_win": 3e-2, "adam_win": 1e-2, "lamb_win": 3e-2, "sgd_win": 3e-1, "adan_win": 3e-2},
}


def lr_grid(opt: str) -> Sequence[float]:
    return {"sgd_win": LR_GRID_SGD, "adafactor_win": LR_GRID_ADAFACTOR}.get(opt, LR_GRID_ADAPTIVE)


# ---------------------------------------------------------------------------------------- one run
#: How every run is trained (recorded in the results).
TRAINER = "hf_win.WinTrainer + WinTrainingArguments(optim=<registry name>)"


def run_one(task: Task, opt: str, mode: str, lr: float, seed: int, steps: int, workdir: str,
            precision: str = "fp32") -> dict:
    """Train one model through ``hf_win.WinTrainer`` with ``WinTrainingArguments(optim=<registry name>)``;
    return its record (curve included). ``precision``: one of :data:`PRECISIONS` (the model's dtype and
    the low-precision optimizer keywords)."""
    from transformers import PrinterCallback, TrainerCallback

    train_ds, heldout_ds = task.data()
    spec = get_optimizer_spec(opt)
    hyper = spec.hyperparameters
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
    extra = {}
    if "betas" in hyper:  # the base optimizer's own betas/eps, through the standard Trainer fields
        extra.update(adam_beta1=hyper["betas"][0], adam_beta2=hyper["betas"][1])
        if len(hyper["betas"]) == 3:
            extra["optim_args"] = f"beta3={hyper['betas'][2]}"
    if lowp:  # what a user types: --optim_args state_dtype=bfloat16,bf16_stochastic_round=True
        items = [extra["optim_args"]] if "optim_args" in extra else []
        extra["optim_args"] = ",".join(items + [f"{k}={v}" for k, v in lowp.items()])
    if "eps" in hyper:
        extra["adam_epsilon"] = hyper["eps"]
    args = hf_win.WinTrainingArguments(optim=opt, acceleration_mode=mode, **common, **extra)
    trainer = hf_win.WinTrainer(model=model, args=args, train_dataset=train_ds, callbacks=[Recorder()])
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
        train_wall_s=round(wall, 3), train_cpu_s=round(cpu, 3), optimizer_class=type(getattr(trainer.optimizer, "optimizer", trainer.optimizer)).__name__,
        param_dtypes=sorted({str(q.dtype) for q in model.parameters()}), state_dtypes=state_dtypes,
        step_path=inner.step_path() if hasattr(inner, "step_path") else None, curve=curve,
    )


def _key(r: dict, stage: str) -> tuple:
    precision = r.get("precision", "fp32")
    return (stage, r["task"], r["optimizer"], r["mode"], float(r["lr"]), int(r["seed"])) + (
        (precision,) if precision != "fp32" else ())


# ------------------------------------------------------------------------------------------- stages
class Runner:
    def __init__(self, out: Path, steps_override: Optional[int], resume: bool, raw_name: str = "runs.jsonl"):
        self.out = out
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

    def close(self) -> None:
        """Remove the working folder (the runs' results stay in ``raw``)."""
        self._tmp.cleanup()

    def get(self, stage: str, task: Task, opt: str, mode: str, lr: float, seed: int, precision: str = "fp32",
            **extra) -> dict:
        key = _key(dict(task=task.name, optimizer=opt, mode=mode, lr=lr, seed=seed, precision=precision), stage)
        if key in self.done:
            return self.done[key]
        steps = self.steps_override or task.steps
        t0 = time.perf_counter()
        r = run_one(task, opt, mode, lr, seed, steps, self.workdir, precision)
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


