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
  diffusers' transformer IP loaders ran (before the next forward).

Usage (see ``tests/peer/run.sh``): ``python -m pytest -p diffusers_swap <diffusers>/tests/...``
with this folder on ``PYTHONPATH``.
"""
from __future__ import annotations

import functools
import os
import tempfile


HUB_TOKENIZERS = ("hf-internal-testing/tiny-random-clip",)
HUB_T5 = "hf-internal-testing/tiny-random-t5"
SWAPPED = {"models": 0, "layers": 0, "fused calls": 0}


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


def _swap(model) -> None:
    from instantstyle.processors import use_fused_processors

    replaced = use_fused_processors(model)
    SWAPPED["models"] += bool(replaced)
    SWAPPED["layers"] += len(replaced)


def _swap_once_before_forward(model, args, kwargs):
    for key in [k for k, hook in model._forward_pre_hooks.items() if hook is _swap_once_before_forward]:
        del model._forward_pre_hooks[key]
        model._forward_pre_hooks_with_kwargs.pop(key, None)
    _swap(model)


def _swap_after(cls, method: str, at_first_forward: bool = False) -> None:
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
            _swap(self)
        return result

    setattr(cls, method, wrapper)


def pytest_configure(config):
    _patch_tokenizers()
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

    fused_processor.attend = attend
    flux.attend = sd3.attend = attend


def pytest_terminal_summary(terminalreporter):
    if os.environ.get("INSTANTSTYLE_SWAP") == "1":
        terminalreporter.write_line(f"instantstyle swap: {SWAPPED}")
