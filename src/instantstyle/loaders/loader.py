"""``load_ip_adapter``: IP weights only where the targets are, fused processors everywhere.

Results equal diffusers' ``load_ip_adapter`` followed by ``set_ip_adapter_scale`` with
the matching dict, but layers outside an adapter's targets hold no weights for it
(SDXL ``style``: 10 of 70 layers) and do no IP work::

    import instantstyle
    report = instantstyle.load_ip_adapter(pipe, "ip-adapter_sdxl.safetensors", target="style")
    print(report)  # layers, parameters held and saved
    image = pipe(prompt, ip_adapter_image_embeds=[embeds]).images[0]

    # layout from image A, style from image B, style only over the first 60% of steps
    instantstyle.load_ip_adapter(pipe, [ckpt, ckpt], target=["layout", "style"], end_at=[1.0, 0.6])
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch

from ..processors.core import diffusers_compat
from ..processors.core.gating import StepGate, ramp_arguments
from ..processors.core.model_state import choose_caches, ensure_step_hook
from ..processors.core.models import transformer_family, unet_of
from ..processors.targets.registry import registry_of
from ..processors.targets.sites import ip_key_ids, ip_sites
from ..processors.targets.weight_types import check_embeds_scaling, swapped_modules
from ..processors.unet.fused_processor import FusedIPAdapterAttnProcessor
from ..processors.unet.image_projection import CachedImageProjection
from .checkpoints import (
    check_encoder_width,
    layer_ids,
    layer_weights,
    num_image_tokens,
    read_checkpoint,
)
from .controls import (
    apply_embeds_scaling,
    apply_weight_type,
    set_embeds_scaling,
    set_weight_type,
    site_values,
)
from .report import (
    SavingsReport,
    adapter_arguments,
    check_caches_argument,
    scaled_weight,
)
from .transformer import load_transformer_ip_adapter


@dataclass
class AdapterReport:
    source: str
    num_tokens: int
    target: object
    layers: List[str]  # attn_processors keys holding this adapter's weights
    gate: Optional[StepGate] = None


@dataclass
class LoadReport(SavingsReport):
    """What was loaded, and what the targets saved against loading every layer."""

    adapters: List[AdapterReport]
    ip_params: int  # IP K/V parameters held
    ip_params_all_layers: int  # what diffusers' loader would hold
    bytes_per_param: int
    replaced: Dict[str, object] = field(default_factory=dict, repr=False)

    def __str__(self) -> str:
        lines = [
            f"adapter {i} ({a.source}, {a.num_tokens} tokens/image): {len(a.layers)} layers"
            + (f", {a.gate}" if a.gate is not None else "")
            for i, a in enumerate(self.adapters)
        ]
        lines.append(self.savings_line())
        return "\n".join(lines)


def layer_params(site) -> int:
    """K and V projection parameters one adapter adds to a layer."""
    return 2 * site.module.to_k.in_features * site.module.to_k.out_features


def ip_param_counts(model_or_pipeline, target, num_adapters: int = 1) -> Dict[str, int]:
    """``{"held", "all_layers"}`` IP parameter counts for ``target`` (meta models work too)."""
    unet = unet_of(model_or_pipeline)
    sites = ip_sites(unet)
    chosen = registry_of(unet).resolve(target, "cross")
    return {
        "held": num_adapters * sum(layer_params(s) for s in sites if s.name in chosen),
        "all_layers": num_adapters * sum(layer_params(s) for s in sites),
    }




def load_ip_adapter(
    model_or_pipeline,
    checkpoint,
    target="all",
    scale=1.0,
    *,
    subfolder=None,
    weight_name=None,
    image_encoder_folder: Optional[str] = "image_encoder",
    start_at=0.0,
    end_at=1.0,
    arch: Optional[str] = None,
    caches: Optional[bool] = None,
    weight_type: str | None = None,
    weight: float = 1.0,
    composition_weight: float | None = None,
    embeds_scaling: str = "V only",
    ramp=None,
    **hub_kwargs,
) -> LoadReport:
    """Load one or several IP-Adapters, each into its own target layers only.

    Args:
        model_or_pipeline: a diffusers UNet or a pipeline with ``.unet``.
        checkpoint: a hub id (``"h94/IP-Adapter"``), a local folder, a path to a
            ``.bin``/``.safetensors`` file in the original IP-Adapter layout or such a state
            dict; or a list of them (one IP-Adapter each, in the order the pipeline's
            ``ip_adapter_image(_embeds)`` lists them).  diffusers' list rules apply.
        subfolder, weight_name: as in diffusers' ``load_ip_adapter``: the file inside a hub
            repo or folder, e.g. ``subfolder="sdxl_models",
            weight_name="ip-adapter_sdxl.safetensors"``; one value or one per checkpoint.
        target: where to inject, see :mod:`instantstyle.processors.targets.registry` (preset,
            patterns, or a ``set_ip_adapter_scale`` dict).  With several checkpoints, a
            list gives one target per checkpoint (so patterns go in a nested list:
            ``[["up_blocks.1"], "style"]``); anything else applies to all.
        scale: per adapter a number (or a per-image list, with masks); a layer's scale is
            ``scale`` times its target weight.  diffusers' ``set_ip_adapter_scale`` still
            works afterwards.
        start_at, end_at: active range over the denoising schedule, per adapter or one for
            all (``gating``).
        arch: override architecture detection ("sdxl", "sd15", "sd2").
        caches: the per-run caches (``instantstyle.set_caches``): None keeps the model's
            setting (on unless turned off), True/False sets it.
        image_encoder_folder: as diffusers: a pipeline without an image encoder gets
            ``CLIPVisionModelWithProjection`` from this folder (under ``subfolder``; a path
            with ``/`` is relative to the repo root) and a ``CLIPImageProcessor`` as
            ``feature_extractor``; ``None`` skips it.  Next to a checkpoint file it is used
            when present; a state dict carries none.  Flux/SD3: next to the adapter first,
            else a folder or hub id of its own (CLIP ViT-L for XLabs, SigLIP for InstantX,
            checked before loading); the default is optional there.
        weight_type, weight, composition_weight: a ComfyUI weight type (``controls``,
            README "Controls"); its per-module values replace the layer scales.  With the
            default ``target="all"`` IP weights are held only where the type is non-zero;
            ``target="*"`` holds them everywhere (to switch types later).
        embeds_scaling: ``V only`` (default), ``K+V``, ``K+V w/ C penalty``,
            ``K+mean(V) w/ C penalty``.
        ramp: None, ``"linear"`` / ``"ease"`` (the weight goes from 1 at ``start_at`` to 0
            at ``end_at``) or ``(kind, from, to)``; read on the device (``gating``).
        **hub_kwargs: ``cache_dir``, ``force_download``, ``proxies``, ``local_files_only``,
            ``token``, ``revision`` (``HF_HUB_OFFLINE=1`` reads the local cache only).

    Like diffusers, a new call replaces previously loaded adapters.  Without an image
    encoder, pass ``ip_adapter_image_embeds``.
    """
    from .hub import attach_encoder, find_image_encoder, resolve_checkpoints

    check_embeds_scaling(embeds_scaling)
    ramp_kwargs = ramp_arguments(ramp)
    control = None
    only = None  # the sites that may hold weights: a weight type's non-zero ones ("*" holds them everywhere)
    if weight_type is not None:  # checked (names, arch) before anything is loaded
        control = site_values(unet_of(model_or_pipeline), weight_type, weight, composition_weight, arch)
        if target == "all":
            only = {name for name, v in control.items() if v != 0}
        if only is not None and transformer_family(unet_of(model_or_pipeline)) is None:
            patterns = [name[: -len(".processor")] for name in control if name in only]
            target = [patterns] * len(checkpoint) if isinstance(checkpoint, (list, tuple)) else patterns
    if embeds_scaling != "V only" and transformer_family(unet_of(model_or_pipeline)) == "sd3":
        raise ValueError(f"embeds_scaling: SD3.5 IP layers take 'V only', got {embeds_scaling!r}")
    if transformer_family(unet_of(model_or_pipeline)) is not None:  # Flux / SD3.5: loaders/transformer.py
        report = load_transformer_ip_adapter(model_or_pipeline, checkpoint, target, scale, subfolder=subfolder, weight_name=weight_name,
                                           image_encoder_folder=image_encoder_folder, start_at=start_at, end_at=end_at, arch=arch,
                                           caches=caches, ramp=ramp, embeds_scaling=embeds_scaling,
                                           only=only, **hub_kwargs)
        if control is not None:
            set_weight_type(model_or_pipeline, weight_type, weight, composition_weight)
        if embeds_scaling != "V only":
            set_embeds_scaling(model_or_pipeline, embeds_scaling)
        return report
    unet = unet_of(model_or_pipeline)
    check_caches_argument(caches)
    checkpoints = resolve_checkpoints(checkpoint, subfolder, weight_name, **hub_kwargs)  # files or state dicts
    if not checkpoints:
        raise ValueError("checkpoint: expected at least one checkpoint, got an empty list")
    targets, scales, starts, ends = adapter_arguments(len(checkpoints), target, scale, start_at, end_at)
    states = [read_checkpoint(c) for c in checkpoints]
    train_steps = getattr(getattr(model_or_pipeline, "scheduler", None), "config", {}).get("num_train_timesteps", 1000)
    # plan and check: nothing below touches the pipeline until every check passed, so a bad
    # checkpoint, target or encoder leaves it as it was
    plan = _plan(unet, states, targets, scales, [StepGate(s, e, train_steps, **ramp_kwargs) for s, e in zip(starts, ends)], arch)
    adapters = list(range(len(states)))
    if control is not None:  # on the planned processors: the model is untouched if this fails
        apply_weight_type(plan.procs, control, swapped_modules(registry_of(unet, arch).arch, weight_type), adapters)
    apply_embeds_scaling({k: p for k, p in plan.procs.items() if isinstance(p, FusedIPAdapterAttnProcessor)}, embeds_scaling, adapters)
    encoder = find_image_encoder(model_or_pipeline, checkpoint, subfolder, image_encoder_folder, **hub_kwargs)
    check_encoder_width(encoder if encoder is not None else getattr(model_or_pipeline, "image_encoder", None), states)
    if image_encoder_folder is not None:
        attach_encoder(model_or_pipeline, encoder)
    return _commit(unet, plan, caches)


@dataclass
class _Plan:
    """Everything a load puts into a UNet, built and checked before any of it is."""

    procs: Dict[str, object]  # every processor the UNet will hold
    old: Dict[str, object]
    projections: list
    gates: list
    report: LoadReport
    registry: object
    labels: Dict[str, dict]


def _plan(unet, states, targets, scales, gates, arch) -> _Plan:
    n = len(states)
    sites = ip_sites(unet)
    key_ids = ip_key_ids(unet)
    registry = registry_of(unet, arch)
    weights = [registry.resolve(t, "cross") for t in targets]
    expected_ids = sorted(key_ids.values())
    for (state, source), chosen, t in zip(states, weights, targets):
        found = layer_ids(state)
        # every layer, or a targets-only checkpoint (``instantstyle train-adapter``'s
        # ip_adapter.safetensors) that holds every layer its target needs
        missing = sorted({key_ids[name] for name in chosen} - set(found))
        if found != expected_ids and (not set(found) <= set(expected_ids) or missing):
            needs = f"; target {t!r} needs ids {missing[:3]}{'...' if len(missing) > 3 else ''} too" if missing else ""
            raise ValueError(
                f"{source}: holds {len(found)} IP layers (ids {found[:1]}..{found[-1:]}), this UNet has "
                f"{len(expected_ids)} cross-attention layers (ids 1..{expected_ids[-1] if expected_ids else '-'}){needs}; "
                "is the checkpoint for another architecture (SD1.5 vs SDXL), or a targets-only one trained for another target?"
            )
    gates = [None if g.always_open else g for g in gates]
    tokens = [num_image_tokens(state["image_proj"]) for state, _ in states]

    procs = {name: proc for name, proc in unet.attn_processors.items() if not name.startswith("encoder_hid_proj.")}
    old = dict(procs)
    held_params = 0
    for site in sites:
        held = [a for a in range(n) if site.name in weights[a]]
        attn = site.module
        shape = (attn.to_k.out_features, attn.to_k.in_features)
        # A layer outside every target still gets an IP processor, holding no weights: it
        # drops the IP tokens the UNet passes to every cross-attention layer, and diffusers'
        # unload_ip_adapter / set_ip_adapter_scale treat it like every other IP layer.
        proc = FusedIPAdapterAttnProcessor(
            hidden_size=shape[0],
            cross_attention_dim=shape[1],
            num_tokens=tokens,
            scale=[scaled_weight(scales[a], weights[a][site.name]) if a in held else 0.0 for a in range(n)],
            adapter_ids=held,
        )
        values = {}
        for j, a in enumerate(held):
            state, source = states[a]
            k, v = layer_weights(state, source, key_ids[site.name], shape)
            values[f"to_k_ip.{j}.weight"], values[f"to_v_ip.{j}.weight"] = k, v
        proc.load_state_dict(values)
        proc.to(device=attn.to_k.weight.device, dtype=attn.to_k.weight.dtype)
        proc.gates = list(gates)
        procs[site.name] = proc
        held_params += len(held) * layer_params(site)

    projections = []
    for state, source in states:
        try:
            projections.append(unet._convert_ip_adapter_image_proj_to_diffusers(state["image_proj"], low_cpu_mem_usage=False))
        except (RuntimeError, KeyError, ValueError) as exc:
            raise ValueError(f"{source}: image_proj does not fit diffusers' converter: {exc}") from exc

    labels = {f"ip_adapter[{a}]": {"target": t, "source": source} for a, ((_, source), t) in enumerate(zip(states, targets))}
    reports = [AdapterReport(source, tokens[a], t, list(weights[a]), gates[a]) for a, ((_, source), t) in enumerate(zip(states, targets))]
    report = LoadReport(reports, held_params, n * sum(layer_params(s) for s in sites), torch.finfo(unet.dtype).bits // 8,
                        {k: old[k] for k in procs if procs[k] is not old[k]})
    return _Plan(procs, old, projections, gates, report, registry, labels)


def _commit(unet, plan: _Plan, caches: Optional[bool]) -> LoadReport:
    # As diffusers: keep Kolors' text projection, and drop the old image projection
    # before setting processors (IP-Adapter Plus' projection has processors of its own).
    if unet.encoder_hid_proj is not None and unet.config.encoder_hid_dim_type == "text_proj" and not hasattr(unet, "text_encoder_hid_proj"):
        unet.text_encoder_hid_proj = unet.encoder_hid_proj
    unet.encoder_hid_proj = None
    diffusers_compat.register_processor_classes()  # diffusers modules imported since
    unet.set_attn_processor(plan.procs)
    # (diffusers then calls unet.to(...), which warns about fp32 modules; only new modules need moving)
    unet.encoder_hid_proj = CachedImageProjection(plan.projections).to(device=unet.device, dtype=unet.dtype)
    unet.config.encoder_hid_dim_type = "ip_image_proj"
    if any(g is not None for g in plan.gates):
        ensure_step_hook(unet)
    choose_caches(unet, caches)
    registry = plan.registry
    registry.labels = {name: info for name, info in registry.labels.items() if not name.startswith("ip_adapter[")}
    registry.labels.update(plan.labels)
    return plan.report
