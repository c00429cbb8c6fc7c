"""A failing or hung rank fails the test instead of hanging it."""

import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "dist_workers"))
import launch  # noqa: E402


@pytest.mark.slow
def test_hung_rank_ends_the_launch_with_an_error():
    # The process-group timeout (5 s in the worker; 60-120 s in the parity workers) ends it, not the
    # subprocess timeout (a safety net, 120 s here).
    with pytest.raises(AssertionError) as err:
        launch.run(launch.torchrun("hang_worker.py"), timeout=120)
    assert str(err.value).startswith("exit code"), str(err.value)[:2000]


def test_subprocess_timeout_kills_the_whole_process_tree(tmp_path):
    pid_file = tmp_path / "child.pid"
    code = ("import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'], "
            "stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL); "
            f"open({str(pid_file)!r}, 'w').write(str(p.pid)); time.sleep(60)")
    with pytest.raises(AssertionError, match="timed out after 3s"):
        launch.run([sys.executable, "-c", code], timeout=3)
    child = int(pid_file.read_text())
    # The grandchild does not hold the output pipe, so only the process-group kill can have ended it.
    stat = Path(f"/proc/{child}/stat")
    for _ in range(100):  # SIGKILL is delivered asynchronously: wait (up to 10 s) for it to take effect
        if not stat.exists() or stat.read_text().split()[2] == "Z":
            break
        time.sleep(0.1)
    assert not stat.exists() or stat.read_text().split()[2] == "Z", "grandchild survived the timeout"
