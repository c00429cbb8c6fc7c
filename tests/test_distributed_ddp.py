"""DDP, ZeroRedundancyOptimizer and FSDP2 with 2 CPU processes (gloo) give the single-process answer.

One ``accelerate launch --multi_gpu --num_processes 2`` runs every registry optimizer in win and win2,
under DDP, ZeroRedundancyOptimizer and FSDP2 (``fully_shard`` on a CPU mesh); the reference is computed
here, in one process, with the same global batch (8 samples per step, 4 per process). Under DDP and
FSDP2 the optimizer's own clipping is on and active (max_grad_norm below the gradient norm): with full
gradients (DDP) or DTensor norms (FSDP2) it uses the whole gradient, like the reference.

Tolerance (ATOL = 1e-5, parameters are O(0.1-1)): the only legitimate difference is float32 rounding of the
batch-mean gradient (a mean of 8 samples here vs the average of two means of 4 there, plus the gloo
all-reduce), about 1e-7 after 4 steps as measured. One optimizer step moves the parameters by ~1e-2
(lr = 1e-2, and Adam-type directions are O(1)), so any real mistake (an unsharded batch, a skipped or
doubled step, state on the wrong parameters, a clipping norm over half the gradients) is >= 1e-3.
"""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent / "dist_workers"))
import common  # noqa: E402
from hf_win.registry import get_optimizer_spec  # noqa: E402
import launch  # noqa: E402

ATOL = 1e-5


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp") / "ddp.pt"
    launch.run(launch.accelerate_launch("ddp_worker.py", str(out)), timeout=240)
    return torch.load(out)


@pytest.mark.slow
@pytest.mark.parametrize("name,mode", common.combos())
def test_ddp_matches_one_process(ddp_results, name, mode):
    ref = common.reference_params(name, mode, max_grad_norm=common.CLIP)
    diff = common.max_abs_diff(ref, ddp_results["params"][f"ddp/{name}/{mode}"])
    assert diff < ATOL, f"DDP {name}/{mode} differs from one process by {diff:.3e}"
    # the tolerance is meaningful: one step fewer, or no clipping, is far outside it
    for other in (common.reference_params(name, mode, max_grad_norm=common.CLIP, steps=common.STEPS - 1),
                  common.reference_params(name, mode, max_grad_norm=0.0)):
        assert common.max_abs_diff(ref, other) > 100 * ATOL


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["fsdp2", "fsdp2_cpu_offload"])
@pytest.mark.parametrize("name,mode", common.combos())
def test_fsdp2_matches_one_process(ddp_results, name, mode, variant):
    """The C kernel steps the local shards (with CPUOffloadPolicy too), LAMB included: the sums of its
    trust ratio's norms are all-reduced between the kernel's stages, so the ratio is that of each whole
    parameter (the 1-process answer; per-shard norms would be ~5e-4 away, see
    test_distributed_fsdp2_trainer.py)."""
    ref = common.reference_params(name, mode, max_grad_norm=common.CLIP)
    diff = common.max_abs_diff(ref, ddp_results["params"][f"{variant}/{name}/{mode}"])
    assert diff < ATOL, f"{variant} {name}/{mode} differs from one process by {diff:.3e}"
    assert ddp_results["paths"][f"{variant}/{name}/{mode}"] == "c kernel"


@pytest.mark.slow
def test_fsdp2_empty_local_shard_takes_part_in_lamb_norms(ddp_results):
    """A (1, 5) parameter over 2 processes: one holds an empty shard, and LAMB on the kernel still sums its
    norms with the other process (a process skipping the call would hang or give per-shard ratios)."""
    sizes = ddp_results["paths"]["uneven/local_sizes"]
    assert sizes[1][0] == 0 and sizes[0][0] == 5, sizes
    assert ddp_results["paths"]["uneven/fsdp2"] == "c kernel"
    diff = common.max_abs_diff(ddp_results["params"]["uneven/one_process"], ddp_results["params"]["uneven/fsdp2"])
    assert diff < ATOL, diff


@pytest.mark.slow
@pytest.mark.parametrize("mode", common.MODES)
def test_fsdp2_lamb_on_the_triton_kernel_matches_one_process(ddp_results, mode):
    """The Triton kernel (its interpreter on CPU) sums LAMB's norms over the processes as the C kernel does."""
    pytest.importorskip("triton")
    ref = common.reference_params("lamb_win", mode, max_grad_norm=common.CLIP)
    assert common.max_abs_diff(ref, ddp_results["params"][f"fsdp2_triton/lamb_win/{mode}"]) < ATOL
    assert ddp_results["paths"][f"fsdp2_triton/lamb_win/{mode}"] == "triton kernel"


@pytest.mark.slow
@pytest.mark.parametrize("name,mode", common.combos())
def test_zero_redundancy_optimizer_matches_one_process(ddp_results, name, mode):
    ref = common.reference_params(name, mode, max_grad_norm=0.0)
    diff = common.max_abs_diff(ref, ddp_results["params"][f"zero/{name}/{mode}"])
    assert diff < ATOL, f"ZeroRedundancyOptimizer {name}/{mode} differs from one process by {diff:.3e}"


@pytest.mark.slow
@pytest.mark.parametrize("name,mode", common.combos())
def test_sharded_state_per_process_is_about_half(ddp_results, name, mode):
    mem = ddp_results["memory"][f"{name}/{mode}"]
    full = mem["ddp_per_process"]
    n_buffers = get_optimizer_spec(name).cls.buffers_per_parameter(mode)
    assert full == n_buffers * ddp_results["n_params"] * 4  # float32, every buffer for every parameter
    # ZeroRedundancyOptimizer: every buffer held exactly once over the two processes, about half each
    # (it assigns whole parameters to processes, hence not exactly half)
    shards = mem["zero_per_process"]
    assert sum(shards) == full and max(shards) <= 0.55 * full, (shards, full)
    # FSDP2: each process holds the state of its shard of every parameter (dim 0 split evenly here)
    shards = mem["fsdp2_per_process"]
    assert sum(shards) == full and max(shards) <= 0.55 * full, (shards, full)


@pytest.mark.slow
def test_zero_redundancy_optimizer_refuses_own_clipping(ddp_results):
    msg = ddp_results["errors"]["zero_clip"]
    assert msg is not None, "max_grad_norm > 0 inside ZeroRedundancyOptimizer was accepted"
    assert "ZeroRedundancyOptimizer" in msg and "max_grad_norm=0" in msg and "clip_grad_norm_" in msg
