"""Tiny but real pipeline folders, built once per session and saved like hub checkpoints
(the builders are in tests/helpers/sdxl_pipelines.py and tests/helpers/dit_pipelines.py)."""
import pytest

from helpers.dit_pipelines import build_tiny_flux, build_tiny_sd3
from helpers.sdxl_pipelines import build_tiny_sd15, build_tiny_sdxl


@pytest.fixture(scope="session")
def tiny_sd15(tmp_path_factory):
    """A saved tiny SD1.5 pipeline (cross dim 32) with a ViT-H-like setup: the image encoder's
    projected space (24-d) is NOT the pipeline's text space, so content subtraction needs the
    separate ``content_text_encoder`` folder (a CLIP text model with projection + tokenizer)."""
    return build_tiny_sd15(tmp_path_factory.mktemp("tiny-sd15"))


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory):
    """Paths of a saved tiny SDXL pipeline, image encoder, ControlNet, IP-Adapter and images."""
    return build_tiny_sdxl(tmp_path_factory.mktemp("tiny-sdxl"))


@pytest.fixture(scope="session")
def tiny_flux_dir(tmp_path_factory):
    """A saved tiny FluxPipeline with XLabs and InstantX adapters and their encoders."""
    return build_tiny_flux(tmp_path_factory.mktemp("tiny-flux"))


@pytest.fixture(scope="session")
def tiny_sd3_dir(tmp_path_factory):
    """A saved tiny StableDiffusion3Pipeline with an InstantX SD3.5 adapter and its encoder."""
    return build_tiny_sd3(tmp_path_factory.mktemp("tiny-sd3"))
