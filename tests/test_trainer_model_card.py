"""The model card and trainer_state.json say which Win ran (a win and a win2 run get different cards)."""

from __future__ import annotations

import json

import pytest

from hf_win import WinTrainer, WinTrainingArguments
from trainer_testing import TinyImages, base_args, fast_cpu, tiny_vit  # noqa: F401 (fixture)

pytestmark = pytest.mark.usefixtures("fast_cpu")


def _card_and_state(tmp_path, sub, **overrides):
    kw = base_args(tmp_path / sub, max_steps=2, save_strategy="steps", save_steps=2, **overrides)
    trainer = WinTrainer(model=tiny_vit(), args=WinTrainingArguments(**kw), train_dataset=TinyImages(n=16))
    trainer.train()
    trainer.create_model_card(model_name=sub)
    card = (tmp_path / sub / "README.md").read_text()
    checkpoint_state = json.load(open(tmp_path / sub / "checkpoint-2" / "trainer_state.json"))
    return card, checkpoint_state["stateful_callbacks"]["WinSettingsCallback"]["args"]


def test_card_and_trainer_state_name_the_mode_and_reckless_steps(tmp_path):
    card_win, state_win = _card_and_state(tmp_path, "win", optim="lamb_win", acceleration_mode="win")
    card_win2, state_win2 = _card_and_state(tmp_path, "win2", optim="lamb_win", acceleration_mode="win2",
                                            reckless_steps=[1.5, 6.0], optim_args="trust_clip=true")
    assert "- acceleration_mode: win\n" in card_win and "- reckless_steps: (2.0, 8.0)" in card_win
    assert "- acceleration_mode: win2\n" in card_win2 and "- reckless_steps: (1.5, 6.0)" in card_win2
    assert "- optim_args: trust_clip=true" in card_win2 and "optim_args" not in card_win.split("- optimizer:")[0]
    optimizer_line = next(line for line in card_win2.splitlines() if line.startswith("- optimizer:"))
    assert "lamb_win (hf_win.LAMB) with acceleration_mode=win2, reckless_steps=(1.5, 6.0)" in optimizer_line
    assert "optimizer_args=trust_clip=true" in optimizer_line
    assert state_win == {"optimizer": "lamb_win", "class": "hf_win.LAMB", "acceleration_mode": "win",
                         "reckless_steps": [2.0, 8.0], "optim_args": None}
    assert state_win2["acceleration_mode"] == "win2" and state_win2["reckless_steps"] == [1.5, 6.0]
    assert state_win2["optim_args"] == "trust_clip=true"


def test_sgd_card_has_no_betas_and_builtin_optimizers_keep_the_transformers_card(tmp_path):
    card, _ = _card_and_state(tmp_path, "sgd", optim="sgd_win", acceleration_mode="win2", learning_rate=0.1)
    line = next(line for line in card.splitlines() if line.startswith("- optimizer:"))
    assert "sgd_win (hf_win.SGD) with acceleration_mode=win2" in line and "betas" not in line
    kw = base_args(tmp_path / "plain", max_steps=1, optim="adamw_torch")
    trainer = WinTrainer(model=tiny_vit(), args=WinTrainingArguments(**kw), train_dataset=TinyImages(n=8))
    trainer.train()
    trainer.create_model_card(model_name="plain")
    card = (tmp_path / "plain" / "README.md").read_text()
    line = next(line for line in card.splitlines() if line.startswith("- optimizer:"))
    assert "adamw_torch" in line.lower() and "with betas" in line and "acceleration_mode" not in card
