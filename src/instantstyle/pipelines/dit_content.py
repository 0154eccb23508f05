"""InstantStyle's content subtraction for transformer pipelines (Flux, SD3.5), and the
IP-Adapter inputs each pipeline expects.

The subtraction happens in the space of the adapter's own image encoder:

- XLabs Flux adapters read the projected ``image_embeds`` of a CLIP ViT-L/14 vision model
  (768-d): the content prompt goes through a CLIP ViT-L/14 text model *with projection*
  (``openai/clip-vit-large-patch14``).  Flux's own ``text_encoder`` is that model's text
  tower *without* the projection, so its pooled output is in another space and is refused.
- InstantX FLUX.1-dev reads SigLIP-so400m's pooled output (1152-d): the content prompt
  goes through SigLIP's text tower (``SiglipTextModel``), whose pooled output is the
  matching space (SigLIP's contrastive pair).
- InstantX SD3.5-Large reads SigLIP patch features (penultimate hidden states), so, as for
  UNet "Plus" adapters, there is no global embedding to subtract from: refused.

The inputs differ per pipeline: Flux takes ``ip_adapter_image_embeds`` (one
``(1, n_images, D)`` tensor per adapter) plus ``negative_ip_adapter_image_embeds``
(diffusers encodes a black image for it; without it the pipeline needs an image encoder
of CLIP's class); SD3 takes ONE tensor ``(2, tokens, D)`` (zeros first) with CFG.  A
negative style image replaces the black image or the zeros.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch

from instantstyle.loaders.hub import is_siglip
from instantstyle.processors.core.models import transformer_family, unet_of

from .content import ContentSubtractionError, negative_entries, subtract_content

XLABS, INSTANTX, SD3 = "xlabs", "instantx", "instantx-sd3"

LABEL = {XLABS: "XLabs Flux", INSTANTX: "InstantX Flux", SD3: "InstantX SD3.5"}
#: the text model that shares each adapter kind's image space (named in errors)
TEXT_ENCODER_FOR = {
    XLABS: "a CLIP ViT-L/14 text model with projection (CLIPTextModelWithProjection, openai/clip-vit-large-patch14); "
           "Flux's own text_encoder lacks the projection",
    INSTANTX: "SigLIP's text tower (SiglipTextModel of google/siglip-so400m-patch14-384)",
}


def dit_adapter_kinds(pipe) -> List[str]:
    """Per loaded adapter of a Flux/SD3 pipeline: ``"xlabs"``, ``"instantx"`` or ``"instantx-sd3"``."""
    from diffusers.models.embeddings import (
        ImageProjection,
        MultiIPAdapterImageProjection,
    )

    from instantstyle.loaders.flux import InstantXImageProjection

    model = unet_of(pipe)
    if transformer_family(model) == "sd3":
        if getattr(model, "image_proj", None) is None:
            raise ValueError("pipe: no IP-Adapter is loaded in the SD3 transformer (load one with instantstyle.load_ip_adapter)")
        return [SD3]
    proj = getattr(model, "encoder_hid_proj", None)
    if not isinstance(proj, MultiIPAdapterImageProjection):
        raise ValueError("pipe: no IP-Adapter is loaded in the Flux transformer (load one with instantstyle.load_ip_adapter)")
    kinds = []
    for layer in proj.image_projection_layers:
        if isinstance(layer, InstantXImageProjection):
            kinds.append(INSTANTX)
        elif isinstance(layer, ImageProjection):
            kinds.append(XLABS)
        else:
            raise ValueError(f"pipe: unknown Flux image projection {type(layer).__name__}")
    return kinds


def _pixels(encoder, processor, images):
    param = next(encoder.parameters())
    if not isinstance(images, torch.Tensor):
        images = processor(images, return_tensors="pt").pixel_values
    return images.to(device=param.device, dtype=param.dtype)


def encode_global(encoder, processor, images) -> torch.Tensor:
    """``(n, D)`` global image embeddings as each adapter reads them: CLIP's projected
    ``image_embeds`` (XLabs) or SigLIP's pooled output (InstantX Flux)."""
    with torch.no_grad():
        out = encoder(_pixels(encoder, processor, images))
    return out.image_embeds if getattr(out, "image_embeds", None) is not None else out.pooler_output


def encode_patches(encoder, processor, images) -> torch.Tensor:
    """``(n, tokens, D)`` penultimate hidden states, as diffusers' SD3 ``encode_image``."""
    with torch.no_grad():
        return encoder(_pixels(encoder, processor, images), output_hidden_states=True).hidden_states[-2]


def encode_content(text_encoder, tokenizer, prompt: str, kind: str, image_encoder) -> torch.Tensor:
    """``(1, D)`` text embedding of ``prompt`` in ``kind``'s image space; a text model of the
    wrong family is refused (CLIP text with a SigLIP image encoder, or the reverse, can have
    equal widths and still mean nothing)."""
    siglip_text = str(getattr(text_encoder.config, "model_type", "")).startswith("siglip")
    if siglip_text != is_siglip(image_encoder):
        raise ContentSubtractionError(
            f"content text encoder: expected {TEXT_ENCODER_FOR[kind]} for this {LABEL[kind]} adapter's "
            f"{type(image_encoder).__name__}, got {type(text_encoder).__name__}"
        )
    # SigLIP was trained on max_length padding (64); CLIP pads to 77 either way
    length = min(int(tokenizer.model_max_length), int(text_encoder.config.max_position_embeddings))
    tokens = tokenizer(prompt, padding="max_length", max_length=length, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        out = text_encoder(tokens.to(next(text_encoder.parameters()).device))
    if siglip_text:
        return out.pooler_output
    if getattr(out, "text_embeds", None) is None:
        raise ContentSubtractionError(f"content text encoder: expected {TEXT_ENCODER_FOR[kind]}, got {type(text_encoder).__name__}")
    return out.text_embeds


def dit_style_inputs(
    pipe,
    style_images: Sequence,
    content_prompt: Optional[str] = None,
    content_scale: float = 0.5,
    text_encoder=None,
    tokenizer=None,
    do_classifier_free_guidance: bool = True,
    negative_images: Optional[Sequence] = None,
    negative_content_prompt: Optional[str] = None,
) -> Dict[str, object]:
    """Keyword arguments for a Flux or SD3 pipeline call carrying the (content-subtracted)
    style references: one ``style_images`` entry (an image or a list) per loaded adapter.

    ``do_classifier_free_guidance`` matters for SD3 only (Flux has no CFG halves).
    ``negative_images`` (one entry per adapter, as for the UNet's ``style_image_embeds``)
    replace the image side of the unconditional prediction: SD3's zero half, and Flux's
    black-image ``negative_ip_adapter_image_embeds`` (read by diffusers only under true CFG:
    ``true_cfg_scale > 1`` with a negative prompt).  ``negative_content_prompt`` is subtracted
    from Flux's negatives as ``content_prompt`` is from the references."""
    encoder, processor = getattr(pipe, "image_encoder", None), getattr(pipe, "feature_extractor", None)
    if encoder is None or processor is None:
        raise ValueError("pipe: expected an image_encoder and a feature_extractor (CLIP ViT-L for XLabs, SigLIP for InstantX)")
    kinds = dit_adapter_kinds(pipe)
    if len(style_images) != len(kinds):
        raise ValueError(f"style_images: expected one entry per loaded IP-Adapter ({len(kinds)}), got {len(style_images)}")
    negatives = negative_entries(negative_images, len(kinds))
    if kinds == [SD3]:
        images = images_of(style_images[0])
        for name, given in (("content_prompt", content_prompt), ("negative_content_prompt", negative_content_prompt)):
            if given:
                raise ContentSubtractionError(
                    f"{name}: the SD3.5 IP-Adapter reads SigLIP patch features (penultimate hidden states), not a "
                    "global embedding; content subtraction applies to global-embedding adapters only: drop it"
                )
        for name, given in (("style_images", images), ("negative_images", negatives[0] if negatives else [None])):
            if len(given) != 1:
                raise ValueError(f"{name}: the SD3.5 IP-Adapter takes one style image, got {len(given)}")
        embeds = encode_patches(encoder, processor, images)
        if not do_classifier_free_guidance:
            return {"ip_adapter_image_embeds": embeds}
        uncond = torch.zeros_like(embeds) if negatives is None else encode_patches(encoder, processor, negatives[0])
        return {"ip_adapter_image_embeds": torch.cat([uncond, embeds])}
    for name, given in (("content_prompt", content_prompt), ("negative_content_prompt", negative_content_prompt)):
        if given and (text_encoder is None or tokenizer is None):
            raise ContentSubtractionError(
                f"{name}: the {LABEL[kinds[0]]} adapter needs {TEXT_ENCODER_FOR[kinds[0]]} for content subtraction: "
                "text_encoder= and tokenizer= in Python, --content-text-encoder DIR on the command line"
            )
    positive, negative = [], []
    black = _black_image()
    for i, (entry, kind) in enumerate(zip(style_images, kinds)):
        images = images_of(entry)
        positive.append(_global_embeds(encoder, processor, images, kind, content_prompt, content_scale,
                                       text_encoder, tokenizer)[None])
        if negatives is None:  # as diffusers: a black image, not subtracted
            negative.append(encode_global(encoder, processor, [black])[None])
            continue
        if len(negatives[i]) not in (1, len(images)):
            raise ValueError(f"negative_images[{i}]: expected 1 or {len(images)} images (one per style image), "
                             f"got {len(negatives[i])}")
        embeds = _global_embeds(encoder, processor, negatives[i], kind, negative_content_prompt, content_scale,
                                text_encoder, tokenizer)
        negative.append(embeds.expand(len(images), -1)[None])
    return {"ip_adapter_image_embeds": positive, "negative_ip_adapter_image_embeds": negative}


def _global_embeds(encoder, processor, images, kind, content_prompt, content_scale, text_encoder, tokenizer):
    """``(n, D)`` embeddings of ``images``, less ``content_scale`` x the content prompt's."""
    embeds = encode_global(encoder, processor, images)
    if content_prompt:
        text = encode_content(text_encoder, tokenizer, content_prompt, kind, encoder)
        embeds = subtract_content(embeds, text.to(embeds.device), content_scale, fits=TEXT_ENCODER_FOR[kind])
    return embeds


def images_of(entry) -> list:
    return list(entry) if isinstance(entry, (list, tuple)) else [entry]


def _black_image():
    """diffusers' negative IP image for Flux: ``np.zeros((h, w, 3), uint8)``; the processor
    resizes it, so its size does not matter."""
    import numpy as np

    return np.zeros((64, 64, 3), dtype=np.uint8)
