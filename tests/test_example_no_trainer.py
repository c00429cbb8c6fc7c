"""examples/image_classification/run_image_classification_no_trainer.py: an Accelerate loop with the Win optimizers.

Resumed from an ``accelerator.save_state`` checkpoint = uninterrupted (bitwise, with every random augmentation
on); 1 process = 2 processes under ``torchrun`` and ``accelerate launch`` (CPU, gloo); the offline default
with a tiny ResNet reports top-1/top-5; bad input is one line before anything is built.
"""

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent / "dist_workers"))
import launch  # noqa: E402

from example_testing import load_script  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "examples" / "image_classification" / "run_image_classification_no_trainer.py"
TINY_VIT = "image_size=16,patch_size=8,hidden_size=16,num_hidden_layers=2,num_attention_heads=2,intermediate_size=32"
# 1 vs 2 processes: float32 reduction order (a mean of 8 samples vs the average of two means of 4, the gloo
# all-reduce) moves the parameters by ~1e-5 after 3 AdamW steps of lr 1e-2 as measured (Adam's normalisation
# amplifies it); one step moves them by ~1e-2, so a wrong batch, a skipped or doubled step is >= 1e-3.
ATOL = 1e-4


@pytest.fixture(scope="module")
def nt():
    return load_script(SCRIPT)


def _run(nt, argv):
    from accelerate.state import AcceleratorState

    try:
        return nt.run(argv)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)  # the next run builds its own Accelerator


def _folder_args(image_folder, out, *extra):
    return ["--train_dir", str(image_folder / "train"), "--validation_dir", str(image_folder / "validation"),
            "--config_overrides", TINY_VIT, "--learning_rate", "1e-2", "--output_dir", str(out), *extra]


def _max_diff(a, b):
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def test_resumed_run_equals_the_uninterrupted_run(nt, image_folder, tmp_path):
    """5 steps (3 per epoch) with random crops, flips, RandAugment, mixup/cutmix, label smoothing and drop path;
    resumed from step_2 (mid-epoch 0) it ends with the same parameters, Win state (x, y) and metrics, bitwise."""
    augment = ["--per_device_train_batch_size", "8", "--max_train_steps", "5", "--checkpointing_steps", "2",
               "--optim", "adamw_win", "--acceleration_mode", "win2", "--mixup_alpha", "0.8", "--cutmix_alpha",
               "1.0", "--label_smoothing_factor", "0.1", "--drop_path_rate", "0.1", "--randaugment_num_ops", "2",
               "--randaugment_magnitude", "7"]
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    _run(nt, _folder_args(image_folder, whole, *augment))
    _run(nt, _folder_args(image_folder, resumed, *augment, "--resume_from_checkpoint", str(whole / "step_2")))
    final = load_file(whole / "model.safetensors")
    assert _max_diff(final, load_file(resumed / "model.safetensors")) == 0.0
    at_2, at_4 = load_file(whole / "step_2" / "model.safetensors"), load_file(whole / "step_4" / "model.safetensors")
    assert _max_diff(at_2, at_4) > 1e-3  # the resumed part really trained
    assert _max_diff(at_4, load_file(resumed / "step_4" / "model.safetensors")) == 0.0
    opt_a = torch.load(whole / "step_4" / "optimizer.bin", weights_only=False)["state"]
    opt_b = torch.load(resumed / "step_4" / "optimizer.bin", weights_only=False)["state"]
    assert set(opt_a[0]) >= {"x", "y"}  # Win2's two sequences are in the checkpoint
    for i in opt_a:
        for key, value in opt_a[i].items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(opt_b[i][key])), (i, key)
    results_a, results_b = (json.load(open(d / "all_results.json")) for d in (whole, resumed))
    assert results_a == results_b and results_a["train_steps"] == 5 and results_a["acceleration_mode"] == "win2"


def test_offline_default_with_a_tiny_resnet_reports_top1_and_top5(nt, tmp_path):
    results = _run(nt, ["--model_type", "resnet", "--max_train_steps", "2", "--per_device_train_batch_size", "16",
                        "--optim", "sgd_win", "--learning_rate", "0.1", "--output_dir", str(tmp_path)])
    assert 0.0 <= results["eval_top1_accuracy"] <= results["eval_top5_accuracy"] <= 1.0
    saved = json.load(open(tmp_path / "all_results.json"))
    assert saved["optimizer"] == "sgd_win" and saved["eval_top5_accuracy"] == results["eval_top5_accuracy"]
    assert json.load(open(tmp_path / "config.json"))["model_type"] == "resnet"


@pytest.mark.slow
def test_two_processes_match_one_under_torchrun_and_accelerate_launch(nt, image_folder, tmp_path):
    """The same global batch (8) on 1 process and on 2 CPU processes (4 each): the same parameters. Without a
    GPU the launches need no --cpu: the script runs them as CPU processes (gloo) and says so once."""
    common = ["--max_train_steps", "3", "--acceleration_mode", "win2"]
    _run(nt, _folder_args(image_folder, tmp_path / "one", *common, "--per_device_train_batch_size", "8"))
    one = load_file(tmp_path / "one" / "model.safetensors")
    gpu = torch.cuda.is_available()
    two = _folder_args(image_folder, None, *common, "--per_device_train_batch_size", "4", *(["--cpu", "true"] if gpu else []))
    for name, command in (("torchrun", launch.torchrun), ("accelerate", launch.accelerate_launch)):
        out = tmp_path / name
        two[two.index("--output_dir") + 1] = str(out)
        log = launch.run(command(str(SCRIPT), *two), timeout=240)
        diff = _max_diff(one, load_file(out / "model.safetensors"))
        assert diff < ATOL, f"{name}: 2 processes differ from 1 by {diff:.3e}"
        assert json.load(open(out / "all_results.json"))["train_steps"] == 3
        assert gpu or log.count("no GPU visible: training as one job on 2 CPU processes (gloo)") == 1, log[-3000:]


def test_argument_file_with_optim_args_as_a_mapping(nt, image_folder, tmp_path):
    """``optim_args:`` as a YAML mapping in an argument file reaches the optimizer (the checkpoint's groups), and
    a number for a text flag (``checkpointing_steps: 1``) is read as the command line would read it."""
    path = tmp_path / "args.yaml"
    path.write_text("optim: adamw_win\noptim_args:\n  amsgrad: true\n  rounding_seed: 7\ncheckpointing_steps: 1\n")
    _run(nt, [str(path), *_folder_args(image_folder, tmp_path / "out", "--max_train_steps", "1",
                                       "--per_device_train_batch_size", "4")])
    groups = torch.load(tmp_path / "out" / "step_1" / "optimizer.bin", weights_only=False)["param_groups"]
    assert groups and all(g["amsgrad"] is True and g["rounding_seed"] == 7 for g in groups)


def _error_line(nt, capsys, argv):
    rc = nt.main(argv)
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("error")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize("argv,expected", [
    (["--optim", "adamw_wn"], ["adamw_wn", "adamw_win", "lamb_win"]),
    (["--acceleration_mode", "win3"], ["win3", "win2", "none"]),
    (["--reckless_steps", "2", "-1"], ["reckless_steps must be two positive numbers"]),
    (["--optim", "sgd_win", "--adam_beta1", "0.8"], ["--adam_beta1 is not used by sgd_win"]),
    (["--optim_args", "momentum=0.5"], ["adamw_win does not use 'momentum'"]),
    (["--checkpointing_steps", "often"], ["--checkpointing_steps must be a positive number of steps or 'epoch'"]),
])
def test_bad_input_is_one_line_before_anything_is_built(nt, capsys, tmp_path, argv, expected):
    line = _error_line(nt, capsys, argv + ["--output_dir", str(tmp_path / "out")])
    for text in expected:
        assert text in line, line
    assert not (tmp_path / "out").exists()  # nothing was started
