"""Training IP-Adapters whose image features go only into chosen blocks (``instantstyle
train-adapter``).  Modules, one job each: ``data`` (pairs, checks, crops), ``model`` (the
trainable parts, installed as inference runs them), ``loop`` (one step), ``checkpoints``
(exact resume), ``export`` (our file and diffusers'), ``report`` (metrics, grids, plot),
``train`` (``train_adapter``), ``cli``, ``measure`` (step time and memory by target).

This package imports from pipelines, loaders, processors and kernels; nothing imports it.
"""
import os

from ..kernels.lazy import lazy_exports

#: an accelerate config for DeepSpeed ZeRO-2 (``accelerate launch --config_file ...``)
DEEPSPEED_CONFIG = os.path.join(os.path.dirname(__file__), "deepspeed_zero2.yaml")

_LAZY = {
    "train_adapter": "instantstyle.training.train",
    "install_adapter": "instantstyle.training.model",
    "read_dataset": "instantstyle.training.data",
}
__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
