"""Shared by the train-adapter and train-lora tests: the CLI run as a user runs it (a
subprocess), two torchrun ranks, and a run killed mid-way then resumed."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import torch

from instantstyle.training.report import read_metrics


def cli_env() -> dict:
    # one thread a process: two ranks on two cores, and unbuffered output for the kill test's polling
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def assert_same_weights(a: dict, b: dict, atol: float = 0.0) -> None:
    """Equal state dicts, each tensor within ``atol``; see ``reordered_atol``."""
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=atol, rtol=0, msg=lambda m, key=key: f"{key}: {m}")


def reordered_atol(lr: float) -> float:
    """How far two runs of the same steps may drift when only their float sums are ordered
    differently (2 ranks' all-reduce, another thread count): Adam divides each gradient by its own
    magnitude, so a near-zero gradient whose last bits differ moves its weight by a visible part of
    one lr step. A lost, repeated or mis-sharded step moves weights by whole lr steps."""
    return lr / 100


def run_two_ranks(cli_args: list, port_base: int) -> subprocess.CompletedProcess:
    """``torchrun --nproc-per-node 2 -m instantstyle ...`` (gloo on CPU); a port per test file and pid."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-port", str(port_base + os.getpid() % 1000), "-m", "instantstyle", *cli_args]
    return subprocess.run(cmd, capture_output=True, text=True, env=cli_env(), timeout=300, check=False)


def kill_mid_run_then_resume(cli_args: list, out, steps: int, *resume_extra: str) -> subprocess.CompletedProcess:
    """SIGKILL the run (its whole process group) after 3 of ``steps`` logged steps, then rerun it
    with ``--resume latest``; returns the resumed run."""
    proc = subprocess.Popen([sys.executable, "-m", "instantstyle", *cli_args], env=cli_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.time() + 240
    while len(read_metrics(str(out))) < 3 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = len(read_metrics(str(out)))
    assert 3 <= done < steps, f"the run was not killed mid-way ({done} steps)"
    return subprocess.run([sys.executable, "-m", "instantstyle", *cli_args, "--resume", "latest", *resume_extra],
                          env=cli_env(), capture_output=True, text=True, timeout=300, check=False)
