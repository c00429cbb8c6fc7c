"""The registry's ``Win(base)`` optimizers (``adafactor_win``, ``nadam_win``, ``radam_win``, ``muon_win``): each
mode is the base as torch writes it (``none``) or ``Win`` around it, weight decay where hf_win's rule puts it,
Muon's parameter split as documented, and every name trains under ``WinTrainer``."""

import tempfile

import pytest
import torch

import hf_win
from hf_win import Win
from hf_win.optim.muon import MuonAdamW, muon_param_groups

NAMES = ["adafactor_win", "nadam_win", "radam_win", "muon_win"]


def _params(seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g, dtype=dtype)) for s in ((6, 4), (4,), (5, 6), (3,))]


def _steps(pairs, n=6):
    g = torch.Generator().manual_seed(7)
    for _ in range(n):
        grads = [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in pairs[0][1]]
        for opt, ps in pairs:
            for p, x in zip(ps, grads):
                p.grad = x.clone()
            opt.step()


def _groups(ps, wd):
    return [{"params": [p for p in ps if p.ndim == 2], "weight_decay": wd},
            {"params": [p for p in ps if p.ndim < 2], "weight_decay": 0.0}]


TORCH_BASES = {
    "adafactor_win": lambda groups, **kw: torch.optim.Adafactor(groups, lr=1e-2, **kw),
    "nadam_win": lambda groups, **kw: torch.optim.NAdam(groups, lr=1e-2, decoupled_weight_decay=True, **kw),
    "radam_win": lambda groups, **kw: torch.optim.RAdam(groups, lr=1e-2, decoupled_weight_decay=True, **kw),
}


@pytest.mark.parametrize("name", sorted(TORCH_BASES))
def test_mode_none_is_torch_s_optimizer_and_win_is_the_wrapper_around_it(name):
    a, b, c, d = _params(), _params(), _params(), _params()
    pairs = [(hf_win.create_optimizer(name, _groups(a, 0.1), lr=1e-2, acceleration_mode="none"), a),
             (TORCH_BASES[name](_groups(b, 0.1)), b),
             (hf_win.create_optimizer(name, _groups(c, 0.1), lr=1e-2, acceleration_mode="win2"), c),
             (Win(TORCH_BASES[name]([{"params": g["params"], "win_weight_decay": g["weight_decay"]}
                                     for g in _groups(d, 0.1)], weight_decay=0.0), "win2"), d)]
    _steps(pairs)
    assert all(torch.equal(p, q) for p, q in zip(a, b))  # decoupled decay in the base's own step
    assert all(torch.equal(p, q) for p, q in zip(c, d))  # the decay integrated by Win, per group
    opt = pairs[2][0]
    assert [g["weight_decay"] for g in opt.param_groups] == [0.0, 0.0]
    assert [g["win_weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    assert not all(torch.equal(p, q) for p, q in zip(a, c))


def test_muon_split_by_module_groups_and_shape():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=32, n_positions=8, n_embd=8, n_layer=1, n_head=2,
                                       bos_token_id=0, eos_token_id=0))
    groups = muon_param_groups(model, 0.1)
    by_id = {id(p): g for g in groups for p in g["params"]}
    t = model.transformer
    assert by_id[id(t.wte.weight)]["use_muon"] is False and by_id[id(t.wpe.weight)]["use_muon"] is False
    assert by_id[id(t.h[0].attn.c_attn.weight)]["use_muon"] is True
    assert by_id[id(t.h[0].ln_1.weight)]["use_muon"] is False and by_id[id(t.h[0].ln_1.weight)]["weight_decay"] == 0.0
    assert by_id[id(t.h[0].mlp.c_fc.bias)]["weight_decay"] == 0.0 and by_id[id(t.wte.weight)]["weight_decay"] == 0.1
    opt = hf_win.MuonWin(model, lr=1e-2, weight_decay=0.1)
    assert {len(g["params"]) for g in opt.param_groups if g["use_muon"]} == {4}  # c_attn, c_proj, c_fc, mlp.c_proj
    # plain parameters: the shape rule; a group's use_muon (or timm's use_fallback) decides for the group
    m, v, e = torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(9, 3))
    opt = hf_win.MuonWin([{"params": [m, v]}, {"params": [e], "use_fallback": True}], weight_decay=0.0)
    assert [(g["use_muon"], len(g["params"])) for g in opt.param_groups] == [(True, 1), (False, 1), (False, 1)]
    with pytest.raises(ValueError, match=r"use_muon=True for parameters of shapes \[\(3,\)\]"):
        hf_win.MuonWin([{"params": [v], "use_muon": True}])


def test_muon_win_parts_are_torch_s_muon_and_hf_win_adamw():
    """Mode none: the Muon groups step as torch.optim.Muon (Moonshot's lr scaling), the others as torch's
    AdamW. Mode win2: the AdamW part equals hf_win.AdamW-Win2."""
    a, b = _params(), _params()
    ours = hf_win.MuonWin(_groups(a, 0.1), lr=1e-2, acceleration_mode="none")
    muon = torch.optim.Muon([p for p in b if p.ndim == 2], lr=1e-2, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
    adamw = torch.optim.AdamW([p for p in b if p.ndim < 2], lr=1e-2, weight_decay=0.0)

    class Both:
        def step(self):
            muon.step()
            adamw.step()

    _steps([(ours, a), (Both(), b)])
    assert all(torch.equal(p, q) for p, q in zip(a, b))
    c = [torch.nn.Parameter(p.detach().double()) for p in _params() if p.ndim < 2]
    d = [torch.nn.Parameter(p.detach().double()) for p in _params() if p.ndim < 2]
    _steps([(hf_win.MuonWin([{"params": c, "use_muon": False}], lr=1e-2, weight_decay=0.1, acceleration_mode="win2"), c),
            (hf_win.AdamW(d, lr=1e-2, weight_decay=0.1, acceleration_mode="win2", foreach=True), d)])
    assert max(float((p - q).detach().abs().max()) for p, q in zip(c, d)) < 1e-12


def test_registry_names_are_listed_with_their_state():
    for name in NAMES:
        assert name in hf_win.available_optimizers()
    assert hf_win.get_optimizer_spec("muon_win").cls is hf_win.MuonWin
    assert hf_win.AdafactorWin.buffers_per_parameter("win2") == 2  # factored second moment: Win's x, y
    assert hf_win.NAdamWin.buffers_per_parameter("none") == 2 and hf_win.MuonWin.buffers_per_parameter("win") == 2
    assert isinstance(hf_win.create_optimizer("muon_win", _params()).base_optimizer, MuonAdamW)
    with pytest.raises(ValueError, match="does not take state_dtype"):
        hf_win.create_optimizer("nadam_win", _params(), state_dtype="bfloat16")


class _Tokens(torch.utils.data.Dataset):
    def __init__(self):
        self.x = torch.randint(0, 32, (16, 8), generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"input_ids": self.x[i], "labels": self.x[i]}


@pytest.mark.parametrize("name", NAMES)
def test_trains_under_win_trainer(name):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=32, n_positions=8, n_embd=8, n_layer=1, n_head=2,
                                       bos_token_id=0, eos_token_id=0))
    before = model.transformer.h[0].attn.c_attn.weight.detach().clone()
    optim_args = {"muon_win": "ns_steps=3", "adafactor_win": "eps2=0.002", "nadam_win": "momentum_decay=0.005",
                  "radam_win": "foreach=false"}[name]
    args = hf_win.WinTrainingArguments(
        output_dir=tempfile.mkdtemp(), optim=name, optim_args=optim_args, acceleration_mode="win2",
        reckless_steps=[1.5, 6.0], max_steps=2, per_device_train_batch_size=8, learning_rate=1e-2,
        weight_decay=0.1, use_cpu=True, report_to="none", save_strategy="no", disable_tqdm=True)
    trainer = hf_win.WinTrainer(model=model, args=args, train_dataset=_Tokens())
    trainer.train()
    opt = trainer.optimizer.optimizer
    assert type(opt) is hf_win.get_optimizer_spec(name).cls
    assert {g["acceleration_mode"] for g in opt.param_groups} == {"win2"}
    assert {tuple(g["reckless_steps"]) for g in opt.param_groups} == {(1.5, 6.0)}
    assert {g["win_weight_decay"] for g in opt.param_groups} == {0.1, 0.0}
    key, value = {"muon_win": ("ns_steps", 3), "adafactor_win": ("eps", (None, 0.002)),
                  "nadam_win": ("momentum_decay", 0.005), "radam_win": ("foreach", False)}[name]
    assert all(g[key] == value for g in opt.param_groups if name != "muon_win" or g["use_muon"])
    assert not torch.equal(before, model.transformer.h[0].attn.c_attn.weight)
    assert "y" in opt.state[model.transformer.h[0].attn.c_attn.weight]
    summary = trainer.win_optimizer_summary
    assert summary["class"] == type(opt).__name__ and summary["step_path_taken"].endswith("then win2 on c kernel")
    if name == "muon_win":  # the Trainer gave the model: embeddings to AdamW, hidden matrices to Muon
        emb = model.transformer.wte.weight
        assert not next(g for g in opt.param_groups if any(p is emb for p in g["params"]))["use_muon"]


def test_every_optim_args_key_reaches_the_base():
    """Each --optim_args key of the wrapped names lands in the base's param groups under torch's name."""
    from hf_win import get_optimizer_cls_and_kwargs
    from hf_win.training_args import optim_args_keys

    given = {"beta2_decay": ("-0.5", "beta2_decay", -0.5), "d": ("2.0", "d", 2.0), "eps2": ("0.002", "eps", (None, 0.002)),
             "foreach": ("false", "foreach", False), "maximize": ("true", "maximize", True),
             "momentum_decay": ("0.005", "momentum_decay", 0.005), "momentum": ("0.9", "momentum", 0.9),
             "nesterov": ("false", "nesterov", False), "ns_steps": ("3", "ns_steps", 3),
             "match_rms_adamw": ("false", "adjust_lr_fn", "original")}
    for name in NAMES:
        keys = optim_args_keys(name)
        assert set(keys) <= set(given), name
        args = hf_win.WinTrainingArguments(output_dir="x", report_to="none", optim=name,
                                           optim_args=",".join(f"{k}={given[k][0]}" for k in keys))
        cls, kw = get_optimizer_cls_and_kwargs(args)
        opt = cls([torch.nn.Parameter(torch.ones(3, 2))], **kw)
        for k in keys:
            _, group_key, value = given[k]
            assert all(g[group_key] == value for g in opt.param_groups), (name, k)
