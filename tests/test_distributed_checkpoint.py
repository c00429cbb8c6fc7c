"""Sharded checkpoints through ``torch.distributed.checkpoint`` (DCP), with FSDP2 on 2 CPU processes (gloo).

Three launches of ``dist_workers/dcp_worker.py`` (see its docstring): one process saves and resumes its own
checkpoints; two processes (``fully_shard``) save and resume theirs and resume the one-process ones
(1 -> 2); one process resumes the two-process ones (2 -> 1). Every registry optimizer in win and win2, the
optimizer's own clipping on, one checkpoint written with ``dcp.async_save``.

What must hold:
- resumed with the same world size = uninterrupted, bitwise;
- the state read back equals the state saved, bitwise, whatever the world size (DCP reshards it), and
  under FSDP2 every tensor of it (``x``, ``y`` and every base buffer) is a DTensor;
- creating the fresh optimizer's state (DCP takes one step at lr 0 with zero gradients, after Accelerate
  has loaded the model) changes no bit of any parameter;
- resumed with another world size: the one-process answer to float32 rounding of the batch mean (the
  tolerance of ``test_distributed_ddp.py``: 1e-5 against a measured 3.4e-7).

The same lr-0 step is also checked here in one process for every optimizer, mode and execution path.
"""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent / "dist_workers"))
import common  # noqa: E402
import launch  # noqa: E402
from hf_win.registry import available_optimizers, get_optimizer_spec  # noqa: E402

ATOL = 1e-5


def _same(a: dict, b: dict) -> bool:
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
    return all(torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k] for k in a)


@pytest.fixture(scope="module")
def dcp_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("dcp")
    one = [sys.executable, str(launch.WORKERS / "dcp_worker.py"), str(out)]
    launch.run(one + ["save"], timeout=180)
    launch.run(launch.torchrun("dcp_worker.py", str(out), "save,load1"), timeout=300)
    launch.run(one + ["load2"], timeout=180)
    return {name: torch.load(out / f"{name}.pt", weights_only=False)
            for name in ("save_world1", "save_world2", "load1_world2", "load2_world1")}


@pytest.mark.slow
@pytest.mark.parametrize("world", [1, 2])
@pytest.mark.parametrize("name,mode,extra", [(n, m, "") for n, m in common.combos()]
                         + [("adamw_win", "win2", "bf16_state")])  # dcp_worker.EXTRA
def test_resumed_is_uninterrupted_bitwise(dcp_results, world, name, mode, extra):
    run = dcp_results[f"save_world{world}"]["/".join(filter(None, (name, mode, extra)))]
    resumed = run["resumed"]
    assert resumed["moved_bits"] == 0, f"creating the optimizer's state moved {resumed['moved_bits']} elements"
    assert _same(resumed["loaded_params"], run["saved"]["params"])
    assert _same(resumed["loaded_state"]["state"], run["saved"]["state"]["state"])
    assert _same(resumed["final"], run["uninterrupted"])
    if world == 2:
        # every tensor of the state is sharded: the base buffers, x and y
        keys = get_optimizer_spec(name).cls.buffers_per_parameter(mode)
        assert len(run["saved"]["state"]["dtensors"]) == keys * len(run["uninterrupted"])


@pytest.mark.slow
@pytest.mark.parametrize("saved,loaded", [(2, 1), (1, 2)])
@pytest.mark.parametrize("name,mode", common.combos())
def test_changed_world_size(dcp_results, saved, loaded, name, mode):
    origin = dcp_results[f"save_world{saved}"][f"{name}/{mode}"]
    resumed = dcp_results[f"load{saved}_world{loaded}"][f"{name}/{mode}"]["resumed"]
    assert resumed["moved_bits"] == 0
    assert _same(resumed["loaded_params"], origin["saved"]["params"])
    assert _same(resumed["loaded_state"]["state"], origin["saved"]["state"]["state"])
    target = dcp_results[f"save_world{loaded}"][f"{name}/{mode}"]["uninterrupted"]
    diff = common.max_abs_diff(resumed["final"], target)
    assert diff < ATOL, f"{saved} -> {loaded} processes: {diff:.3e} from the uninterrupted run"
    # the tolerance separates: the checkpoint's parameters (two steps fewer) are far from the answer
    assert common.max_abs_diff(origin["saved"]["params"], target) > 100 * ATOL


@pytest.mark.slow
def test_async_save_was_used(dcp_results):
    import torch.distributed.checkpoint as dcp

    if not hasattr(dcp, "async_save"):
        pytest.skip("this torch has no dcp.async_save")
    for world in (1, 2):
        assert dcp_results[f"save_world{world}"]["adamw_win/win2"]["saved"].get("async")


@pytest.mark.parametrize("state_dtype", [None, "bfloat16"])
@pytest.mark.parametrize("fused", [None, False], ids=["kernel", "foreach"])
@pytest.mark.parametrize("mode", ["none", "win", "win2"])
@pytest.mark.parametrize("name", [n for n in available_optimizers() if not get_optimizer_spec(n).wraps_base])
def test_state_creation_at_lr_zero_moves_no_parameter(name, mode, fused, state_dtype):
    """What DCP does to a fresh optimizer (``_init_optim_state``: zero gradients, lr 0, one step) leaves
    every parameter bit in place, with weight decay on, as at the first step of a warmup from lr 0; with
    bfloat16 state too (its sequences are differences from the parameter, 0 at the start)."""
    from torch.distributed.checkpoint.state_dict import _init_optim_state

    model = common.make_model()
    kwargs = common.optimizer_kwargs(name, mode)
    kwargs.update(acceleration_mode=mode, fused=fused, state_dtype=state_dtype)
    opt = get_optimizer_spec(name).cls(common.param_groups(model), **kwargs)
    before = [p.detach().clone() for p in model.parameters()]
    _init_optim_state(opt)
    assert opt.state, "torch's state creation did not step"
    for b, p in zip(before, model.parameters()):
        assert torch.equal(b.view(torch.int32), p.detach().view(torch.int32)), opt.step_path()
    # and an lr-0 step from state that differs from the parameters still moves them (towards x): the
    # difference form of the mix is not a skip
    if mode != "none":
        for group in opt.param_groups:
            group["lr"] = 1e-2
        for p in model.parameters():
            p.grad = torch.ones_like(p)
        opt.step()
        for group in opt.param_groups:
            group["lr"] = 0.0
        after_one = [p.detach().clone() for p in model.parameters()]
        opt.step()
        assert any(not torch.equal(a, p) for a, p in zip(after_one, model.parameters()))


# ---------------------------------------------------------------------------------------------------------
# The example scripts resume from Accelerate's FSDP2 sharded checkpoints (SHARDED_STATE_DICT, written with
# DCP), launched as users do: accelerate launch --config_file configs/accelerate/fsdp2.yaml, 2 CPU processes.
# Accelerate takes its FSDP path only for GPU-type processes; the test-only launcher fsdp_on_cpu.py lets it
# take the same path on CPU processes (see trainer_worker.allow_fsdp_on_cpu).

EXAMPLES = launch.ROOT / "examples" / "image_classification"
TINY_VIT = "image_size=16,patch_size=8,hidden_size=16,num_hidden_layers=2,num_attention_heads=2,intermediate_size=32"
# 24 training images, 8 per step: 3 steps per epoch. The Trainer script resumes at an epoch boundary (its
# mid-epoch resume under 2 processes is not bitwise even under DDP: the data order, not the optimizer).
SCRIPTS = {
    "no_trainer": ("run_image_classification_no_trainer.py", "step_{}", 2, 4,
                   ["--checkpointing_steps", "2", "--cpu", "true"]),
    "trainer": ("run_image_classification.py", "checkpoint-{}", 3, 5,
                ["--save_strategy", "steps", "--save_steps", "3", "--use_cpu", "true", "--report_to", "none",
                 "--disable_tqdm", "true", "--dataloader_num_workers", "0", "--horizontal_flip_prob", "0",
                 "--random_resized_crop_scale", "1", "1", "--random_resized_crop_ratio", "1", "1"]),
}


def _fsdp2_launch(script, out, *args):
    cmd = launch.accelerate_launch("fsdp_on_cpu.py", str(EXAMPLES / script), *args)
    cmd[cmd.index("--multi_gpu")] = "--config_file"  # the config's own distributed_type (FSDP), version 2
    cmd.insert(cmd.index("--config_file") + 1, str(launch.ROOT / "configs" / "accelerate" / "fsdp2.yaml"))
    return launch.run(cmd, timeout=240)


def _dcp_flat(folder) -> dict:
    """A DCP checkpoint folder as one flat {key: value} dict (through a torch.save file)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    target = folder.parent / f"{folder.name}.pt"
    dcp_to_torch_save(str(folder), str(target))

    def flat(d, pre=""):
        out = {}
        for k, v in d.items():
            if isinstance(v, dict):
                out.update(flat(v, f"{pre}{k}/"))
            else:
                out[f"{pre}{k}"] = repr(v) if isinstance(v, list) else v
        return out

    return flat(torch.load(target, weights_only=False))


@pytest.mark.slow
@pytest.mark.parametrize("which", sorted(SCRIPTS))
def test_example_resumes_from_accelerate_fsdp2_sharded_checkpoint(which, image_folder, tmp_path):
    script, ckpt, at, steps, extra = SCRIPTS[which]
    common_args = ["--train_dir", str(image_folder / "train"), "--validation_dir", str(image_folder / "validation"),
                   "--config_overrides", TINY_VIT, "--learning_rate", "1e-2", "--per_device_train_batch_size", "4",
                   "--max_train_steps" if which == "no_trainer" else "--max_steps", str(steps),
                   "--optim", "adamw_win", "--acceleration_mode", "win2", *extra]
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    _fsdp2_launch(script, whole, *common_args, "--output_dir", str(whole))
    saved = whole / ckpt.format(at)
    # Accelerate's FSDP SHARDED_STATE_DICT (only an FSDP run writes these): DCP folders, one file per process
    for part in ("pytorch_model_fsdp_0", "optimizer_0"):
        assert sorted(p.name for p in (saved / part).glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    _fsdp2_launch(script, resumed, *common_args, "--output_dir", str(resumed), "--resume_from_checkpoint", str(saved))
    end = ckpt.format(steps)
    model_a, model_b = (_dcp_flat(d / end / "pytorch_model_fsdp_0") for d in (whole, resumed))
    optim_a, optim_b = (_dcp_flat(d / end / "optimizer_0") for d in (whole, resumed))
    assert any(k.endswith("/y") for k in optim_a)  # Win2's sequences are in the sharded checkpoint
    for a, b in ((model_a, model_b), (optim_a, optim_b)):
        assert a.keys() == b.keys()
        different = [k for k in a if not (torch.equal(a[k], b[k]) if torch.is_tensor(a[k]) else a[k] == b[k])]
        assert not different, f"{which}: resumed differs from uninterrupted in {different[:5]}"
    at_start = _dcp_flat(saved / "pytorch_model_fsdp_0")
    assert common.max_abs_diff({k: v for k, v in at_start.items() if torch.is_tensor(v)},
                               {k: v for k, v in model_a.items() if torch.is_tensor(v)}) > 1e-3  # it trained on
