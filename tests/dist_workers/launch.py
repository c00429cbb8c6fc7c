"""Run a 2-process launch from a test: a free port, one thread per process, a hard timeout that kills the
whole process tree (a rank that dies or hangs fails the test instead of hanging it), and the output shown
when it fails."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

from hf_win._offline import use_offline_defaults

WORKERS = Path(__file__).resolve().parent
ROOT = WORKERS.parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(script: str, *args: str, nproc: int = 2) -> list:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
            "--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(WORKERS / script), *args]


def accelerate_launch(script: str, *args: str, nproc: int = 2, extra=()) -> list:
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(nproc),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_ip", "127.0.0.1", "--main_process_port", str(free_port()), *extra,
            str(WORKERS / script), *args]


def run(cmd: list, timeout: float, cwd=None) -> str:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(WORKERS)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env.setdefault("OMP_NUM_THREADS", "1")
    use_offline_defaults(env)
    proc = subprocess.Popen(cmd, cwd=cwd or ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and every rank it started
        out, _ = proc.communicate()
        raise AssertionError(f"timed out after {timeout}s: {' '.join(cmd)}\n{_tail(out)}")
    if proc.returncode != 0:
        raise AssertionError(f"exit code {proc.returncode}: {' '.join(cmd)}\n{_tail(out)}")
    return out


def _tail(out: str, n: int = 80) -> str:
    lines = [l for l in (out or "").splitlines() if "Warning" not in l and "warnings.warn" not in l]
    return "\n".join(lines[-n:])
