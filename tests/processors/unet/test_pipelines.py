"""End to end through real diffusers pipelines (tiny components built in code, no
download): ours vs diffusers' pipeline ``load_ip_adapter`` + ``set_ip_adapter_scale``,
with classifier-free guidance and precomputed image embeds."""
from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch

from instantstyle.kernels import check_close
from instantstyle.loaders import load_ip_adapter
from instantstyle.processors import FusedIPAdapterAttnProcessor

from helpers.ip_fixtures import CLIP, CROSS, random_checkpoint, tiny_unet


def tiny_components(tmp_path):
    from diffusers import AutoencoderKL, DDIMScheduler
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "!": 2}
    for i, ch in enumerate("abcdefghijklmnopqrstuvwxyz"):
        vocab[ch], vocab[ch + "</w>"] = 3 + 2 * i, 4 + 2 * i
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(vocab_size=len(vocab), hidden_size=CROSS, intermediate_size=37, num_attention_heads=4,
                       num_hidden_layers=2, max_position_embeddings=77, projection_dim=CROSS)
    ).eval()
    vae = AutoencoderKL(block_out_channels=(8,), down_block_types=("DownEncoderBlock2D",),
                        up_block_types=("UpDecoderBlock2D",), latent_channels=4, norm_num_groups=8).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scheduler = DDIMScheduler(clip_sample=False, steps_offset=1)
    return dict(
        vae=vae, text_encoder=text_encoder, tokenizer=CLIPTokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"), model_max_length=77),
        unet=tiny_unet("sd15"), scheduler=scheduler, safety_checker=None, feature_extractor=None, image_encoder=None,
        requires_safety_checker=False,
    )


@pytest.mark.slow  # whole pipeline runs
@pytest.mark.parametrize("kind", ["text2img", "img2img"])
def test_pipeline_matches_diffusers(tmp_path, kind):
    from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionPipeline

    cls = {"text2img": StableDiffusionPipeline, "img2img": StableDiffusionImg2ImgPipeline}[kind]
    components = tiny_components(tmp_path)
    ckpt = random_checkpoint(components["unet"], seed=3)
    torch.save(ckpt, tmp_path / "ip.bin")
    ref = cls(**dict(components, unet=copy.deepcopy(components["unet"])))
    ref.load_ip_adapter(str(tmp_path), subfolder="", weight_name="ip.bin", image_encoder_folder=None)
    ref.set_ip_adapter_scale({"down": {"block_2": 0.75}, "mid": 0.75})
    ours = cls(**dict(components, unet=copy.deepcopy(components["unet"])))
    load_ip_adapter(ours, str(tmp_path / "ip.bin"), target="layout", scale=0.75)
    assert sum(isinstance(p, FusedIPAdapterAttnProcessor) and len(p.to_k_ip) > 0 for p in ours.unet.attn_processors.values()) == 3

    g = torch.Generator().manual_seed(1)
    # one reference row for both prompts: per-prompt rows diffusers repeats once per prompt and
    # blends (diffusers issue 9813), which our processors refuse (test_ip_pairing.py)
    embeds = torch.randn(1, 1, CLIP, generator=g)
    embeds = [torch.cat([torch.zeros_like(embeds), embeds])]  # negative half first (CFG)
    kwargs = dict(prompt=["a cat", "a dog"], num_inference_steps=3, guidance_scale=5.0, output_type="latent",
                  ip_adapter_image_embeds=embeds)
    if kind == "img2img":
        kwargs.update(image=torch.rand(2, 3, 16, 16, generator=g), strength=0.8)
    else:
        kwargs.update(height=16, width=16)

    def run(pipe):
        with torch.no_grad():
            return pipe(**kwargs, generator=torch.Generator().manual_seed(2)).images

    expected = run(ref)
    check_close(run(ours), expected, "fp32")
    # the comparison is not vacuous: without the image branch the latents differ
    ours.set_ip_adapter_scale(0.0)
    assert (run(ours) - expected).abs().max() > 1e-3
