"""What a Win optimizer can and cannot do when its parameters are sharded across processes.

Three ways a ``WinOptimizer`` ends up stepping something other than the model's whole parameters:

- **FSDP2** (``torch.distributed.fsdp.fully_shard``): the parameters are ``DTensor``s. Element-wise
  updates act on the local shard, and a norm of a ``DTensor`` (``torch.linalg.vector_norm`` and
  ``torch._foreach_norm`` alike) is reduced over all processes, so LAMB's trust ratio and the optimizer's
  own clipping see whole tensors. Nothing to refuse. A kernel steps the local shards (``local_shards``)
  when the parameter, its gradient and its state are sharded alike; the per-tensor sums of a step that
  takes norms (LAMB's trust ratio) are summed over the processes between the kernel's stages
  (``sum_over_shards``: one all-reduce per stage for all the tensors of a kernel call).
- **DeepSpeed ZeRO 1/2/3**: DeepSpeed replaces each param group's parameters by one *flattened fp32
  partition*: a 1-D slice of the concatenation of many layers. Element-wise updates are still right, but a
  per-"parameter" norm is the norm of a piece of many layers, and a norm over the optimizer's parameters is
  the norm of this process's partition only. ZeRO-3 also steps the optimizer once per sub-group, so a step
  count kept in the param group (LAMB, Adan) would advance several times per real step; for flattened
  partitions the count is therefore kept per partition (each partition is stepped exactly once per step).
- **ZeroRedundancyOptimizer**: each process builds the optimizer over its own subset of whole parameters.
  Per-parameter norms are right; a norm over "all" the optimizer's gradients covers this process's subset.

This module detects the two wrong cases and raises :class:`ShardingError` before any state is touched.
"""

from __future__ import annotations

import sys
from typing import Iterable

from torch import Tensor

__all__ = ["ShardingError", "check_partitioned", "is_dtensor", "inside_zero_redundancy_optimizer",
           "check_clipping_at_construction", "stepping_partitions", "local_shards"]

CLIP_ADVICE = (
    "Set the optimizer's max_grad_norm=0 and clip where the whole gradient is known: DeepSpeed's "
    "\"gradient_clipping\" in its config, --max_grad_norm under the Trainer (it passes max_grad_norm=0 to "
    "the optimizer), or torch.nn.utils.clip_grad_norm_(model.parameters(), ...) before step() with "
    "ZeroRedundancyOptimizer."
)
LAMB_ADVICE = (
    "Use LAMB-Win with FSDP2 (its DTensor parameters give whole-tensor norms), DDP or "
    "ZeroRedundancyOptimizer, or use a base optimizer without layer-wise norms under ZeRO (adamw_win, "
    "adam_win, sgd_win, adan_win)."
)


class ShardingError(ValueError):
    """A Win optimizer setting that would silently compute a different result on sharded parameters."""


def is_dtensor(t: Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except Exception:  # pragma: no cover - torch built without distributed
        return False
    return isinstance(t, DTensor)


def local_shards(ts):
    """``(local tensors, "")`` for one parameter's DTensors (parameter, gradient, state buffers) when a
    kernel may step them shard by shard: every one a DTensor on the same mesh with the same placements
    (``Shard`` or ``Replicate``) and shape; else ``(None, the reason in words)``."""
    p = ts[0]
    if any(not (pl.is_shard() or pl.is_replicate()) for pl in p.placements):
        return None, f"DTensor parameters placed as {p.placements} (not Shard / Replicate) are not fused"
    for t in ts[1:]:
        if not is_dtensor(t) or t.device_mesh != p.device_mesh or t.placements != p.placements or t.shape != p.shape:
            return None, "a DTensor parameter whose gradient or state is not sharded like it is not fused"
    return [t.to_local() for t in ts], ""


def sum_over_shards(p):
    """For a kernel stepping ``p``'s local shard: a function that sums a float64 tensor of per-tensor sums
    (norms) in place over the processes holding the other shards (the mesh dimensions where ``p`` is
    ``Shard``), so that a norm is the whole parameter's. One all-reduce per call, for all the tensors of
    the call together."""
    import torch.distributed as dist

    mesh = p.device_mesh
    groups = [mesh.get_group(d) for d, pl in enumerate(p.placements) if pl.is_shard()]

    def sync(sums):
        for group in groups:
            dist.all_reduce(sums, group=group)

    return sync


def inside_zero_redundancy_optimizer(max_depth: int = 8) -> bool:
    """Whether the caller chain contains a ``ZeroRedundancyOptimizer`` method (it builds its local
    optimizer, over this process's subset of the parameters, from its own ``__init__``)."""
    zro = sys.modules.get("torch.distributed.optim.zero_redundancy_optimizer")
    if zro is None:
        return False
    frame = sys._getframe(1)
    for _ in range(max_depth):
        if frame is None:
            return False
        if isinstance(frame.f_locals.get("self"), zro.ZeroRedundancyOptimizer):
            return True
        frame = frame.f_back
    return False


def foreign_params(params: Iterable[Tensor], registered: set) -> list:
    """Parameters the optimizer was not built with and that are not DTensors: DeepSpeed's flattened
    partitions (FSDP2 as prepared by Accelerate swaps in DTensor versions of the parameters: fine)."""
    return [p for p in params if id(p) not in registered and not is_dtensor(p)]


def check_partitioned(optimizer, where: str = "DeepSpeed ZeRO") -> None:
    """Raise :class:`ShardingError` if ``optimizer`` (a ``WinOptimizer``) would compute something different
    on flattened partitions (``where``): its own clipping (``max_grad_norm > 0``), or a per-parameter norm
    in any non-empty param group (LAMB's trust ratio, on when ``weight_decay != 0`` or ``always_adapt``).

    The optimizer calls this itself at its first step on partitions; ``WinTrainer`` calls it when it builds
    the optimizer for a ``--deepspeed`` run with ZeRO stage >= 1, so such a run stops before training."""
    name = type(optimizer).__name__
    max_norm = float(optimizer.defaults.get("max_grad_norm", 0.0))
    if max_norm > 0:
        raise ShardingError(
            f"{name}: max_grad_norm={max_norm} would clip with the norm of this process's flattened "
            f"partition ({where}), not of the whole gradient. " + CLIP_ADVICE
        )
    for i, group in enumerate(optimizer.param_groups):
        if group["params"] and optimizer._needs_whole_tensors(group):
            raise ShardingError(
                f"{name}: param group {i} uses the norm of each whole parameter (layer-wise trust ratio), but "
                f"under {where} its parameters are flattened partitions: each one is a slice of many layers, "
                "so the ratio would be computed over the wrong tensors. " + LAMB_ADVICE
            )


def check_clipping_at_construction(name: str, max_grad_norm: float) -> None:
    """Raise :class:`ShardingError` when an optimizer that clips (``max_grad_norm > 0``) is being built by a
    ``ZeroRedundancyOptimizer``: it would clip with the norm of this process's share of the parameters."""
    # max_depth: one frame more than the default, for this function's own
    if max_grad_norm > 0 and inside_zero_redundancy_optimizer(max_depth=9):
        raise ShardingError(
            f"{name}: max_grad_norm={max_grad_norm} inside ZeroRedundancyOptimizer would clip "
            "with the norm of this process's share of the parameters only. " + CLIP_ADVICE
        )


def stepping_partitions(optimizer, registered: set) -> bool:
    """Whether ``optimizer`` is stepping flattened partitions it was not built with (DeepSpeed ZeRO; its
    ``registered`` parameter ids tell); then ``check_partitioned`` raises :class:`ShardingError` (before
    any state is touched) for what would be silently wrong there."""
    if not any(foreign_params(g["params"], registered) for g in optimizer.param_groups):
        return False
    check_partitioned(optimizer)
    return True
