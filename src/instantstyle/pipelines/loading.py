"""Models for the command line: the pipeline, the image encoder and the content text encoder.

Each loader turns a failure into a :class:`UserError` that says whether a local folder is
missing (a typo) or a hub id could not be fetched (network / offline cache), since the cure
differs.
"""
from __future__ import annotations

import os

from instantstyle.loaders.hub import (
    HubDownloadError,
    load_image_processor,
    load_pretrained_encoder,
    looks_local,
    resolve_one,
)

from .errors import UserError

OFFLINE_HINT = ("  Without network access, download the model once and pass its local folder (e.g. from "
                "`hf download ...`), or set HF_HUB_OFFLINE=1 to use the local cache.")


def from_pretrained(flag: str, load, name: str, **kwargs):
    """``load(name, **kwargs)``; a missing local folder or an unreachable hub id becomes one message."""
    if (os.path.exists(name) or looks_local(name)) and not os.path.isdir(name):
        raise UserError(f"{flag}: no such folder: {name!r}" + ("" if not os.path.exists(name) else " (it is a file)"))
    try:
        return load(name, **kwargs)
    except (OSError, ValueError) as exc:
        where = "folder" if os.path.isdir(name) else "hub id"
        hint = "" if os.path.isdir(name) else "\n" + OFFLINE_HINT
        raise UserError(f"{flag}: could not load {name!r} ({where}): {str(exc).splitlines()[0]}{hint}") from None


def load_pipeline(args, torch_dtype, hub: dict):
    from diffusers import AutoPipelineForText2Image, ControlNetModel

    kwargs = {"torch_dtype": torch_dtype, **hub}
    if args.controlnet:
        kwargs["controlnet"] = from_pretrained("--controlnet", ControlNetModel.from_pretrained, args.controlnet,
                                               torch_dtype=torch_dtype, **hub)
    return from_pretrained("--model", AutoPipelineForText2Image.from_pretrained, args.model, **kwargs)


def resolve_ip_adapter(args, hub: dict):
    """The checkpoint file (downloaded for a hub id), checked before any model loads."""
    try:
        return resolve_one(args.ip_adapter, args.subfolder, args.weight_name, **hub)
    except HubDownloadError as exc:
        raise UserError(f"--ip-adapter: {exc}\n{OFFLINE_HINT}") from None
    except (OSError, ValueError) as exc:  # missing file/folder, a folder without --weight-name
        raise UserError(f"--ip-adapter: {exc}") from None


def load_image_encoder(args, torch_dtype, hub: dict):
    """``(encoder, processor)`` from --image-encoder, else diffusers' default ``image_encoder``
    folder next to the IP-Adapter (its subfolder in a hub repo, or beside the file)."""
    if args.image_encoder:
        name, sub, flag = args.image_encoder, None, "--image-encoder"
    elif os.path.isfile(os.path.expanduser(args.ip_adapter)):
        name, sub, flag = os.path.join(os.path.dirname(os.path.abspath(args.ip_adapter)), "image_encoder"), None, \
            "--image-encoder (default: image_encoder next to --ip-adapter)"
    else:
        name, sub = args.ip_adapter, "/".join(p for p in (args.subfolder, "image_encoder") if p)
        flag = "--image-encoder (default: image_encoder in the --ip-adapter folder or repo)"
    try:
        encoder = load_pretrained_encoder(name, sub, dtype=torch_dtype, **hub)
    except (OSError, ValueError) as exc:
        raise UserError(f"{flag}: {exc}" + ("" if os.path.isdir(name) else "\n" + OFFLINE_HINT)) from None
    return encoder, load_image_processor(name, sub, encoder, **hub)


def load_content_text_encoder(args, torch_dtype, hub: dict):
    """``(text_encoder, tokenizer)`` from --content-text-encoder, or ``(None, None)``: a CLIP
    text model with projection, or SigLIP's text tower (InstantX Flux) when the folder's
    config is SigLIP's (a whole SigLIP model's folder works: its text half is read)."""
    if not args.content_text_encoder:
        return None, None
    from transformers import (
        AutoTokenizer,
        CLIPTextModelWithProjection,
        CLIPTokenizer,
        PretrainedConfig,
    )

    flag, name = "--content-text-encoder", args.content_text_encoder
    config = from_pretrained(flag, lambda n, **kw: PretrainedConfig.get_config_dict(n, **kw)[0], name, **hub)
    if str(config.get("model_type", "")).startswith("siglip"):
        from transformers import SiglipTextModel

        return (from_pretrained(flag, SiglipTextModel.from_pretrained, name, dtype=torch_dtype, **hub),
                from_pretrained(flag, AutoTokenizer.from_pretrained, name, **hub))
    return (from_pretrained(flag, CLIPTextModelWithProjection.from_pretrained, name, dtype=torch_dtype, **hub),
            from_pretrained(flag, CLIPTokenizer.from_pretrained, name, **hub))
