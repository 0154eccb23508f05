"""Where an IP-Adapter comes from: hub ids, local folders, files or state dicts, with diffusers' arguments.

    load_ip_adapter(pipe, "h94/IP-Adapter", subfolder="sdxl_models", weight_name="ip-adapter_sdxl.safetensors")

takes the same ``(pretrained_model_name_or_path_or_dict, subfolder, weight_name, **hub kwargs)``
as diffusers' ``load_ip_adapter`` (lists give several adapters), so practitioners' code and
checkpoints carry over.  This module only *finds* files (and attaches the image encoder);
reading and slicing them is ``checkpoints`` / ``loader``.

Errors say which of the three went wrong, because the cure differs: a local path that does
not exist (a typo: never reported as a hub failure), an existing folder without
``weight_name`` (name the file), or a hub id that can't be fetched (network / offline cache).
"""
from __future__ import annotations

import os
from typing import List, Optional, Sequence, Union

#: the hub arguments diffusers' load_ip_adapter forwards to hf_hub_download / from_pretrained
HUB_KWARGS = ("cache_dir", "force_download", "proxies", "local_files_only", "token", "revision")
CHECKPOINT_EXTENSIONS = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")
#: where the official checkpoints live (the README says the same)
OFFICIAL = "h94/IP-Adapter: sdxl_models/ip-adapter_sdxl.safetensors (+ sdxl_models/image_encoder), " \
           "models/ip-adapter_sd15.safetensors (+ models/image_encoder)"


class HubDownloadError(OSError):
    """A hub id that could not be fetched (no network, not in the offline cache, no such repo or file)."""


def check_hub_kwargs(kwargs: dict) -> dict:
    unknown = sorted(set(kwargs) - set(HUB_KWARGS))
    if unknown:
        raise TypeError(f"unexpected keyword argument(s) {', '.join(unknown)}; hub arguments are {', '.join(HUB_KWARGS)}")
    return {k: v for k, v in kwargs.items() if v is not None}


def looks_local(name: str) -> bool:
    """A string meant as a local path rather than a hub id ``owner/name``: absolute or relative
    markers, more than one separator, or a checkpoint file extension."""
    return (os.path.isabs(name) or name.startswith((".", "~")) or name.count("/") > 1 or "\\" in name
            or name.lower().endswith(CHECKPOINT_EXTENSIONS))


def _candidates(folder: str) -> str:
    try:
        found = sorted(f for f in os.listdir(folder) if f.lower().endswith(CHECKPOINT_EXTENSIONS))
    except OSError:
        found = []
    return f"checkpoints there: {', '.join(found)}" if found else "no checkpoint files there"


def _join(*parts) -> str:
    return os.path.join(*[p for p in parts if p])


def resolve_one(source, subfolder: Optional[str] = None, weight_name: Optional[str] = None, **hub_kwargs):
    """One checkpoint: a state dict as given, else the path of a local file (downloaded if a hub id)."""
    if isinstance(source, dict):
        return source
    if not isinstance(source, (str, os.PathLike)):
        return source  # read_checkpoint names the wrong type
    name = os.path.expanduser(os.fspath(source))
    if os.path.isfile(name) and not subfolder and not weight_name:
        return name
    if os.path.isdir(name):
        folder = _join(name, subfolder)
        if not weight_name:
            raise IsADirectoryError(f"{folder} is a folder: name the checkpoint file in it with weight_name= "
                                    f"(--weight-name on the command line); {_candidates(folder)}")
        path = os.path.join(folder, weight_name)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no such file {path!r} (weight_name {weight_name!r} in folder {folder!r}; "
                                    f"{_candidates(folder)})")
        return path
    if os.path.exists(name):  # a file given together with subfolder/weight_name
        raise ValueError(f"{name} is a file: subfolder= and weight_name= apply to folders and hub ids only")
    if looks_local(name) or not weight_name:
        hint = "" if weight_name or looks_local(name) else \
            f"; as a hub id it needs weight_name= (official checkpoints: {OFFICIAL})"
        raise FileNotFoundError(f"no such file or folder: {name!r}{hint}")
    return download(name, weight_name, subfolder, **hub_kwargs)


def download(repo_id: str, filename: str, subfolder: Optional[str] = None, **hub_kwargs) -> str:
    """``hf_hub_download`` (the local cache first; ``HF_HUB_OFFLINE=1`` / ``local_files_only`` never
    touch the network), with errors that say which part was missing."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = f"{repo_id}/{_join(subfolder, filename)}"
    try:
        return hf_hub_download(repo_id, filename, subfolder=subfolder or None, library_name="instantstyle",
                               **check_hub_kwargs(hub_kwargs))
    except HFValidationError as exc:
        raise FileNotFoundError(f"no such file or folder, and not a valid hub id: {repo_id!r} ({exc})") from None
    except LocalEntryNotFoundError:
        raise HubDownloadError(
            f"{where}: not in the local hub cache and the hub can't be reached (offline, HF_HUB_OFFLINE=1 or "
            "local_files_only). Download it once where there is a network (`hf download ...`) or pass a local path"
        ) from None
    except EntryNotFoundError:
        raise HubDownloadError(f"{where}: the hub repository has no such file (check subfolder and weight_name; "
                               f"official checkpoints: {OFFICIAL})") from None
    except RevisionNotFoundError:
        raise HubDownloadError(f"{where}: no such revision {hub_kwargs.get('revision')!r}") from None
    except RepositoryNotFoundError:
        raise HubDownloadError(f"{repo_id}: no such hub repository (or it is private: pass token=)") from None
    except OSError as exc:  # connection errors and other HTTP failures
        raise HubDownloadError(f"{where}: download failed: {str(exc).splitlines()[0]}") from None


def _listed(value, n: int, name: str) -> list:
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    if len(values) == 1:
        values = values * n
    if len(values) != n:
        raise ValueError(f"{name}: expected one entry per checkpoint ({n}) or one for all, got {len(values)}")
    return values


def resolve_checkpoints(sources, subfolder=None, weight_name=None, **hub_kwargs) -> list:
    """diffusers' list rules: ``sources``, ``subfolder`` and ``weight_name`` may each be one value or a
    list; a single source or subfolder is repeated for every weight name."""
    hub_kwargs = check_hub_kwargs(hub_kwargs)
    sources = list(sources) if isinstance(sources, (list, tuple)) else [sources]
    names = list(weight_name) if isinstance(weight_name, (list, tuple)) else [weight_name]
    n = max(len(sources), len(names))
    if not sources or n == 0:
        return []
    sources, names = _listed(sources, n, "pretrained_model_name_or_path_or_dict"), _listed(names, n, "weight_name")
    subfolders = _listed(subfolder, n, "subfolder")
    return [resolve_one(s, f, w, **hub_kwargs) for s, f, w in zip(sources, subfolders, names)]


def _encoder_location(source, subfolder: Optional[str], folder: str):
    """``(name_or_path, subfolder)`` for from_pretrained, by diffusers' rule: a bare folder name sits
    under the adapter's subfolder, a path with ``/`` is relative to the repo root.  Next to a
    checkpoint *file*, it is looked up in the file's folder (the official layout)."""
    if isinstance(source, (str, os.PathLike)) and os.path.isfile(os.fspath(source)):
        base = os.path.dirname(os.path.abspath(os.fspath(source)))
        return os.path.join(base, folder), None
    sub = "/".join(p for p in (subfolder, folder) if p) if "/" not in folder else folder
    return os.fspath(source), sub


def find_image_encoder(pipe, sources, subfolder=None, image_encoder_folder: Optional[str] = "image_encoder", **hub_kwargs):
    """The image encoder diffusers' ``load_ip_adapter`` would give ``pipe``, loaded but not
    attached (None when there is none to load): only a pipeline with an empty
    ``image_encoder`` slot gets one, from the first source (``CLIPVisionModelWithProjection``,
    or ``SiglipVisionModel`` when the folder's config is SigLIP's; the pipeline's dtype and
    device).  ``image_encoder_folder=None`` skips it.  State dicts carry no encoder; for a
    checkpoint file the folder is optional (looked up next to the file), for hub ids and
    folders it is required."""
    if image_encoder_folder is None or not hasattr(pipe, "register_modules") or getattr(pipe, "image_encoder", 0) is not None:
        return None
    first = sources[0] if isinstance(sources, (list, tuple)) else sources
    first_sub = subfolder[0] if isinstance(subfolder, (list, tuple)) else subfolder
    if isinstance(first, dict) or not isinstance(first, (str, os.PathLike)):
        return None
    name, sub = _encoder_location(first, first_sub, image_encoder_folder)
    if os.path.isfile(os.fspath(first)) and not os.path.isdir(name):
        return None  # a bare checkpoint file: the encoder is the caller's business
    return load_pretrained_encoder(name, sub, dtype=pipe.dtype, **hub_kwargs).to(pipe.device)


def attach_encoder(pipe, encoder) -> bool:
    """Register ``encoder`` (when given) and a missing ``feature_extractor`` (CLIP's or
    SigLIP's image processor at the encoder's image size) with ``register_modules``, so
    ``save_pretrained``/``to``/offloading see them.  Returns whether the pipeline has an encoder."""
    if not hasattr(pipe, "register_modules") or not hasattr(pipe, "image_encoder"):
        return False
    if encoder is not None:
        pipe.register_modules(image_encoder=encoder)
    if pipe.image_encoder is None:
        return False
    if hasattr(pipe, "feature_extractor") and getattr(pipe, "feature_extractor", None) is None:
        pipe.register_modules(feature_extractor=default_image_processor(pipe.image_encoder))
    return True


def attach_image_encoder(pipe, sources, subfolder=None, image_encoder_folder: Optional[str] = "image_encoder",
                         **hub_kwargs) -> bool:
    """:func:`find_image_encoder`, then :func:`attach_encoder`."""
    if image_encoder_folder is None:
        return False
    return attach_encoder(pipe, find_image_encoder(pipe, sources, subfolder, image_encoder_folder, **hub_kwargs))


#: the image encoder each DiT adapter format was trained with: (family, what to pass)
DIT_ENCODERS = {
    "xlabs": ("clip", "a CLIP ViT-L/14 encoder with projection (openai/clip-vit-large-patch14)"),
    "instantx": ("siglip", "a SigLIP encoder (google/siglip-so400m-patch14-384)"),
    "instantx-sd3": ("siglip", "a SigLIP encoder (google/siglip-so400m-patch14-384)"),
}


def _has_config(name: str, subfolder: Optional[str], **hub_kwargs) -> bool:
    from transformers import PretrainedConfig

    if os.path.isdir(name) or looks_local(name):  # a local folder: never asked of the hub
        return os.path.isfile(os.path.join(_join(name, subfolder), "config.json"))
    try:
        PretrainedConfig.get_config_dict(name, subfolder=subfolder or "", **hub_kwargs)
        return True
    except (OSError, ValueError):  # ValueError: not a valid repo id
        return False


def find_dit_image_encoder(pipe, sources, subfolder=None, image_encoder_folder: Optional[str] = "image_encoder",
                           fmt: Optional[str] = None, **hub_kwargs):
    """:func:`find_image_encoder` for Flux/SD3.5 adapters, whose repos ship no encoder.

    ``image_encoder_folder`` is looked up next to the adapter first, as for UNets (under
    ``subfolder``, or next to a checkpoint file), then as a local folder or hub id of its
    own (diffusers' Flux/SD3 ``image_encoder_pretrained_model_name_or_path``).  The
    default ``"image_encoder"`` found nowhere is skipped (pass ``ip_adapter_image_embeds``);
    any other name found nowhere is an error.  The folder's config must be the family
    ``fmt`` was trained with (:data:`DIT_ENCODERS`), checked before any weight is loaded.
    """
    if image_encoder_folder is None or not hasattr(pipe, "register_modules") or getattr(pipe, "image_encoder", 0) is not None:
        return None
    kwargs = check_hub_kwargs(hub_kwargs)
    first = sources[0] if isinstance(sources, (list, tuple)) else sources
    first_sub = subfolder[0] if isinstance(subfolder, (list, tuple)) else subfolder
    places = [_encoder_location(first, first_sub, image_encoder_folder)] if isinstance(first, (str, os.PathLike)) else []
    if image_encoder_folder != "image_encoder":  # the default names no folder or repo of its own
        places.append((os.fspath(image_encoder_folder), None))
    found = next((p for p in places if _has_config(*p, **kwargs)), None)
    if found is None:
        if image_encoder_folder == "image_encoder":
            return None
        tried = ", ".join(repr(_join(*p)) for p in places)
        raise FileNotFoundError(f"image_encoder_folder: expected an image encoder (a folder or hub id with config.json), "
                                f"found none at {tried}")
    family, wanted = DIT_ENCODERS.get(fmt, (None, None))
    got = "siglip" if _vision_model_class(*found, **kwargs).__name__.startswith("Siglip") else "clip"
    if family is not None and got != family:
        raise ValueError(f"image_encoder_folder: a {fmt} adapter needs {wanted}, got a {got.upper()} encoder at "
                         f"{_join(*found)!r}")
    return load_pretrained_encoder(*found, dtype=pipe.dtype, **hub_kwargs).to(pipe.device)


def _vision_model_class(name: str, subfolder: Optional[str], **hub_kwargs):
    """CLIP (``CLIPVisionModelWithProjection``: SD, SDXL, XLabs Flux) or SigLIP
    (``SiglipVisionModel``: InstantX Flux and SD3.5), read from the folder's config so a
    SigLIP encoder is never loaded into CLIP's class with random weights."""
    from transformers import CLIPVisionModelWithProjection, PretrainedConfig

    try:
        config, _ = PretrainedConfig.get_config_dict(name, subfolder=subfolder or "", **hub_kwargs)
    except OSError:
        return CLIPVisionModelWithProjection  # from_pretrained reports the missing folder/file
    if str(config.get("model_type", "")).startswith("siglip"):
        from transformers import SiglipVisionModel

        return SiglipVisionModel
    return CLIPVisionModelWithProjection


def is_siglip(encoder) -> bool:
    return str(getattr(getattr(encoder, "config", None), "model_type", "")).startswith("siglip")


def load_pretrained_encoder(name: str, subfolder: Optional[str] = None, dtype=None, **hub_kwargs):
    """The image encoder of an IP-Adapter (CLIP with projection, or SigLIP's vision tower),
    with a message that tells a missing local folder from a hub failure."""
    local = os.path.isdir(name) or looks_local(name)
    if local and not os.path.isdir(_join(name, subfolder)):
        raise FileNotFoundError(f"image encoder: no such folder {_join(name, subfolder)!r}")
    hub_kwargs = check_hub_kwargs(hub_kwargs)
    try:
        cls = _vision_model_class(name, subfolder, **hub_kwargs)
        return cls.from_pretrained(name, subfolder=subfolder or "", dtype=dtype, **hub_kwargs)
    except OSError as exc:
        where = "folder" if local else "hub id"
        raise HubDownloadError(f"image encoder: could not load {_join(name, subfolder)!r} ({where}): "
                               f"{str(exc).splitlines()[0]}") from None


def default_image_processor(encoder):
    """The processor IP-Adapter's ``image_encoder`` folders lack: CLIP's (or SigLIP's, for a
    SigLIP encoder) at the encoder's size."""
    from transformers import CLIPImageProcessor

    size = encoder.config.image_size if encoder is not None else 224
    if is_siglip(encoder):
        from transformers import SiglipImageProcessor

        return SiglipImageProcessor(size={"height": size, "width": size})
    return CLIPImageProcessor(size=size, crop_size=size)


def load_image_processor(name: str, subfolder: Optional[str] = None, encoder=None, **hub_kwargs):
    """The folder's ``preprocessor_config.json`` when it has one, else :func:`default_image_processor`."""
    from transformers import AutoImageProcessor, CLIPImageProcessor

    cls = AutoImageProcessor if is_siglip(encoder) else CLIPImageProcessor
    try:
        return cls.from_pretrained(name, subfolder=subfolder or "", **check_hub_kwargs(hub_kwargs))
    except (OSError, ValueError):  # IP-Adapter's image_encoder folders ship no processor config
        return default_image_processor(encoder)


SourceList = Union[str, os.PathLike, dict, Sequence]
__all__: List[str] = ["resolve_checkpoints", "resolve_one", "attach_image_encoder", "find_image_encoder", "find_dit_image_encoder", "attach_encoder", "download", "HubDownloadError",
                      "load_pretrained_encoder", "load_image_processor", "default_image_processor", "is_siglip", "OFFICIAL"]
