"""WinTrainingArguments: the Win flags parse from the command line, JSON and YAML; bad values fail at
parse time with the allowed values in the message."""

from __future__ import annotations

import json
import re

import pytest
import torch
import yaml
from transformers import HfArgumentParser
from transformers.training_args import OptimizerNames

import hf_win
from hf_win import OPTIMIZERS, WinTrainingArguments, get_optimizer_cls_and_kwargs
from hf_win.training_args import optim_args_keys

BASE = ["--output_dir", "unused", "--report_to", "none", "--use_cpu"]


def parse_cli(*argv):
    (args,) = HfArgumentParser(WinTrainingArguments).parse_args_into_dataclasses(list(BASE) + list(argv))
    return args


def test_cli_win_flags():
    args = parse_cli("--optim", "sgd_win", "--acceleration_mode", "win2", "--reckless_steps", "1.5", "6",
                     "--optim_args", "momentum=0.8, nesterov=false,dampening=0.1", "--learning_rate", "0.1")
    assert (args.optim, args.acceleration_mode, args.reckless_steps) == ("sgd_win", "win2", [1.5, 6.0])
    cls, kw = get_optimizer_cls_and_kwargs(args)
    assert cls is hf_win.SGD
    assert kw["momentum"] == 0.8 and kw["nesterov"] is False and kw["dampening"] == 0.1
    assert kw["acceleration_mode"] == "win2" and kw["reckless_steps"] == (1.5, 6.0) and kw["lr"] == 0.1


def test_defaults():
    args = parse_cli()
    assert args.optim == "adamw_win" and args.acceleration_mode == "win" and args.reckless_steps == [2.0, 8.0]
    cls, kw = get_optimizer_cls_and_kwargs(args)
    assert cls is hf_win.AdamW and kw["betas"] == (0.9, 0.999) and kw["max_grad_norm"] == 0.0


@pytest.mark.parametrize("fmt", ["json", "yaml"])
def test_json_and_yaml_files(tmp_path, fmt):
    data = {"output_dir": str(tmp_path), "report_to": "none", "use_cpu": True, "optim": "adan_win",
            "acceleration_mode": "win2", "reckless_steps": [3, 9], "optim_args": "beta3=0.995,foreach=false",
            "adam_beta1": 0.98, "adam_beta2": 0.92, "weight_decay": 0.02}
    path = tmp_path / f"args.{fmt}"
    path.write_text(json.dumps(data) if fmt == "json" else yaml.safe_dump(data))
    parser = HfArgumentParser(WinTrainingArguments)
    (args,) = parser.parse_json_file(path) if fmt == "json" else parser.parse_yaml_file(path)
    assert args.reckless_steps == [3.0, 9.0]
    cls, kw = get_optimizer_cls_and_kwargs(args)
    assert cls is hf_win.Adan
    assert kw["betas"] == (0.98, 0.92, 0.995) and kw["foreach"] is False
    assert kw["acceleration_mode"] == "win2" and kw["reckless_steps"] == (3.0, 9.0) and kw["weight_decay"] == 0.02

    # A dict for optim_args in a file works too and is kept as the canonical string.
    data["optim_args"] = {"beta3": 0.9, "foreach": True}
    path.write_text(json.dumps(data) if fmt == "json" else yaml.safe_dump(data))
    (args,) = parser.parse_json_file(path) if fmt == "json" else parser.parse_yaml_file(path)
    assert args.optim_args == "beta3=0.9,foreach=True"
    assert get_optimizer_cls_and_kwargs(args)[1]["betas"] == (0.98, 0.92, 0.9)

    bad = dict(data, acceleration_mode="win3")
    path.write_text(json.dumps(bad) if fmt == "json" else yaml.safe_dump(bad))
    with pytest.raises(ValueError, match="acceleration_mode must be one of win, win2, none"):
        parser.parse_json_file(path) if fmt == "json" else parser.parse_yaml_file(path)


def test_optim_args_as_an_object_string_what_an_argument_files_mapping_becomes_on_a_command_line():
    import torch

    from hf_win.optim_args import format_optim_args, optim_args_mapping, parse_win_optim_args

    args = parse_cli("--optim_args", json.dumps({"amsgrad": True, "state_dtype": "bfloat16", "rounding_seed": 3}))
    assert args.optim_args == "amsgrad=True,state_dtype=bfloat16,rounding_seed=3"
    kw = get_optimizer_cls_and_kwargs(args)[1]
    assert (kw["amsgrad"], kw["state_dtype"], kw["rounding_seed"]) == (True, "bfloat16", 3)
    assert parse_win_optim_args("sgd_win", "{nesterov: false, momentum: 0.5}") == {"nesterov": False, "momentum": 0.5}
    assert format_optim_args({"state_dtype": torch.bfloat16, "maximize": False}) == "state_dtype=bfloat16,maximize=False"
    for bad, message in (("{[1, 2]}", "is not a JSON/YAML mapping"), ("{amsgrad: [", "is not a JSON/YAML mapping"),
                         ('{"amsgrad": maybe}', "amsgrad='maybe' for adamw_win is not valid")):
        with pytest.raises(ValueError, match=re.escape(message)):
            parse_cli("--optim_args", bad)
    with pytest.raises(ValueError, match="is not a mapping of keys to values"):
        optim_args_mapping("[1, 2]")


def test_builtin_names_unchanged():
    args = parse_cli("--optim", "adamw_torch", "--optim_args", "anything=goes")
    assert args.optim == OptimizerNames.ADAMW_TORCH
    assert get_optimizer_cls_and_kwargs(args)[0].__name__ == "AdamW"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--optim", "adamw_wim"], r"invalid choice: 'adamw_wim'.*adamw_win"),
        (["--acceleration_mode", "win3"], r"invalid choice: 'win3'.*'win', 'win2', 'none'"),
        (["--reckless_steps", "2.0"], r"reckless_steps must be two positive numbers"),
        (["--reckless_steps", "2", "8", "9"], r"reckless_steps must be two positive numbers"),
        (["--reckless_steps", "0", "8"], r"reckless_steps must be two positive numbers"),
        (["--optim_args", "momentum=0.9"], r"adamw_win does not use 'momentum'; it accepts: amsgrad \(bool\), foreach"),
        (["--optim_args", "max_grad_norm=1.0"],
         r"max_grad_norm is not an --optim_args key; set it with --max_grad_norm"),
        (["--optim_args", "lr=0.1"], r"set it with --learning_rate"),
        (["--optim_args", "betas=0.9"], r"set it with --adam_beta1 / --adam_beta2"),
        (["--optim_args", "amsgrad=maybe"], r"amsgrad='maybe' for adamw_win is not valid; amsgrad takes true/false"),
        (["--optim_args", "amsgrad"], r"not of the form key=value; adamw_win accepts: amsgrad"),
        (["--optim", "sgd_win", "--optim_args", "momentum=1.5"], r"momentum must be in \[0, 1\).*accepts: momentum"),
        (["--optim", "sgd_win", "--optim_args", "momentum=fast"], r"momentum takes a number"),
        (["--optim", "sgd_win", "--adam_beta1", "0.5"], r"--adam_beta1 is not used by sgd_win"),
        (["--optim", "adan_win", "--optim_args", "beta3=1.0"], r"betas must be 3 numbers each in \[0, 1\)"),
        (["--optim", "lamb_win", "--optim_args", "trust_clip=1,trust_clip=0"], r"trust_clip is given twice"),
        (["--optim", "lamb_win", "--adam_epsilon", "-1"], r"eps must be a number >= 0"),
        (["--optim", "adamw_torch", "--acceleration_mode", "win2"], r"apply to the Win optimizers"),
        (["--optim", "adamw_torch", "--reckless_steps", "1", "2"], r"apply to the Win optimizers"),
    ],
)
def test_bad_values_fail_at_parse_time(argv, message, capsys):
    try:
        parse_cli(*argv)
    except SystemExit:  # argparse rejects a choice: the message is on stderr
        text = capsys.readouterr().err
    except ValueError as e:
        text = str(e)
    else:
        pytest.fail(f"{argv} parsed without error")
    assert re.search(message, text, re.S), text


def test_bad_values_in_code():
    with pytest.raises(ValueError, match=r"optim='nope' is not an optimizer name; Win optimizers: adamw_win"):
        WinTrainingArguments(output_dir="x", optim="nope", report_to="none")
    with pytest.raises(ValueError, match="reckless_steps"):
        WinTrainingArguments(output_dir="x", reckless_steps=[1.0, float("nan")], report_to="none")


def test_optim_args_keys_follow_the_registry():
    mapped = {"lr", "betas", "eps", "weight_decay", "acceleration_mode", "reckless_steps", "max_grad_norm",
              "capturable", "differentiable"}
    for name, spec in OPTIMIZERS.items():
        keys = set(optim_args_keys(name))
        expected = set(spec.accepted_keys) - mapped
        if "betas" in spec.accepted_keys and spec.cls._n_betas == 3:
            expected.add("beta3")
        assert keys == expected, name
    low_precision = {"state_dtype", "bf16_stochastic_round", "rounding_seed"}
    assert set(optim_args_keys("lamb_win")) == {
        "bias_correction", "grad_averaging", "trust_clip", "always_adapt", "foreach", "fused", "maximize"} | low_precision
    assert set(optim_args_keys("sgd_win")) == {"momentum", "dampening", "nesterov", "foreach", "fused", "maximize"} | low_precision
    assert set(optim_args_keys("adan_win")) == {"beta3", "foreach", "fused", "maximize"} | low_precision


def test_every_optim_args_key_reaches_the_optimizer():
    values = {"bool": "false", "bool|none": "false", "float": "0.5", "int": "7", "dtype|none": "bfloat16"}
    expected = {"bool": False, "bool|none": False, "float": 0.5, "int": 7, "dtype|none": "bfloat16"}
    for name in (n for n, spec in OPTIMIZERS.items() if not spec.wraps_base):  # Win(base): test_wrapped_optimizers
        keys = optim_args_keys(name)
        s = ",".join(f"{k}={values[kind]}" for k, kind in keys.items())
        args = WinTrainingArguments(output_dir="x", report_to="none", optim=name, optim_args=s)
        cls, kw = get_optimizer_cls_and_kwargs(args)
        opt = cls([__import__("torch").nn.Parameter(__import__("torch").ones(1))], **kw)
        for k, kind in keys.items():
            got = opt.defaults["betas"][2] if k == "beta3" else opt.defaults[k]
            assert got == expected[kind], (name, k)


def test_set_optimizer_accepts_win_names_and_rolls_back_bad_values():
    args = WinTrainingArguments(output_dir="x", report_to="none")
    args.set_optimizer("lamb_win", learning_rate=0.01, acceleration_mode="win2", args="trust_clip=true")
    assert args.optim == "lamb_win" and args.acceleration_mode == "win2"
    assert get_optimizer_cls_and_kwargs(args)[1]["trust_clip"] is True
    with pytest.raises(ValueError, match="acceleration_mode"):
        args.set_optimizer("adamw_win", acceleration_mode="fast")
    assert args.optim == "lamb_win" and args.acceleration_mode == "win2"


def test_help_explains_the_flags():
    text = HfArgumentParser(WinTrainingArguments).format_help()
    flat = " ".join(text.split())
    assert "--acceleration_mode {win,win2,none}" in flat
    assert "--reckless_steps" in flat and "r1*lr" in flat and "r2*lr" in flat
    assert "optimizer's own max_grad_norm stays 0 under the Trainer" in flat
    for name in OPTIMIZERS:
        assert name in flat


def test_importing_hf_win_does_not_import_the_trainer_stack_nor_timm():
    import subprocess
    import sys

    # (In this process the Trainer tests have imported it already; WinTrainer resolving lazily is used by all.)
    # Nor timm, even once the Trainer stack is in: only ``import hf_win.timm`` imports it.
    code = ("import sys, hf_win; assert 'transformers.trainer' not in sys.modules, 'eager Trainer import'; "
            "hf_win.WinTrainer, hf_win.WinTrainingArguments; assert 'timm' not in sys.modules, 'timm imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)


# --------------------------------------------------------------- low-precision keys through --optim_args
def test_optim_args_reach_the_optimizer():
    args = hf_win.WinTrainingArguments(
        output_dir="unused", report_to="none", optim="adamw_win", acceleration_mode="win2",
        optim_args="state_dtype=bfloat16,bf16_stochastic_round=True,rounding_seed=5",
    )
    cls, kwargs = hf_win.get_optimizer_cls_and_kwargs(args)
    assert kwargs["state_dtype"] == "bfloat16" and kwargs["bf16_stochastic_round"] is True
    assert kwargs["rounding_seed"] == 5
    p = torch.nn.Parameter(torch.ones(8, dtype=torch.bfloat16))
    opt = cls([p], **kwargs)
    p.grad = torch.ones(8, dtype=torch.bfloat16)
    opt.step()
    assert opt.param_groups[0]["bf16_stochastic_round"] is True
    assert {v.dtype for v in opt.state[p].values() if torch.is_tensor(v)} == {torch.bfloat16}
    from hf_win.trainer import optimizer_state_bytes

    assert optimizer_state_bytes(cls, kwargs, [torch.zeros(10)]) == 4 * 10 * 2  # 4 bf16 buffers


@pytest.mark.parametrize("optim_args, match", [
    ("state_dtype=float16", "state_dtype takes float32, bfloat16 or none"),
    ("bf16_stochastic_round=maybe", "bf16_stochastic_round takes true/false"),
    ("rounding_seed=1.5", r"rounding_seed takes an integer in \[0, 2\*\*31\)"),
    ("rounding_seed=-3", "rounding_seed takes an integer"),
])
def test_bad_optim_args_are_refused_when_the_arguments_are_built(optim_args, match):
    with pytest.raises(ValueError, match=match):
        hf_win.WinTrainingArguments(output_dir="unused", report_to="none", optim="sgd_win", optim_args=optim_args)


def test_optim_args_as_a_mapping():
    args = hf_win.WinTrainingArguments(
        output_dir="unused", report_to="none", optim="lamb_win",
        optim_args={"state_dtype": "bfloat16", "rounding_seed": 3, "bf16_stochastic_round": False},
    )
    _, kwargs = hf_win.get_optimizer_cls_and_kwargs(args)
    assert (kwargs["state_dtype"], kwargs["rounding_seed"], kwargs["bf16_stochastic_round"]) == ("bfloat16", 3, False)


def test_the_command_line_reaches_the_optimizer():
    (args,) = HfArgumentParser(hf_win.WinTrainingArguments).parse_args_into_dataclasses([
        "--output_dir", "unused", "--report_to", "none", "--optim", "sgd_win", "--acceleration_mode", "win2",
        "--optim_args", "state_dtype=bfloat16,bf16_stochastic_round=True",
    ])
    cls, kwargs = hf_win.get_optimizer_cls_and_kwargs(args)
    assert cls is hf_win.SGD and kwargs["state_dtype"] == "bfloat16" and kwargs["bf16_stochastic_round"] is True
