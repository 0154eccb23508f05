"""The trainable parts of an IP-Adapter, installed the way inference runs them.

* **Image projection**: ``base`` is diffusers' ``ImageProjection`` (Linear + LayerNorm to 4
  tokens, from CLIP's projected ``image_embeds``); ``plus`` is diffusers'
  ``IPAdapterPlusImageProjection`` (a resampler to 16 tokens, from CLIP's penultimate hidden
  states; width 64 x heads, as the original ``Resampler``: 1280 for SDXL, 768 for SD1.5).
* **K/V projections** ``to_k_ip``/``to_v_ip`` only in the target layers, initialised as copies
  of the layer's ``to_k``/``to_v`` (the original recipe).
* Every layer that can take IP weights gets a ``FusedIPAdapterAttnProcessor``, as
  ``instantstyle.load_ip_adapter`` sets them up: target layers hold adapter 0 at their target
  weight, the rest hold nothing and do no IP work.  So the training forward is the inference
  code path, and no layer outside the targets has a parameter that could get a gradient.

Everything else (UNet, VAE, encoders) is frozen; parameters are named by their path in the
UNet (``up_blocks.0.attentions.1.transformer_blocks.0.attn2.processor.to_k_ip.0.weight``,
``encoder_hid_proj.image_projection_layers.0.image_embeds.weight``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..processors.core import diffusers_compat
from ..processors.targets.registry import registry_of
from ..processors.targets.sites import AttentionSite, ip_key_ids, ip_sites
from ..processors.unet.fused_processor import FusedIPAdapterAttnProcessor
from ..processors.unet.image_projection import CachedImageProjection

FORMATS = ("base", "plus")
TOKENS = {"base": 4, "plus": 16}
PLUS_DEPTH, PLUS_HEAD_DIM, PLUS_FFN = 4, 64, 4  # diffusers' converter assumes these


@dataclass
class Adapter:
    """What :func:`install_adapter` put into a UNet."""

    format: str
    target: object  # as given
    weights: dict[str, float]  # target site name -> weight
    sites: list[AttentionSite]  # every IP site, in checkpoint key-id order
    key_ids: dict[str, int]  # site name -> id in the original layout
    projection: torch.nn.Module
    encoder_width: int  # what the projection reads: projection_dim (base) or hidden_size (plus)

    @property
    def num_tokens(self) -> int:
        return TOKENS[self.format]


def plus_width(cross_attention_dim: int) -> int:
    """The resampler's width: the original's 1280 (SDXL) / 768 (SD1.5), a multiple of 64 at least 64."""
    return max(PLUS_HEAD_DIM, min(1280, -(-cross_attention_dim // PLUS_HEAD_DIM) * PLUS_HEAD_DIM))


def build_projection(fmt: str, encoder_config, cross_attention_dim: int) -> tuple[torch.nn.Module, int]:
    """``(projection, width it reads)`` with diffusers' default initialisation."""
    from diffusers.models.embeddings import (
        ImageProjection,
        IPAdapterPlusImageProjection,
    )

    if fmt == "base":
        width = int(encoder_config.projection_dim)
        return ImageProjection(cross_attention_dim=cross_attention_dim, image_embed_dim=width,
                               num_image_text_embeds=TOKENS["base"]), width
    if fmt == "plus":
        width, hidden = int(encoder_config.hidden_size), plus_width(cross_attention_dim)
        return IPAdapterPlusImageProjection(embed_dims=width, output_dims=cross_attention_dim, hidden_dims=hidden,
                                            depth=PLUS_DEPTH, dim_head=PLUS_HEAD_DIM, heads=hidden // PLUS_HEAD_DIM,
                                            num_queries=TOKENS["plus"], ffn_ratio=PLUS_FFN), width
    raise ValueError(f"format: expected one of {', '.join(FORMATS)}, got {fmt!r}")


def _weight(site: str, value) -> float:
    if isinstance(value, (list, tuple)):
        raise ValueError(f"target: {site} has per-image weights {list(value)}; training takes one weight per layer")
    return float(value)


def install_adapter(unet, target, fmt: str, encoder_config, seed: int = 0, arch=None) -> Adapter:
    """Freeze ``unet`` and install a new trainable adapter into it (see the module doc).

    The new weights depend only on ``seed`` (and the UNet's own ``to_k``/``to_v``), not on the
    global RNG, which is left as it was."""
    sites = ip_sites(unet)
    weights = {name: _weight(name, w) for name, w in registry_of(unet, arch).resolve(target, "cross").items()}
    if not weights:
        raise ValueError(f"target: {target!r} selects no cross-attention layer of this UNet")
    unet.requires_grad_(False)
    device, dtype = unet.device, torch.float32  # trained weights stay float32 (mixed precision autocasts)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        projection, width = build_projection(fmt, encoder_config, unet.config.cross_attention_dim)
    procs = {name: proc for name, proc in unet.attn_processors.items() if not name.startswith("encoder_hid_proj.")}
    for site in sites:
        attn = site.module
        held = site.name in weights
        proc = FusedIPAdapterAttnProcessor(hidden_size=attn.to_k.out_features, cross_attention_dim=attn.to_k.in_features,
                                           num_tokens=[TOKENS[fmt]], scale=[weights.get(site.name, 0.0)],
                                           adapter_ids=[0] if held else [])
        if held:
            with torch.no_grad():
                proc.to_k_ip[0].weight.copy_(attn.to_k.weight.float())
                proc.to_v_ip[0].weight.copy_(attn.to_v.weight.float())
        procs[site.name] = proc.to(device=device, dtype=dtype)
    # as loaders.loader._commit: Kolors keeps its text projection; drop the old image
    # projection before setting processors (Plus' projection has processors of its own)
    if unet.encoder_hid_proj is not None and unet.config.encoder_hid_dim_type == "text_proj" \
            and not hasattr(unet, "text_encoder_hid_proj"):
        unet.text_encoder_hid_proj = unet.encoder_hid_proj
    unet.encoder_hid_proj = None
    diffusers_compat.register_processor_classes()
    unet.set_attn_processor(procs)
    unet.encoder_hid_proj = CachedImageProjection([projection]).to(device=device, dtype=dtype)
    unet.config.encoder_hid_dim_type = "ip_image_proj"
    for proc in procs.values():
        if isinstance(proc, FusedIPAdapterAttnProcessor):
            proc.requires_grad_(True)
    unet.encoder_hid_proj.requires_grad_(True)
    return Adapter(fmt, target, weights, sites, ip_key_ids(unet), projection, width)


def trainable_parameters(model) -> list[tuple[str, torch.nn.Parameter]]:
    """``[(name, parameter)]`` of everything that trains, in a fixed order."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def trainable_state(model) -> dict[str, torch.Tensor]:
    """Detached float32 CPU copies of the trained weights, by name."""
    return {n: p.detach().float().cpu().contiguous() for n, p in trainable_parameters(model)}


def load_trainable_state(model, state: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Copy ``state`` into the trained weights; names and shapes must match exactly."""
    params = dict(trainable_parameters(model))
    missing, unexpected = sorted(set(params) - set(state)), sorted(set(state) - set(params))
    if missing or unexpected:
        raise ValueError(f"{source}: does not fit this adapter (missing {missing[:2]}, unexpected {unexpected[:2]}); "
                         "was it trained with another --target, --format or model?")
    with torch.no_grad():
        for name, param in params.items():
            if tuple(state[name].shape) != tuple(param.shape):
                raise ValueError(f"{source}: {name}: expected shape {tuple(param.shape)}, got {tuple(state[name].shape)}")
            param.copy_(state[name].to(param.dtype))
