"""train-adapter under the shipped DeepSpeed ZeRO-2 accelerate config, on CPU: one process
(accelerate connects DeepSpeed ranks on GPUs only) gives the weights of the plain run, a
resumed run those of one run in one go (the ZeRO optimizer state goes through accelerate's
save_state), and several CPU processes are refused in one line rather than training apart.
Needs deepspeed (the test extra installs it)."""
from __future__ import annotations

import subprocess
import sys

import pytest
import yaml
from helpers.training_runs import assert_same_weights, cli_env, reordered_atol
from safetensors.torch import load_file

from instantstyle.training import DEEPSPEED_CONFIG

pytest.importorskip("deepspeed")

RES = 32


def _config(tmp_path, processes: int):
    """The shipped config with this machine's process count (it ships for 8 GPUs)."""
    with open(DEEPSPEED_CONFIG, encoding="utf-8") as f:
        config = yaml.safe_load(f)
    assert config["distributed_type"] == "DEEPSPEED" and config["deepspeed_config"]["zero_stage"] == 2
    path = tmp_path / f"deepspeed-{processes}.yaml"
    path.write_text(yaml.safe_dump(dict(config, num_processes=processes)))
    return path


def _train(root, config, out, *extra):
    """``train-adapter`` as a subprocess: under ``accelerate launch --config_file config``, or
    plain with ``config=None`` (the same thread settings either way, so the sums match)."""
    launcher = ["-m", "accelerate.commands.launch", "--config_file", str(config)] if config else []
    cmd = [sys.executable, *launcher, "-m", "instantstyle", "train-adapter", "--model", str(root / "model"),
           "--image-encoder", str(root / "image_encoder"), "--data", str(root / "data" / "pairs.jsonl"),
           "--out", str(out), "--resolution", str(RES), "--seed", "5", "--batch-size", "2", "--checkpoint-every", "2",
           "--device", "cpu", "--threads", "1", "--no-progress", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, env=cli_env(), timeout=300, check=False)


def _weights(out):
    return load_file(str(out / "final" / "ip_adapter.safetensors"))


@pytest.mark.slow
def test_zero2_on_one_cpu_process_equals_the_plain_run_and_resumes_exactly(train_root, tmp_path):
    config = _config(tmp_path, 1)
    for out, launch in (("ds", config), ("plain", None)):
        proc = _train(train_root, launch, tmp_path / out, "--max-steps", "4")
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "ds" / "checkpoints" / "checkpoint-4" / "accelerate").is_dir()  # ZeRO's sharded state
    weights = _weights(tmp_path / "ds")
    assert_same_weights(weights, _weights(tmp_path / "plain"), atol=reordered_atol(1e-4))  # train-adapter's lr
    for steps, extra in (("2", ()), ("4", ("--resume", "latest"))):
        proc = _train(train_root, config, tmp_path / "resumed", "--max-steps", steps, *extra)
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_weights(_weights(tmp_path / "resumed"), weights)


@pytest.mark.slow
def test_several_cpu_processes_under_deepspeed_are_refused_in_one_line(train_root, tmp_path):
    proc = _train(train_root, _config(tmp_path, 2), tmp_path / "two", "--max-steps", "2")
    errors = [line for line in proc.stderr.splitlines() if line.startswith("instantstyle: error:")]
    assert proc.returncode != 0 and errors, proc.stderr[-3000:]
    assert all("DeepSpeed on CPU: accelerate connects DeepSpeed ranks on GPUs only, so 2 CPU processes" in e
               for e in errors)
    assert not (tmp_path / "two").exists()  # refused before anything is written
