"""A pytest plugin that runs diffusers' own test files with instantstyle's processors
swapped in (``INSTANTSTYLE_SWAP=1``) or not (the baseline), offline.

- The hub tokenizer the fast tests load (``hf-internal-testing/tiny-random-clip``) is
  replaced by a CLIP tokenizer built from a byte-level vocabulary written here (514
  tokens, below the tests' ``vocab_size=1000``), in both runs alike.
- ``hf-internal-testing/tiny-random-t5`` (Flux/SD3 tests: ``AutoConfig`` and
  ``AutoTokenizer``) is replaced by the same-shaped config and a local Unigram T5
  tokenizer (``tests/helpers/tiny_tokenizers.py``), in both runs alike.
- With the swap, every UNet, ControlNet and motion UNet gets the fused processors on its
  cross-attention layers right after construction, and again after diffusers'
  ``load_ip_adapter`` (``use_fused_processors``): the tests then exercise our processors
  through every diffusers API they call.  Flux and SD3 transformers get them after
  diffusers' transformer IP loaders ran (before the next forward).  Wan, SkyReels-V2 and
  ChronoEdit transformers get them right after construction (``_swap_wan``: the
  image-branch layers fused, every other Wan-family processor replaced by our class,
  which hands those calls to diffusers' ``__call__``).
- ``INSTANTSTYLE_WAN_IMAGE_BRANCH=1`` (``run.py --wan-image-branch``): Wan-family models
  built with ``image_dim`` also get the image branch (``_with_image_branch``), both runs.
- ``T5EncoderModel.from_pretrained(tiny-random-t5)`` (SkyReels-V2 tests) builds the same
  shape from that config, in both runs alike.

Usage (see ``tests/peer/run.sh``): ``python -m pytest -p diffusers_swap <diffusers>/tests/...``
with this folder on ``PYTHONPATH``.
"""
from __future__ import annotations

import functools
import os
import tempfile

HUB_TOKENIZERS = ("hf-internal-testing/tiny-random-clip",)
HUB_T5 = "hf-internal-testing/tiny-random-t5"
SWAPPED = {"models": 0, "layers": 0, "fused calls": 0, "delegating layers": 0}


@functools.lru_cache(maxsize=1)
def _tokenizer_folder() -> str:
    folder = tempfile.mkdtemp(prefix="peer-tokenizer-")
    _tiny_tokenizers().write_clip_vocab(folder)
    return folder


@functools.lru_cache(maxsize=1)
def _tiny_tokenizers():
    """tests/helpers/tiny_tokenizers.py, loaded by path (this plugin's folder is the only
    one on PYTHONPATH)."""
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "helpers", "tiny_tokenizers.py")
    spec = importlib.util.spec_from_file_location("instantstyle_tiny_tokenizers", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _patch_tokenizers() -> None:
    import transformers

    original_config = transformers.AutoConfig.from_pretrained.__func__

    def config_from_pretrained(klass, path, *args, **kwargs):
        if str(path) == HUB_T5:
            return _tiny_tokenizers().tiny_t5_config()
        return original_config(klass, path, *args, **kwargs)

    transformers.AutoConfig.from_pretrained = classmethod(config_from_pretrained)
    original_t5 = transformers.T5EncoderModel.from_pretrained.__func__

    def t5_from_pretrained(klass, path, *args, **kwargs):
        # SkyReels-V2 tests load the encoder's weights too: same shape, weights drawn here
        # (from the tests' torch seed), in both runs alike
        if str(path) == HUB_T5:
            return klass(_tiny_tokenizers().tiny_t5_config()).eval()
        return original_t5(klass, path, *args, **kwargs)

    transformers.T5EncoderModel.from_pretrained = classmethod(t5_from_pretrained)
    for name in ("CLIPTokenizer", "CLIPTokenizerFast", "AutoTokenizer", "T5Tokenizer", "T5TokenizerFast"):
        cls = getattr(transformers, name, None)
        if cls is None:
            continue
        original = cls.from_pretrained.__func__

        def from_pretrained(klass, path, *args, _original=original, **kwargs):
            if str(path) == HUB_T5:
                return _tiny_tokenizers().t5_tokenizer(tempfile.mkdtemp(prefix="peer-t5-"))
            if str(path) in HUB_TOKENIZERS:
                folder = _tokenizer_folder()
                return transformers.CLIPTokenizer(os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt"),
                                                  pad_token="<|endoftext|>", model_max_length=77)
            return _original(klass, path, *args, **kwargs)

        cls.from_pretrained = classmethod(from_pretrained)


def _swap(model) -> dict:
    from instantstyle.processors import use_fused_processors

    replaced = use_fused_processors(model)
    SWAPPED["models"] += bool(replaced)
    SWAPPED["layers"] += len(replaced)
    return replaced


def _swap_wan(model) -> None:
    """``use_fused_processors`` (the image-branch cross-attention layers), then our class
    on every other layer still running a diffusers Wan-family processor: those calls
    (self-attention, text-only cross-attention) go through ours to diffusers' ``__call__``,
    so the T2V-shaped models of the transformer test files run our classes as well."""
    from instantstyle.processors.wan.conversion import fuse_wan_processor

    replaced = _swap(model)
    current = model.attn_processors
    delegating = {site: fused for site, proc in current.items() if (fused := fuse_wan_processor(proc)) is not None}
    if delegating:
        model.set_attn_processor({**current, **delegating})
    SWAPPED["models"] += bool(delegating) and not replaced
    SWAPPED["delegating layers"] += len(delegating)


def _swap_once_before_forward(model, args, kwargs):
    for key in [k for k, hook in model._forward_pre_hooks.items() if hook is _swap_once_before_forward]:
        del model._forward_pre_hooks[key]
        model._forward_pre_hooks_with_kwargs.pop(key, None)
    _swap(model)


def _swap_after(cls, method: str, at_first_forward: bool = False, swap=_swap) -> None:
    """Swap right after ``cls.method``, or (``at_first_forward``) just before the model's
    next forward: diffusers' loader tests assert the class their loader installed
    (``processor.__class__.__name__ in ("IPAdapterAttnProcessor2_0", ...)``) right after
    loading, then run forwards, which then run ours."""
    original = getattr(cls, method)

    @functools.wraps(original)
    def wrapper(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        if at_first_forward:
            self.register_forward_pre_hook(_swap_once_before_forward, with_kwargs=True)
        else:
            swap(self)
        return result

    setattr(cls, method, wrapper)


def _with_image_branch(cls) -> None:
    """``INSTANTSTYLE_WAN_IMAGE_BRANCH=1``, in both runs alike: a model built with an
    ``image_dim`` but no ``added_kv_proj_dim`` gets ``added_kv_proj_dim = heads x head_dim``,
    as the released Wan 2.1 I2V / SkyReels-V2 I2V / ChronoEdit configs set it.  diffusers'
    pipeline tests set ``image_dim`` only: their ``attn2`` then has no image branch (the
    image tokens join the text keys) and there is nothing for our processors to fuse."""
    import inspect

    original = cls.__init__
    signature = inspect.signature(original)

    @functools.wraps(original)
    def __init__(self, *args, **kwargs):
        bound = signature.bind(self, *args, **kwargs)
        bound.apply_defaults()
        given = bound.arguments
        if given.get("image_dim") is not None and given.get("added_kv_proj_dim") is None:
            given["added_kv_proj_dim"] = given["num_attention_heads"] * given["attention_head_dim"]
        original(*bound.args, **bound.kwargs)

    cls.__init__ = __init__


def pytest_configure(config):
    _patch_tokenizers()
    from diffusers import (
        ChronoEditTransformer3DModel,
        SkyReelsV2Transformer3DModel,
        WanTransformer3DModel,
    )

    wan_family = (WanTransformer3DModel, SkyReelsV2Transformer3DModel, ChronoEditTransformer3DModel)
    if os.environ.get("INSTANTSTYLE_WAN_IMAGE_BRANCH") == "1":
        for cls in wan_family:
            _with_image_branch(cls)
    if os.environ.get("INSTANTSTYLE_SWAP") != "1":
        return
    from diffusers import ControlNetModel, UNet2DConditionModel, UNetMotionModel
    from diffusers.loaders.unet import UNet2DConditionLoadersMixin

    for cls in (UNet2DConditionModel, ControlNetModel, UNetMotionModel):
        _swap_after(cls, "__init__")
    _swap_after(UNet2DConditionLoadersMixin, "_load_ip_adapter_weights", at_first_forward=True)
    # Flux / SD3 transformers: their IP processors exist only after diffusers' loader ran
    from diffusers.loaders.transformer_flux import FluxTransformer2DLoadersMixin
    from diffusers.loaders.transformer_sd3 import SD3Transformer2DLoadersMixin

    for mixin in (FluxTransformer2DLoadersMixin, SD3Transformer2DLoadersMixin):
        _swap_after(mixin, "_load_ip_adapter_weights", at_first_forward=True)
    # Wan family: the image branch is native (no loader), so right after construction
    for cls in wan_family:
        _swap_after(cls, "__init__", swap=_swap_wan)
    _count_calls()


def _count_calls() -> None:
    """Proof that the tests ran our processors, not only installed them."""
    from instantstyle.processors.core import engine as pipeline

    original = pipeline.attend

    def attend(*args, **kwargs):
        SWAPPED["fused calls"] += 1
        return original(*args, **kwargs)

    pipeline.attend = attend
    from instantstyle.processors.dit import flux, sd3
    from instantstyle.processors.unet import fused_processor
    from instantstyle.processors.wan import processor as wan

    fused_processor.attend = attend
    flux.attend = sd3.attend = wan.attend = attend


def pytest_terminal_summary(terminalreporter):
    if os.environ.get("INSTANTSTYLE_SWAP") == "1":
        terminalreporter.write_line(f"instantstyle swap: {SWAPPED}")
