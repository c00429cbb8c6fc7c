"""Resuming a WinTrainer run from a checkpoint is exact (tiny ViT, CPU, fixed seeds), the checkpoints hold
the Win state, and ViT checkpoints that transformers 5.x writes under the original parameter names load
into the model (hf_win/_compat.py)."""

from __future__ import annotations

import copy
import logging
import warnings

import pytest
import torch
from safetensors.torch import load_file
from transformers import Trainer, TrainerCallback, TrainingArguments, ViTForImageClassification

from hf_win import WinTrainer, WinTrainingArguments
from hf_win._compat import checkpoint_key_mapping
from trainer_testing import TinyImages, base_args, fast_cpu, tiny_vit  # noqa: F401 (fixture)

pytestmark = pytest.mark.usefixtures("fast_cpu")

STEPS, SAVE = 8, 3  # 6 steps per epoch: checkpoint-3 is mid-epoch, the run crosses an epoch boundary


class SnapshotOnSave(TrainerCallback):
    """Keeps a deep copy of the optimizer state at every checkpoint save."""

    def __init__(self):
        self.states = {}

    def on_save(self, args, state, control, optimizer=None, **kwargs):
        self.states[state.global_step] = copy.deepcopy(optimizer.state_dict())


def _run(tmp_path, sub, trainer_cls=WinTrainer, args_cls=WinTrainingArguments, model_seed=0, resume=None,
         callbacks=None, **overrides):
    kw = base_args(tmp_path / sub, max_steps=STEPS, save_strategy="steps", save_steps=SAVE, warmup_steps=2,
                   **overrides)
    model = tiny_vit(seed=model_seed, dropout=0.1)  # dropout: the restored RNG state matters too
    trainer = trainer_cls(model=model, args=args_cls(**kw), train_dataset=TinyImages(n=48), callbacks=callbacks)
    trainer.train(resume_from_checkpoint=resume)
    return trainer, model


def _inner(opt):
    return getattr(opt, "optimizer", opt)


def _assert_state_equal(a, b):
    assert a.keys() == b.keys()
    for i in a:
        assert a[i].keys() == b[i].keys(), i
        for k in a[i]:
            va, vb = a[i][k], b[i][k]
            assert (torch.equal(va, vb) if isinstance(va, torch.Tensor) else va == vb), (i, k)


@pytest.mark.parametrize("optim, mode", [("adamw_win", "win"), ("adamw_win", "win2"), ("lamb_win", "win2")])
def test_resume_is_bitwise_exact_and_checkpoints_hold_the_win_state(tmp_path, optim, mode):
    snap = SnapshotOnSave()
    full, full_model = _run(tmp_path, "full", optim=optim, acceleration_mode=mode, callbacks=[snap])
    ckpt = tmp_path / "full" / f"checkpoint-{SAVE}"

    # The checkpoint holds the Win state, all of it: x (and y for win2) for every parameter, equal to the
    # optimizer's state at the time of saving, and the param groups with their mode and reckless steps.
    saved = torch.load(ckpt / "optimizer.pt", weights_only=True)
    n_params = sum(1 for p in full_model.parameters())
    assert len(saved["state"]) == n_params
    extra = {"x"} if mode == "win" else {"x", "y"}
    for s in saved["state"].values():
        assert extra <= set(s) and ("y" not in s or mode == "win2")
    for g in saved["param_groups"]:
        assert g["acceleration_mode"] == mode and tuple(g["reckless_steps"]) == (2.0, 8.0)
        assert g["max_grad_norm"] == 0.0
    _assert_state_equal(saved["state"], snap.states[SAVE]["state"])

    # Resume in a fresh trainer whose model starts from other weights: everything must come from the checkpoint.
    resumed, resumed_model = _run(tmp_path, "resumed", optim=optim, acceleration_mode=mode, model_seed=123,
                                  resume=str(ckpt))
    assert resumed.state.global_step == STEPS
    for (n, p1), (_, p2) in zip(full_model.named_parameters(), resumed_model.named_parameters()):
        assert torch.equal(p1, p2), n
    _assert_state_equal(_inner(full.optimizer).state_dict()["state"], _inner(resumed.optimizer).state_dict()["state"])
    # The resumed history starts with the checkpoint's; the steps run after resuming log the same losses.
    losses = lambda t: [(h["step"], h["loss"]) for h in t.state.log_history if "loss" in h]  # noqa: E731
    assert len(losses(full)) == STEPS and losses(full) == losses(resumed)


def test_plain_trainer_loses_vit_encoder_on_resume_and_win_trainer_does_not(tmp_path, caplog):
    # The problem (transformers 5.x): checkpoints hold the original ViT names, the model uses new ones.
    _, full_model = _run(tmp_path, "full", trainer_cls=Trainer, args_cls=TrainingArguments, optim="adamw_torch")
    ckpt = tmp_path / "full" / f"checkpoint-{SAVE}"
    saved_keys = set(load_file(ckpt / "model.safetensors"))
    model_keys = set(full_model.state_dict())
    mapping = checkpoint_key_mapping(full_model)
    assert "vit.encoder.layer.0.attention.attention.query.weight" in saved_keys
    assert mapping["vit.encoder.layer.0.attention.attention.query.weight"] == "vit.layers.0.attention.q_proj.weight"
    assert {mapping.get(k, k) for k in saved_keys} == model_keys

    _, plain_model = _run(tmp_path, "plain", trainer_cls=Trainer, args_cls=TrainingArguments, optim="adamw_torch",
                          model_seed=123, resume=str(ckpt))
    diverged = [n for (n, p1), (_, p2) in zip(full_model.named_parameters(), plain_model.named_parameters())
                if not torch.equal(p1, p2)]
    assert any(n.startswith("vit.layers.") for n in diverged), (
        "transformers now resumes ViT checkpoints correctly: hf_win._compat.CheckpointNamesMixin may be obsolete"
    )

    # Same checkpoint (written by the plain Trainer), resumed by WinTrainer with the same optimizer: exact,
    # and no missing/unexpected keys warning.
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="transformers.trainer"):
        _, win_model = _run(tmp_path, "win", args_cls=WinTrainingArguments, optim="adamw_torch", model_seed=123,
                            resume=str(ckpt))
    assert not [r for r in caplog.records if "keys in the checkpoint" in r.getMessage()]
    for (n, p1), (_, p2) in zip(full_model.named_parameters(), win_model.named_parameters()):
        assert torch.equal(p1, p2), n


def test_sharded_checkpoint_and_mismatched_checkpoint(tmp_path, caplog):
    source = tiny_vit(seed=7)
    source.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    target = tiny_vit(seed=8)
    trainer = WinTrainer(model=target, args=WinTrainingArguments(**base_args(tmp_path / "o")))
    with caplog.at_level(logging.WARNING, logger="transformers.trainer"):
        trainer._load_from_checkpoint(str(tmp_path / "sharded"))
    assert not [r for r in caplog.records if "keys in the checkpoint" in r.getMessage()]
    for (n, p1), (_, p2) in zip(source.named_parameters(), target.named_parameters()):
        assert torch.equal(p1, p2), n

    # A checkpoint whose names match nothing is an error, not a warning.
    torch.save({"encoder." + k: v for k, v in source.state_dict().items()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(RuntimeError, match="does not match the model"):
        trainer._load_from_checkpoint(str(tmp_path))


def test_load_best_model_at_end_restores_the_best_checkpoint(tmp_path):
    kw = base_args(tmp_path, optim="adamw_win", acceleration_mode="win2", max_steps=6, save_strategy="steps",
                   save_steps=2, eval_strategy="steps", eval_steps=2, load_best_model_at_end=True,
                   metric_for_best_model="eval_loss", learning_rate=0.05,
                   greater_is_better=True)  # the worst loss: an early checkpoint, not the final weights
    model = tiny_vit()
    trainer = WinTrainer(model=model, args=WinTrainingArguments(**kw), train_dataset=TinyImages(n=48),
                         eval_dataset=TinyImages(n=16, seed=2))
    trainer.train()
    best = trainer.state.best_model_checkpoint
    assert best is not None and not best.endswith("checkpoint-6")
    reference = ViTForImageClassification.from_pretrained(best)
    for (n, p1), (_, p2) in zip(reference.named_parameters(), model.named_parameters()):
        assert torch.equal(p1, p2), n


def test_trainer_resume_converts_another_mode_and_logs_what_it_did(tmp_path, caplog):
    def run(sub, mode, resume=None, steps=2):
        kw = base_args(tmp_path / sub, max_steps=steps, save_strategy="steps", save_steps=2, acceleration_mode=mode)
        trainer = WinTrainer(model=tiny_vit(), args=WinTrainingArguments(**kw), train_dataset=TinyImages(n=32))
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    run("first", "win")
    ckpt = str(tmp_path / "first" / "checkpoint-2")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="transformers.trainer"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        same = run("same", "win", resume=ckpt, steps=3)
        switched = run("switched", "win2", resume=ckpt, steps=3)
    assert "loaded as saved" in same.win_optimizer_resume
    assert "acceleration_mode='win' and this optimizer was built with 'win2'" in switched.win_optimizer_resume
    assert "Now: acceleration_mode win2" in switched.win_optimizer_resume
    records = [r for r in caplog.records if "hf_win optimizer state from" in r.getMessage()]
    assert [r.levelno for r in records] == [logging.INFO, logging.WARNING]
    inner = getattr(switched.optimizer, "optimizer", switched.optimizer)
    assert {g["acceleration_mode"] for g in inner.param_groups} == {"win2"}
    assert all("y" in st for st in inner.state.values())
