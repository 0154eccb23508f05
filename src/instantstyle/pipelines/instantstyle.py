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

import inspect
from contextlib import contextmanager
from typing import Optional

import torch

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


#: the control settings :meth:`InstantStyle.configure` passes on to ``load_ip_adapter``
CONTROLS = ("weight_type", "weight", "composition_weight", "embeds_scaling")


def per_prompt_styles(style_images, num_prompts: int):
    """One list of style images per prompt, or None when all prompts share ``style_images``.

    Per prompt: a list of ``num_prompts`` lists (each one prompt's references), or, with
    several prompts, a flat list of exactly ``num_prompts`` images (image i styles prompt i).
    Anything else (one image, or a flat list of another length) is shared by all prompts,
    its images sharing one softmax as in diffusers."""
    if not isinstance(style_images, (list, tuple)) or num_prompts < 2 and not any(
            isinstance(x, (list, tuple)) for x in style_images):
        return None
    nested = [isinstance(x, (list, tuple)) for x in style_images]
    if any(nested):
        if not all(nested) or len(style_images) != num_prompts:
            raise ValueError(f"style_images: expected a list of {num_prompts} lists (one per prompt), got {len(style_images)} "
                             f"entries of which {sum(nested)} are lists")
        return [list(x) for x in style_images]
    return [[x] for x in style_images] if len(style_images) == num_prompts else None


def _per_prompt(name: str, value, num_prompts: int) -> list:
    """A per-prompt setting: one value for all, or a list of ``num_prompts`` values."""
    if isinstance(value, (list, tuple)):
        if len(value) != num_prompts:
            raise ValueError(f"{name}: expected one value or a list of {num_prompts} (one per prompt), got {len(value)}")
        return list(value)
    return [value] * num_prompts


@contextmanager
def embeds_as_given(pipe):
    """While active, the pipeline takes ``ip_adapter_image_embeds`` that already hold the whole
    batch (``[2 * B * num_images_per_prompt, ...]`` with CFG) as they are.  diffusers' own
    ``prepare_ip_adapter_image_embeds`` repeats them once per prompt (diffusers issue 9813),
    which would pair every prompt with all references; embeds of one row keep its behaviour.
    UNet and SD3 pipelines pass ``do_classifier_free_guidance`` after the count (SD3's embeds
    are one tensor, not a list); Flux's (true CFG is a second call, not a second half of the
    batch) pass nothing after it."""
    original = pipe.prepare_ip_adapter_image_embeds
    own = "prepare_ip_adapter_image_embeds" in vars(pipe)

    def prepare(ip_adapter_image, ip_adapter_image_embeds, device, num_images_per_prompt, *args, **kwargs):
        cfg = args[0] if args else kwargs.get("do_classifier_free_guidance", False)
        rows = num_images_per_prompt * (2 if cfg else 1)
        if isinstance(ip_adapter_image_embeds, torch.Tensor):  # SD3: one adapter, one tensor
            if ip_adapter_image_embeds.shape[0] == rows:
                return ip_adapter_image_embeds.to(device)
        elif isinstance(ip_adapter_image_embeds, (list, tuple)) and all(e.shape[0] == rows for e in ip_adapter_image_embeds):
            return [e.to(device) for e in ip_adapter_image_embeds]
        return original(ip_adapter_image, ip_adapter_image_embeds, device, num_images_per_prompt, *args, **kwargs)

    object.__setattr__(pipe, "prepare_ip_adapter_image_embeds", prepare)
    try:
        yield pipe
    finally:
        if own:
            object.__setattr__(pipe, "prepare_ip_adapter_image_embeds", original)
        else:
            del pipe.__dict__["prepare_ip_adapter_image_embeds"]


def stack_per_prompt(per_prompt: list, num_images_per_prompt: int, cfg: bool) -> list:
    """Per prompt, per adapter ``[2 or 1, n, ...]`` embeds -> per adapter ``[(2) B * nipp, n, ...]``:
    all negatives first, then all positives (diffusers' CFG order), each prompt's rows
    repeated ``num_images_per_prompt`` times in place, as diffusers orders the prompt embeds."""
    counts = [[e.shape[1] for e in row] for row in per_prompt]
    if any(c != counts[0] for c in counts):
        raise ValueError(f"style_images: every prompt of one batch needs the same number of style images per adapter, "
                         f"got {counts}")
    out = []
    for adapter in range(len(per_prompt[0])):
        rows = [row[adapter] for row in per_prompt]
        halves = [torch.cat([r[h:h + 1] for r in rows]) for h in (range(2) if cfg else range(1))]
        out.append(torch.cat([half.repeat_interleave(num_images_per_prompt, dim=0) for half in halves]))
    return out


def _per_prompt_negatives(negative_style_images, num_prompts: int) -> list:
    """One negative entry (an image, a list, or None) per prompt: a list of ``num_prompts``
    is per prompt, anything else is shared by every prompt."""
    if isinstance(negative_style_images, (list, tuple)) and len(negative_style_images) == num_prompts:
        return list(negative_style_images)
    return [negative_style_images] * num_prompts


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
                 weight_type=None, weight=None, composition_weight=None, embeds_scaling=None, **hub_kwargs):
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
        self._implicit_target, self._default_target = target is None, default_target(self.family, self._state, self.source)
        self.controls = {k: v for k, v in zip(CONTROLS, (weight_type, weight, composition_weight, embeds_scaling))
                         if v is not None}
        target = self._target_for(target, self.controls)
        self.target, self.scale, self.start_at, self.end_at = target, scale, start_at, end_at
        self.report = self._load(target, scale, self.controls)

    def _target_for(self, target, controls):
        """The target to load: as given; else the last one given; else the family's default, or
        with a UNet weight type ``"all"`` (the loader then holds IP weights wherever the type
        weights a module: a weight type spans more than the style block)."""
        if target is not None:
            return target
        if not self._implicit_target:
            return self.target
        return "all" if controls.get("weight_type") and self.family is None else self._default_target

    def _load(self, target, scale, controls):
        if controls:
            missing = [k for k in controls if k not in inspect.signature(load_ip_adapter).parameters]
            if missing:
                raise ValueError(f"{missing[0]}: this build's load_ip_adapter has no {missing[0]}= "
                                 "(instantstyle.processors.targets.weight_types is missing)")
        return load_ip_adapter(self.pipe, self._state, target=target, scale=scale, start_at=self.start_at,
                               end_at=self.end_at, **controls)

    def configure(self, target=None, scale: Optional[float] = None, weight_type=None, weight=None,
                  composition_weight=None, embeds_scaling=None):
        """Change targets, scale and the controls (``weight_type``, ``weight``,
        ``composition_weight``, ``embeds_scaling``: see ``load_ip_adapter``) from the in-memory
        checkpoint (no disk read).  None keeps a setting as it is.

        All or nothing: if loading fails (a target that matches nothing, a bad scale, an
        unknown weight type), the error propagates and the model, ``target``, ``scale``,
        ``controls`` and ``report`` are unchanged.
        """
        given = {k: v for k, v in zip(CONTROLS, (weight_type, weight, composition_weight, embeds_scaling)) if v is not None}
        return self.configure_all(target, scale, **{**self.controls, **given})

    def configure_all(self, target=None, scale: Optional[float] = None, **controls):
        """:meth:`configure` with the controls exactly as given: one left out goes back to the
        loader's default (a batch row without a weight type must not inherit the last row's)."""
        unknown = sorted(set(controls) - set(CONTROLS))
        if unknown:
            raise TypeError(f"configure_all: unknown control(s) {unknown}; controls are {', '.join(CONTROLS)}")
        controls = {k: v for k, v in controls.items() if v is not None}
        new_target = self._target_for(target, controls)
        new_scale = self.scale if scale is None else scale
        if new_target != self.target or new_scale != self.scale or controls != self.controls:
            report = self._load(new_target, new_scale, controls)  # raises before touching the UNet on bad input
            self.target, self.scale, self.controls, self.report = new_target, new_scale, controls, report
            self._implicit_target = self._implicit_target and target is None  # a target given is kept
        return self.report

    def embeds(self, style_images, content_prompt=None, content_scale=0.5, do_classifier_free_guidance: bool = True,
               negative_style_images=None, negative_content_prompt: Optional[str] = None, num_prompts: int = 1,
               num_images_per_prompt: int = 1):
        """Content-subtracted style embeddings, in the ``ip_adapter_image_embeds`` layout.

        With ``num_prompts`` > 1 and per-prompt ``style_images`` (see :func:`per_prompt_styles`)
        the embeds hold the whole batch, row i from prompt i's references (and its own
        ``content_prompt``/``content_scale``/``negative_style_images`` when those are lists);
        run them through :meth:`__call__` (or :func:`embeds_as_given`) so the pipeline keeps
        the pairing.  ``negative_style_images``: the unconditional half from these images
        instead of zeros (see ``content.style_image_embeds``)."""
        if self.family is not None:  # Flux / SD3: see ip_inputs for the negative embeddings
            return self.ip_inputs(style_images, content_prompt, content_scale, do_classifier_free_guidance,
                                  negative_style_images, negative_content_prompt, num_prompts,
                                  num_images_per_prompt)["ip_adapter_image_embeds"]
        rows, per_prompt = self._encode(style_image_embeds, style_images, content_prompt, content_scale,
                                        do_classifier_free_guidance, negative_style_images, negative_content_prompt,
                                        num_prompts)
        return stack_per_prompt(rows, num_images_per_prompt, do_classifier_free_guidance) if per_prompt else rows

    def _encode(self, encode, style_images, content_prompt, content_scale, do_classifier_free_guidance,
                negative_style_images, negative_content_prompt, num_prompts: int):
        """``(result, per_prompt)``: ``encode`` (``style_image_embeds`` or ``dit_style_inputs``, which
        take the same arguments) run once for references shared by every prompt, or once per
        prompt for per-prompt ones (a list of results), with that prompt's content prompt,
        content scale and negatives."""
        per_prompt = per_prompt_styles(style_images, num_prompts)
        if per_prompt is None:
            images = style_images if isinstance(style_images, (list, tuple)) else [style_images]
            if isinstance(content_prompt, (list, tuple)) or isinstance(content_scale, (list, tuple)):
                raise ValueError("content_prompt/content_scale: per-prompt values need per-prompt style_images")
            return encode(self.pipe, [list(images)], content_prompt, content_scale, self.text_encoder, self.tokenizer,
                          do_classifier_free_guidance, self._negatives(negative_style_images),
                          negative_content_prompt), False
        contents = _per_prompt("content_prompt", content_prompt, num_prompts)
        scales = _per_prompt("content_scale", content_scale, num_prompts)
        negatives = _per_prompt_negatives(negative_style_images, num_prompts)
        return [encode(self.pipe, [images], contents[i], scales[i], self.text_encoder, self.tokenizer,
                       do_classifier_free_guidance, self._negatives(negatives[i]), negative_content_prompt)
                for i, images in enumerate(per_prompt)], True

    @staticmethod
    def _negatives(negative_style_images):
        if negative_style_images is None or (isinstance(negative_style_images, (list, tuple))
                                             and all(n is None for n in negative_style_images)):
            return None  # stylize-batch passes one None per row
        images = negative_style_images if isinstance(negative_style_images, (list, tuple)) else [negative_style_images]
        return [list(images)]  # the one adapter's negatives

    def ip_inputs(self, style_images, content_prompt=None, content_scale=0.5, do_classifier_free_guidance: bool = True,
                  negative_style_images=None, negative_content_prompt: Optional[str] = None, num_prompts: int = 1,
                  num_images_per_prompt: int = 1) -> dict:
        """The pipeline call's IP-Adapter keyword arguments: ``ip_adapter_image_embeds`` (and for
        Flux ``negative_ip_adapter_image_embeds``), content-subtracted, in each pipeline's layout.
        Per-prompt references and negatives (see :meth:`embeds`) work for every family; Flux
        reads its negatives only under true CFG (``true_cfg_scale > 1`` and a negative prompt)."""
        if self.family is None:
            return {"ip_adapter_image_embeds": self.embeds(style_images, content_prompt, content_scale,
                                                           do_classifier_free_guidance, negative_style_images,
                                                           negative_content_prompt, num_prompts, num_images_per_prompt)}
        rows, per_prompt = self._encode(dit_style_inputs, style_images, content_prompt, content_scale,
                                        do_classifier_free_guidance, negative_style_images, negative_content_prompt,
                                        num_prompts)
        if not per_prompt:
            return rows
        if self.family == "sd3":  # one tensor, zeros (or negatives) first under CFG, as the UNet's halves
            embeds = stack_per_prompt([[r["ip_adapter_image_embeds"]] for r in rows], num_images_per_prompt,
                                      do_classifier_free_guidance)
            return {"ip_adapter_image_embeds": embeds[0]}
        # Flux's batch has no CFG half: row i of the embeds, and of true CFG's negatives, is prompt i's
        return {key: stack_per_prompt([r[key] for r in rows], num_images_per_prompt, cfg=False)
                for key in ("ip_adapter_image_embeds", "negative_ip_adapter_image_embeds")}

    def check_negatives(self, negative_style_images, pipe_kwargs: dict) -> None:
        """A negative image must reach the image: Flux reads it only in true CFG's negative pass
        (diffusers runs that pass with ``true_cfg_scale > 1`` and a negative prompt)."""
        if self.family != "flux" or self._negatives(negative_style_images) is None:
            return
        if not (pipe_kwargs.get("true_cfg_scale", 1.0) > 1.0 and pipe_kwargs.get("negative_prompt") is not None):
            raise ValueError("negative_style_images: on Flux a negative image enters only true CFG's negative pass: "
                             "pass true_cfg_scale > 1 and a negative_prompt (--true-cfg-scale and --negative-prompt)")

    def __call__(self, prompt, style_images, content_prompt=None, content_scale=0.5, target=None,
                 scale: Optional[float] = None, negative_style_images=None, negative_content_prompt: Optional[str] = None,
                 **pipe_kwargs):
        """Run the pipeline with the style references; extra keyword arguments go to it.

        ``prompt`` may be a list of B prompts with ``style_images`` a list of B images (or of B
        lists): image i is then made from prompt i and references i only, exactly as its own
        one-prompt run (with a list of B generators).  ``content_prompt``, ``content_scale``
        and ``negative_style_images`` may then be per-prompt lists too."""
        self.configure(target, scale)
        self.check_negatives(negative_style_images, pipe_kwargs)
        cfg = pipe_kwargs.get("guidance_scale", 5.0) > 1.0
        num_prompts = len(prompt) if isinstance(prompt, (list, tuple)) else 1
        inputs = self.ip_inputs(style_images, content_prompt, content_scale, cfg, negative_style_images,
                                negative_content_prompt, num_prompts, pipe_kwargs.get("num_images_per_prompt") or 1)
        with embeds_as_given(self.pipe):
            return self.pipe(prompt=prompt, **inputs, **pipe_kwargs)
