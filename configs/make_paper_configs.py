#!/usr/bin/env python
"""Write the paper's ImageNet recipes as argument files for run_image_classification.py.

    python configs/make_paper_configs.py paper_imagenet_runs.json configs/

The input is the list of every ImageNet-1k run published with the Win paper (timm argument names, top-1 read
from each run's log): ViT-S/16 and ViT-B/16 (DeiT), ResNet-50 and ResNet-101, each with four base optimizers
and Win / Win2. Each file says, in comments, how every timm argument was translated and what could not be.
Run by the developers when the recipes change; nothing reads the JSON at run time.
"""

import json
import os
import sys

VIT = {
    "deit_small_patch16_224": ("vit_small", "ViT-S/16 (DeiT-S)", dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536)),
    "deit_base_patch16_224": ("vit_base", "ViT-B/16 (DeiT-B)", dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)),
}
# transformers' ResNetConfig: bottleneck blocks, stride in the 3x3 convolution (ResNet v1.5, timm's resnet50/101).
RESNET = {
    "resnet50": ("resnet50", "ResNet-50", [3, 4, 6, 3]),
    "resnet101": ("resnet101", "ResNet-101", [3, 4, 23, 3]),
}
OPT = {"adam-win": "adam_win", "adamw-win": "adamw_win", "lamb-win": "lamb_win", "sgd-win": "sgd_win", "sgd2": "sgd_win"}
# The authors' optimizers' default eps (timm passes none when --opt-eps is unset).
DEFAULT_EPS = {"adam_win": 1e-8, "adamw_win": 1e-8, "lamb_win": 1e-6}
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


def fmt(v):
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        text = repr(v)
        if "e" in text and "." not in text.split("e")[0]:  # YAML 1.1 (PyYAML) reads 1e-06 as a string
            mantissa, exponent = text.split("e")
            text = f"{mantissa}.0e{exponent}"
        return text
    if isinstance(v, list):
        return "[" + ", ".join(fmt(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}: {fmt(x)}" for k, x in v.items()) + "}"
    if isinstance(v, str):
        return json.dumps(v) if any(c in v for c in ":#{}[],&*!|>'\"%@`") or v in ("true", "false", "null") else v
    return str(v)


def parse_aa(aa):
    parts = aa.split("-")
    assert parts[0] == "rand", aa
    out = {"n": 2, "m": None, "rest": []}
    for p in parts[1:]:
        if p.startswith("m") and not p.startswith("mstd"):
            out["m"] = float(p[1:])
        elif p.startswith("n"):
            out["n"] = int(p[1:])
        else:
            out["rest"].append(p)
    return out


def label_of(model):
    return (VIT.get(model) or RESNET[model])[1]


def recipe(run):
    vit = run["model"] in VIT
    short, label = (VIT.get(run["model"]) or RESNET[run["model"]])[:2]
    optim = OPT[run["opt"]]
    mode = run["acceleration_mode"]
    name = f"{short}_{optim}_{mode}"
    total_epochs = run["epochs"] + run["cooldown_epochs"]
    aa = parse_aa(run["aa"])
    lines = []   # (key, value, comment)
    notes = []
    A = lambda k, v, c="": lines.append((k, v, c))
    if vit:
        overrides = dict(image_size=224, patch_size=16, **VIT[run["model"]][2], layer_norm_eps=1e-6,
                         hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, qkv_bias=True)
        A("model_type", "vit", f"timm --model {run['model']}, trained from scratch")
        A("config_overrides", ",".join(f"{k}={fmt(v)}" for k, v in overrides.items()), "DeiT dimensions; timm's LayerNorm eps 1e-6")
    else:
        overrides = dict(layer_type="bottleneck", embedding_size=64, hidden_sizes=[256, 512, 1024, 2048],
                         depths=RESNET[run["model"]][2], downsample_in_bottleneck=False)
        A("model_type", "resnet", f"timm --model {run['model']}, trained from scratch")
        A("config_overrides", ",".join(f"{k}={fmt(v).replace(' ', '')}" for k, v in overrides.items()),
          f"{label}: bottleneck blocks, stride in the 3x3 convolution (v1.5, as timm's)")
        A("image_size", 224)
        A("zero_init_residual", True, "timm's ResNet default (zero_init_last): each block starts as the identity")
        A("channels_last", False, "timm --channels-last (not recorded in the runs; same results, faster on GPUs)")
    A("image_mean", IMAGENET_MEAN, "timm's ImageNet normalisation")
    A("image_std", IMAGENET_STD)
    A("drop_path_rate", run["drop_path"], "--drop-path" + ("" if vit else " (on each block's residual branch)"))
    no_decay = "position embeddings, class token" if vit else "i.e. biases and BatchNorm weights"
    A("weight_decay_filter", "all" if run["bias_decay"] else "timm",
      f"bias_decay={fmt(run['bias_decay'])}: " + ("decay on every parameter" if run["bias_decay"]
                                                   else f"no decay on 1-d parameters, {no_decay}"))
    A("dataset_name", "ILSVRC/imagenet-1k", "or --train_dir/--validation_dir (ImageNet folders) on the command line")
    A("optim", optim, f"--opt {run['opt']}")
    A("acceleration_mode", mode)
    rs = run.get("reckless_steps")
    A("reckless_steps", rs if rs else [2.0, 8.0], "" if rs else "not recorded in the run's config: the paper's default")
    A("learning_rate", run["lr"], "--lr (given explicitly, not scaled by batch size)")
    A("weight_decay", run["weight_decay"], "--weight-decay")
    if optim != "sgd_win":
        betas = run["opt_betas"]
        A("adam_beta1", betas[0], "--opt-betas")
        A("adam_beta2", betas[1])
        eps = run["opt_eps"] if run["opt_eps"] is not None else DEFAULT_EPS[optim]
        A("adam_epsilon", eps, "--opt-eps" if run["opt_eps"] is not None else "--opt-eps unset: the optimizer's default")
    else:
        A("optim_args", f"momentum={run['momentum']}", "--momentum (Nesterov, the optimizer's default)")
        if run["opt"] == "sgd2":
            notes.append(f"the run's --opt is 'sgd2' (the authors' name for SGD with Win2) and its --opt-betas "
                         f"{run['opt_betas']} (unused by SGD; read as momentum, r1, r2 they equal this file's values)")
    A("max_grad_norm", float(run["max_grad_norm"]),
      "the optimizer's own max_grad_norm (a global norm), done by the Trainer here; --clip-grad is "
      + fmt(run["clip_grad"]).replace('"', ""))
    if run["clip_grad"] is not None:
        notes.append(f"--clip-grad {run['clip_grad']} is not expressed (one clipping only: max_grad_norm)")
    A("num_train_epochs", total_epochs, f"--epochs {run['epochs']} + --cooldown-epochs {run['cooldown_epochs']}")
    A("lr_scheduler_type", "cosine_warmup_with_min_lr", f"--sched {run['sched']}")
    A("lr_scheduler_kwargs", {"min_lr": run["min_lr"], "warmup_lr_rate": run["warmup_lr"] / run["lr"]},
      f"--min-lr {run['min_lr']}, --warmup-lr {run['warmup_lr']} (as a ratio of lr)")
    A("warmup_steps", round(run["warmup_epochs"] / total_epochs, 6), f"--warmup-epochs {run['warmup_epochs']} of {total_epochs}")
    notes.append(f"timm's cosine ends at --min-lr after {run['epochs']} epochs and stays there for the "
                 f"{run['cooldown_epochs']} cooldown epochs; here the cosine spans all {total_epochs} epochs, and the "
                 "learning rate changes every step instead of every epoch")
    n_proc = run["total_batch_size"] // run["batch_size"]
    A("per_device_train_batch_size", run["batch_size"], f"--batch-size per GPU; total {run['total_batch_size']} on {n_proc} GPUs")
    A("gradient_accumulation_steps", 1, f"on fewer than {n_proc} GPUs raise this to keep the total batch size {run['total_batch_size']}")
    A("per_device_eval_batch_size", 256)
    A("label_smoothing_factor", run["smoothing"], "--smoothing")
    A("bce_loss", run["bce_loss"], "--bce-loss")
    A("mixup_alpha", run["mixup"], "--mixup")
    A("cutmix_alpha", run["cutmix"], "--cutmix")
    A("mixup_prob", 1.0, "timm's default --mixup-prob")
    A("mixup_switch_prob", 0.5, "timm's default --mixup-switch-prob")
    A("randaugment_num_ops", aa["n"], f"--aa {run['aa']}")
    A("randaugment_magnitude", aa["m"])
    if aa["rest"]:
        notes.append(f"--aa {run['aa']}: {'-'.join(aa['rest'])} (magnitude noise / the 'increasing' op variants) is "
                     "not expressed: kornia's RandAugment uses a fixed magnitude and its own op ranges")
    A("random_resized_crop_scale", [0.08, 1.0], "timm's default --scale")
    A("horizontal_flip_prob", 0.5, "timm's default --hflip")
    if vit:
        A("interpolation", "bicubic", "DeiT's interpolation")
    else:
        A("interpolation", "bicubic", "timm's ResNet-50/101 (their default_cfg)")
    if run["train_interpolation"] == "random":
        notes.append("--train-interpolation random (bilinear or bicubic per image) is not expressed: bicubic")
    if vit:
        A("eval_crop_pct", 0.875, "DeiT's crop_pct: resize to 256, center-crop 224")
    else:
        A("eval_crop_pct", 0.95, "timm's ResNet crop_pct (the runs set none): resize to 236, center-crop 224")
        notes.append("the evaluation crop_pct is timm's ResNet default (0.95 since timm 0.5; 0.875 before); the "
                     "timm version of the runs is not recorded")
    if run["reprob"]:
        notes.append(f"--reprob {run['reprob']} (random erasing) is not expressed")
    if run["model_ema"]:
        notes.append("--model-ema is not expressed")
    A("fp16", bool(run["amp"]), "--amp (timm's native AMP: float16 with a loss scaler)" if run["amp"] else "no --amp: float32")
    A("dataloader_num_workers", 8, "the per-image augmentation runs in the data loader workers")
    A("dataloader_drop_last", True, "as timm's training loader")
    A("eval_strategy", "epoch")
    A("save_strategy", "epoch")
    A("save_total_limit", 2)
    A("logging_steps", 100)
    A("seed", 42)
    A("do_train", True)
    A("do_eval", True)
    A("output_dir", f"outputs/{name}")
    r = run["result"]
    header = [
        f"# {label}, {run['opt']} with {mode} on ImageNet-1k from scratch: a published run of the Win paper.",
        f"# Published: top-1 {r['final_top1']} (best {r['best_top1']}), top-5 {r['final_top5']} (final epoch); run log {run['log']}.",
        "#   python examples/image_classification/run_image_classification.py "
        f"configs/{name}.yaml [overrides]",
        "# Translated from the run's timm arguments by configs/make_paper_configs.py. Not expressed:",
    ] + [f"#   - {n}" for n in notes]
    width = max(len(f"{k}: {fmt(v)}") for k, v, _ in lines if len(f"{k}: {fmt(v)}") <= 60)
    body = [(f"{k}: {fmt(v)}".ljust(width) + (f"  # {c}" if c else "")).rstrip() for k, v, c in lines]
    return name, "\n".join(header + body) + "\n", r, run


def main(src, out):
    runs = json.load(open(src))["runs"]
    table = []
    for run in runs:
        name, text, r, run = recipe(run)
        with open(os.path.join(out, name + ".yaml"), "w") as f:
            f.write(text)
        table.append((name, label_of(run["model"]), run["opt"], run["acceleration_mode"], r))
    table.sort()
    print("| file | model | optimizer | mode | published top-1 (final) | best top-1 | top-5 (final) |")
    print("|---|---|---|---|---|---|---|")
    for name, label, opt, mode, r in table:
        print(f"| [`{name}.yaml`]({name}.yaml) | {label} | {opt} | {mode} | {r['final_top1']} | {r['best_top1']} | {r['final_top5']} |")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else os.path.dirname(os.path.abspath(__file__)))
