"""The ViT image-classification example (examples/image_classification) and the recipes in configs/.

End to end (a few steps each): the built-in digits default (as a subprocess, the README's entry point), a local
image folder made here, a saved tiny pretrained ViT; every recipe in configs/ parses and builds the optimizer
it names with its hyper-parameters; bad input gets one clear line.
"""

import glob
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from example_testing import load_script  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent / "dist_workers"))
import launch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples" / "image_classification"
SCRIPT = EXAMPLES / "run_image_classification.py"
CONFIGS = ROOT / "configs"
RECIPES = sorted(glob.glob(str(CONFIGS / "*.yaml")))
TINY = ("image_size=16,patch_size=8,hidden_size=16,num_hidden_layers=2,num_attention_heads=2,intermediate_size=32,"
        "layer_norm_eps=1e-6,qkv_bias=true")
TINY_RESNET = "layer_type=bottleneck,embedding_size=8,hidden_sizes=[16,32],depths=[1,1]"
CLASSES = ("bird", "cat", "dog")  # the classes of conftest's image_folder


@pytest.fixture(scope="module")
def ric():
    return load_script(SCRIPT)


@pytest.fixture(scope="module")
def utils(ric):
    """The recipes' module beside the scripts (imported by the Trainer script)."""
    return sys.modules["paper_recipes"]


def _results(out_dir):
    with open(os.path.join(out_dir, "all_results.json")) as f:
        return json.load(f)


def test_default_digits_end_to_end(tmp_path):
    """No data argument: the digits, a ViT from scratch, the top-k metrics in all_results.json, a summary line."""
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--max_steps", "4", "--output_dir", str(out), "--disable_tqdm", "true",
         "--per_device_train_batch_size", "16"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = _results(out)
    for key in ("eval_top1_accuracy", "eval_top5_accuracy", "train_loss", "eval_loss"):
        assert key in results, results
    assert 0.0 <= results["eval_top1_accuracy"] <= results["eval_top5_accuracy"] <= 1.0
    assert results["train_runtime"] > 0
    assert "*** Result on 360 held-out images" in proc.stdout  # 20% of 1,797 digits held out
    config = json.load(open(out / "config.json"))
    assert config["model_type"] == "vit" and len(config["id2label"]) == 10 and config["image_size"] == 16


def test_image_folder_end_to_end(ric, image_folder, tmp_path):
    out = tmp_path / "out"
    results = ric.run([
        "--train_dir", str(image_folder / "train"), "--validation_dir", str(image_folder / "validation"),
        "--config_overrides", TINY, "--max_steps", "3", "--per_device_train_batch_size", "4",
        "--output_dir", str(out), "--report_to", "none", "--disable_tqdm", "true",
        "--optim", "lamb_win", "--acceleration_mode", "win", "--learning_rate", "1e-3",
        "--randaugment_num_ops", "2", "--randaugment_magnitude", "7", "--mixup_alpha", "0.8", "--cutmix_alpha", "1.0",
        "--label_smoothing_factor", "0.1", "--drop_path_rate", "0.1", "--eval_crop_pct", "0.875",
    ])
    assert results["epoch"] > 0 and np.isfinite(results["train_loss"])
    assert set(_results(out)) >= {"eval_top1_accuracy", "eval_loss", "train_loss"}
    assert "eval_top5_accuracy" not in results  # 3 classes: top-5 is meaningless and not reported
    config = json.load(open(out / "config.json"))
    assert sorted(config["label2id"]) == list(CLASSES)
    assert json.load(open(out / "trainer_state.json"))["global_step"] == 3
    card = (out / "README.md").read_text()
    assert "- acceleration_mode: win\n" in card and "lamb_win (hf_win.LAMB)" in card


def test_pretrained_checkpoint_is_loaded(ric, image_folder, tmp_path):
    """--model_name_or_path loads the saved weights (with lr 0 the backbone must come back unchanged) and
    replaces a classifier of another size with --ignore_mismatched_sizes."""
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    torch.manual_seed(0)
    config = ViTConfig(image_size=16, patch_size=8, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=32, num_labels=5)
    pretrained = ViTForImageClassification(config)
    ckpt = tmp_path / "tiny-vit"
    pretrained.save_pretrained(ckpt)
    ViTImageProcessor(size={"height": 16, "width": 16}).save_pretrained(ckpt)
    out = tmp_path / "out"
    ric.run([
        "--model_name_or_path", str(ckpt), "--ignore_mismatched_sizes", "true",
        "--train_dir", str(image_folder / "train"), "--max_steps", "2", "--per_device_train_batch_size", "4",
        "--learning_rate", "0.0", "--warmup_steps", "0", "--output_dir", str(out), "--report_to", "none",
        "--disable_tqdm", "true",
    ])
    tuned = ViTForImageClassification.from_pretrained(out)
    assert tuned.config.num_labels == 3
    before, after = pretrained.state_dict(), tuned.state_dict()
    backbone = [k for k in before if not k.startswith("classifier")]
    assert backbone
    for k in backbone:
        torch.testing.assert_close(after[k], before[k], rtol=0, atol=1e-6, msg=k)


def _param_group_of(optimizer, param):
    return next(g for g in optimizer.param_groups if any(p is param for p in g["params"]))


@pytest.mark.parametrize("recipe", [os.path.basename(p) for p in RECIPES])
def test_recipe_parses_and_builds_its_optimizer(ric, utils, image_folder, tmp_path, recipe):
    from hf_win import get_optimizer_spec

    path = str(CONFIGS / recipe)
    raw = yaml.safe_load(open(path))
    resnet = raw["model_type"] == "resnet"
    model_args, data_args, aug_args, training_args, default_data = ric.parse_arguments([
        path, "--train_dir", str(image_folder / "train"), "--config_overrides", TINY_RESNET if resnet else TINY,
        "--fp16", "false", "--dataloader_num_workers", "0", "--output_dir", str(tmp_path),
    ])
    assert not default_data and data_args.dataset_name is None  # the command line's data source wins
    # every value of the file arrived (those not overridden above)
    parsed = {**vars(model_args), **vars(data_args), **vars(aug_args), **vars(training_args)}
    for key, value in raw.items():
        if key in ("config_overrides", "fp16", "dataloader_num_workers", "output_dir", "dataset_name"):
            continue
        got = parsed[key]
        got = getattr(got, "value", got)
        assert got == value or (isinstance(value, float) and got == pytest.approx(value)), (key, got, value)

    model, processor = ric.build_model(model_args, list(CLASSES), training_args)
    assert list(processor.image_mean) == raw["image_mean"]
    n_drop = sum(isinstance(m, utils.DropPath) for m in model.modules())
    assert n_drop == (2 if raw["drop_path_rate"] > 0 else 0)
    trainer = ric.ImageClassificationTrainer(
        model=model, args=training_args, batch_augment=torch.nn.Identity(), eval_dataset=[{}],
        weight_decay_filter=model_args.weight_decay_filter,
    )
    optimizer = trainer.create_optimizer()
    inner = getattr(optimizer, "optimizer", optimizer)
    assert type(inner) is get_optimizer_spec(raw["optim"]).cls
    assert inner.defaults["acceleration_mode"] == raw["acceleration_mode"]
    assert tuple(inner.defaults["reckless_steps"]) == tuple(raw["reckless_steps"])
    assert inner.defaults["max_grad_norm"] == 0.0 and training_args.max_grad_norm == raw["max_grad_norm"]
    if "adam_beta1" in raw:
        assert tuple(inner.defaults["betas"][:2]) == (raw["adam_beta1"], raw["adam_beta2"])
        assert inner.defaults["eps"] == raw["adam_epsilon"]
    else:
        assert inner.defaults["momentum"] == float(raw["optim_args"].split("=")[1])
    # weight decay on the right parameters
    expect_bias = raw["weight_decay"] if raw["weight_decay_filter"] == "all" else 0.0
    if resnet:  # timm: no decay on BatchNorm weights and biases
        block = model.resnet.encoder.stages[0].layers[0]
        weight, norm = block.layer[0].convolution.weight, block.layer[0].normalization
        exempt = (norm.weight, norm.bias, model.classifier[-1].bias)
    else:  # timm: no decay on the position embedding
        weight = model.vit.layers[0].attention.q_proj.weight
        exempt = (model.vit.layers[0].attention.q_proj.bias, model.vit.embeddings.position_embeddings)
    assert _param_group_of(inner, weight)["weight_decay"] == raw["weight_decay"]
    for param in exempt:
        assert _param_group_of(inner, param)["weight_decay"] == expect_bias
    # the schedule starts at warmup_lr and reaches min_lr at the end
    scheduler = trainer.create_scheduler(num_training_steps=1000, optimizer=optimizer)
    lr0 = scheduler.get_last_lr()[0]
    assert lr0 == pytest.approx(raw["learning_rate"] * raw["lr_scheduler_kwargs"]["warmup_lr_rate"], rel=1e-6)


def test_full_size_resnet_recipes_build_resnet50_and_resnet101(ric, utils, tmp_path):
    """The ResNet recipes' own config_overrides give timm's / torchvision's ResNet-50 and ResNet-101 (the same
    parameter count, 1000 classes), with stochastic depth on every block and zero-initialised last norms."""
    for depth, n_params, n_blocks in ((50, 25_557_032, 16), (101, 44_549_160, 33)):
        model_args, _, _, training_args, _ = ric.parse_arguments([
            str(CONFIGS / f"resnet{depth}_adamw_win_win2.yaml"), "--train_dir", str(tmp_path), "--fp16", "false",
            "--output_dir", str(tmp_path), "--channels_last", "true"])
        model, processor = ric.build_model(model_args, [str(i) for i in range(1000)], training_args)
        assert sum(p.numel() for p in model.parameters()) == n_params
        assert dict(processor.size)["height"] == 224
        drops = [m.p for m in model.modules() if isinstance(m, utils.DropPath)]
        assert len(drops) == n_blocks and drops[0] == 0.0 and drops[-1] == pytest.approx(model_args.drop_path_rate)
        blocks = model.resnet.encoder.stages[0].layers
        assert all(not b.layer[2].normalization.weight.detach().any() for b in blocks)
        assert blocks[0].layer[1].normalization.weight.detach().all()
        conv = model.resnet.embedder.embedder.convolution.weight
        assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()


def test_tiny_resnet_on_the_offline_default(ric, tmp_path):
    """--model_type resnet alone: the digits with a tiny ResNet (the digits' ViT sizes do not apply)."""
    out = tmp_path / "out"
    results = ric.run(["--model_type", "resnet", "--max_steps", "3", "--per_device_train_batch_size", "16",
                       "--output_dir", str(out), "--disable_tqdm", "true"])
    assert np.isfinite(results["train_loss"]) and 0.0 <= results["eval_top1_accuracy"] <= results["eval_top5_accuracy"]
    config = json.load(open(out / "config.json"))
    assert config["model_type"] == "resnet" and config["depths"] == [1, 1] and len(config["id2label"]) == 10


def test_pure_bfloat16_training_with_bf16_state_and_stochastic_rounding(ric, tmp_path):
    """--torch_dtype bfloat16 keeps the parameters in bfloat16; the optimizer keeps bfloat16 state and writes
    the parameters back with stochastic rounding, through the example."""
    out = tmp_path / "out"
    results = ric.run(["--config_overrides", TINY, "--max_steps", "3", "--per_device_train_batch_size", "16",
                       "--output_dir", str(out), "--disable_tqdm", "true", "--torch_dtype", "bfloat16",
                       "--optim_args", "state_dtype=bfloat16,bf16_stochastic_round=true"])
    assert np.isfinite(results["train_loss"]) and "eval_top1_accuracy" in results
    from safetensors.torch import load_file

    weights = load_file(str(out / "model.safetensors"))
    assert {t.dtype for t in weights.values()} == {torch.bfloat16}


def test_tiny_resnet_on_an_image_folder(ric, image_folder, tmp_path):
    """A faithful-recipe ResNet, tiny: BCE on mixed soft targets, channels-last, drop path, zero-init, timm decay."""
    out = tmp_path / "out"
    results = ric.run([
        "--train_dir", str(image_folder / "train"), "--validation_dir", str(image_folder / "validation"),
        "--model_type", "resnet", "--config_overrides", TINY_RESNET, "--image_size", "16", "--max_steps", "3",
        "--per_device_train_batch_size", "4", "--output_dir", str(out), "--report_to", "none", "--disable_tqdm", "true",
        "--optim", "sgd_win", "--acceleration_mode", "win2", "--learning_rate", "0.1", "--weight_decay", "5e-4",
        "--weight_decay_filter", "timm", "--bce_loss", "true", "--mixup_alpha", "0.1", "--cutmix_alpha", "1.0",
        "--label_smoothing_factor", "0.1", "--drop_path_rate", "0.05", "--zero_init_residual", "true",
        "--channels_last", "true", "--randaugment_num_ops", "2", "--randaugment_magnitude", "7",
    ])
    assert np.isfinite(results["train_loss"]) and "eval_top1_accuracy" in results
    assert json.load(open(out / "config.json"))["hidden_sizes"] == [16, 32]
    assert json.load(open(out / "trainer_state.json"))["global_step"] == 3


def test_argument_file_with_optim_args_as_a_mapping(ric, utils, tmp_path):
    """``optim_args:`` as a YAML mapping reaches the optimizer through the example's argument files and through
    ``HfArgumentParser.parse_yaml_file`` alike."""
    from transformers import HfArgumentParser

    from hf_win import WinTrainingArguments

    path = tmp_path / "args.yaml"
    path.write_text(f"optim: adamw_win\nacceleration_mode: win2\noptim_args:\n  amsgrad: true\n  rounding_seed: 7\n"
                    f"learning_rate: 0.003\noutput_dir: {tmp_path / 'out'}\n")
    from_example = ric.parse_arguments([str(path)])[3]
    parser = HfArgumentParser((ric.ModelArguments, ric.DataTrainingArguments, utils.AugmentationArguments,
                               WinTrainingArguments))
    from_yaml = parser.parse_yaml_file(str(path))[3]
    for training_args in (from_example, from_yaml):
        trainer = ric.ImageClassificationTrainer(model=torch.nn.Linear(2, 2), args=training_args,
                                                 batch_augment=torch.nn.Identity(), eval_dataset=[{}])
        optimizer = trainer.create_optimizer()
        inner = getattr(optimizer, "optimizer", optimizer)
        assert inner.defaults["amsgrad"] is True and inner.defaults["rounding_seed"] == 7
        assert inner.defaults["acceleration_mode"] == "win2" and inner.defaults["lr"] == 0.003
    # the file's values come over the offline default's (lr 2e-3) and under the command line's
    assert ric.parse_arguments([str(path), "--learning_rate", "0.004"])[3].learning_rate == 0.004


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="the launch without a GPU")
def test_torchrun_without_a_gpu_trains_one_job_on_cpu_processes(ric, image_folder, tmp_path):
    """torchrun --nproc_per_node 2, no GPU, no --use_cpu: one job on 2 CPU processes (gloo), said once in the log,
    ending with the parameters of 1 process with the same global batch (two processes training alone, as the
    launch ran unasked before, end elsewhere: each steps on its own 4 images). Deterministic crops (scale and
    ratio 1: the central square), so both runs see the same pixels; 24 images, 3 global batches of 8."""
    common = ["--train_dir", str(image_folder / "train"), "--validation_dir", str(image_folder / "validation"),
              "--config_overrides", TINY, "--max_steps", "3",
              "--learning_rate", "1e-2", "--acceleration_mode", "win2", "--random_resized_crop_scale", "1", "1",
              "--random_resized_crop_ratio", "1", "1", "--horizontal_flip_prob", "0", "--do_eval", "false",
              "--report_to", "none", "--disable_tqdm", "true"]
    ric.run(common + ["--per_device_train_batch_size", "8", "--output_dir", str(tmp_path / "one")])
    out = launch.run(launch.torchrun(str(SCRIPT), *common, "--per_device_train_batch_size", "4",
                                     "--output_dir", str(tmp_path / "two")), timeout=300)
    assert out.count("no GPU visible: training as one job on 2 CPU processes (gloo)") == 1, out[-3000:]
    from safetensors.torch import load_file

    one, two = (load_file(tmp_path / d / "model.safetensors") for d in ("one", "two"))
    diff = max(float((one[k] - two[k]).abs().max()) for k in one)
    assert diff < 1e-4, f"2 processes differ from 1 by {diff:.3e}"  # a step moves them by ~1e-2
    assert json.load(open(tmp_path / "two" / "trainer_state.json"))["global_step"] == 3


def test_distributed_configs_parse():
    """accelerate launch files and DeepSpeed JSON parse and say what their names say (the DeepSpeed files also
    train in tests/test_distributed_deepspeed.py)."""
    accel = {os.path.basename(p): yaml.safe_load(open(p)) for p in glob.glob(str(CONFIGS / "accelerate" / "*.yaml"))}
    assert set(accel) == {"ddp.yaml", "multi_node.yaml", "fsdp2.yaml", "deepspeed_zero1.yaml",
                          "deepspeed_zero2.yaml", "deepspeed_zero3.yaml", "deepspeed_zero2_offload.yaml",
                          "deepspeed_zero3_offload.yaml"}
    assert accel["ddp.yaml"]["distributed_type"] == "MULTI_GPU"
    assert accel["multi_node.yaml"]["num_machines"] > 1
    assert accel["fsdp2.yaml"]["fsdp_config"]["fsdp_version"] == 2
    for stage in (1, 2, 3):
        cfg = accel[f"deepspeed_zero{stage}.yaml"]
        ds_file = ROOT / cfg["deepspeed_config"]["deepspeed_config_file"]
        ds = json.load(open(ds_file))
        assert ds["zero_optimization"]["stage"] == stage
        assert ds["zero_allow_untested_optimizer"] is True
        assert "optimizer" not in ds  # the optimizer is the Trainer's (Win), not one of DeepSpeed's
    for stage in (2, 3):  # ZeRO-Offload: the Win optimizer steps the offloaded partitions on the CPU
        cfg = accel[f"deepspeed_zero{stage}_offload.yaml"]
        ds = json.load(open(ROOT / cfg["deepspeed_config"]["deepspeed_config_file"]))
        assert ds["zero_optimization"]["stage"] == stage and "optimizer" not in ds
        assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
        assert ds["zero_force_ds_cpu_optimizer"] is False and ds["zero_allow_untested_optimizer"] is True


def test_batch_augment_targets(utils):
    """Soft targets: label smoothing as timm's mixup_target, rows sum to 1. CutMix (kornia's): one box for the
    whole batch, each image pasted from another image of the batch, and each row's target weighs its own label
    by the share of the image kept (lam) and the pasted image's label by the rest."""
    aug = utils.AugmentationArguments(mixup_alpha=0.0, cutmix_alpha=1.0)
    ba = utils.BatchAugment([0.5] * 3, [0.5] * 3, 4, aug, label_smoothing=0.2)
    labels = torch.tensor([0, 1, 2, 3, 1, 0])
    t = ba.soft_targets(labels)
    assert torch.allclose(t.sum(1), torch.ones(6))
    assert t[0, 0] == pytest.approx(0.85) and t[0, 1] == pytest.approx(0.05)
    torch.manual_seed(0)
    np.random.seed(0)
    x = torch.rand(6, 3, 8, 8)
    mixed, target = ba(x, labels)
    assert torch.allclose(target.sum(1), torch.ones(6))
    normalized = (x - 0.5) / 0.5
    from_self = (mixed == normalized).float().mean(dim=(1, 2, 3))
    from_other = (mixed[:, None] == normalized[None]).float().mean(dim=(2, 3, 4))  # [row, image]
    boxes, n_mixed = set(), 0
    for i in range(6):
        if float(from_self[i]) == 1.0:  # paired with itself: nothing to mix
            torch.testing.assert_close(target[i], t[i])
            continue
        j = max((k for k in range(6) if k != i), key=lambda k: float(from_other[i, k]))
        lam = float(from_self[i])  # lam is the share of the image kept ...
        assert 0.0 < lam < 1.0 and float(from_other[i, j]) == pytest.approx(1 - lam, abs=1e-6)  # ... the rest is j's
        torch.testing.assert_close(target[i], lam * t[i] + (1 - lam) * t[j])
        boxes.add(tuple((mixed[i] != normalized[i]).any(0).flatten().tolist()))
        n_mixed += 1
    assert n_mixed >= 2 and len(boxes) == 1  # one box for the batch (timm's 'batch' mode)


def test_cutmix_share_kept_follows_beta(utils):
    """kornia's CutMix as the recipes configure it: over many batches the share of each image kept follows
    Beta(alpha, alpha), as in timm (up to the box's whole pixels), for the alpha given, not another."""
    from scipy import stats

    ba = utils.BatchAugment([0.0] * 3, [1.0] * 3, 2, utils.AugmentationArguments(cutmix_alpha=0.3), 0.0)
    x = torch.stack([torch.zeros(3, 16, 16), torch.ones(3, 16, 16)])
    torch.manual_seed(0)
    kept = []
    for _ in range(600):
        mixed, target = ba(x, torch.tensor([0, 1]))
        share = float((mixed[0] == 0).float().mean())
        assert float(target[0, 0]) == pytest.approx(share, abs=1e-6)  # the target weighs what the image holds
        if share < 1.0:  # paired with the other image and a box of at least one pixel
            kept.append(share)
    assert len(kept) > 200
    # The box's side is floor(sqrt(1 - lam) * 16) pixels, so at every share k a box can leave, P(kept <= k) is
    # P(lam <= k), here given a box of at least one pixel (lam <= 1 - 1/16**2).
    kept = np.array(kept)
    shares = np.unique(kept)
    observed = np.array([(kept <= k).mean() for k in shares])
    beta = stats.beta(0.3, 0.3)
    assert np.abs(observed - beta.cdf(shares) / beta.cdf(1 - 1 / 16**2)).max() < 0.08
    assert np.abs(observed - shares).max() > 0.15  # not Beta(1, 1): the alpha given reaches kornia


def test_mixup_blends_each_image_with_the_batch_reversed(utils):
    """Mixup (ours: kornia's MixUp draws its weight uniformly, the recipes need Beta(alpha, alpha)): one weight
    for the batch, image i blended with image B-1-i, targets blended alike."""
    ba = utils.BatchAugment([0.0] * 3, [1.0] * 3, 4, utils.AugmentationArguments(mixup_alpha=0.8), 0.1)
    labels = torch.tensor([0, 1, 2, 3])
    x = torch.rand(4, 3, 4, 4)
    np.random.seed(0)
    mixed, target = ba(x, labels)
    lam = float((mixed[0] - x[3]).flatten()[0] / (x[0] - x[3]).flatten()[0])
    assert 0.0 < lam < 1.0
    torch.testing.assert_close(mixed, lam * x + (1 - lam) * x.flip(0))
    t = ba.soft_targets(labels)
    torch.testing.assert_close(target, lam * t + (1 - lam) * t.flip(0))


def test_random_resized_crop_box_in_bounds(utils):
    torch.manual_seed(0)
    for h, w in ((8, 8), (30, 12), (5, 40)):
        for _ in range(50):
            top, left, ch, cw = utils.random_resized_crop_box(h, w, (0.08, 1.0), (3 / 4, 4 / 3))
            assert 0 <= top and top + ch <= h and 0 <= left and left + cw <= w and ch > 0 and cw > 0


def _error_line(ric, capsys, argv):
    rc = ric.main(argv)
    err = capsys.readouterr().err
    assert rc == 2
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("error")]
    assert len(lines) == 1 and err.rstrip().endswith(lines[0]), err  # one error line, the last word said
    return lines[0]


def test_error_missing_data_directory(ric, capsys, tmp_path):
    line = _error_line(ric, capsys, ["--train_dir", str(tmp_path / "nope"), "--output_dir", str(tmp_path)])
    assert line.startswith("error: --train_dir") and "does not exist" in line


def test_error_image_column_not_there(ric, capsys, image_folder, tmp_path):
    line = _error_line(ric, capsys, ["--train_dir", str(image_folder / "train"), "--image_column_name", "img",
                                     "--output_dir", str(tmp_path)])
    assert "--image_column_name 'img' is not a column" in line and "image, label" in line


def test_error_unknown_optimizer(ric, capsys, tmp_path):
    line = _error_line(ric, capsys, ["--optim", "adamw_wn", "--output_dir", str(tmp_path)])
    assert line.startswith("error:") and "adamw_wn" in line and "adamw_win" in line and "lamb_win" in line


def test_error_config_overrides_list_and_image_size(ric, capsys, image_folder, tmp_path):
    base = ["--train_dir", str(image_folder / "train"), "--output_dir", str(tmp_path)]
    line = _error_line(ric, capsys, base + ["--model_type", "resnet", "--config_overrides", "depths=[1,x]"])
    assert line == "error: --config_overrides: depths=[1,x] is not a list of numbers"
    line = _error_line(ric, capsys, base + ["--image_size", "32"])
    assert line.startswith("error: --image_size is for models whose config has no image size")


def test_error_config_does_not_parse(ric, capsys, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: adamw_win\nlearning_rate: [1e-3\n")
    line = _error_line(ric, capsys, [str(bad)])
    assert line.startswith(f"error: argument file {bad} does not parse")
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("optim: adamw_win\nlearning_rte: 0.001\n")
    line = _error_line(ric, capsys, [str(unknown)])
    assert "unknown argument 'learning_rte'" in line



def test_error_argument_file_value_not_among_the_choices(ric, capsys, tmp_path):
    """A file's value is checked against the argument's choices as the command line's is."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("weight_decay_filter: timmm\n")
    line = _error_line(ric, capsys, [str(bad), "--output_dir", str(tmp_path)])
    assert line == f"error: {bad}: weight_decay_filter must be one of trainer, timm, all, got 'timmm'"
