"""Tiny Wan-family transformers built from config (diffusers' test sizes: patch (1, 2, 2),
2 heads x 12, text_dim 32, image_dim 4), with the image branch on (added_kv_proj_dim =
inner dim, as the I2V checkpoints have it), in float64, and their call inputs.

The text is 512 tokens long: diffusers' Wan processor splits the context at len - 512,
so a shorter context would leave the image branch empty."""
import pytest
import torch

TINY = {"patch_size": (1, 2, 2), "num_attention_heads": 2, "attention_head_dim": 12, "in_channels": 4, "out_channels": 4,
        "text_dim": 32, "freq_dim": 32, "ffn_dim": 32, "num_layers": 3, "cross_attn_norm": True,
        "qk_norm": "rms_norm_across_heads", "rope_max_seq_len": 32, "image_dim": 4, "added_kv_proj_dim": 24}


def _build(cls, **extra):
    torch.manual_seed(0)
    model = cls(**TINY, **extra).to(torch.float64).eval()
    for block in model.blocks:  # norm weights away from 1, so a skipped norm would show
        for norm in (block.attn2.norm_q, block.attn2.norm_k, block.attn2.norm_added_k):
            norm.weight.data.uniform_(0.5, 1.5)
    return model


@pytest.fixture
def wan():
    from diffusers import WanTransformer3DModel

    return _build(WanTransformer3DModel)


@pytest.fixture
def skyreels():
    from diffusers import SkyReelsV2Transformer3DModel

    return _build(SkyReelsV2Transformer3DModel)


@pytest.fixture
def chronoedit():
    from diffusers import ChronoEditTransformer3DModel

    return _build(ChronoEditTransformer3DModel)


@pytest.fixture
def wan_inputs():
    g = torch.Generator().manual_seed(7)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)
    return {"hidden_states": r(2, 4, 2, 4, 4), "timestep": torch.tensor([700.0, 700.0], dtype=torch.float64),
            "encoder_hidden_states": r(2, 512, 32), "encoder_hidden_states_image": r(2, 5, 4)}
