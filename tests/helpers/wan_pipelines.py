"""A tiny but real Wan 2.1 I2V pipeline folder (or SkyReels-V2 I2V, ChronoEdit: the same
components with their own pipeline, transformer and scheduler), built from config as diffusers'
own test (``tests/pipelines/wan/test_wan_image_to_video.py``'s ``get_dummy_components``) builds it,
in float32, and saved with ``save_pretrained`` so the CLI loads it like a user's folder.

Two changes from diffusers' dummy components, both needed for the image branch to exist:
``added_kv_proj_dim`` = the inner dim (24), as the I2V checkpoints have it (diffusers' test
leaves it None, so its "I2V" transformer has no image branch); and the T5 and tokenizer are
written here from config / a vocab (no hub).  The text is padded to 512 tokens (the
pipeline's default ``max_sequence_length``): Wan splits the context at ``len - 512``.
"""
from __future__ import annotations

from pathlib import Path

import torch

from helpers.tiny_tokenizers import t5_tokenizer, tiny_t5_config

#: the transformer's config (diffusers' test sizes, 2 blocks, image branch on)
TRANSFORMER = {"patch_size": (1, 2, 2), "num_attention_heads": 2, "attention_head_dim": 12, "in_channels": 36,
               "out_channels": 16, "text_dim": 32, "freq_dim": 256, "ffn_dim": 32, "num_layers": 2, "cross_attn_norm": True,
               "qk_norm": "rms_norm_across_heads", "rope_max_seq_len": 32, "image_dim": 4, "added_kv_proj_dim": 24}


#: family -> (pipeline, transformer, scheduler and its arguments), as diffusers' tests pair them.
#: SkyReels-V2's diffusion-forcing I2V pipeline is not here: it has no image encoder, so no image branch.
FAMILIES = {
    "wan": ("WanImageToVideoPipeline", "WanTransformer3DModel", "FlowMatchEulerDiscreteScheduler", {"shift": 7.0}),
    "skyreels-v2": ("SkyReelsV2ImageToVideoPipeline", "SkyReelsV2Transformer3DModel", "UniPCMultistepScheduler",
                    {"flow_shift": 5.0, "use_flow_sigmas": True}),
    "chronoedit": ("ChronoEditPipeline", "ChronoEditTransformer3DModel", "FlowMatchEulerDiscreteScheduler",
                   {"shift": 7.0}),
}


def tiny_wan_i2v(tmp: Path, flf2v: bool = False, family: str = "wan"):
    """A Wan-family image-to-video pipeline in float32 (components seeded as diffusers' test seeds
    them); ``family`` picks the pipeline/transformer/scheduler from :data:`FAMILIES`.

    ``flf2v``: the first-last-frame variant, as diffusers' FLF2V test builds it (4x4 CLIP images,
    17 tokens each, and a learned position embedding over both images' 2 x 17 tokens)."""
    import diffusers
    from diffusers import AutoencoderKLWan
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        CLIPVisionModel,
        T5EncoderModel,
    )

    torch.manual_seed(0)
    vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True])
    pipeline_name, transformer_name, scheduler_name, scheduler_args = FAMILIES[family]
    scheduler = getattr(diffusers, scheduler_name)(**scheduler_args)
    torch.manual_seed(0)
    text_encoder = T5EncoderModel(tiny_t5_config())
    tokenizer = t5_tokenizer(str(tmp / "t5_tokenizer"))
    torch.manual_seed(0)
    side = 4 if flf2v else 32
    transformer = getattr(diffusers, transformer_name)(**TRANSFORMER, pos_embed_seq_len=2 * (side * side + 1) if flf2v else None)
    torch.manual_seed(0)
    image_encoder = CLIPVisionModel(CLIPVisionConfig(hidden_size=4, projection_dim=4, num_hidden_layers=2, num_attention_heads=2,
                                                     image_size=side, intermediate_size=16, patch_size=1))
    image_processor = CLIPImageProcessor(crop_size=side, size=side)
    return getattr(diffusers, pipeline_name)(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, scheduler=scheduler,
                                             image_processor=image_processor, image_encoder=image_encoder,
                                             transformer=transformer).to(torch.float32)


def save_tiny_wan_i2v(folder: Path, flf2v: bool = False, family: str = "wan") -> Path:
    """The pipeline saved as a diffusers folder (``model_index.json`` + one folder per component)."""
    folder = Path(folder)
    tiny_wan_i2v(folder.parent, flf2v, family).save_pretrained(folder)
    return folder


def as_uint8_frames(video):
    """PIL frames as one int16 array (F, H, W, 3): differences don't wrap around."""
    import numpy as np

    return np.stack([np.asarray(f.convert("RGB"), dtype=np.int16) for f in video])


def diffusers_frames(folder, image, *, seed, zero_image_branch=False, last_image=None, prompt="a red fox"):
    """The reference: diffusers' own pipeline from ``folder`` at the tests' small settings (5
    frames of 32x16, 2 steps, guidance 5), optionally with every block's image value projection
    zeroed, which removes the image branch (the branch is linear in its values)."""
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(str(folder), torch_dtype=torch.float32)
    if zero_image_branch:
        with torch.no_grad():
            for block in pipe.transformer.blocks:
                block.attn2.add_v_proj.weight.zero_()
                block.attn2.add_v_proj.bias.zero_()
    extra = {} if last_image is None else {"last_image": last_image}
    return as_uint8_frames(pipe(image=image, prompt=prompt, num_frames=5, height=16, width=32, num_inference_steps=2,
                                guidance_scale=5.0, output_type="pil", generator=torch.Generator().manual_seed(seed),
                                **extra).frames[0])
