"""Training IP-Adapters whose image features go only into chosen blocks (``instantstyle
train-adapter``) and LoRAs on registry targets such as B-LoRA's blocks (``instantstyle
train-lora``).  Modules, one job each: ``engine`` (the run both share: accelerate, resume,
checkpoints, metrics, validation), ``data`` (pairs, checks, crops), ``model`` (the adapter's
trainable parts, installed as inference runs them), ``lora`` (peft LoRA in, diffusers' LoRA
file out), ``loop`` (one step), ``checkpoints`` (exact resume), ``export`` (our adapter file
and diffusers'), ``report`` (metrics, grids, plot), ``train`` (``train_adapter``),
``lora_train`` (``train_lora``), ``cli`` / ``lora_cli``, ``measure`` (step time and memory).

This package imports from pipelines, loaders, processors and kernels; nothing imports it.
"""
import os

from ..kernels.lazy import lazy_exports

#: an accelerate config for DeepSpeed ZeRO-2 (``accelerate launch --config_file ...``)
DEEPSPEED_CONFIG = os.path.join(os.path.dirname(__file__), "deepspeed_zero2.yaml")

_LAZY = {
    "train_adapter": "instantstyle.training.train",
    "train_lora": "instantstyle.training.lora_train",
    "install_adapter": "instantstyle.training.model",
    "read_dataset": "instantstyle.training.data",
}
__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
