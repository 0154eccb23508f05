"""InstantStyle's first half: subtract the content from the style reference in CLIP space.

    style_embeds = image_embeds(style image) - content_scale * text_embeds(content prompt)

Both embeddings must live in the same projected CLIP space:

- SDXL's ``ip-adapter_sdxl`` (ViT-bigG image encoder, 1280-d) pairs with the pooled,
  projected output of the pipeline's own ``text_encoder_2`` (OpenCLIP bigG);
- ViT-H adapters (SD1.5 and the ``*_vit-h`` SDXL ones, 1024-d) pair with a CLIP ViT-H
  text model with projection, which the user provides.

The subtraction acts on the raw projected ``image_embeds`` (no L2 normalisation), before
the adapter's image projection, so it only applies to global-embedding adapters (4
tokens); "Plus" and Full-face adapters read patch features and are refused.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch

#: projected CLIP widths and the text encoder that shares each space
_ENCODER_FOR_WIDTH = {
    1280: "SDXL's text_encoder_2 (OpenCLIP ViT-bigG, the pipeline's own)",
    1024: "a CLIP ViT-H-14 text model with projection (laion/CLIP-ViT-H-14-laion2B-s32B-b79K)",
    768: "a CLIP ViT-L/14 text model with projection (openai/clip-vit-large-patch14)",
    1152: "SigLIP's text tower (SiglipTextModel of google/siglip-so400m-patch14-384)",
}


class ContentSubtractionError(ValueError):
    """Raised when the content embedding can't be subtracted from the style embedding."""


def encode_images(image_encoder, image_processor, images) -> torch.Tensor:
    """``(n_images, D)`` projected CLIP image embeddings, as diffusers' ``encode_image`` makes them."""
    param = next(image_encoder.parameters())
    if not isinstance(images, torch.Tensor):
        images = image_processor(images, return_tensors="pt").pixel_values
    with torch.no_grad():
        return image_encoder(images.to(device=param.device, dtype=param.dtype)).image_embeds


def encode_text(text_encoder, tokenizer, prompt: str) -> torch.Tensor:
    """``(1, D)`` pooled, projected CLIP text embedding of ``prompt``.

    ``text_encoder`` must project (``CLIPTextModelWithProjection``: SDXL's ``text_encoder_2``
    or a ViT-H text model), so its output lives in the image encoder's space.
    """
    tokens = tokenizer(
        prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids
    param = next(text_encoder.parameters())
    with torch.no_grad():
        out = text_encoder(tokens.to(param.device))
    if not hasattr(out, "text_embeds"):
        raise ContentSubtractionError(
            f"text_encoder: expected a CLIP text model with projection (text_embeds), got {type(text_encoder).__name__}; "
            "use SDXL's text_encoder_2 or CLIPTextModelWithProjection"
        )
    return out.text_embeds


def subtract_content(image_embeds: torch.Tensor, text_embeds: torch.Tensor, content_scale: float,
                     fits: Optional[str] = None) -> torch.Tensor:
    """``image_embeds - content_scale * text_embeds``, with a helpful error when the spaces differ
    (``fits``: the text encoder to name there; default: guessed from the image width)."""
    width_i, width_t = image_embeds.shape[-1], text_embeds.shape[-1]
    if width_i != width_t:
        fits = fits or _ENCODER_FOR_WIDTH.get(width_i, f"a CLIP text model with projection_dim={width_i}")
        raise ContentSubtractionError(
            f"content subtraction: the image embeddings are {width_i}-d but the text embeddings are {width_t}-d; "
            f"they must come from the same (CLIP or SigLIP) image-text space. For this image encoder use {fits}."
        )
    return image_embeds - content_scale * text_embeds.to(image_embeds.dtype)


def adapter_kinds(unet) -> List[str]:
    """Per loaded IP-Adapter: ``"global"`` (4-token ImageProjection) or the patch-feature kind."""
    from diffusers.models.embeddings import (
        ImageProjection,
        MultiIPAdapterImageProjection,
    )

    proj = getattr(unet, "encoder_hid_proj", None)
    if not isinstance(proj, MultiIPAdapterImageProjection):
        raise ValueError("unet: no IP-Adapter is loaded (load one with instantstyle.load_ip_adapter first)")
    return ["global" if isinstance(p, ImageProjection) else type(p).__name__ for p in proj.image_projection_layers]


def style_image_embeds(
    pipe,
    style_images: Sequence,
    content_prompt: Optional[str] = None,
    content_scale: float = 0.5,
    text_encoder=None,
    tokenizer=None,
    do_classifier_free_guidance: bool = True,
    negative_images: Optional[Sequence] = None,
    negative_content_prompt: Optional[str] = None,
) -> List[torch.Tensor]:
    """Style embeddings for every loaded adapter, in diffusers' ``ip_adapter_image_embeds`` layout.

    Args:
        pipe: a diffusers pipeline with ``image_encoder`` and ``feature_extractor`` set and
            IP-Adapters loaded.
        style_images: one entry per adapter; each an image or a list of images (several
            style references for one adapter share its softmax, as in diffusers).
        content_prompt: a short description of the references' content ("a cat"); None
            skips the subtraction.
        content_scale: how much of the content embedding to subtract.
        text_encoder, tokenizer: the CLIP text model with projection that shares the image
            encoder's space; default: the pipeline's ``text_encoder_2`` (SDXL bigG).
        do_classifier_free_guidance: prepend the unconditional half (zeros, as diffusers
            does for global-embedding adapters; it is not subtracted).
        negative_images: None, or one entry per adapter (an image or a list of 1 or
            n_images images): the unconditional half's embeddings come from these images
            instead of zeros (patch adapters: instead of a black image), the idea of
            ComfyUI's ``image_negative``.  One image stands for all n (n copies of one
            reference's tokens attend exactly as the one does).
        negative_content_prompt: subtract this content from the negative images' embeddings
            too (``content_scale``); None: no subtraction there.

    Returns:
        one tensor per adapter, ``[2, n_images, D]`` (negative first) with CFG, else
        ``[1, n_images, D]``: pass it as ``ip_adapter_image_embeds``.
    """
    if pipe.image_encoder is None or pipe.feature_extractor is None:
        raise ValueError("pipe: expected an image_encoder and a feature_extractor (CLIP vision model and processor)")
    kinds = adapter_kinds(pipe.unet)
    if len(style_images) != len(kinds):
        raise ValueError(f"style_images: expected one entry per loaded IP-Adapter ({len(kinds)}), got {len(style_images)}")
    text = None
    if content_prompt:
        text_encoder = text_encoder or getattr(pipe, "text_encoder_2", None)
        tokenizer = tokenizer or getattr(pipe, "tokenizer_2", None)
        if text_encoder is None or tokenizer is None:
            raise ContentSubtractionError(
                "content_prompt: this pipeline has no text_encoder_2; give a CLIP text model with projection that "
                "matches the image encoder (ViT-H for SD1.5 adapters): text_encoder= and tokenizer= in Python, "
                "--content-text-encoder DIR on the command line"
            )
        text = encode_text(text_encoder, tokenizer, content_prompt)
    negatives = negative_entries(negative_images, len(kinds))
    negative_text = None
    if negative_content_prompt and negatives is not None:
        text_encoder = text_encoder or getattr(pipe, "text_encoder_2", None)
        tokenizer = tokenizer or getattr(pipe, "tokenizer_2", None)
        if text_encoder is None or tokenizer is None:
            raise ContentSubtractionError("negative_content_prompt: this pipeline has no text_encoder_2; give text_encoder= "
                                          "and tokenizer= (a CLIP text model with projection in the image encoder's space)")
        negative_text = encode_text(text_encoder, tokenizer, negative_content_prompt)
    out = []
    for i, (images, kind) in enumerate(zip(style_images, kinds)):
        if (text is not None or negative_text is not None) and kind != "global":
            raise ContentSubtractionError(
                f"IP-Adapter {i} is a patch-feature adapter ({kind}, e.g. Plus or Full-face): content subtraction "
                "applies to global CLIP embeddings only (base 4-token adapters); drop content_prompt for it"
            )
        images = list(images) if isinstance(images, (list, tuple)) else [images]
        if kind == "global":
            embeds = encode_images(pipe.image_encoder, pipe.feature_extractor, images)
            if text is not None:
                embeds = subtract_content(embeds, text.to(embeds.device), content_scale)
            uncond = torch.zeros_like(embeds)
        else:  # patch features, exactly as diffusers' encode_image(output_hidden_states=True)
            embeds, uncond = _patch_features(pipe.image_encoder, pipe.feature_extractor, images)
        if negatives is not None and do_classifier_free_guidance:
            uncond = _negative_embeds(pipe, kind, negatives[i], len(images), i, negative_text, content_scale)
        embeds, uncond = embeds[None], uncond[None]  # [1, n_images, ...]
        out.append(torch.cat([uncond, embeds]) if do_classifier_free_guidance else embeds)
    return out


def negative_entries(negative_images, adapters: int):
    """``negative_images`` as one list of images per adapter, or None (shared with the DiT inputs)."""
    if negative_images is None:
        return None
    if not isinstance(negative_images, (list, tuple)):
        negative_images = [negative_images]
    if adapters == 1 and len(negative_images) != 1:
        negative_images = [list(negative_images)]  # several negatives of the one adapter
    if len(negative_images) != adapters:
        raise ValueError(f"negative_images: expected one entry per loaded IP-Adapter ({adapters}), got {len(negative_images)}")
    return [list(n) if isinstance(n, (list, tuple)) else [n] for n in negative_images]


def _negative_embeds(pipe, kind: str, images: list, count: int, adapter: int, text, content_scale: float):
    """The unconditional half of one adapter from negative images: ``(count, ...)``."""
    if len(images) not in (1, count):
        raise ValueError(f"negative_images[{adapter}]: expected 1 or {count} images (one per style image), got {len(images)}")
    if kind == "global":
        embeds = encode_images(pipe.image_encoder, pipe.feature_extractor, images)
        if text is not None:
            embeds = subtract_content(embeds, text.to(embeds.device), content_scale)
    else:
        embeds = _patch_features(pipe.image_encoder, pipe.feature_extractor, images)[0]
    return embeds.expand(count, *embeds.shape[1:]) if len(images) == 1 else embeds


def _patch_features(image_encoder, image_processor, images):
    """Penultimate hidden states of the images and of a black image (the unconditional half)."""
    param = next(image_encoder.parameters())
    pixels = image_processor(images, return_tensors="pt").pixel_values.to(device=param.device, dtype=param.dtype)
    with torch.no_grad():
        cond = image_encoder(pixels, output_hidden_states=True).hidden_states[-2]
        uncond = image_encoder(torch.zeros_like(pixels), output_hidden_states=True).hidden_states[-2]
    return cond, uncond
