"""FSDP2 through ``WinTrainer`` / Accelerate (``--fsdp``, ``fsdp_config={"version": 2}``) with 2 CPU
processes (gloo) gives the same parameters as DDP through ``WinTrainer``, LAMB-Win included, and is really
sharded.

One ``torchrun --nproc_per_node 2`` of ``dist_workers/trainer_worker.py`` trains every registry optimizer in
win and win2 twice through ``WinTrainer``: with FSDP2 (Accelerate's ``fsdp2_prepare_model``: ``fully_shard``
per Linear / LayerNorm and the root, on the default CPU mesh) and with DDP. Accelerate 1.15 only takes its
FSDP path for GPU-type processes; the worker's test-only shim (``allow_fsdp_on_cpu``, documented there)
makes it take the same path on CPU processes. Nothing in ``hf_win`` is patched.

Tolerance as in ``test_distributed_ddp.py``: ATOL = 1e-5 against a measured float32 difference of at most
1.2e-7 (DDP and FSDP2 reduce the two half-batch gradients in different ways) and per-step moves of ~1e-2.
LAMB's trust ratio: if it were computed over each process's shard instead of the whole parameter, LAMB-Win
would end 5.8e-4 / 5.9e-4 (win / win2) away from the right answer here (computed in this process by
stepping the two dim-0 halves of every parameter as separate parameters), far outside the tolerance.
"""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent / "dist_workers"))
import common  # noqa: E402
import launch  # noqa: E402

ATOL = 1e-5


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp2_trainer") / "fsdp2.pt"
    launch.run(launch.torchrun("trainer_worker.py", str(out), "fsdp2,ddp"), timeout=300)
    return torch.load(out)


@pytest.mark.slow
@pytest.mark.parametrize("name,mode", common.combos())
def test_fsdp2_trainer_matches_ddp_trainer(results, name, mode):
    fsdp2 = results["params"][f"fsdp2/{name}/{mode}"]
    ddp = results["params"][f"ddp/{name}/{mode}"]
    assert results["info"][f"ddp/{name}/{mode}"]["distributed_type"] == "MULTI_CPU"
    diff = common.max_abs_diff(ddp, fsdp2)
    assert diff < ATOL, f"FSDP2 {name}/{mode} through WinTrainer differs from DDP by {diff:.3e}"
    # and both are the single-process answer (the Trainer's optimizer, groups and clipping, whole batch)
    ref = common.trainer_reference(name, mode)
    assert common.max_abs_diff(ref, fsdp2) < ATOL and common.max_abs_diff(ref, ddp) < ATOL
    # the tolerance is meaningful: one step fewer is far outside it
    assert common.max_abs_diff(ref, common.trainer_reference(name, mode, steps=common.STEPS - 1)) > 100 * ATOL


@pytest.mark.slow
@pytest.mark.parametrize("name,mode", common.combos())
def test_fsdp2_trainer_run_is_sharded(results, name, mode):
    info = results["info"][f"fsdp2/{name}/{mode}"]
    assert info["distributed_type"] == "FSDP"
    # every model parameter and every parameter the optimizer steps: a DTensor, Shard placements, part of it
    assert info["sharded"] and info["optimizer_steps_model_params"], info
    assert info["fsdp_units"] == 6, info  # inp, norm, h1, h2, out (size-based wrap) + the root
    # each process holds the state of its half of every parameter (dim 0 splits evenly here)
    full = common.param_count() * 4 * common.buffers(name, mode)
    assert info["state_bytes_per_process"] == [full // 2, full // 2], (info, full)
    assert results["state_bytes"][f"ddp/{name}/{mode}"] == full


@pytest.mark.slow
@pytest.mark.parametrize("mode", common.MODES)
def test_fsdp2_lamb_trust_ratio_uses_whole_parameters(results, mode):
    ref = common.trainer_reference("lamb_win", mode)
    per_shard = common.trainer_reference_per_shard_norms("lamb_win", mode, shards=2)
    fsdp2 = results["params"][f"fsdp2/lamb_win/{mode}"]
    # shard-local norms would be a visibly different answer ...
    assert common.max_abs_diff(ref, per_shard) > 30 * ATOL
    assert common.max_abs_diff(per_shard, fsdp2) > 30 * ATOL
    # ... and FSDP2 through the Trainer gives the whole-parameter one
    assert common.max_abs_diff(ref, fsdp2) < ATOL
    # the per-shard emulation itself is exact for element-wise optimizers (no per-parameter norm)
    assert common.max_abs_diff(common.trainer_reference("adamw_win", mode),
                               common.trainer_reference_per_shard_norms("adamw_win", mode, shards=2)) < ATOL


@pytest.mark.slow
def test_fsdp_flag_not_silently_dropped_on_cpu(results):
    """Without the shim Accelerate keeps MULTI_CPU and would train unsharded: WinTrainer stops at construction."""
    msg = results["errors"]["fsdp2_without_shim"]
    assert msg is not None, "--fsdp on CPU processes was accepted although Accelerate did not enable FSDP"
    assert "--fsdp" in msg and "MULTI_CPU" in msg and "unsharded" in msg and "GPU" in msg
    msg = results["errors"]["accelerate_fsdp_without_shim"]  # the accelerate-launch route (environment)
    assert msg is not None and "ACCELERATE_USE_FSDP=true" in msg and "MULTI_CPU" in msg
