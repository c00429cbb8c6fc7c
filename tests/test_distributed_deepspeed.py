"""DeepSpeed ZeRO stage 1, 2 and 3 through ``WinTrainer`` (``--deepspeed configs/deepspeed/zeroN.json``,
``--use_cpu``) with 2 CPU processes (gloo) give the single-process answer; resuming from a ZeRO checkpoint
continues exactly; LAMB-Win stops at start with an explanation.

One ``torchrun --nproc_per_node 2`` runs AdamW, Adam, SGD and Adan in win and win2 at every stage. The
reference is computed here in one process: the optimizer ``WinTrainer`` builds for the same arguments, the
Trainer's parameter groups and its gradient clipping (active: max_grad_norm below the gradient norm), the
whole global batch per step. It equals DDP (``test_distributed_ddp.py``). Tolerance as there: ATOL = 1e-5
against float32 rounding of ~1e-7 and per-step moves of ~1e-2. Without ``--use_cpu`` each process would
train alone on all the data and these comparisons fail.
"""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent / "dist_workers"))
import common  # noqa: E402
import launch  # noqa: E402

pytest.importorskip("deepspeed")

ATOL = 1e-5
STAGES = ("zero1", "zero2", "zero3")
NAMES = ["adamw_win", "adam_win", "sgd_win", "adan_win"]
# what trainer_worker.py resumes at each stage
RESUMED = {"zero1": ("adan_win", "win2"), "zero2": ("adamw_win", "win"), "zero3": ("adan_win", "win2"),
           "zero2_offload": ("adamw_win", "win"), "zero3_offload": ("adan_win", "win2")}


def _trainer_runs(tmp_path_factory, stages, names):
    """One torchrun of trainer_worker.py over ``stages`` x ``names`` (x win/win2); its results."""
    out = tmp_path_factory.mktemp(stages[0]) / "results.pt"
    launch.run(launch.torchrun("trainer_worker.py", str(out), ",".join(stages), ",".join(names)), timeout=420)
    return torch.load(out)


def _assert_matches_one_process(results, stage, name, mode):
    diff = common.max_abs_diff(common.trainer_reference(name, mode), results["params"][f"{stage}/{name}/{mode}"])
    assert diff < ATOL, f"{stage} {name}/{mode} differs from one process by {diff:.3e}"


def _assert_resumed_exactly(results, stage):
    name, mode = RESUMED[stage]
    resumed = results["params"][f"{stage}/resume/{name}/{mode}"]
    uninterrupted = results["params"][f"{stage}/{name}/{mode}"]
    for n in uninterrupted:
        assert torch.equal(resumed[n], uninterrupted[n]), f"{stage}: {n} differs after resuming from checkpoint-2"


@pytest.fixture(scope="module")
def ds_results(tmp_path_factory):
    return _trainer_runs(tmp_path_factory, STAGES, NAMES)


@pytest.mark.slow
@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("name,mode", common.combos(NAMES))
def test_zero_matches_one_process(ds_results, stage, name, mode):
    _assert_matches_one_process(ds_results, stage, name, mode)


@pytest.mark.slow
@pytest.mark.parametrize("stage", STAGES)
def test_resume_from_zero_checkpoint_continues_exactly(ds_results, stage):
    _assert_resumed_exactly(ds_results, stage)


@pytest.mark.slow
@pytest.mark.parametrize("stage", STAGES)
def test_zero_state_per_process_is_half(ds_results, stage):
    for name, mode in common.combos(NAMES):
        full = common.param_count() * 4 * common.buffers(name, mode)
        assert ds_results["state_bytes"][f"{stage}/{name}/{mode}"] * 2 == full, (stage, name, mode)


@pytest.mark.slow
@pytest.mark.parametrize("stage", STAGES)
def test_lamb_trust_ratio_refused_at_start_under_zero(ds_results, stage):
    msg = ds_results["errors"][stage]
    assert msg is not None, f"LAMB-Win under {stage} was accepted"
    # raised by WinTrainer when it builds the optimizer (names the stage), before any training step
    assert msg.startswith("ShardingError") and f"ZeRO stage {stage[-1]}" in msg
    assert "trust ratio" in msg and "FSDP2" in msg and "adamw_win" in msg


# ZeRO-Offload (configs/deepspeed/zero{2,3}_offload.json: "offload_optimizer": {"device": "cpu"} and
# "zero_force_ds_cpu_optimizer": false, which lets DeepSpeed step a client optimizer on the offloaded fp32
# partitions). DeepSpeed's CPU accelerator runs it on CPU processes. AdamW (the common case) and Adan (the
# most state, and a step count kept in the param group) keep the CI run short.
OFFLOAD = ("zero2_offload", "zero3_offload")
OFFLOAD_NAMES = ["adamw_win", "adan_win"]


@pytest.fixture(scope="module")
def offload_results(tmp_path_factory):
    return _trainer_runs(tmp_path_factory, OFFLOAD, OFFLOAD_NAMES)


@pytest.mark.slow
@pytest.mark.parametrize("stage", OFFLOAD)
@pytest.mark.parametrize("name,mode", common.combos(OFFLOAD_NAMES))
def test_zero_offload_steps_on_the_c_kernel_and_matches_one_process(offload_results, stage, name, mode):
    info = offload_results["info"][f"{stage}/{name}/{mode}"]
    assert info["offload"], f"{stage}: DeepSpeed did not offload the optimizer ({info})"
    assert info["step_path"] == "c kernel" and info["state_devices"] == ["cpu"], info
    _assert_matches_one_process(offload_results, stage, name, mode)
    full = common.param_count() * 4 * common.buffers(name, mode)
    assert offload_results["state_bytes"][f"{stage}/{name}/{mode}"] * 2 == full


@pytest.mark.slow
@pytest.mark.parametrize("stage", OFFLOAD)
def test_resume_from_zero_offload_checkpoint_continues_exactly(offload_results, stage):
    _assert_resumed_exactly(offload_results, stage)
