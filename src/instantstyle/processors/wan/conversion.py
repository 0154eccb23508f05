"""diffusers' Wan-family processors -> ours, at every cross-attention layer that has an
image branch (``add_k_proj``).  Self-attention and cross-attention without an image
branch keep diffusers' processors (one softmax each: nothing to fuse)."""
from __future__ import annotations

from ..core.model_state import call_per_cfg_half, default_caches, runs_pipeline
from .processor import FUSED_BY_CLASS, WanCrossAttention


def image_branch_sites(model) -> list[tuple[str, object]]:
    """``[(attn_processors key, module)]`` of the cross-attention layers with an image
    branch, in model order (``blocks.N.attn2.processor``)."""
    return [(name + ".processor", m) for name, m in model.named_modules()
            if hasattr(m, "set_processor") and getattr(m, "add_k_proj", None) is not None
            and getattr(m, "is_cross_attention", False) and hasattr(m, "norm_added_k")]


def fuse_wan_processor(proc):
    """Our processor for diffusers' ``proc`` (same attention backend, parallel config), or
    None for a processor that is already ours or of another class (left alone)."""
    if runs_pipeline(proc):
        return None
    cls = FUSED_BY_CLASS.get(type(proc))
    if cls is None:
        return None
    fused = cls()
    fused._attention_backend = getattr(proc, "_attention_backend", None)  # self-attention paths keep them
    fused._parallel_config = getattr(proc, "_parallel_config", None)
    return fused


def fused_sites(model) -> dict:
    """``{site: our processor}`` for every image-branch layer, fusing diffusers' processors
    where needed (nothing is installed here).  Raises, naming the layer, where a layer
    runs a processor we can't stand in for."""
    out = {}
    for site, module in image_branch_sites(model):
        proc = module.processor
        if isinstance(proc, WanCrossAttention):
            out[site] = proc
            continue
        fused = fuse_wan_processor(proc)
        if fused is None:
            raise TypeError(f"pipe_or_model: layer {site} runs a {type(proc).__name__}; instantstyle needs diffusers' "
                            "Wan-family processor (WanAttnProcessor, SkyReelsV2AttnProcessor) or its own there")
        out[site] = fused
    return out


def install(model, procs: dict) -> dict:
    """Set ``procs`` (``{site: processor}``) where they are not installed yet; returns what they replaced."""
    current = model.attn_processors
    replaced = {site: current[site] for site, p in procs.items() if current[site] is not p}
    if replaced:
        model.set_attn_processor({**current, **{site: procs[site] for site in replaced}})
    return replaced


def use_fused_wan(model) -> dict:
    """Swap diffusers' processor of every image-branch cross-attention layer for ours;
    returns ``{name: replaced processor}``.  Layers running other classes are left alone.
    Turns the per-run K/V caches on (``context_cache``), unless ``set_caches(model, False)``."""
    current = model.attn_processors
    procs = {}
    for site, _ in image_branch_sites(model):
        fused = fuse_wan_processor(current[site])
        if fused is not None:
            procs[site] = fused
    replaced = install(model, procs)
    default_caches(model)  # as the UNet and DiT conversions
    call_per_cfg_half(model)  # diffusers' Wan pipelines: cond and uncond calls at each timestep
    return replaced


def wan_plain_classes() -> tuple:
    """diffusers' stateless Wan-family processors (given back when the last method leaves a layer)."""
    return tuple(FUSED_BY_CLASS)


def wan_equivalent(site: str, proc):
    """The fused processor for a Wan-family layer a method attaches to (``attn1`` or
    ``attn2``): ours as it is, else ours for diffusers' class (same backend)."""
    fused = proc if runs_pipeline(proc) else fuse_wan_processor(proc)
    if fused is None:
        raise TypeError(f"target: layer {site} runs a {type(proc).__name__}; instantstyle needs diffusers' Wan-family "
                        "processor (WanAttnProcessor, SkyReelsV2AttnProcessor) or its own there")
    return fused
