"""One call wires a diffusers pipeline for InstantStyle; then stylise as often as you like.

    style = InstantStyle(pipe, "ip-adapter_sdxl.safetensors", target="style")
    image = style("a dog, watercolor", style_images=[ref], content_prompt="a cat").images[0]

Loading happens once: the checkpoint is read from disk once and kept (CPU) in memory,
IP weights go only into the target layers, and the fused processors run everywhere.
Changing the style images, prompt or content settings between calls touches no weights;
changing the scale or the targets re-slices the in-memory checkpoint (nothing is re-read
from disk, no model is rebuilt), unlike upstream's demo, which rebuilt everything per request.
"""
from __future__ import annotations

from typing import Optional

from instantstyle.processors import load_ip_adapter
from instantstyle.processors.checkpoints import read_checkpoint

from .content import style_image_embeds


class InstantStyle:
    """A diffusers pipeline with an IP-Adapter loaded into style-specific blocks.

    Args:
        pipe: a StableDiffusion(XL) pipeline: text-to-image, img2img, inpaint or ControlNet.
        ip_adapter: path to an IP-Adapter ``.bin``/``.safetensors`` (original layout) or
            its state dict.
        target: a preset (``"style"``, ``"layout"``, ``"style+layout"``, ``"all"``), module
            patterns, or a ``set_ip_adapter_scale`` dict; see ``instantstyle.processors``.
        scale: IP-Adapter scale in the target layers.
        image_encoder, image_processor: the CLIP vision model with projection and its
            processor, if the pipeline has none yet.
        text_encoder, tokenizer: CLIP text model with projection for content subtraction
            when the pipeline's ``text_encoder_2`` is not in the image encoder's space
            (ViT-H adapters).
    """

    def __init__(self, pipe, ip_adapter, target="style", scale: float = 1.0, image_encoder=None, image_processor=None,
                 text_encoder=None, tokenizer=None):
        self.pipe = pipe
        if image_encoder is not None or image_processor is not None:
            pipe.register_modules(
                image_encoder=image_encoder if image_encoder is not None else pipe.image_encoder,
                feature_extractor=image_processor if image_processor is not None else pipe.feature_extractor,
            )
        self.text_encoder, self.tokenizer = text_encoder, tokenizer
        self._state, self.source = read_checkpoint(ip_adapter)  # read once
        self.target, self.scale = target, scale
        self.report = self._load()

    def _load(self):
        return load_ip_adapter(self.pipe, self._state, target=self.target, scale=self.scale)

    def configure(self, target=None, scale: Optional[float] = None):
        """Change targets and/or scale from the in-memory checkpoint (no disk read)."""
        changed = (target is not None and target != self.target) or (scale is not None and scale != self.scale)
        if changed:
            self.target = self.target if target is None else target
            self.scale = self.scale if scale is None else scale
            self.report = self._load()
        return self.report

    def embeds(self, style_images, content_prompt: Optional[str] = None, content_scale: float = 0.5,
               do_classifier_free_guidance: bool = True):
        """Content-subtracted style embeddings, in the ``ip_adapter_image_embeds`` layout."""
        images = style_images if isinstance(style_images, (list, tuple)) else [style_images]
        return style_image_embeds(
            self.pipe, [list(images)], content_prompt, content_scale, self.text_encoder, self.tokenizer,
            do_classifier_free_guidance,
        )

    def __call__(self, prompt, style_images, content_prompt: Optional[str] = None, content_scale: float = 0.5,
                 target=None, scale: Optional[float] = None, **pipe_kwargs):
        """Run the pipeline with the style references; extra keyword arguments go to it."""
        self.configure(target, scale)
        cfg = pipe_kwargs.get("guidance_scale", 5.0) > 1.0
        embeds = self.embeds(style_images, content_prompt, content_scale, do_classifier_free_guidance=cfg)
        return self.pipe(prompt=prompt, ip_adapter_image_embeds=embeds, **pipe_kwargs)
