"""The benchmark scripts run and write what they promise (tiny sizes; never timed)."""

import csv
import importlib.util
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


# the schedule case counts the kernels it builds: its own cache folder, no kernel loaded before it
pytestmark = pytest.mark.usefixtures("fresh_kernel_cache")


def _load_benchmark(name):
    spec = importlib.util.spec_from_file_location(f"{name}_bench", BENCHMARKS / f"{name}.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_step_time_benchmark_writes_its_tables(tmp_path):
    """benchmarks/step_time.py (never timed here): --quick writes its table with the path that ran, and the
    schedule case records that OneCycleLR built no more kernels than a constant schedule."""
    bench = _load_benchmark("step_time")
    bench.main(["--quick", "--out", str(tmp_path), "--no_memory"])
    rows = list(csv.DictReader(open(tmp_path / "step_time_tiny_cpu.csv")))
    ours = [r for r in rows if r["optimizer"] == "adamw_win"]
    assert ours and all(r["runs"] in ("kernel", "eager") for r in ours)
    assert any(r["runs"] == "kernel" and r["backend"] == "c" for r in ours)
    bench.main(["--params", "tiny", "--optimizers", "adamw_win", "--modes", "win", "--schedule", "--schedule_steps",
                "5", "--out", str(tmp_path)])
    sched = list(csv.DictReader(open(tmp_path / "step_time_tiny_cpu_schedule.csv")))
    assert {r["schedule"] for r in sched} == {"constant", "OneCycleLR"}
    assert all(r["kernels_built"] == "1;1" for r in sched)
