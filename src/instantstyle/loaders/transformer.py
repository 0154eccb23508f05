"""``load_ip_adapter`` for transformers (Flux, SD3.5): the family's checkpoint layout
(``flux``, ``sd3``), IP weights only in the target layers, fused processors there.

Everything is read, checked and built before the model is touched, so a bad or
mismatched checkpoint raises a one-line ``ValueError`` and leaves the model as it was.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch
from diffusers.models.embeddings import MultiIPAdapterImageProjection

from ..processors.core import diffusers_compat
from ..processors.core.gating import StepGate, ramp_arguments
from ..processors.core.model_state import choose_caches, ensure_step_hook
from ..processors.core.models import transformer_family, unet_of
from ..processors.targets.registry import registry_of
from ..processors.targets.sites import attention_sites
from . import flux, sd3
from .report import SavingsReport, adapter_arguments, check_caches_argument


@dataclass
class TransformerLoadReport(SavingsReport):
    """What was loaded, and what the targets saved against loading every capable layer."""

    family: str
    format: str  # "xlabs", "instantx" (Flux) or "instantx-sd3"
    sources: List[str]
    num_tokens: List[int]
    layers: List[List[str]]  # per adapter: sites holding its weights
    ip_params: int
    ip_params_all_layers: int
    bytes_per_param: int
    replaced: Dict[str, object] = field(default_factory=dict, repr=False)

    def __str__(self) -> str:
        lines = [f"adapter {i} ({src}, {self.format}, {t} tokens/image): {len(ls)} layers"
                 for i, (src, t, ls) in enumerate(zip(self.sources, self.num_tokens, self.layers))]
        lines.append(self.savings_line())
        return "\n".join(lines)




def _restrict(weights: dict, capable: set, target, fmt: str, source: str) -> dict:
    """XLabs Flux has weights for double-stream blocks only: ``"all"`` means those; a
    target that names single-stream layers is an error."""
    outside = [s for s in weights if s not in capable]
    if outside and target != "all":
        raise ValueError(
            f"target: {source} is a {fmt} checkpoint with weights for the double-stream blocks (transformer_blocks.N) "
            f"only; the target also names {len(outside)} single-stream layers, e.g. {outside[0]}"
        )
    kept = {s: w for s, w in weights.items() if s in capable}
    if not kept:
        raise ValueError(f"target: {target!r} leaves no layer that a {fmt} checkpoint has weights for")
    return kept


def load_transformer_ip_adapter(model_or_pipeline, checkpoint, target="all", scale=1.0, *, subfolder=None, weight_name=None,
                                image_encoder_folder: Optional[str] = "image_encoder", start_at=0.0, end_at=1.0,
                                arch: Optional[str] = None, caches: Optional[bool] = None, ramp=None,
                                embeds_scaling: str = "V only", only=None, **hub_kwargs) -> TransformerLoadReport:
    """See :func:`instantstyle.loaders.load_ip_adapter`; for Flux and SD3 transformers.
    A pipeline without an image encoder gets one from ``image_encoder_folder``
    (:func:`~instantstyle.loaders.hub.find_dit_image_encoder`: next to the adapter, or a
    folder / hub id of its own; CLIP ViT-L for XLabs, SigLIP for InstantX, checked),
    after the checkpoints are read and checked and before the model is touched.
    ``only``: the site names that may hold weights at all (a weight type's non-zero layers)."""
    from .hub import attach_encoder, find_dit_image_encoder, resolve_checkpoints

    model = unet_of(model_or_pipeline)
    family = transformer_family(model)
    check_caches_argument(caches)
    checkpoints = resolve_checkpoints(checkpoint, subfolder, weight_name, **hub_kwargs)
    if not checkpoints:
        raise ValueError("checkpoint: expected at least one checkpoint, got an empty list")
    n = len(checkpoints)
    targets, scales, starts, ends = adapter_arguments(n, target, scale, start_at, end_at)
    states = [flux.read_flux_checkpoint(c) for c in checkpoints]
    sites = attention_sites(model)
    registry = registry_of(model, arch)
    weights = [registry.resolve(t, "cross") for t in targets]
    if only is not None:
        weights = [{site: w for site, w in ws.items() if site in only} for ws in weights]
    old = dict(model.attn_processors)

    if family == "sd3" or any(sd3.is_sd3_checkpoint(s) for s, _ in states):
        if family != "sd3":
            raise ValueError(f"checkpoint: {states[0][1]} is an SD3 IP-Adapter, the model is a {type(model).__name__}")
        if any(s != 0.0 for s in starts) or any(e != 1.0 for e in ends) or ramp is not None:
            raise ValueError(f"start_at/end_at: step gating is not supported for SD3 IP-Adapters yet, got {start_at}/{end_at}")
        new, projection, held, all_params = sd3.plan(model, states, sites, weights, scales)
        fmt, tokens = "instantx-sd3", [sd3.num_tokens(states[0][0])]
        layers = [list(new)]
    else:
        fmts = [flux.checkpoint_format(s, src) for s, src in states]
        if len(set(fmts)) > 1:
            raise ValueError(f"checkpoint: expected one Flux format for all checkpoints, got {fmts}")
        fmt = fmts[0]
        if embeds_scaling != "V only" and fmt != "xlabs":  # refused before the model is touched
            raise ValueError(f"embeds_scaling: {fmt} Flux IP layers take 'V only' (XLabs' take every mode), "
                             f"got {embeds_scaling!r}")
        capable = {s.name for s in flux.capable_sites(fmt, sites)}
        weights = [_restrict(w, capable, t, fmt, src) for w, t, (_, src) in zip(weights, targets, states)]
        # Flux's transformer gets sigma in [0, 1] as its timestep: gate on that scale
        gates = [StepGate(s, e, 2, **ramp_arguments(ramp)) for s, e in zip(starts, ends)]
        gates = [None if g.always_open else g for g in gates]
        new, projections, held, all_params, tokens = flux.plan(model, states, fmt, sites, weights, scales, gates)
        projection = MultiIPAdapterImageProjection(projections)
        layers = [list(w) for w in weights]

    # nothing above touched the model; a missing or wrong encoder still leaves it as it was
    encoder = find_dit_image_encoder(model_or_pipeline, checkpoint, subfolder, image_encoder_folder, fmt, **hub_kwargs)
    if image_encoder_folder is not None:
        attach_encoder(model_or_pipeline, encoder)
    # As diffusers: drop the old image projection
    # first (SD3's has attention modules of its own), then set processors.
    diffusers_compat.register_processor_classes()
    if family == "sd3":
        model.image_proj = None
        model.set_attn_processor({**model.attn_processors, **new})
        model.image_proj = projection.to(device=model.device, dtype=model.dtype)
    else:
        model.encoder_hid_proj = None
        model.set_attn_processor({**model.attn_processors, **new})
        model.encoder_hid_proj = projection.to(device=model.device, dtype=model.dtype)
        model.config.encoder_hid_dim_type = "ip_image_proj"
        if any(g is not None for g in gates):
            ensure_step_hook(model)
    choose_caches(model, caches)
    registry.labels = {k: v for k, v in registry.labels.items() if not k.startswith("ip_adapter[")}
    for a, (t, (_, src)) in enumerate(zip(targets, states)):
        registry.labels[f"ip_adapter[{a}]"] = {"target": t, "source": src, "format": fmt}
    return TransformerLoadReport(
        family, fmt, [src for _, src in states], tokens, layers, held, all_params, torch.finfo(model.dtype).bits // 8,
        {k: old[k] for k in new if k in old},
    )


def transformer_ip_param_counts(model, target, fmt: str) -> Dict[str, int]:
    """``{"held", "all_layers"}`` IP parameter counts for ``target`` and a checkpoint
    format (``xlabs``/``instantx`` for Flux, ``instantx-sd3``); meta models work too."""
    sites = attention_sites(model)
    chosen = registry_of(model).resolve(target, "cross")
    if fmt == "instantx-sd3":
        cfg = model.config
        hidden = cfg.attention_head_dim * cfg.num_attention_heads
        per = 2 * hidden * hidden + (1280 + 1) * 2 * hidden + 3 * cfg.attention_head_dim  # K/V, norm_ip (temb 1280), norms
        return {"held": per * len(chosen), "all_layers": per * len(sites)}
    capable = {s.name for s in flux.capable_sites(fmt, sites)}
    per = flux.layer_params(fmt, model)
    return {"held": per * len(capable & set(chosen)), "all_layers": per * len(capable)}
