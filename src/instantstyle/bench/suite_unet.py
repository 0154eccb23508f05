"""UNet suite: one denoising step of an SDXL-architecture UNet2DConditionModel.

Random weights from a built-in config (no download).  On a GPU: the real SDXL config,
fp16, 1024x1024 (128x128 latents), CFG batch 2.  On CPU: a reduced config (same block
layout and module names, fewer channels and transformer layers) at a reduced
resolution; the notes say so.

Cases (rows) and providers (columns):

* ``no-ip``: no image embeds; ``diffusers``: stock ``AttnProcessor2_0`` everywhere (the
  overhead base); ``fused``: our processors on the cross layers (our own floor).
* ``style``: InstantStyle's style preset, IP only in ``up_blocks.0.attentions.1``;
  the other attn2 processors hold scale 0 (diffusers-style gating).
* ``style+layout``: also ``down_blocks.2.attentions.1``.
* ``all-blocks``: IP-Adapter at scale 1 in every attn2.

For each IP case, ``diffusers`` (``IPAdapterAttnProcessor2_0``, the baseline), ``fused``
(``instantstyle.processors.FusedIPAdapterAttnProcessor`` as a drop-in, same weights, same
scale-0 gating) and ``fused-targeted`` (IP processors only in the target blocks,
``FusedAttnProcessor`` elsewhere, as ``load_ip_adapter`` sets it up).
Rows report ms/step and the overhead over ``no-ip``.
"""
from __future__ import annotations

import copy
import functools
import gc
from typing import Dict, List, Optional

import torch

from .suite_processor import NOT_AVAILABLE, fused_processor_class
from .suites import Context, dtype_name, name_matches, short_error

SDXL_UNET_CONFIG = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    mid_block_type="UNetMidBlock2DCrossAttn",
    block_out_channels=(320, 640, 1280), transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20),  # diffusers' name for the number of heads: head dim 64
    cross_attention_dim=2048, use_linear_projection=True, norm_num_groups=32,
    addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
)
#: CPU: same module names (so the InstantStyle block paths exist), a fraction of the work.
REDUCED_UNET_CONFIG = dict(SDXL_UNET_CONFIG, block_out_channels=(32, 64, 128), attention_head_dim=(1, 1, 2),
                           transformer_layers_per_block=(1, 1, 2), sample_size=32)
#: latent side: GPU 128 (1024x1024 images); CPU 32 (256x256), 16 with --quick
GPU_LATENT, CPU_LATENT, CPU_QUICK_LATENT = 128, 32, 16
TEXT_EMBED_DIM, IMAGE_EMBED_DIM, IP_TOKENS, TEXT_TOKENS = 1280, 1280, 4, 77

PRESETS: Dict[str, Optional[List[str]]] = {
    "style": ["up_blocks.0.attentions.1"],
    "style+layout": ["up_blocks.0.attentions.1", "down_blocks.2.attentions.1"],
    "all-blocks": None,  # every attn2
}
PROVIDERS = ["diffusers", "fused", "fused-targeted"]


def targeted_processor_class():
    """``FusedAttnProcessor`` (cross-attention without IP weights), or None while missing."""
    try:
        import instantstyle.processors as procs
    except Exception:
        return None
    return getattr(procs, "FusedAttnProcessor", None)


def _original_image_proj(projection) -> dict:
    """diffusers' ``ImageProjection`` weights under the original IP-Adapter checkpoint's names."""
    layer = projection.image_projection_layers[0]
    weights = {"proj.weight": layer.image_embeds.weight, "proj.bias": layer.image_embeds.bias,
               "norm.weight": layer.norm.weight, "norm.bias": layer.norm.bias}
    return {k: v.detach().float().cpu() for k, v in weights.items()}


def _in_blocks(name: str, prefixes: Optional[List[str]]) -> bool:
    return prefixes is None or any(name.startswith(p + ".") for p in prefixes)


class _UNetBench:
    """A UNet, its inputs, and processor swapping between cases."""

    def __init__(self, device, dtype, reduced: bool, latent: int, batch: int = 2):
        from diffusers import UNet2DConditionModel
        from diffusers.models.embeddings import (
            ImageProjection,
            MultiIPAdapterImageProjection,
        )

        self.config = dict(REDUCED_UNET_CONFIG if reduced else SDXL_UNET_CONFIG)
        torch.manual_seed(0)
        with torch.device(device):  # initialise in place: SDXL's 2.6B parameters init fast on a GPU
            self.unet = UNet2DConditionModel(**self.config)
            self.ip_proj = MultiIPAdapterImageProjection([ImageProjection(
                image_embed_dim=IMAGE_EMBED_DIM, cross_attention_dim=self.config["cross_attention_dim"],
                num_image_text_embeds=IP_TOKENS)])
        from diffusers.utils import logging as dlogging

        level = dlogging.get_verbosity()
        dlogging.set_verbosity_error()  # .to(dtype) warns about from_pretrained's torch_dtype; not relevant here
        try:
            self.unet.to(dtype=dtype).eval()
        finally:
            dlogging.set_verbosity(level)
        self.ip_proj.to(dtype=dtype).eval()
        g = torch.Generator().manual_seed(1)
        rand = lambda *s: torch.randn(*s, generator=g).to(device=device, dtype=dtype)  # noqa: E731
        self.sample = rand(batch, 4, latent, latent)
        self.text = rand(batch, TEXT_TOKENS, self.config["cross_attention_dim"])
        self.added = {"text_embeds": rand(batch, TEXT_EMBED_DIM),
                      "time_ids": torch.tensor([[latent * 8, latent * 8, 0, 0, latent * 8, latent * 8]] * batch,
                                               device=device, dtype=dtype)}
        self.image_embeds = [rand(batch, 1, IMAGE_EMBED_DIM)]
        # a denoising run's timesteps fall: entries of one schedule tensor, as a pipeline
        # passes them (the per-run caches live for one such run, see core/step_cache.py)
        self.schedule = torch.arange(999, 0, -1, device=device)
        self.calls = 0
        self.attn2 = [n for n in self.unet.attn_processors if n.endswith("attn2.processor")]
        self.ip_weights = {}  # attn2 name -> state dict shared by both processor kinds
        self.device, self.dtype = device, dtype

    def set_no_ip(self, unet):
        from diffusers.models.attention_processor import AttnProcessor2_0

        unet.set_attn_processor(AttnProcessor2_0())
        unet.encoder_hid_proj = None
        unet.register_to_config(encoder_hid_dim_type=None)

    def set_ip(self, unet, cls, prefixes: Optional[List[str]], untargeted=None):
        """IP processors ``cls`` in every attn2, scale 1 inside ``prefixes`` and 0 outside
        (diffusers' gating); or, with ``untargeted``, what users get from
        ``instantstyle.load_ip_adapter(target=...)``: the same weights, loaded into the
        targets only."""
        from diffusers.models.attention_processor import AttnProcessor2_0

        if untargeted is not None:
            return self._load_targeted(unet, prefixes)
        procs = {}
        for name in unet.attn_processors:
            if name not in self.attn2:
                procs[name] = AttnProcessor2_0()
                continue
            if untargeted is not None and not _in_blocks(name, prefixes):
                procs[name] = untargeted()
                continue
            module = unet.get_submodule(name[: -len(".processor")])
            hidden = module.to_q.out_features
            scale = 1.0 if _in_blocks(name, prefixes) else 0.0
            with torch.device(self.device):  # SDXL has 70 attn2 layers: don't init their IP weights on CPU
                proc = cls(hidden_size=hidden, cross_attention_dim=self.config["cross_attention_dim"],
                           num_tokens=(IP_TOKENS,), scale=scale)
            if name not in self.ip_weights:
                self.ip_weights[name] = {k: v.clone() for k, v in proc.state_dict().items()}
            proc.load_state_dict(self.ip_weights[name])
            procs[name] = proc.to(device=self.device, dtype=self.dtype)
        unet.set_attn_processor(procs)
        unet.encoder_hid_proj = self.ip_proj
        unet.register_to_config(encoder_hid_dim_type="ip_image_proj")
        if getattr(cls, "instantstyle_pipeline", False):
            # as users get the drop-in: use_fused_processors after diffusers' load_ip_adapter and
            # scale dict, which also caches the image projection per run (its K/V with it);
            # without that the projection alone (1280 -> 4 x 2048) costs ~13% of the step
            from ..processors import use_fused_processors
            from ..processors.core.model_state import set_caches

            use_fused_processors(unet)
            set_caches(unet, True)

    def _load_targeted(self, unet, prefixes: Optional[List[str]]) -> None:
        from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0

        from ..loaders import load_ip_adapter

        self.set_ip(unet, IPAdapterAttnProcessor2_0, prefixes)  # makes every layer's weights, as diffusers' case has them
        layers = unet.attn_processors
        checkpoint = {"image_proj": _original_image_proj(self.ip_proj), "ip_adapter": {}}
        for i, name in enumerate(self.attn2):  # the original layout's ids: 1, 3, 5, ... over attn2 layers
            for part in ("to_k_ip", "to_v_ip"):
                checkpoint["ip_adapter"][f"{2 * i + 1}.{part}.weight"] = getattr(layers[name], part)[0].weight.detach().float().cpu()
        load_ip_adapter(unet, checkpoint, target=list(prefixes) if prefixes else "all")

    def step(self, unet, ip: bool):
        added = dict(self.added, image_embeds=self.image_embeds) if ip else self.added
        # no_grad, as diffusers' pipelines run the UNet (inference_mode tensors carry no
        # version counter, so instantstyle's per-run caches stay off under it)
        timestep = self.schedule[self.calls % len(self.schedule)]
        self.calls += 1
        with torch.no_grad():
            return unet(self.sample, timestep, encoder_hidden_states=self.text,
                             added_cond_kwargs=added, return_dict=False)[0]


class UNetSuite:
    name = "unet"
    description = "one SDXL UNet denoising step: no IP vs InstantStyle presets, fused vs diffusers"

    def unavailable(self, ctx: Context) -> Optional[str]:
        return None

    def _plan(self, ctx: Context):
        cases = [("no-ip", "diffusers"), ("no-ip", "fused")] + [(p, prov) for p in PRESETS for prov in PROVIDERS
                                            if not (prov == "fused-targeted" and PRESETS[p] is None)]
        cases = [c for c in cases if c[0] == "no-ip" or name_matches(c[0], ctx.shape_filter, list(PRESETS))]
        # no-ip is only the overhead reference: without a matching IP case there is nothing to run
        return cases if any(c[0] != "no-ip" for c in cases) else []

    def _dtype(self, ctx: Context):
        return ctx.dtypes[0]  # one dtype: a UNet step is slow, and the attention dtype story is the kernel suite's

    def planned(self, ctx: Context) -> int:
        return len(self._plan(ctx))

    def run(self, ctx: Context) -> List[dict]:
        from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0

        dtype = self._dtype(ctx)
        if ctx.is_gpu:
            reduced, latent = False, GPU_LATENT
            desc = f"SDXL config, {latent * 8}x{latent * 8} ({latent}x{latent} latents), batch 2 (CFG)"
        else:
            reduced, latent = True, CPU_QUICK_LATENT if ctx.quick else CPU_LATENT
            desc = f"reduced SDXL-layout config, {latent * 8}x{latent * 8} ({latent}x{latent} latents), batch 2 (CFG)"
            ctx.note(f"unet suite on CPU: {desc}, {dtype_name(dtype)}; channels "
                     f"{REDUCED_UNET_CONFIG['block_out_channels']}, transformer layers "
                     f"{REDUCED_UNET_CONFIG['transformer_layers_per_block']} instead of SDXL's, so only ratios mean anything.")
        fused_cls = fused_processor_class()
        if fused_cls is None:
            ctx.note(f"unet suite: fused rows {NOT_AVAILABLE}.")
        bench = _UNetBench(ctx.device, dtype, reduced, latent)
        rows, keys, prepared = [], [], {}
        for case, provider in self._plan(ctx):
            row = {"suite": self.name, "case": case, "provider": provider, "baseline": provider == "diffusers",
                   "dtype": dtype_name(dtype), "shape_desc": desc, "status": "ok", "ms": None, "ms_graph": None,
                   "unet_config": "sdxl" if not reduced else "reduced", "latent": latent,
                   "ip_blocks": None if case == "no-ip" else (PRESETS[case] or "all")}
            rows.append(row)
            keys.append(None)
            cls = IPAdapterAttnProcessor2_0 if provider == "diffusers" else fused_cls
            untargeted = targeted_processor_class() if provider == "fused-targeted" else None
            key = keys[-1] = (case, provider, untargeted)
            if case != "no-ip" and (cls is None or (provider == "fused-targeted" and untargeted is None)):
                row["status"] = NOT_AVAILABLE if cls is None else \
                    "not available yet (instantstyle.processors has no FusedAttnProcessor)"
            else:
                self._prepare(ctx, bench, row, key, cls, prepared)
            if ctx.is_gpu:
                ctx.tick(f"unet {case} {provider}")
        if prepared:  # CPU: every variant at once, round-robin
            ctx.working(f"unet: timing {len(prepared)} variants")
            timings = ctx.time_many(prepared, heavy=True)
            for row, key in zip(rows, keys):
                if key in timings:
                    _store(row, timings[key])
        if not ctx.is_gpu:
            for row in rows:
                ctx.tick(f"unet {row['case']} {row['provider']}")
        _finish(rows)
        del bench
        gc.collect()
        if ctx.is_gpu:
            torch.cuda.empty_cache()
        return rows

    @staticmethod
    def _prepare(ctx: Context, bench: "_UNetBench", row: dict, key: tuple, cls, prepared: dict) -> None:
        """Set up one variant.  GPU: the one SDXL UNet, processors swapped, timed right away.
        CPU: the reduced UNet is small, so each variant gets its own copy and all are timed
        later, interleaved."""
        case = key[0]
        try:
            unet = bench.unet if ctx.is_gpu else copy.deepcopy(bench.unet)
            if case == "no-ip":
                bench.set_no_ip(unet)
                if key[1] == "fused":  # our own no-IP reference: fused processors on every cross layer
                    from ..processors import use_fused_processors

                    use_fused_processors(unet)
            else:
                bench.set_ip(unet, cls, PRESETS[case], key[2])
            fn = functools.partial(bench.step, unet, case != "no-ip")
            fn()  # first call: fails here, not inside the timer, if the variant is broken
            if ctx.is_gpu:
                ctx.working(f"unet {case} {key[1]}")
                _store(row, ctx.time_many({key: [fn]}, heavy=True)[key])
            else:
                prepared[key] = [fn]
        except Exception as exc:
            row["status"] = short_error(exc)


def _store(row: dict, result) -> None:
    if isinstance(result, Exception):
        row["status"] = short_error(result)
    else:
        row.update(result.as_fields("ms"))


def _finish(rows: List[dict]) -> None:
    """Speedup vs the diffusers row of the same case, overhead vs no-ip."""
    noip = next((r for r in rows if r["case"] == "no-ip" and r["status"] == "ok"), None)
    for r in rows:
        base = next((b for b in rows if b["case"] == r["case"] and b["baseline"] and b["status"] == "ok"), None)
        ok = r["status"] == "ok" and r["ms"]
        r["speedup"] = base["ms"] / r["ms"] if ok and base else None
        r["speedup_graph"] = None
        r["overhead_pct"] = 100.0 * (r["ms"] - noip["ms"]) / noip["ms"] if ok and noip and r["case"] != "no-ip" else None
        # over the same processors without IP: what IP-Adapter itself costs with ours (our
        # per-run caches also speed up the text attention, so diffusers' no-ip is not our floor)
        own = next((b for b in rows if b["case"] == "no-ip" and b["provider"] == ("diffusers" if r["baseline"] else "fused")
                    and b["status"] == "ok"), None)
        r["overhead_own_pct"] = 100.0 * (r["ms"] - own["ms"]) / own["ms"] if ok and own and r["case"] != "no-ip" else None
