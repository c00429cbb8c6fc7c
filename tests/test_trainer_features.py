"""Gradient accumulation, bf16 autocast on CPU and evaluation during training with WinTrainer."""

from __future__ import annotations

import pytest
import torch

from hf_win import WinTrainer, WinTrainingArguments
from trainer_testing import TinyImages, base_args, fast_cpu, tiny_vit  # noqa: F401 (fixture)

pytestmark = pytest.mark.usefixtures("fast_cpu")


def _train(tmp_path, sub, eval_dataset=None, **overrides):
    kw = base_args(tmp_path / sub, optim="adamw_win", acceleration_mode="win2", warmup_steps=1, **overrides)
    model = tiny_vit()
    trainer = WinTrainer(model=model, args=WinTrainingArguments(**kw), train_dataset=TinyImages(n=48),
                         eval_dataset=eval_dataset)
    trainer.train()
    return trainer, model


def _max_diff(m1, m2):
    return max((p1 - p2).abs().max().item() for p1, p2 in zip(m1.parameters(), m2.parameters()))


def test_gradient_accumulation_matches_the_large_batch(tmp_path):
    big, big_model = _train(tmp_path, "big", per_device_train_batch_size=8)
    acc, acc_model = _train(tmp_path, "acc", per_device_train_batch_size=4, gradient_accumulation_steps=2)
    small, small_model = _train(tmp_path, "small", per_device_train_batch_size=4)
    opt = getattr(acc.optimizer, "optimizer", acc.optimizer)
    assert acc.state.global_step == 3
    assert all(s["step"] == 3 for s in opt.state.values())  # one optimizer step per 2 micro-batches
    # Same samples, same optimizer steps: equal up to float summation order...
    assert _max_diff(big_model, acc_model) < 1e-4
    # ...while half the batch per step gives a visibly different run (the comparison can fail).
    assert _max_diff(big_model, small_model) > 1e-3


def test_bf16_autocast_on_cpu(tmp_path):
    fp32, fp32_model = _train(tmp_path, "fp32")
    bf16, bf16_model = _train(tmp_path, "bf16", bf16=True)
    opt = getattr(bf16.optimizer, "optimizer", bf16.optimizer)
    # Master weights and the Win state stay float32; the forward ran in bfloat16 (results differ a little).
    assert all(p.dtype == torch.float32 for p in bf16_model.parameters())
    assert all(v.dtype == torch.float32 for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor))
    assert {"x", "y"} <= set(next(iter(opt.state.values())))
    d = _max_diff(fp32_model, bf16_model)
    assert 0 < d < 5e-2
    assert all(torch.isfinite(p).all() for p in bf16_model.parameters())


def test_evaluation_during_training(tmp_path):
    evald, eval_model = _train(tmp_path, "eval", eval_dataset=TinyImages(n=16, seed=2), eval_strategy="steps",
                               eval_steps=1, max_steps=3)
    plain, plain_model = _train(tmp_path, "plain", max_steps=3)
    evals = [h for h in evald.state.log_history if "eval_loss" in h]
    assert [h["step"] for h in evals] == [1, 2, 3]
    assert all(h["eval_loss"] > 0 for h in evals)
    # Evaluating between steps does not touch the optimizer or the parameters.
    assert _max_diff(eval_model, plain_model) == 0.0
    final = evald.evaluate()
    assert final["eval_loss"] == pytest.approx(evals[-1]["eval_loss"], rel=0, abs=0)
