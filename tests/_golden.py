"""Loading and replaying the reference trajectories (tests/data/win_reference_trajectories.json).

The file is a copy of the project's shared golden data: 57 cases computed in float64 by the authors'
public implementation (and, for Adan-Win, by the specification).
"""

import json
from functools import lru_cache
from pathlib import Path

import torch

import hf_win

GOLDEN = Path(__file__).parent / "data" / "win_reference_trajectories.json"
REGISTRY_NAME = {"adamw": "adamw_win", "adam": "adam_win", "lamb": "lamb_win", "sgd": "sgd_win", "adan": "adan_win"}


@lru_cache(maxsize=1)
def cases():
    return json.loads(GOLDEN.read_text())["cases"]


def build(case, dtype=torch.float64, **overrides):
    """Parameters (leaf tensors) and the optimizer the case describes."""
    params = [
        torch.tensor(v, dtype=dtype).reshape(shape).requires_grad_(True)
        for v, shape in zip(case["initial_params"], case["shapes"])
    ]
    groups = [
        {"params": [params[i] for i in g["param_indices"]], "weight_decay": g["weight_decay"]}
        for g in case["param_groups"]
    ]
    kwargs = dict(case["hyperparameters"], lr=case["lr_per_step"][0], acceleration_mode=case["acceleration_mode"])
    kwargs.update(overrides)
    opt = hf_win.create_optimizer(REGISTRY_NAME[case["optimizer"]], groups, **kwargs)
    return params, opt


def set_grads(params, step_grads, dtype=torch.float64):
    for p, g in zip(params, step_grads):
        p.grad = torch.tensor(g, dtype=dtype).reshape(p.shape)


def replay(case, dtype=torch.float64, **overrides):
    """Yield (step index, params, expected flat params) after each step of the case."""
    params, opt = build(case, dtype=dtype, **overrides)
    for k, (lr, grads, expected) in enumerate(
        zip(case["lr_per_step"], case["grads_per_step"], case["expected_params_per_step"])
    ):
        for group in opt.param_groups:
            group["lr"] = lr
        set_grads(params, grads, dtype)
        opt.step()
        yield k, params, [torch.tensor(e, dtype=torch.float64) for e in expected]
