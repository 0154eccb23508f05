"""Packaging for instantstyle.

The repository keeps the architecture visible at the top level (``kernels/``,
``processors/``, ``bench/``), but everything installs as ONE importable package,
``instantstyle``: a top-level ``kernels`` module would collide with the PyPI
package of that name.  ``package_dir`` maps each folder into the namespace:

    src/instantstyle/ -> instantstyle             (public re-exports and the CLI)
    kernels/          -> instantstyle.kernels     (Triton kernels, reference, dispatch)
    processors/       -> instantstyle.processors  (diffusers integration, registry; methods/)
    loaders/          -> instantstyle.loaders     (checkpoints -> processors, targets only)
    pipelines/        -> instantstyle.pipelines   (InstantStyle end to end)
    bench/            -> instantstyle.bench       (measurement)

The root package lives in ``src/instantstyle/``, not ``instantstyle/`` at the top: a
folder named ``instantstyle`` in the working directory would shadow the installed
package and hide its subpackages whenever Python runs from the repo root.
"""
from setuptools import find_packages, setup

PACKAGE_DIRS = {
    "instantstyle": "src/instantstyle",
    "instantstyle.kernels": "kernels",
    "instantstyle.processors": "processors",
    "instantstyle.loaders": "loaders",
    "instantstyle.bench": "bench",
    "instantstyle.pipelines": "pipelines",
}

# Each folder plus its subpackages (e.g. processors/methods), so a new subfolder can't be
# left out of a regular install.
PACKAGES = [sub for pkg, folder in PACKAGE_DIRS.items() for sub in [pkg] + [f"{pkg}.{p}" for p in find_packages(folder)]]

setup(
    name="instantstyle",
    version="0.1.0",
    description="Fused decoupled cross-attention (IP-Adapter / InstantStyle) kernels and "
    "diffusers processors with per-block feature injection.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.9",
    packages=PACKAGES,
    package_dir=PACKAGE_DIRS,
    package_data={"instantstyle.bench": ["results/*.md", "results/*.png"], "instantstyle.kernels": ["tuned/*.json"]},
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
        "test": ["pytest>=7", "pytest-timeout"],
    },
    entry_points={"console_scripts": ["instantstyle = instantstyle.cli:main"]},
    classifiers=[
        "Programming Language :: Python :: 3",
        "Operating System :: OS Independent",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
