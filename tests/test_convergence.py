"""benchmarks/convergence.py: the --quick grid produces every output, well formed and self-consistent.

These tests check the plumbing (every run of the grid is there, through WinTrainer, with the learning
rate it claims, steps-to-target agreeing with the curve, tables and plots written), not that Win wins.
"""

import csv
import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _load():
    spec = importlib.util.spec_from_file_location("hfwin_convergence", ROOT / "benchmarks" / "convergence.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # the module's dataclasses look themselves up there
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def conv():
    return _load()


@pytest.fixture(scope="module")
def quick(conv, tmp_path_factory):
    out = tmp_path_factory.mktemp("convergence_quick")
    assert conv.main(["--quick", "--out", str(out)]) == 0
    return out


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_quick_grid_every_run_present_and_consistent(conv, quick):
    rows = _rows(quick / "runs.csv")
    opts, mults, seeds = conv.QUICK["optimizers"], conv.QUICK["lr_multipliers"], conv.QUICK["seeds"]
    expected = {(t, o, m, str(x), str(s)) for t in conv.TASKS for o in opts for m in conv.MODES
                for x in mults for s in seeds}
    got = [(r["task"], r["optimizer"], r["mode"], r["lr_mult"], r["seed"]) for r in rows]
    assert len(got) == len(set(got)) == len(expected)
    assert set(got) == expected
    for r in rows:
        task = conv.TASKS[r["task"]]
        assert r["optimizer_class"] == conv.get_optimizer_spec(r["optimizer"]).cls.__name__
        assert math.isclose(float(r["lr"]), float(r["base_lr"]) * float(r["lr_mult"]), rel_tol=1e-12)
        assert r["metric_name"] == task.metric
        assert int(r["steps"]) == conv.QUICK["steps"]
        assert r["diverged"] in ("True", "False")
        if r["diverged"] == "False":
            assert math.isfinite(float(r["final_train_loss"])) and float(r["final_train_loss"]) > 0
            m = float(r["heldout_metric"])
            assert (0.0 <= m <= 1.0) if task.metric == "accuracy" else (m >= 1.0)


def test_quick_curves_and_steps_to_target_agree(conv, quick):
    runs = _rows(quick / "runs.csv")
    curves = {}
    for c in _rows(quick / "curves.csv"):
        curves.setdefault((c["task"], c["optimizer"], c["mode"], c["lr_mult"], c["seed"]), []).append(
            (int(c["step"]), float(c["train_loss"])))
    steps = conv.QUICK["steps"]
    logged = list(range(conv.LOG_EVERY, steps + 1, conv.LOG_EVERY))
    for r in runs:
        curve = curves[(r["task"], r["optimizer"], r["mode"], r["lr_mult"], r["seed"])]
        assert [s for s, _ in curve] == logged
        target = float(r["target_loss"])
        first = next((s for s, l in curve if l <= target), None)
        assert (r["steps_to_target"] or None) == (str(first) if first is not None else None)
        tail = [l for _, l in curve][-max(1, len(curve) // 10):]
        assert math.isclose(float(r["final_train_loss"]), sum(tail) / len(tail), rel_tol=1e-9)
    # the target: the vanilla optimizer at 1x, mean over seeds, has made TARGET_FRACTION of its loss reduction
    for (task, opt) in {(r["task"], r["optimizer"]) for r in runs}:
        van = [r for r in runs if (r["task"], r["optimizer"], r["mode"], r["lr_mult"]) == (task, opt, "none", "1")]
        final = sum(float(r["final_train_loss"]) for r in van) / len(van)
        first = sum(curves[(task, opt, "none", "1", r["seed"])][0][1] for r in van) / len(van)
        tgt = {float(r["target_loss"]) for r in runs if (r["task"], r["optimizer"]) == (task, opt)}
        assert len(tgt) == 1
        assert math.isclose(tgt.pop(), first - conv.TARGET_FRACTION * (first - final), rel_tol=1e-9)


def test_quick_tables_plots_and_command(conv, quick):
    md = (quick / "summary.md").read_text()
    assert "--quick" in (quick / "command.txt").read_text()
    for task in conv.TASKS:
        assert f"## {task}" in md
    header = "| optimizer | lr x | " + " | ".join(conv.MODES) + " |"
    assert md.count(header) == 3 * len(conv.TASKS)  # loss, held-out metric, steps to target, per task
    for opt in conv.QUICK["optimizers"]:
        for mult in conv.QUICK["lr_multipliers"]:
            # one row per (optimizer, multiplier) in each of the 4 tables of each task, every cell filled
            lines = [l for l in md.splitlines() if l.startswith(f"| {opt} | {mult} |")]
            assert len(lines) == 4 * len(conv.TASKS)
            for line in lines:
                cells = [c.strip() for c in line.strip("|").split("|")]
                assert len(cells) in (2 + len(conv.MODES) + 1, 2 + 2 * (len(conv.MODES) - 1)) and all(cells[2:])
            paired = [l for l in lines if "/" in l.split("|")[3] and "±" not in l]
            for line in paired:  # "k/n" with n = number of seeds
                for cell in line.strip("|").split("|")[2:]:
                    k, n = map(int, cell.strip().split("/"))
                    assert 0 <= k <= n == len(conv.QUICK["seeds"])
    for task in conv.TASKS:
        for name in (f"loss_curves_{task}.png", f"robustness_{task}.png"):
            data = (quick / name).read_bytes()
            assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    meta = json.loads((quick / "meta.json").read_text())
    assert meta["command"].startswith("python benchmarks/convergence.py --quick")


def test_report_stage_rebuilds_the_same_tables(conv, quick, tmp_path):
    before = (quick / "summary.md").read_text()
    runs_before = (quick / "runs.csv").read_text()
    assert conv.main(["--quick", "--out", str(quick), "--stage", "report"]) == 0
    assert (quick / "summary.md").read_text() == before
    assert (quick / "runs.csv").read_text() == runs_before


def test_wrapped_arm_tunes_vanilla_and_runs_every_mode(conv, tmp_path):
    """The Win(base) arm: tuning on vanilla over the optimizer's grid, then every mode at the tuned lr, through
    WinTrainer with the registry class (the recorded class and path are the wrapper's), tables written."""
    out = tmp_path / "wrapped"
    assert conv.main(["--stage", "wrapped", "--optimizers", "muon_win", "--steps", "5", "--seeds", "0",
                      "--lr-multipliers", "1", "--out", str(out)]) == 0
    tuned = json.loads((out / "tuned_lr_wrapped.json").read_text())["gpt2_stdlib"]["muon_win"]
    tuning = _rows(out / "tuning_wrapped.csv")
    assert [float(r["lr"]) for r in tuning] == list(conv.lr_grid("muon_win"))
    finite = [r for r in tuning if r["diverged"] == "False"] or tuning
    assert tuned == float(min(finite, key=lambda r: float(r["final_train_loss"]))["lr"])
    runs = _rows(out / "runs_wrapped.csv")
    assert sorted(r["mode"] for r in runs) == sorted(conv.MODES)
    for r in runs:
        assert r["optimizer_class"] == "MuonWin" and float(r["lr"]) == tuned
        assert r["step_path"].startswith("MuonAdamW step")
        assert ("then " + r["mode"]) in r["step_path"] or r["mode"] == "none"
    md = (out / "summary_wrapped.md").read_text()
    assert "| muon_win | 1 |" in md
    assert (out / "loss_curves_wrapped_gpt2_stdlib.png").read_bytes()[:4] == b"\x89PNG"


def test_bad_arguments_are_refused(conv):
    with pytest.raises(SystemExit) as e:
        conv.main(["--quick", "--optimizers", "adamw"])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        conv.main(["--quick", "--backend", "trainer+registry"])  # every run goes through WinTrainer: no --backend
    assert e.value.code == 2
