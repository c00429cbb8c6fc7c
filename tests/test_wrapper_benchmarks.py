"""The benchmark rows of ``hf_win.Win`` (never timed here): ``step_time.py`` runs the wrapper around torch's
fused AdamW in the AdamW-Win group and says so; ``memory_floor.py --report state`` measures what the wrapper
keeps (the base's state plus x, and y for Win2) and allocates during a step (one parameter-sized copy)."""

import csv
import importlib.util
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


def _load(name):
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(f"{name}_bench", BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_step_time_has_the_wrapper_row_next_to_adamw_win(tmp_path):
    bench = _load("step_time")
    bench.main(["--params", "tiny", "--optimizers", "adamw_win", "--modes", "win", "win2", "--paths", "foreach",
                "--repeats", "1", "--warmup", "0", "--no_memory", "--out", str(tmp_path)])
    rows = list(csv.DictReader(open(tmp_path / "step_time_tiny_cpu.csv")))
    for mode in ("win", "win2"):
        group = [r for r in rows if r["group"] == f"adamw_win/{mode}"]
        wrapped = [r for r in group if r["path"] == "wrapper"]
        assert len(wrapped) == 1 and wrapped[0]["runs"] == "wrapper" and wrapped[0]["mode"] == mode
        assert wrapped[0]["optimizer"] == "hf_win.Win(torch.optim.AdamW(fused=True))"
        assert float(wrapped[0]["ratio_to_torch_fused_adamw"]) > 0
        # the wrapper keeps torch's two moments, one step count per parameter and x (y)
        assert float(wrapped[0]["state_bytes_per_param_byte"]) == pytest.approx(3 if mode == "win" else 4, abs=0.02)
        assert {r["path"] for r in group} >= {"foreach", "fused", "wrapper"}
    md = (tmp_path / "step_time_tiny_cpu.md").read_text()
    assert "| hf_win.Win(torch.optim.AdamW(fused=True)) | win | wrapper | float32 | wrapper |" in md


def test_memory_floor_state_rows_of_the_wrapper(tmp_path):
    bench = _load("memory_floor")
    rows, n, shapes = bench.state_memory(40_000, names=["Win(torch.optim.AdamW)", "torch.optim.AdamW", "nadam_win"])
    by = {(r["optimizer"], r["mode"], r["path"]): r for r in rows}
    torch_fused = by[("torch.optim.AdamW", "-", "fused")]
    for mode, extra in (("win", 1), ("win2", 2)):
        r = by[("Win(torch.optim.AdamW)", mode, "fused")]
        # torch's state plus x (and y), 4 bytes each per float32 parameter
        assert r["state_bytes_per_param"] == pytest.approx(torch_fused["state_bytes_per_param"] + 4 * extra, abs=0.01)
        # one transient parameter-sized copy (the parameters before the base's step); the pass is a kernel
        assert 4.0 <= r["transient_peak_per_param"] - torch_fused["transient_peak_per_param"] <= 4.2
        assert r["path_taken"] == f"AdamW step, then {mode} on c kernel"
    for mode, extra in (("none", 0), ("win", 1), ("win2", 2)):
        r = by[("nadam_win", mode, "default")]
        assert r["state_bytes_per_param"] == pytest.approx(8 + 4 * extra, abs=0.01)
    bench.write_state_report(rows, n, shapes, tmp_path, ["--report", "state"])
    assert "| Win(torch.optim.AdamW) | win2 | fused |" in (tmp_path / "memory_state_cpu.md").read_text()
