"""Built-in UNet configs (no download) and architecture detection.

Detection reads the block structure from the model's config, not its widths, so a
scaled-down test UNet with SDXL's block layout is recognised as SDXL.
"""
from __future__ import annotations

from typing import Optional

_COMMON = dict(
    act_fn="silu",
    center_input_sample=False,
    downsample_padding=1,
    flip_sin_to_cos=True,
    freq_shift=0,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    mid_block_scale_factor=1,
    norm_eps=1e-5,
    norm_num_groups=32,
)

#: stabilityai/stable-diffusion-xl-base-1.0, unet/config.json
SDXL_CONFIG = dict(
    _COMMON,
    sample_size=128,
    block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=(5, 10, 20),
    transformer_layers_per_block=(1, 2, 10),
    cross_attention_dim=2048,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)

#: runwayml/stable-diffusion-v1-5, unet/config.json
SD15_CONFIG = dict(
    _COMMON,
    sample_size=64,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    attention_head_dim=8,
    cross_attention_dim=768,
)

#: stabilityai/stable-diffusion-2-1, unet/config.json
SD2_CONFIG = dict(
    SD15_CONFIG,
    sample_size=96,
    attention_head_dim=(5, 10, 20, 20),
    cross_attention_dim=1024,
    use_linear_projection=True,
)

CONFIGS = {"sdxl": SDXL_CONFIG, "sd15": SD15_CONFIG, "sd2": SD2_CONFIG}

#: Which down blocks have cross-attention, per architecture family.
_SIGNATURES = {
    (False, True, True): "sdxl",
    (True, True, True, False): "sd15",
}


def _has_attention(block_types) -> tuple:
    return tuple("CrossAttn" in t for t in block_types)


def detect_arch(config) -> Optional[str]:
    """``"sdxl"``, ``"sd15"``, ``"sd2"`` or None (unknown), from a UNet config (dict-like)."""
    get = config.get if hasattr(config, "get") else lambda k, d=None: getattr(config, k, d)
    down = get("down_block_types")
    if not down:
        return None
    family = _SIGNATURES.get(_has_attention(down))
    if family == "sd15" and get("cross_attention_dim") == 1024:
        return "sd2"  # SD2.x: same blocks, OpenCLIP-H text encoder
    return family


def preset_family(arch: Optional[str]) -> Optional[str]:
    """Presets are shared by SD1.5 and SD2.x."""
    return "sd15" if arch == "sd2" else arch


def build_meta_unet(arch: str):
    """The full-size UNet of ``arch`` on the meta device: structure only, no memory, no download."""
    import torch
    from diffusers import UNet2DConditionModel

    if arch not in CONFIGS:
        raise ValueError(f"arch: expected one of {', '.join(sorted(CONFIGS))}, got {arch!r}")
    with torch.device("meta"):
        return UNet2DConditionModel(**CONFIGS[arch])
