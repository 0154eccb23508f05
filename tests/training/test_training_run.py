"""Training runs on the tiny SDXL pipeline: the loss falls on a fixed batch; a resumed run equals
one run in one go; a killed run resumes without losing or repeating a step; 1 process equals 2
processes (torchrun, gloo) at the same global batch; diffusers' own pipe.load_ip_adapter reads
the export."""
from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file

from helpers.training_runs import assert_same_weights, kill_mid_run_then_resume, reordered_atol, run_two_ranks
from instantstyle.pipelines.errors import UserError
from instantstyle.training import train_adapter
from instantstyle.training.report import read_metrics

RES = 32


def _kwargs(root, out, **extra):
    return dict(dict(image_encoder=str(root / "image_encoder"), resolution=RES, batch_size=2, max_steps=4,
                     checkpoint_every=2, keep_checkpoints=1, seed=5, device="cpu", progress=False), **extra) | {
        "model": str(root / "model"), "data": str(root / "data" / "pairs.jsonl"), "out": str(out)}


def _weights(out):
    return load_file(str(out / "final" / "ip_adapter.safetensors"))


def test_loss_falls_on_a_fixed_batch(train_root):
    from diffusers import DDPMScheduler, DiffusionPipeline
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    from instantstyle.training.data import Loader, read_dataset
    from instantstyle.training.loop import Conditioner, Drops, micro_step
    from instantstyle.training.model import install_adapter, trainable_parameters

    pipe = DiffusionPipeline.from_pretrained(str(train_root / "model"))
    encoder = CLIPVisionModelWithProjection.from_pretrained(str(train_root / "image_encoder"))
    install_adapter(pipe.unet, "style", "base", encoder.config, seed=0)
    conditioner = Conditioner(pipe, encoder, CLIPImageProcessor.from_pretrained(str(train_root / "image_encoder")),
                              "base", "cpu")
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    load = Loader(read_dataset(str(train_root / "folder")), RES, seed=0)
    batch = [load(0), load(1)]  # the same samples, hence the same noise and timesteps, every iteration
    optimizer = torch.optim.AdamW([p for _, p in trainable_parameters(pipe.unet)], lr=1e-2)
    losses = []
    for _ in range(25):
        out = micro_step(pipe.unet, conditioner, scheduler, batch, 0, Drops(0, 0, 0), 0.0, RES)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(out.loss.item())
    assert losses[-1] < 0.96 * losses[0] and min(losses[-5:]) < min(losses[:5]), losses


def test_resume_equals_one_go_and_diffusers_reads_the_export(train_root, tmp_path, capsys):
    one, two = tmp_path / "one", tmp_path / "two"
    result = train_adapter(**_kwargs(train_root, one))
    assert result["step"] == 4 and "skipped 3 bad row(s)" in capsys.readouterr().err
    train_adapter(**_kwargs(train_root, two, max_steps=2))
    train_adapter(**_kwargs(train_root, two, resume="latest"))
    assert_same_weights(_weights(one), _weights(two))  # bitwise
    assert_same_weights(load_file(str(one / "checkpoints" / "checkpoint-4" / "adapter.safetensors")),
                 load_file(str(two / "checkpoints" / "checkpoint-4" / "adapter.safetensors")))
    assert [r["step"] for r in read_metrics(str(two))] == [1, 2, 3, 4]
    assert [r["loss"] for r in read_metrics(str(two))] == [r["loss"] for r in read_metrics(str(one))]
    assert os.listdir(two / "checkpoints") == ["checkpoint-4"]  # keep 1
    assert (one / "loss.png").stat().st_size > 0
    with pytest.raises(UserError, match="trained with seed=5, this run has 6"):
        train_adapter(**_kwargs(train_root, two, resume="latest", seed=6, max_steps=6))

    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(str(train_root / "model"))
    pipe.load_ip_adapter(str(one / "final"), subfolder="", weight_name="ip_adapter_diffusers.safetensors",
                         image_encoder_folder=None)  # diffusers' own loader: every layer present
    assert type(pipe.unet.attn_processors["up_blocks.0.attentions.1.transformer_blocks.0.attn2.processor"]).__name__ \
        == "IPAdapterAttnProcessor2_0"


def _cli(root, out, *extra):
    return ["train-adapter", "--model", str(root / "model"), "--image-encoder", str(root / "image_encoder"),
            "--data", str(root / "data" / "pairs.jsonl"), "--out", str(out), "--resolution", str(RES), "--seed", "5",
            "--device", "cpu", "--threads", "1", "--no-progress", *extra]


@pytest.mark.slow
def test_one_process_equals_two_processes_at_the_same_global_batch(train_root, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    # one process, 2 micro-batches of 2 vs two processes, 1 micro-batch of 2 each: one global batch of 4
    train_adapter(**_kwargs(train_root, one, batch_size=4, max_steps=3, gradient_accumulation=2))
    args = _cli(train_root, two, "--batch-size", "4", "--max-steps", "3", "--checkpoint-every", "2",
                "--validation-every", "3", "--validation-prompts", "a dog", "a cat",
                "--validation-images", str(train_root / "style.png"), "--validation-inference-steps", "2")
    proc = run_two_ranks(args, port_base=29600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_weights(_weights(one), _weights(two), atol=reordered_atol(1e-4))  # train_adapter's default lr
    assert [r["step"] for r in read_metrics(str(two))] == [1, 2, 3]
    losses = zip(read_metrics(str(one)), read_metrics(str(two)))
    assert all(abs(a["loss"] - b["loss"]) < 1e-5 for a, b in losses)
    assert (two / "validation" / "step-000003.png").is_file()
    from PIL import Image

    assert Image.open(two / "validation" / "step-000003.png").size == (2 * RES, RES)  # 1 reference x 2 prompts


@pytest.mark.slow
def test_a_killed_run_resumes_without_losing_or_repeating_a_step(train_root, tmp_path):
    out, steps = tmp_path / "killed", 8
    args = _cli(train_root, out, "--batch-size", "2", "--max-steps", str(steps), "--checkpoint-every", "1",
                "--keep-checkpoints", "2")
    proc = kill_mid_run_then_resume(args, out, steps)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [r["step"] for r in read_metrics(str(out))] == list(range(1, steps + 1))
    assert set(os.listdir(out / "checkpoints")) == {f"checkpoint-{steps - 1}", f"checkpoint-{steps}"}  # keep 2
    reference = tmp_path / "reference"
    train_adapter(**_kwargs(train_root, reference, max_steps=steps, checkpoint_every=0))
    assert_same_weights(_weights(out), _weights(reference), atol=reordered_atol(1e-4))  # train_adapter's default lr
    assert [r["loss"] for r in read_metrics(str(out))] == pytest.approx([r["loss"] for r in read_metrics(str(reference))],
                                                                       abs=1e-6)


def test_cli_mistakes_are_one_line_errors_before_any_model_loads(train_root, tmp_path, capsys):
    from instantstyle.cli import main

    base = _cli(train_root, tmp_path / "bad")
    assert main([*base, "--batch-size", "3", "--gradient-accumulation", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("instantstyle: error: --batch-size 3 (the global batch) must be a multiple") and "\n" not in err
    assert main([*base, "--validation-every", "5"]) == 2
    assert "needs --validation-prompts and --validation-images" in capsys.readouterr().err
    assert main([*base, "--data", str(tmp_path / "nothing.jsonl")]) == 2  # the last --data wins
    assert "--data: no such file or folder" in capsys.readouterr().err
