"""Packaging for instantstyle.

One package root, as Liger-Kernel, flash-attn, xformers and diffusers keep theirs: every
importable folder lives under ``src/instantstyle/``.  Nothing importable sits at the repo
root, so running Python there (``python -m instantstyle``, a shell, a notebook, pytest)
can't shadow an installed distribution -- transformers imports the PyPI package
``kernels``, which a top-level ``kernels/`` folder used to hide.  The architecture stays
visible one level down:

    src/instantstyle/kernels/     Triton kernels, launchers, reference, dispatch
    src/instantstyle/processors/  the per-layer engine, targeting, one room per model family
    src/instantstyle/loaders/     checkpoints -> processors, targets only
    src/instantstyle/pipelines/   InstantStyle end to end (stylize, stylize-batch)
    src/instantstyle/bench/       measurement
"""
from setuptools import find_packages, setup

setup(
    name="instantstyle",
    version="0.1.0",
    description="Fused decoupled cross-attention (IP-Adapter / InstantStyle) kernels and "
    "diffusers processors with per-block feature injection.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.9",
    packages=find_packages("src"),
    package_dir={"": "src"},
    package_data={"instantstyle.bench": ["results/*.md", "results/*.png"], "instantstyle.kernels": ["tuned/*.json"],
                  "instantstyle.training": ["*.yaml"]},
    install_requires=[
        "torch>=2.4",
        "triton>=3.0; platform_system == 'Linux'",
        "numpy",
        "diffusers>=0.30",
        "transformers>=4.40",
        "safetensors",
        "tqdm",
        "matplotlib",
        "accelerate>=0.26",  # stylize-batch: processes under accelerate launch / torchrun
        "huggingface_hub>=0.23",  # hub ids for IP-Adapters and image encoders
    ],
    extras_require={
        "xformers": ["xformers"],
        # `instantstyle video`: diffusers' Wan pipelines clean prompts with ftfy; MP4 out needs imageio(-ffmpeg)
        "video": ["ftfy", "imageio", "imageio-ffmpeg"],
        "train": ["peft>=0.6"],  # `instantstyle train-lora` (LoRA through diffusers' add_adapter)
        # DeepSpeed ZeRO-2 training (training/deepspeed_zero2.yaml); a pure-Python install, ops built on first use
        "deepspeed": ["deepspeed"],
        # train-lora, video, and the DeepSpeed config run on CPU
        "test": ["pytest>=7", "pytest-timeout", "peft>=0.6", "ftfy", "imageio", "imageio-ffmpeg", "deepspeed"],
    },
    entry_points={"console_scripts": ["instantstyle = instantstyle.cli:main"]},
    classifiers=[
        "Programming Language :: Python :: 3",
        "Operating System :: OS Independent",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
