"""train-lora on the tiny SDXL pipeline: LoRA (peft) only on the target blocks' attention
projections; only those weights change while the loss falls on a fixed batch; the export in
diffusers' LoRA format loads (diffusers' own load_lora_weights) to the trained UNet's output and
to W x + (alpha / r) B A x by hand in float64; a resumed run equals one run in one go; 1 process
equals 2 processes (gloo) at the same global batch; a killed run resumes without losing or
repeating a step; CLI mistakes and a missing peft are one-line errors."""
from __future__ import annotations

import json
import os
import sys

import pytest
import torch
from safetensors.torch import load_file

from helpers.training_runs import assert_same_weights, kill_mid_run_then_resume, reordered_atol, run_two_ranks
from instantstyle.pipelines.errors import UserError
from instantstyle.training import train_lora
from instantstyle.training.lora import (
    WEIGHT_NAME,
    install_lora,
    lora_modules,
    write_lora,
)
from instantstyle.training.report import read_metrics

RES = 32
LR = 1e-3
STYLE, CONTENT = "up_blocks.0.attentions.1.", "up_blocks.0.attentions.0."


def _pipe(root):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(str(root / "model"))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _by_hand(root, blocks):
    """Every to_q/to_k/to_v/to_out.0 Linear of attn1 and attn2 under ``blocks``, from the module tree."""
    unet = _pipe(root).unet
    return [n for n, m in unet.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith(blocks)
            and n.split(".")[-3 if n.endswith("to_out.0") else -2] in ("attn1", "attn2")
            and n.endswith(("to_q", "to_k", "to_v", "to_out.0"))]


def test_lora_goes_into_the_target_blocks_projections_only(train_root):
    assert lora_modules(_pipe(train_root).unet, "b-lora-style") == _by_hand(train_root, (STYLE,))
    assert lora_modules(_pipe(train_root).unet, "b-lora-content") == _by_hand(train_root, (CONTENT,))
    assert sorted(lora_modules(_pipe(train_root).unet, "b-lora")) == sorted(_by_hand(train_root, (STYLE, CONTENT)))
    assert len(_by_hand(train_root, (STYLE,))) == 3 * 2 * 4  # 3 transformer blocks x attn1/attn2 x 4 projections
    unet = _pipe(train_root).unet
    modules = install_lora(unet, "b-lora-style", rank=2, seed=0)
    trained = [n for n, p in unet.named_parameters() if p.requires_grad]
    assert len(trained) == 2 * len(modules) and all(n.startswith(STYLE) and ".lora_" in n for n in trained)
    again = _pipe(train_root).unet
    install_lora(again, "b-lora-style", rank=2, seed=0)
    assert all(torch.equal(p, dict(again.named_parameters())[n]) for n, p in unet.named_parameters())  # seed alone
    with pytest.raises(ValueError, match=r"unknown preset 'b-lora-sytle'.*b-lora-style"):
        install_lora(_pipe(train_root).unet, "b-lora-sytle")
    with pytest.raises(ValueError, match="rank: expected a positive integer, got 0"):
        install_lora(_pipe(train_root).unet, "b-lora", rank=0)


def _train_in_memory(root, target, rank, alpha, steps=25):
    from diffusers import DDPMScheduler

    from instantstyle.training.data import Loader, read_dataset
    from instantstyle.training.loop import Conditioner, Drops, micro_step

    pipe = _pipe(root)
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    install_lora(pipe.unet, target, rank=rank, alpha=alpha, seed=0)
    conditioner = Conditioner(pipe, None, None, None, "cpu")
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    load = Loader(read_dataset(str(root / "folder")), RES, seed=0)
    batch = [load(0), load(1)]  # the same samples, hence the same noise and timesteps, every iteration
    params = [p for p in pipe.unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    losses = []
    for _ in range(steps):
        out = micro_step(pipe.unet, conditioner, scheduler, batch, 0, Drops(0, 0, 0), 0.0, RES)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(out.loss.item())
    return pipe, before, losses


def _unet_inputs(seed=0, batch=2):
    g = torch.Generator().manual_seed(seed)
    return {"sample": torch.randn(batch, 4, 16, 16, generator=g), "timestep": torch.tensor([10, 700]),
                "encoder_hidden_states": torch.randn(batch, 7, 32, generator=g),
                "added_cond_kwargs": {"text_embeds": torch.randn(batch, 24, generator=g),
                                   "time_ids": torch.tensor([[32.0, 40, 0, 4, 32, 32]] * batch)}}


@torch.no_grad()
def _unet_out(unet, seed=0):
    return unet(**_unet_inputs(seed)).sample


def test_loss_falls_only_lora_weights_change_and_the_export_loads_to_the_same_output(train_root, tmp_path):
    pipe, before, losses = _train_in_memory(train_root, "b-lora-style", rank=3, alpha=6.0)
    assert losses[-1] < 0.96 * losses[0] and min(losses[-5:]) < min(losses[:5]), losses
    after = pipe.unet.state_dict()
    frozen = {k.replace(".base_layer", ""): v for k, v in after.items() if ".lora_" not in k}
    assert frozen.keys() == before.keys() and all(torch.equal(frozen[k], before[k]) for k in before)
    ups = {k: v for k, v in after.items() if ".lora_B." in k}
    assert ups and all(k.startswith(STYLE) and v.abs().max() > 0 for k, v in ups.items())  # trained, in place
    trained = _unet_out(pipe.unet)

    pipe.unet.eval()
    paths = write_lora(pipe, str(tmp_path / "final"), {"steps": 25})
    state = load_file(paths[WEIGHT_NAME])
    assert all(k.startswith("unet." + STYLE) and k.endswith(("lora.down.weight", "lora.up.weight")) for k in state)

    fresh = _pipe(train_root)
    fresh.load_lora_weights(str(tmp_path / "final"))  # diffusers' own reader
    torch.testing.assert_close(_unet_out(fresh.unet), trained, atol=1e-5, rtol=1e-5)

    # one projection by hand, float64: W x + (alpha / r) B A x, with alpha / r folded into the file's B
    name = STYLE + "transformer_blocks.1.attn2.to_out.0"  # a projection with a bias
    base = dict(_pipe(train_root).unet.named_modules())[name]
    down, up = state[f"unet.{name}.lora.down.weight"].double(), state[f"unet.{name}.lora.up.weight"].double()
    peft_layer = dict(pipe.unet.named_modules())[name]
    a, b = peft_layer.lora_A["default"].weight.double(), peft_layer.lora_B["default"].weight.double()
    torch.testing.assert_close(up @ down, 2.0 * (b @ a), atol=1e-6, rtol=1e-6)  # alpha / r = 6 / 3
    x = torch.randn(5, 3, base.in_features, dtype=torch.float64)
    expected = x @ base.weight.double().T + base.bias.double() + x @ down.T @ up.T
    loaded = dict(fresh.unet.named_modules())[name]
    with torch.no_grad():
        torch.testing.assert_close(loaded(x.float()).double(), expected, atol=1e-5, rtol=1e-5)


def _kwargs(root, out, **extra):
    return dict({"target": "b-lora", "rank": 2, "lr": LR, "resolution": RES, "batch_size": 2, "max_steps": 4, "checkpoint_every": 2,
                     "keep_checkpoints": 1, "seed": 5, "device": "cpu", "progress": False}, **extra) | {
        "model": str(root / "model"), "data": str(root / "data" / "pairs.jsonl"), "out": str(out)}


def _weights(out):
    return load_file(str(out / "final" / WEIGHT_NAME))


def test_resume_equals_one_go(train_root, tmp_path, capsys):
    one, two = tmp_path / "one", tmp_path / "two"
    result = train_lora(**_kwargs(train_root, one))
    assert result["step"] == 4 and "skipped 3 bad row(s)" in capsys.readouterr().err
    assert {k.split(".lora")[0][len("unet."):] for k in _weights(one)} == set(_by_hand(train_root, (STYLE, CONTENT)))
    train_lora(**_kwargs(train_root, two, max_steps=2))
    train_lora(**_kwargs(train_root, two, resume="latest"))
    assert_same_weights(_weights(one), _weights(two))  # bitwise
    assert [r["step"] for r in read_metrics(str(two))] == [1, 2, 3, 4]
    assert [r["loss"] for r in read_metrics(str(two))] == [r["loss"] for r in read_metrics(str(one))]
    assert os.listdir(two / "checkpoints") == ["checkpoint-4"]  # keep 1
    assert (one / "loss.png").stat().st_size > 0
    with pytest.raises(UserError, match="trained with rank=2, this run has 4"):
        train_lora(**_kwargs(train_root, two, resume="latest", rank=4, max_steps=6))


def _cli(root, out, *extra):
    return ["train-lora", "--model", str(root / "model"), "--data", str(root / "data" / "pairs.jsonl"),
            "--out", str(out), "--resolution", str(RES), "--seed", "5", "--rank", "2", "--lr", str(LR),
            "--device", "cpu", "--threads", "1", "--no-progress", *extra]


@pytest.mark.slow
def test_one_process_equals_two_processes_at_the_same_global_batch(train_root, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    # one process, 2 micro-batches of 2 vs two processes, 1 micro-batch of 2 each: one global batch of 4
    train_lora(**_kwargs(train_root, one, batch_size=4, max_steps=3, gradient_accumulation=2))
    proc = run_two_ranks(_cli(train_root, two, "--target", "b-lora", "--batch-size", "4", "--max-steps", "3",
                               "--checkpoint-every", "2", "--validation-every", "3", "--validation-prompts", "a dog", "a cat",
                               "--validation-inference-steps", "2"), port_base=29700)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_weights(_weights(one), _weights(two), atol=reordered_atol(LR))
    assert [r["step"] for r in read_metrics(str(two))] == [1, 2, 3]
    assert all(abs(a["loss"] - b["loss"]) < 1e-5 for a, b in zip(read_metrics(str(one)), read_metrics(str(two))))
    from PIL import Image

    assert Image.open(two / "validation" / "step-000003.png").size == (2 * RES, RES)  # one row x 2 prompts


@pytest.mark.slow
def test_a_killed_run_resumes_without_losing_or_repeating_a_step(train_root, tmp_path):
    out, steps = tmp_path / "killed", 8
    args = _cli(train_root, out, "--batch-size", "2", "--max-steps", str(steps), "--checkpoint-every", "1",
                "--keep-checkpoints", "2")
    proc = kill_mid_run_then_resume(args, out, steps, "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["step"] == steps and result["exports"] == {WEIGHT_NAME: str(out / "final" / WEIGHT_NAME)}
    assert [r["step"] for r in read_metrics(str(out))] == list(range(1, steps + 1))
    assert set(os.listdir(out / "checkpoints")) == {f"checkpoint-{steps - 1}", f"checkpoint-{steps}"}  # keep 2
    reference = tmp_path / "reference"
    train_lora(**_kwargs(train_root, reference, max_steps=steps, checkpoint_every=0))
    assert_same_weights(_weights(out), _weights(reference), atol=reordered_atol(LR))


def test_cli_mistakes_and_a_missing_peft_are_one_line_errors(train_root, tmp_path, capsys, monkeypatch):
    from instantstyle.cli import main

    base = _cli(train_root, tmp_path / "bad")
    for extra, said in ((["--rank", "0"], "--rank: expected a positive integer, got 0"),
                        (["--lora-alpha", "-1"], "--lora-alpha: expected a positive number, got -1.0"),
                        (["--validation-every", "5"], "--validation-every: needs --validation-prompts"),
                        (["--batch-size", "3", "--gradient-accumulation", "2"], "--batch-size 3 (the global batch)"),
                        (["--target", "b-lora-sytle"], "--target: unknown preset 'b-lora-sytle'")):
        assert main([*base, *extra]) == 2, extra
        err = capsys.readouterr().err.strip().splitlines()[-1]  # after the data warning and progress lines
        assert err.startswith("instantstyle: error: ") and said in err, err
    monkeypatch.setitem(sys.modules, "peft", None)  # as if not installed
    assert main(base) == 2
    err = capsys.readouterr().err.strip()
    assert err == 'instantstyle: error: train-lora needs peft: pip install "instantstyle[train]"'
