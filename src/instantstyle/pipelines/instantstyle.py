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

from instantstyle.loaders import load_ip_adapter
from instantstyle.loaders.checkpoints import read_checkpoint
from instantstyle.loaders.flux import INSTANTX, checkpoint_format, read_flux_checkpoint
from instantstyle.loaders.hub import attach_image_encoder, resolve_checkpoints
from instantstyle.processors.core.models import transformer_family, unet_of

from .content import style_image_embeds
from .dit_content import dit_style_inputs


def read_ip_adapter(checkpoint, reader=read_checkpoint) -> tuple:
    """``reader(checkpoint)`` with unreadable files (empty, truncated, not a checkpoint) reported as
    a ``ValueError`` naming the file, not as a pickle/safetensors internal error."""
    try:
        return reader(checkpoint)
    except (ValueError, TypeError, FileNotFoundError, NotImplementedError):
        raise
    except Exception as exc:  # UnpicklingError, EOFError, SafetensorError, RuntimeError from torch.load
        first = (str(exc).splitlines() or [""])[0][:200]
        raise ValueError(f"{checkpoint}: not a readable IP-Adapter checkpoint ({type(exc).__name__}: {first})") from None


def default_target(family, state: dict, source: str) -> str:
    """InstantStyle's blocks where they are known: UNets and InstantX Flux (weights in the
    single-stream blocks SplitFlux finds style in) ``"style"``; XLabs Flux (double-stream
    blocks only, no published style split there) and SD3.5 ``"all"``."""
    if family is None:
        return "style"
    if family == "flux" and checkpoint_format(state, source) == INSTANTX:
        return "style"
    return "all"


def layers_of(report) -> list:
    """The layers holding the first adapter's weights, from either load report."""
    return list(report.adapters[0].layers) if hasattr(report, "adapters") else list(report.layers[0])


class InstantStyle:
    """A diffusers pipeline with an IP-Adapter loaded into style-specific blocks.

    Args:
        pipe: a StableDiffusion(XL) pipeline (text-to-image, img2img, inpaint or ControlNet), or
            a Flux / SD3.5 pipeline.
        ip_adapter: a hub id (``"h94/IP-Adapter"``), a folder, a path to an IP-Adapter
            ``.bin``/``.safetensors`` (original layout) or its state dict.
        subfolder, weight_name, image_encoder_folder, **hub_kwargs: as in
            :func:`instantstyle.load_ip_adapter` (diffusers' semantics); the image encoder is
            attached from the adapter's repo/folder when none is given.
        target: a preset (``"style"``, ``"layout"``, ``"style+layout"``, ``"all"``; Flux
            ``"double"``/``"single"``/``"content"``/``"style"``), module patterns, or a
            ``set_ip_adapter_scale`` dict; see ``instantstyle.processors``.  None (default):
            ``"style"`` for UNets and InstantX Flux, ``"all"`` for XLabs Flux and SD3.5.
        scale: IP-Adapter scale in the target layers.
        image_encoder, image_processor: the CLIP vision model with projection and its
            processor, if the pipeline has none yet.
        start_at, end_at: the adapter's active range over the schedule (fractions, as ComfyUI).
        text_encoder, tokenizer: CLIP text model with projection for content subtraction
            when the pipeline's ``text_encoder_2`` is not in the image encoder's space
            (ViT-H adapters; for XLabs Flux a CLIP ViT-L/14 one, for InstantX Flux
            SigLIP's ``SiglipTextModel``).
    """

    def __init__(self, pipe, ip_adapter, target=None, scale: float = 1.0, image_encoder=None, image_processor=None,
                 text_encoder=None, tokenizer=None, *, subfolder=None, weight_name=None,
                 image_encoder_folder: Optional[str] = "image_encoder", start_at: float = 0.0, end_at: float = 1.0,
                 **hub_kwargs):
        self.pipe = pipe
        files = resolve_checkpoints(ip_adapter, subfolder, weight_name, **hub_kwargs)
        if len(files) != 1:
            raise ValueError(f"ip_adapter: InstantStyle takes one IP-Adapter, got {len(files)}")
        if image_encoder is not None or image_processor is not None:
            pipe.register_modules(
                image_encoder=image_encoder if image_encoder is not None else pipe.image_encoder,
                feature_extractor=image_processor if image_processor is not None else pipe.feature_extractor,
            )
        self.family = transformer_family(unet_of(pipe))
        # XLabs' own Flux safetensors need their key conversion; other files read as usual
        self._state, self.source = read_ip_adapter(files[0], read_flux_checkpoint if self.family else read_checkpoint)
        attach_image_encoder(pipe, ip_adapter, subfolder, image_encoder_folder, **hub_kwargs)
        self.text_encoder, self.tokenizer = text_encoder, tokenizer
        if target is None:
            target = default_target(self.family, self._state, self.source)
        self.target, self.scale, self.start_at, self.end_at = target, scale, start_at, end_at
        self.report = self._load(target, scale)

    def _load(self, target, scale):
        return load_ip_adapter(self.pipe, self._state, target=target, scale=scale, start_at=self.start_at,
                               end_at=self.end_at)

    def configure(self, target=None, scale: Optional[float] = None):
        """Change targets and/or scale from the in-memory checkpoint (no disk read).

        All or nothing: if loading fails (a target that matches nothing, a bad scale), the
        error propagates and the model, ``target``, ``scale`` and ``report`` are unchanged.
        """
        new_target = self.target if target is None else target
        new_scale = self.scale if scale is None else scale
        if new_target != self.target or new_scale != self.scale:
            report = self._load(new_target, new_scale)  # raises before touching the UNet on bad input
            self.target, self.scale, self.report = new_target, new_scale, report
        return self.report

    def embeds(self, style_images, content_prompt: Optional[str] = None, content_scale: float = 0.5,
               do_classifier_free_guidance: bool = True):
        """Content-subtracted style embeddings, in the ``ip_adapter_image_embeds`` layout."""
        if self.family is not None:  # Flux / SD3: see ip_inputs for the negative embeddings
            return self.ip_inputs(style_images, content_prompt, content_scale, do_classifier_free_guidance)["ip_adapter_image_embeds"]
        images = style_images if isinstance(style_images, (list, tuple)) else [style_images]
        return style_image_embeds(
            self.pipe, [list(images)], content_prompt, content_scale, self.text_encoder, self.tokenizer,
            do_classifier_free_guidance,
        )

    def ip_inputs(self, style_images, content_prompt: Optional[str] = None, content_scale: float = 0.5,
                  do_classifier_free_guidance: bool = True) -> dict:
        """The pipeline call's IP-Adapter keyword arguments: ``ip_adapter_image_embeds`` (and for
        Flux ``negative_ip_adapter_image_embeds``), content-subtracted, in each pipeline's layout."""
        if self.family is None:
            return {"ip_adapter_image_embeds": self.embeds(style_images, content_prompt, content_scale,
                                                           do_classifier_free_guidance)}
        images = style_images if isinstance(style_images, (list, tuple)) else [style_images]
        return dit_style_inputs(self.pipe, [list(images)], content_prompt, content_scale, self.text_encoder, self.tokenizer,
                                do_classifier_free_guidance)

    def __call__(self, prompt, style_images, content_prompt: Optional[str] = None, content_scale: float = 0.5,
                 target=None, scale: Optional[float] = None, **pipe_kwargs):
        """Run the pipeline with the style references; extra keyword arguments go to it."""
        self.configure(target, scale)
        cfg = pipe_kwargs.get("guidance_scale", 5.0) > 1.0
        inputs = self.ip_inputs(style_images, content_prompt, content_scale, do_classifier_free_guidance=cfg)
        return self.pipe(prompt=prompt, **inputs, **pipe_kwargs)
