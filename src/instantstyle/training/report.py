"""What a run shows besides the progress bar: ``metrics.jsonl``, validation grids, the loss plot.

* ``OUT/metrics.jsonl``: one line per optimiser step, ``{"step", "loss", "lr", "time"}``
  (``time``: seconds of training since the run began, across resumes).  A resumed run first
  drops the lines after its checkpoint (those steps are trained again), so the steps in the
  file are always 1, 2, 3, ... once each.
* ``OUT/validation/step-<N>.png``: one row per reference image (LoRA: one row), one column per
  prompt, made with the pipeline itself (the trained adapter or LoRA in place) from fixed seeds.
* ``OUT/loss.png``: loss over steps (matplotlib, Agg backend), at the end of a run.
"""
from __future__ import annotations

import json
import os

import torch

from ..pipelines.outputs import atomic_write_bytes, save_image

METRICS = "metrics.jsonl"


def read_metrics(out_dir: str) -> list[dict]:
    """Complete lines of ``metrics.jsonl`` (a line cut by a kill is left out)."""
    path = os.path.join(out_dir, METRICS)
    rows = []
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.endswith("\n"):
                    try:
                        rows.append(json.loads(line))
                    except ValueError:
                        pass
    except FileNotFoundError:
        pass
    return rows


def reset_metrics(out_dir: str, up_to_step: int) -> None:
    """Keep the lines of steps ``1..up_to_step`` (a fresh run: none), atomically."""
    rows = [r for r in read_metrics(out_dir) if isinstance(r.get("step"), int) and r["step"] <= up_to_step]
    atomic_write_bytes(os.path.join(out_dir, METRICS), "".join(json.dumps(r) + "\n" for r in rows).encode())


class MetricsWriter:
    def __init__(self, out_dir: str):
        self.file = open(os.path.join(out_dir, METRICS), "a", encoding="utf-8")

    def write(self, step: int, loss: float, lr: float, seconds: float) -> None:
        self.file.write(json.dumps({"step": step, "loss": loss, "lr": lr, "time": round(seconds, 3)}) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def plot_loss(out_dir: str) -> str | None:
    """``OUT/loss.png`` from ``metrics.jsonl``; None when matplotlib is missing or nothing ran."""
    rows = read_metrics(out_dir)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    if not rows:
        return None
    import io

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    steps, losses = [r["step"] for r in rows], [r["loss"] for r in rows]
    ax.plot(steps, losses, lw=0.8, alpha=0.5, label="loss")
    window = max(1, len(losses) // 50)
    if window > 1:
        smooth = [sum(losses[max(0, i - window + 1): i + 1]) / len(losses[max(0, i - window + 1): i + 1])
                  for i in range(len(losses))]
        ax.plot(steps, smooth, lw=1.5, label=f"mean of {window}")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    path = os.path.join(out_dir, "loss.png")
    atomic_write_bytes(path, buf.getvalue())
    return path


def grid(images, rows: int, cols: int):
    from PIL import Image

    w, h = images[0].size
    canvas = Image.new("RGB", (cols * w, rows * h), "white")
    for i, image in enumerate(images):
        canvas.paste(image.convert("RGB"), ((i % cols) * w, (i // cols) * h))
    return canvas


@torch.no_grad()
def validation_grid(pipe, conditioner, references, prompts, resolution: int, steps: int, guidance: float,
                    seed: int, out_path: str) -> str:
    """Generate every (reference, prompt) pair through ``pipe`` and save the grid."""
    from PIL import Image

    images = []
    for r, reference in enumerate(references or [None]):  # no references (LoRA): one row of prompts
        extra = {}
        if reference is not None:
            with Image.open(reference) as opened:
                image = opened.convert("RGB")
            embeds = conditioner.image_embeds([image], torch.tensor([False]))
            if guidance > 1:
                negative = conditioner.image_embeds([image], torch.tensor([True]))
                embeds = torch.cat([negative, embeds])
            extra["ip_adapter_image_embeds"] = [embeds.to(pipe.unet.dtype)]
        for p, prompt in enumerate(prompts):
            generator = torch.Generator(device="cpu").manual_seed(seed + r * len(prompts) + p)
            images.append(pipe(prompt=prompt, height=resolution, width=resolution, num_inference_steps=steps,
                               guidance_scale=guidance, generator=generator, **extra).images[0])
    os.makedirs(os.path.dirname(out_path), exist_ok=True)
    save_image(grid(images, max(1, len(references)), len(prompts)), out_path)
    return out_path
