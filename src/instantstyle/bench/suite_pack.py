"""Pack suite: ``stylize-batch --pack N`` on CPU, as rows per second of the denoising loop.

N rows, each with its own reference (per-row image embeds), run the reduced SDXL UNet
(``suite_unet.REDUCED_UNET_CONFIG``: SDXL's block layout and module names, fewer channels)
for a few denoising steps with CFG:

* ``one-by-one`` (baseline): N runs at batch 2 (one row, CFG halves);
* ``packed``: one run at batch 2N, image row i paired with sample i, as our processors
  read a per-sample batch of image states (InstantStyle's packed call feeds them so).

ms is per row (one run's time / N), so ``speedup`` is the throughput gain of packing.  The
IP-Adapter is loaded with ``load_ip_adapter`` (style preset, random weights).  Only the
UNet steps are timed: the text and image encoders and the VAE run once per row either
way and would add the same per-row cost to both providers.
"""
from __future__ import annotations

from typing import List, Optional

import torch

from . import timing
from .suite_unet import IMAGE_EMBED_DIM, REDUCED_UNET_CONFIG, TEXT_EMBED_DIM, TEXT_TOKENS
from .suites import Context, add_speedups, dtype_name, name_matches, short_error

PACKS = (2, 4)
CASES = [f"pack-{n}" for n in PACKS]
LATENT, QUICK_LATENT = 16, 8


def _unet(dtype):
    from diffusers import UNet2DConditionModel

    from ..loaders import load_ip_adapter

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**REDUCED_UNET_CONFIG).eval()  # float32 as built
    g = torch.Generator().manual_seed(1)
    cross = REDUCED_UNET_CONFIG["cross_attention_dim"]
    checkpoint = {"image_proj": {"proj.weight": torch.randn(4 * cross, IMAGE_EMBED_DIM, generator=g) * 0.02,
                                 "proj.bias": torch.zeros(4 * cross), "norm.weight": torch.ones(cross),
                                 "norm.bias": torch.zeros(cross)}, "ip_adapter": {}}
    modules = dict(unet.named_modules())
    attn2 = [n[: -len(".processor")] for n in unet.attn_processors if n.endswith("attn2.processor")]
    for i, name in enumerate(attn2):  # the original layout's ids: 1, 3, 5, ... over attn2 layers
        shape = (modules[name].to_k.out_features, cross)
        for part in ("to_k_ip", "to_v_ip"):
            checkpoint["ip_adapter"][f"{2 * i + 1}.{part}.weight"] = torch.randn(shape, generator=g) * 0.02
    load_ip_adapter(unet, checkpoint, target="style")
    if dtype == torch.float32:
        return unet
    from diffusers.utils import logging as dlogging

    level = dlogging.get_verbosity()
    dlogging.set_verbosity_error()  # .to(dtype) warns about from_pretrained's torch_dtype; not relevant here
    try:
        return unet.to(dtype=dtype)
    finally:
        dlogging.set_verbosity(level)


def _inputs(rows: int, latent: int, dtype):
    """Per row: latents, text and image embeds of its CFG pair (negative, positive)."""
    g = torch.Generator().manual_seed(2)
    rand = lambda *s: torch.randn(*s, generator=g).to(dtype)  # noqa: E731
    cross = REDUCED_UNET_CONFIG["cross_attention_dim"]
    side = latent * 8
    return [{"sample": rand(2, 4, latent, latent), "text": rand(2, TEXT_TOKENS, cross),
             "pooled": rand(2, TEXT_EMBED_DIM), "image": rand(2, 1, IMAGE_EMBED_DIM),
             "time_ids": torch.tensor([[side, side, 0, 0, side, side]] * 2, dtype=dtype)} for _ in range(rows)]


def _cat(rows: List[dict]) -> dict:
    """N CFG pairs -> one batch in diffusers' order: all negatives, then all positives."""
    return {k: torch.cat([r[k][h:h + 1] for h in (0, 1) for r in rows]) for k in rows[0]}


def _denoise(unet, batch: dict, steps: int):
    with torch.no_grad():
        for t in range(steps):  # falling timesteps: one run, as a pipeline calls the UNet
            unet(batch["sample"], 999 - 100 * t, encoder_hidden_states=batch["text"],
                 added_cond_kwargs={"text_embeds": batch["pooled"], "time_ids": batch["time_ids"],
                                    "image_embeds": [batch["image"]]})


class PackSuite:
    name = "pack"
    description = "stylize-batch --pack: N rows in one batched UNet run vs one by one (reduced SDXL UNet, CPU rows/s)"

    def unavailable(self, ctx: Context) -> Optional[str]:
        return None

    def _cases(self, ctx: Context) -> List[int]:
        return [n for n, c in zip(PACKS, CASES) if name_matches(c, ctx.shape_filter, CASES)]

    def planned(self, ctx: Context) -> int:
        return 2 * len(self._cases(ctx))

    def run(self, ctx: Context) -> List[dict]:
        dtype = torch.float32 if ctx.device.type == "cpu" else ctx.dtypes[0]
        unet = _unet(dtype).to(ctx.device)
        latent, steps = (QUICK_LATENT, 2) if ctx.quick else (LATENT, 4)
        rows_out = []
        for n in self._cases(ctx):
            rows = [{k: v.to(ctx.device) for k, v in r.items()} for r in _inputs(n, latent, dtype)]
            packed = _cat(rows)
            fns = {"one-by-one": lambda: [_denoise(unet, _cat([r]), steps) for r in rows],
                   "packed": lambda: _denoise(unet, packed, steps)}
            case_rows = []
            for provider in fns:
                case_rows.append({"suite": self.name, "case": f"pack-{n}", "provider": provider,
                                  "baseline": provider == "one-by-one", "dtype": dtype_name(dtype),
                                  "shape_desc": f"{n} rows, latent {latent}x{latent}, {steps} steps, CFG; ms = per row",
                                  "status": "ok", "ms": None, "ms_graph": None})
            ctx.working(f"pack-{n}: timing one-by-one, packed")
            try:
                timings = timing.cpu_time_interleaved(fns, warmup=1, min_runs=3 if ctx.quick else 5,
                                                      max_runs=6 if ctx.quick else 15, budget_s=2.0 if ctx.quick else 8.0)
            except Exception as exc:  # one case failing must not lose the others
                timings = {p: exc for p in fns}
            for row in case_rows:
                t = timings.get(row["provider"])
                if isinstance(t, Exception):
                    row["status"] = short_error(t)
                elif t is not None:
                    row.update({k: v / n if isinstance(v, float) else v for k, v in t.as_fields("ms").items()})
                ctx.tick(f"pack-{n} {row['provider']}")
            add_speedups(case_rows)
            rows_out += case_rows
        return rows_out
