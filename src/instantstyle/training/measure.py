"""Time and peak memory of one training step: style-block-only targets vs every cross-attention
layer (the original recipe), and a rank-64 B-LoRA on the style block (``train-lora``, with peft).

    python -m instantstyle.training.measure            # CPU: reduced SDXL layout, a table
    python -m instantstyle.training.measure --device cuda --full   # the real SDXL config

A step is the UNet part of training (forward with the adapter, backward, AdamW step) on
precomputed inputs: the frozen VAE and encoders cost the same for every target, so they are
left out.  The UNet has random weights from a config (no download).  On CPU it is the
bench's reduced SDXL layout (same block layout and module names as SDXL, fewer channels and
transformer layers), so only the ratios carry over.  Each target runs in its own process;
peak memory is the peak resident set (CPU, sampled every millisecond) or
``max_memory_allocated`` (CUDA) above what the process held before the first step.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    mid_block_type="UNetMidBlock2DCrossAttn", block_out_channels=(320, 640, 1280), transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20), cross_attention_dim=2048, use_linear_projection=True, norm_num_groups=32,
    addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
)
#: the bench's reduced layout (``bench/suite_unet.py``): same module names, a fraction of the work
REDUCED_UNET = dict(SDXL_UNET, block_out_channels=(32, 64, 128), attention_head_dim=(1, 1, 2),
                    transformer_layers_per_block=(1, 1, 2), sample_size=32)
#: row -> (what trains, target): an IP-Adapter into the style block or every layer (the original
#: recipe), or a rank-64 B-LoRA on the style block (``train-lora --target b-lora-style``)
TARGETS = {"style": ("ip", "style"), "all": ("ip", "all"), "b-lora-style": ("lora", "b-lora-style")}
LORA_RANK = 64
IMAGE_EMBED_DIM, TEXT_TOKENS = 1280, 77


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class _PeakRSS:
    """Peak resident set, sampled every millisecond on a thread."""

    def __init__(self):
        self.peak, self._stop = _rss(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss())
            time.sleep(0.001)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())


def measure_one(target: str, device: str = "cpu", full: bool = False, batch: int = 2, latent: int = 32,
                steps: int = 5, warmup: int = 2, checkpointing: bool = False) -> dict:
    import torch
    from diffusers import UNet2DConditionModel

    from .model import install_adapter, trainable_parameters

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**(SDXL_UNET if full else REDUCED_UNET)).to(device)
    if full and device.startswith("cuda"):
        unet.half()
    kind, where = TARGETS[target]
    if kind == "ip":
        layers = len(install_adapter(unet, where, "base", SimpleNamespace(projection_dim=IMAGE_EMBED_DIM), seed=0).weights)
    else:
        from .lora import install_lora

        layers = len(install_lora(unet, where, rank=LORA_RANK, seed=0))  # LoRA'd projections
    if checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    params = [p for _, p in trainable_parameters(unet)]
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01)
    dtype = unet.dtype
    g = torch.Generator().manual_seed(0)
    cross = unet.config.cross_attention_dim
    inputs = dict(sample=torch.randn(batch, 4, latent, latent, generator=g).to(device, dtype),
                  timestep=torch.randint(0, 1000, (batch,), generator=g).to(device),
                  encoder_hidden_states=torch.randn(batch, TEXT_TOKENS, cross, generator=g).to(device, dtype),
                  added_cond_kwargs={"text_embeds": torch.randn(batch, 1280, generator=g).to(device, dtype),
                                     "time_ids": torch.tensor([[latent * 8.0, latent * 8.0, 0, 0, latent * 8.0, latent * 8.0]] * batch).to(device, dtype),
                                     **({"image_embeds": [torch.randn(batch, 1, IMAGE_EMBED_DIM, generator=g).to(device)]}
                                        if kind == "ip" else {})})
    target_noise = torch.randn(batch, 4, latent, latent, generator=g).to(device)

    def step():
        with torch.autocast(device.split(":")[0], dtype=dtype, enabled=dtype != torch.float32):
            pred = unet(**inputs).sample
        loss = torch.nn.functional.mse_loss(pred.float(), target_noise)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = _rss()
    with _PeakRSS() as rss:
        for _ in range(warmup):
            step()
        if cuda:
            torch.cuda.synchronize()
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            step()
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    peak = (torch.cuda.max_memory_allocated() if cuda else rss.peak) - before
    times.sort()
    return {"target": target, "layers": layers, "trained_params": sum(p.numel() for p in params),
            "ip_kv_params": sum(p.numel() for n, p in trainable_parameters(unet) if "_ip." in n),
            "ms_median": 1000 * times[len(times) // 2], "ms_min": 1000 * times[0], "peak_mb": peak / 2**20,
            "device": device, "config": "sdxl" if full else "reduced", "latent": latent, "batch": batch,
            "threads": torch.get_num_threads() if not cuda else None}


def table(rows) -> str:
    base = {r["target"]: r for r in rows}.get("all")
    lines = [("| targets | IP layers (LoRA: projections) | IP K/V params | trained params | step (ms, median) "
              "| peak memory (MiB) |"), "|---|---|---|---|---|---|"]
    for r in rows:
        rel = (f" ({r['ms_median'] / base['ms_median']:.2f}x)" if base else "", f" ({r['peak_mb'] / base['peak_mb']:.2f}x)"
               if base and base["peak_mb"] > 0 else "")
        lines.append(f"| {r['target']} | {r['layers']} | {r['ip_kv_params']:,} | {r['trained_params']:,} "
                     f"| {r['ms_median']:.0f}{rel[0]} "
                     f"| {r['peak_mb']:.0f}{rel[1]} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--full", action="store_true", help="the real SDXL config (GPU)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--latent", type=int, default=None, help="latent side (default 32 reduced, 128 full)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--one", choices=sorted(TARGETS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    latent = args.latent or (128 if args.full else 32)
    if args.one:
        print(json.dumps(measure_one(args.one, args.device, args.full, args.batch, latent, args.steps,
                                     checkpointing=args.gradient_checkpointing)))
        return 0
    rows = []
    import importlib.util

    rows_wanted = ["style", "all"] + (["b-lora-style"] if importlib.util.find_spec("peft") else [])
    for target in rows_wanted:  # one process each: memory peaks must not see each other
        cmd = [sys.executable, "-m", "instantstyle.training.measure", "--one", target, "--device", args.device,
               "--batch", str(args.batch), "--latent", str(latent), "--steps", str(args.steps)]
        cmd += ["--full"] * args.full + ["--gradient-checkpointing"] * args.gradient_checkpointing
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    first = rows[0]
    print(f"{first['config']} UNet, latent {latent}x{latent}, batch {args.batch}, {args.device}"
          + (f", {first['threads']} threads" if first["threads"] else ""))
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
