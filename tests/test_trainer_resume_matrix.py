"""Resuming a WinTrainer run from the checkpoints users have: a plain Trainer's, a WinTrainer's with a built-in
optimizer (neither has the WinSettingsCallback entry), a WinTrainer's of another mode, of another state_dtype,
of other rounding settings, of another optimizer (refused, naming both). Each resume saves a checkpoint and
finishes, and what it reports (the train-start line, the summary, training_args.bin, trainer_state.json, the
model card) is what its optimizer really holds: mode, state dtype, state bytes."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch
from transformers import Trainer, TrainingArguments

from hf_win import WinTrainer, WinTrainingArguments
from hf_win.optim_args import parse_win_optim_args
from hf_win.trainer import _fmt_bytes
from trainer_testing import TinyImages, base_args, fast_cpu, tiny_vit  # noqa: F401 (fixture)

N, BATCH = 16, 8  # two steps per epoch: checkpoint-2 is the source, the resumed runs save checkpoint-4


def _train(out, trainer_cls=WinTrainer, args_cls=WinTrainingArguments, resume=None, steps=2, **overrides):
    kw = base_args(out, max_steps=steps, save_strategy="steps", save_steps=2, per_device_train_batch_size=BATCH,
                   **overrides)
    trainer = trainer_cls(model=tiny_vit(), args=args_cls(**kw), train_dataset=TinyImages(n=N))
    trainer.train(resume_from_checkpoint=resume)
    return trainer


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """checkpoint-2 of each kind of source run (made once for the module)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("sources")
    runs = {
        "plain_trainer": dict(trainer_cls=Trainer, args_cls=TrainingArguments, optim="adamw_torch"),
        "win_trainer_adamw_torch": dict(optim="adamw_torch"),
        "win_bf16_seed7": dict(acceleration_mode="win", optim_args="state_dtype=bfloat16,rounding_seed=7"),
        "win2_fp32": dict(acceleration_mode="win2"),
        "sgd_win": dict(optim="sgd_win", learning_rate=0.05),
    }
    try:
        for name, kw in runs.items():
            _train(root / name, **kw)
    finally:
        torch.set_num_threads(threads)
    ckpts = {name: root / name / "checkpoint-2" for name in runs}
    # A Win checkpoint without the callback entry (an older hf_win; what the Trainer writes for another optimizer)
    stripped = root / "win2_fp32_no_entry"
    shutil.copytree(ckpts["win2_fp32"], stripped)
    state = json.loads((stripped / "trainer_state.json").read_text())
    del state["stateful_callbacks"]["WinSettingsCallback"]
    (stripped / "trainer_state.json").write_text(json.dumps(state))
    ckpts["win2_fp32_no_entry"] = stripped
    return ckpts


def _inner(trainer):
    return getattr(trainer.optimizer, "optimizer", trainer.optimizer)


def _assert_reports_match_the_state(trainer, out, mode, dtype, caplog=None):
    """The optimizer holds ``mode``'s state in ``dtype``; everything reported says so."""
    opt = _inner(trainer)
    assert trainer.state.global_step == 4
    tensors = [v for st in opt.state.values() for k, v in st.items() if torch.is_tensor(v) and k != "step"]
    assert tensors and {t.dtype for t in tensors} == {dtype}
    # bfloat16 state of the float32 model: the sequences as differences from the parameters (x_delta = x - p)
    x, y = ("x_delta", "y_delta") if dtype == torch.bfloat16 else ("x", "y")
    assert all((y in st) == (mode == "win2") and x in st for st in opt.state.values())
    assert {g["acceleration_mode"] for g in opt.param_groups} == {mode}
    name = str(dtype).replace("torch.", "")

    summary = trainer.win_optimizer_summary
    assert summary["acceleration_mode"] == mode and summary["state_bytes"] == opt.state_bytes()
    assert summary["state_dtype"] == name
    if caplog is not None:
        line = [r.getMessage() for r in caplog.records if r.getMessage().startswith("hf_win optimizer: ")
                and "first step took" not in r.getMessage()][-1]
        assert f"acceleration_mode={mode}" in line and f"in {name} = {_fmt_bytes(opt.state_bytes())}" in line

    def says(optim_args):  # the state dtype an optim_args string gives (none: the parameters', float32)
        return parse_win_optim_args("adamw_win", optim_args).get("state_dtype") or "float32"

    assert says(trainer.args.optim_args) == name
    ckpt = out / "checkpoint-4"
    saved = torch.load(ckpt / "optimizer.pt", weights_only=True)
    assert {t.dtype for st in saved["state"].values() for k, t in st.items() if k != "step"} == {dtype}
    assert {g["acceleration_mode"] for g in saved["param_groups"]} == {mode}
    settings = json.loads((ckpt / "trainer_state.json").read_text())["stateful_callbacks"]["WinSettingsCallback"]["args"]
    assert settings["acceleration_mode"] == mode and says(settings["optim_args"]) == name
    args = torch.load(ckpt / "training_args.bin", weights_only=False)
    assert args.acceleration_mode == mode and says(args.optim_args) == name
    trainer.create_model_card(model_name="resumed")
    card = (out / "README.md").read_text()
    assert f"- acceleration_mode: {mode}\n" in card
    assert ("state_dtype=bfloat16" in card) == (name == "bfloat16")


@pytest.mark.usefixtures("fast_cpu")
@pytest.mark.parametrize("mode", ["win", "win2"])
@pytest.mark.parametrize("source", ["plain_trainer", "win_trainer_adamw_torch", "win2_fp32_no_entry"])
def test_resume_from_a_checkpoint_without_the_callback_entry_saves_and_finishes(tmp_path, sources, mode, source,
                                                                                caplog):
    with caplog.at_level(logging.INFO, logger="transformers.trainer"):
        trainer = _train(tmp_path, resume=str(sources[source]), steps=4, acceleration_mode=mode)
    _assert_reports_match_the_state(trainer, tmp_path, mode, torch.float32, caplog)
    if source != "win2_fp32_no_entry":  # a torch.optim.AdamW state dict was converted, and said so
        assert "converted a torch.optim.AdamW state dict" in trainer.win_optimizer_resume


@pytest.mark.usefixtures("fast_cpu")
@pytest.mark.parametrize("restore", [False, True])
def test_resume_in_another_mode_reports_the_mode_that_runs(tmp_path, sources, restore):
    # restore_callback_states_from_checkpoint rebuilds the callback from the checkpoint's entry (win2)
    trainer = _train(tmp_path, resume=str(sources["win2_fp32"]), steps=4, acceleration_mode="win",
                     restore_callback_states_from_checkpoint=restore)
    _assert_reports_match_the_state(trainer, tmp_path, "win", torch.float32)
    assert "acceleration_mode='win2' and this optimizer was built with 'win'" in trainer.win_optimizer_resume


@pytest.mark.usefixtures("fast_cpu")
@pytest.mark.parametrize("mode", ["win", "win2"])
def test_a_given_state_dtype_wins_and_the_state_is_converted(tmp_path, sources, mode, caplog):
    # bfloat16 state in the checkpoint, float32 asked for (and the reverse)
    with caplog.at_level(logging.INFO, logger="transformers.trainer"):
        up = _train(tmp_path / "up", resume=str(sources["win_bf16_seed7"]), steps=4, acceleration_mode=mode,
                    optim_args="state_dtype=float32,rounding_seed=7")
    _assert_reports_match_the_state(up, tmp_path / "up", mode, torch.float32, caplog)
    assert "converted to float32" in up.win_optimizer_resume
    down = _train(tmp_path / "down", resume=str(sources["win2_fp32"]), steps=4, acceleration_mode=mode,
                  optim_args="state_dtype=bfloat16")
    _assert_reports_match_the_state(down, tmp_path / "down", mode, torch.bfloat16)
    assert down.win_optimizer_summary["state_bytes"] * 2 == up.win_optimizer_summary["state_bytes"]


@pytest.mark.usefixtures("fast_cpu")
def test_settings_not_given_at_resume_are_the_checkpoints_and_the_reports_say_so(tmp_path, sources, caplog):
    with caplog.at_level(logging.WARNING, logger="transformers.trainer"):
        kept = _train(tmp_path / "kept", resume=str(sources["win_bf16_seed7"]), steps=4)
    _assert_reports_match_the_state(kept, tmp_path / "kept", "win", torch.bfloat16)
    assert {g["rounding_seed"] for g in _inner(kept).param_groups} == {7}
    assert parse_win_optim_args("adamw_win", kept.args.optim_args) == {"state_dtype": "bfloat16", "rounding_seed": 7}
    warned = [r.getMessage() for r in caplog.records if "runs with other settings than the arguments said" in r.getMessage()]
    assert len(warned) == 1 and "rounding_seed=7 runs (the checkpoint's), not 0" in warned[0]

    # given at resume, the rounding settings win (warned)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="transformers.trainer"):
        given = _train(tmp_path / "given", resume=str(sources["win_bf16_seed7"]), steps=4,
                       optim_args="state_dtype=bfloat16,rounding_seed=3,bf16_stochastic_round=true")
    groups = _inner(given).param_groups
    assert {g["rounding_seed"] for g in groups} == {3} and {g["bf16_stochastic_round"] for g in groups} == {True}
    assert given.win_optimizer_summary["rounding_seed"] == 3 and given.win_optimizer_summary["bf16_stochastic_round"]
    warned = [r.getMessage() for r in caplog.records if "runs with other settings than the arguments said" in r.getMessage()]
    assert len(warned) == 1 and "rounding_seed=3 given in --optim_args replaces the checkpoint's 7" in warned[0]
    assert "bf16_stochastic_round=True given in --optim_args replaces the checkpoint's False" in warned[0]

    # state_dtype=none given: the parameters' dtype, the checkpoint's bfloat16 state converted
    none = _train(tmp_path / "none", resume=str(sources["win_bf16_seed7"]), steps=4,
                  optim_args="state_dtype=none,rounding_seed=7")
    _assert_reports_match_the_state(none, tmp_path / "none", "win", torch.float32)
    assert {g["state_dtype"] for g in _inner(none).param_groups} == {None}
    _assert_reports_match_the_state(given, tmp_path / "given", "win", torch.bfloat16)


@pytest.mark.usefixtures("fast_cpu")
@pytest.mark.parametrize("mode", ["win", "win2"])
def test_a_checkpoint_of_another_optimizer_is_refused_naming_both(tmp_path, sources, mode):
    with pytest.raises(ValueError, match="saved by hf_win SGD, and this optimizer is AdamW"):
        _train(tmp_path, resume=str(sources["sgd_win"]), steps=4, acceleration_mode=mode)
    assert not (tmp_path / "checkpoint-4").exists()


@pytest.mark.usefixtures("fast_cpu")
def test_an_optimizer_built_otherwise_than_the_arguments_is_what_the_reports_say(tmp_path, caplog):
    import hf_win

    model = tiny_vit()
    opt = hf_win.AdamW(model.parameters(), lr=1e-2, betas=(0.8, 0.99), rounding_seed=5)
    args = WinTrainingArguments(**base_args(tmp_path, max_steps=1, save_strategy="steps", save_steps=1))
    with caplog.at_level(logging.WARNING, logger="transformers.trainer"):
        trainer = WinTrainer(model=model, args=args, train_dataset=TinyImages(n=8), optimizers=(opt, None))
        trainer.train()
    assert (args.adam_beta1, args.adam_beta2) == (0.8, 0.99) and args.optim_args == "rounding_seed=5"
    saved = torch.load(tmp_path / "checkpoint-1" / "training_args.bin", weights_only=False)
    assert (saved.adam_beta1, saved.optim_args) == (0.8, "rounding_seed=5")
    warned = [r.getMessage() for r in caplog.records if "runs with other settings" in r.getMessage()]
    assert len(warned) == 1 and "rounding_seed=5 runs (the optimizer's), not 0" in warned[0]
