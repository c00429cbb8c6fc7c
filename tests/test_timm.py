"""``import hf_win.timm``: the Win optimizers in timm's optimizer registry, under the authors' hyphenated names.

Runs where timm (>= 1.0.12) imports; where torchvision does not import beside this torch, through the test-only
stand-in in tests/torchvision_standin.py (timm's optimizer factory uses nothing of torchvision).
``bash scripts/bootstrap.sh test`` installs timm for these tests in ``<venv>/timm-for-tests``, a folder of its own
(in the venv, timm without torchvision would break accelerate's CLI), which is on the path while timm imports.
"""

import contextlib
import os
import sys
import types

import pytest
import torch
import transformers  # noqa: F401  (imported before the stand-in exists: it must see no torchvision)

import torchvision_standin


@contextlib.contextmanager
def _timm_for_tests_on_path():
    folder = os.path.join(sys.prefix, "timm-for-tests")
    sys.path.insert(0, folder)
    try:
        yield
    finally:
        sys.path.remove(folder)


with torchvision_standin.installed(), _timm_for_tests_on_path():
    timm = pytest.importorskip("timm")
    timm_optim = pytest.importorskip("timm.optim")
    if not hasattr(timm_optim, "OptimInfo"):
        pytest.skip("timm < 1.0.12 has no optimizer registry", allow_module_level=True)
    import hf_win.timm as hf_win_timm

import hf_win  # noqa: E402
from hf_win.registry import OPTIMIZERS  # noqa: E402

OWN = [name for name, spec in OPTIMIZERS.items() if not issubclass(spec.cls, hf_win.Win)]
NAMES = [(f"{name[:-4]}-{mode}", name, mode) for name in OWN for mode in ("win", "win2")]
# The registry's Win(base) optimizers (torch.optim's Adafactor, NAdam, RAdam, Muon inside hf_win.Win).
WRAPPED = [(f"{name[:-4]}-{mode}", name, mode) for name in OPTIMIZERS if name not in OWN for mode in ("win", "win2")]


class Net(torch.nn.Module):
    """Matrices, biases, a LayerNorm and a position embedding that the model exempts from decay (as DeiT)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.pos_embed = torch.nn.Parameter(torch.randn(1, 3, 4))
        self.fc1 = torch.nn.Linear(4, 8)
        self.norm = torch.nn.LayerNorm(8)
        self.fc2 = torch.nn.Linear(8, 2)

    def no_weight_decay(self):
        return {"pos_embed"}

    def forward(self, x):
        return self.fc2(self.norm(self.fc1(x + self.pos_embed).relu())).mean(1)


def test_the_ten_names_are_registered():
    assert hf_win_timm.TIMM_NAMES == tuple(n for n, _, _ in NAMES + WRAPPED)
    assert len(WRAPPED) == 8 and {"muon-win2", "adafactor-win", "nadam-win", "radam-win2"} <= set(hf_win_timm.TIMM_NAMES)
    assert len(NAMES) == 10 and "adamw-win2" in hf_win_timm.TIMM_NAMES and "adan-win" in hf_win_timm.TIMM_NAMES
    listed = timm_optim.list_optimizers("*-win*")
    assert set(hf_win_timm.TIMM_NAMES) <= set(listed)
    info = timm_optim.get_optimizer_info("adan-win2")
    assert info.num_betas == 3 and info.has_betas and not info.has_momentum
    assert timm_optim.get_optimizer_info("sgd-win").has_momentum and not timm_optim.get_optimizer_info("sgd-win").has_betas


@pytest.mark.parametrize("timm_name,name,mode", NAMES)
def test_create_optimizer_v2_builds_our_class_with_timms_groups(timm_name, name, mode):
    model = Net()
    opt = timm_optim.create_optimizer_v2(model, opt=timm_name, lr=0.01, weight_decay=0.05)
    assert type(opt) is OPTIMIZERS[name].cls
    assert opt.defaults["acceleration_mode"] == mode and opt.defaults["lr"] == 0.01
    # timm's own no-decay split: 1-d parameters, biases and the model's no_weight_decay() list
    expected = timm_optim.param_groups_weight_decay(model, 0.05, no_weight_decay_list=model.no_weight_decay())
    got = [([id(p) for p in g["params"]], g["weight_decay"]) for g in opt.param_groups]
    assert got == [([id(p) for p in g["params"]], g["weight_decay"]) for g in expected]
    no_decay = {id(p) for g in opt.param_groups if g["weight_decay"] == 0.0 for p in g["params"]}
    assert id(model.pos_embed) in no_decay and id(model.fc1.bias) in no_decay and id(model.norm.weight) in no_decay
    assert id(model.fc1.weight) not in no_decay
    if name == "sgd_win":
        assert opt.defaults["momentum"] == 0.9  # timm's momentum default for optimizers that take one
    loss = model(torch.randn(5, 3, 4)).pow(2).sum()
    loss.backward()
    before = model.fc1.weight.detach().clone()
    opt.step()
    assert not torch.equal(before, model.fc1.weight) and "x" in opt.state[model.fc1.weight]
    assert ("y" in opt.state[model.fc1.weight]) == (mode == "win2")


def test_train_py_arguments_reach_the_optimizer():
    """What timm's train.py does with --opt adamw-win2 --opt-eps --opt-betas --opt-kwargs (and lookahead_)."""
    cfg = types.SimpleNamespace(opt="adamw-win2", lr=2e-3, weight_decay=0.05, momentum=0.9, opt_eps=1e-6,
                                opt_betas=[0.8, 0.99], opt_args={"reckless_steps": (1.0, 4.0)})
    opt = timm_optim.create_optimizer_v2(Net(), **timm_optim.optimizer_kwargs(cfg=cfg))
    assert type(opt) is OPTIMIZERS["adamw_win"].cls
    d = opt.defaults
    assert (d["acceleration_mode"], d["eps"], tuple(d["betas"]), tuple(d["reckless_steps"])) == ("win2", 1e-6, (0.8, 0.99), (1.0, 4.0))
    # an explicit keyword wins over the name's mode; timm's lookahead_ prefix works with the hyphenated names
    assert timm_optim.create_optimizer_v2(Net(), opt="lamb-win2", acceleration_mode="none").defaults["acceleration_mode"] == "none"
    wrapped = timm_optim.create_optimizer_v2(Net(), opt="lookahead_sgd-win", lr=0.1)
    assert type(wrapped).__name__ == "Lookahead" and type(wrapped._base_optimizer) is OPTIMIZERS["sgd_win"].cls


@pytest.mark.parametrize("timm_name,name,mode", WRAPPED)
def test_create_optimizer_v2_builds_the_wrapped_optimizers(timm_name, name, mode):
    """timm's groups reach the Win(base) optimizer with their decay integrated by Win (win_weight_decay; the base
    decays nothing); muon-win* puts 2-D matrices on Muon and timm's fallback_list on AdamW."""
    model = Net()
    opt = timm_optim.create_optimizer_v2(model, opt=timm_name, lr=0.01, weight_decay=0.05,
                                         fallback_list=["fc2.*"] if name == "muon_win" else ())
    assert type(opt) is OPTIMIZERS[name].cls and opt.defaults["acceleration_mode"] == mode
    decay = {id(p): g["win_weight_decay"] for g in opt.param_groups for p in g["params"]}
    assert all(g["weight_decay"] == 0.0 for g in opt.param_groups)
    assert decay[id(model.fc1.weight)] == 0.05 and decay[id(model.pos_embed)] == 0.0 and decay[id(model.fc1.bias)] == 0.0
    if name == "muon_win":
        muon = {id(p) for g in opt.param_groups if g["use_muon"] for p in g["params"]}
        assert muon == {id(model.fc1.weight)}  # fc2.weight is 2-D but on timm's fallback list
    model(torch.randn(5, 3, 4)).pow(2).sum().backward()
    before = model.fc1.weight.detach().clone()
    opt.step()
    assert not torch.equal(before, model.fc1.weight) and ("y" in opt.state[model.fc1.weight]) == (mode == "win2")
