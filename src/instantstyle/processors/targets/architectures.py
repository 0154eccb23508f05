"""Built-in UNet and transformer configs (no download) and architecture detection.

Detection reads the block structure from the model's config, not its widths, so a
scaled-down test UNet with SDXL's block layout is recognised as SDXL (and a tiny
Flux or SD3 transformer as ``flux`` / ``sd3``).
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

#: black-forest-labs/FLUX.1-dev, transformer/config.json
FLUX_CONFIG = dict(
    patch_size=1,
    in_channels=64,
    num_layers=19,
    num_single_layers=38,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=4096,
    pooled_projection_dim=768,
    guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)

#: stabilityai/stable-diffusion-3.5-large, transformer/config.json
SD35_CONFIG = dict(
    sample_size=128,
    patch_size=2,
    in_channels=16,
    num_layers=38,
    attention_head_dim=64,
    num_attention_heads=38,
    joint_attention_dim=4096,
    caption_projection_dim=2432,
    pooled_projection_dim=2048,
    out_channels=16,
    pos_embed_max_size=192,
    qk_norm="rms_norm",
)

#: Wan 2.1 I2V 14B (480p and 720p share it), as diffusers' scripts/convert_wan_to_diffusers.py
#: ("Wan-I2V-14B-480p") writes it: 40 blocks, 40 heads x 128, image branch added_kv_proj_dim 5120
#: (CLIP ViT-H 1280 -> 5120 by the image embedder).  FLF2V adds pos_embed_seq_len=514.
WAN_I2V_CONFIG = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=40,
    attention_head_dim=128,
    in_channels=36,
    out_channels=16,
    text_dim=4096,
    freq_dim=256,
    ffn_dim=13824,
    num_layers=40,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    eps=1e-6,
    image_dim=1280,
    added_kv_proj_dim=5120,
)

CONFIGS = {"sdxl": SDXL_CONFIG, "sd15": SD15_CONFIG, "sd2": SD2_CONFIG, "flux": FLUX_CONFIG, "sd3": SD35_CONFIG,
           "wan": WAN_I2V_CONFIG}
TRANSFORMER_ARCHS = ("flux", "sd3")

#: Joint-sequence lengths at the default resolution (1024 px): image tokens, text tokens.
#: Flux: 128x128 latent, 2x2 packing -> 4096 image tokens; 512 T5 tokens.  SD3.5: 128x128
#: latent, patch 2 -> 4096; 77 CLIP + 256 T5 = 333 text tokens.
#: Wan (not joint): every layer's queries are the video tokens, 480x832 at 81 frames ->
#: 21 x 30 x 52 = 32,760; its 512 text and 257 image tokens are keys only, hence 0 here.
DEFAULT_TOKENS = {"flux": (4096, 512), "sd3": (4096, 333), "wan": (32760, 0)}

#: Which down blocks have cross-attention, per architecture family.
_SIGNATURES = {
    (False, True, True): "sdxl",
    (True, True, True, False): "sd15",
}


def _has_attention(block_types) -> tuple:
    return tuple("CrossAttn" in t for t in block_types)


def detect_arch(config) -> Optional[str]:
    """``"sdxl"``, ``"sd15"``, ``"sd2"``, ``"flux"``, ``"sd3"``, ``"wan"`` or None (unknown),
    from a UNet or transformer config (dict-like)."""
    get = config.get if hasattr(config, "get") else lambda k, d=None: getattr(config, k, d)
    if get("cross_attn_norm") is not None and get("ffn_dim") is not None and get("text_dim") is not None:
        return "wan"  # Wan 2.1 / SkyReels-V2 / ChronoEdit / Wan-Animate: blocks.N.attn1 + attn2
    if get("num_single_layers") is not None:
        return "flux"
    if get("caption_projection_dim") is not None and get("joint_attention_dim") is not None:
        return "sd3"
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
    """The full-size UNet (or transformer, for ``flux``/``sd3``/``wan``) of ``arch`` on the
    meta device: structure only, no memory, no download."""
    import torch

    if arch not in CONFIGS:
        raise ValueError(f"arch: expected one of {', '.join(sorted(CONFIGS))}, got {arch!r}")
    if arch == "flux":
        from diffusers import FluxTransformer2DModel as cls
    elif arch == "sd3":
        from diffusers import SD3Transformer2DModel as cls
    elif arch == "wan":
        from diffusers import WanTransformer3DModel as cls
    else:
        from diffusers import UNet2DConditionModel as cls
    with torch.device("meta"):
        return cls(**CONFIGS[arch])
