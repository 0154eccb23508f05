"""The pipeline helper loads once; style, prompt and content changes touch no weights."""
import pytest
import torch
from diffusers import AutoPipelineForImage2Image, StableDiffusionXLPipeline
from PIL import Image
from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

import instantstyle.pipelines.instantstyle as module
from instantstyle.pipelines import InstantStyle


@pytest.fixture
def counted(monkeypatch):
    calls = {"read": 0, "load": 0}

    def wrap(name, key):
        original = getattr(module, name)

        def counting(*args, **kwargs):
            calls[key] += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(module, name, counting)

    wrap("read_checkpoint", "read")
    wrap("load_ip_adapter", "load")
    return calls


def _style(root, pipe, **kwargs):
    encoder = CLIPVisionModelWithProjection.from_pretrained(root / "image_encoder")
    processor = CLIPImageProcessor.from_pretrained(root / "image_encoder")
    return InstantStyle(pipe, root / "ip-adapter.safetensors", image_encoder=encoder, image_processor=processor, **kwargs)


def _run(style, prompt, ref, **kwargs):
    kwargs = {"num_inference_steps": 1, "height": 32, "width": 32, **kwargs}
    return style(prompt, [ref], output_type="pt", generator=torch.Generator().manual_seed(0), **kwargs).images


def test_load_once_then_restyle_without_reloading(tiny_sdxl, counted):
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl / "model")
    style = _style(tiny_sdxl, pipe, target="style")
    assert counted == {"read": 1, "load": 1}
    weights_before = {n: p.data_ptr() for n, p in pipe.unet.named_parameters()}
    a = _run(style, "a dog", Image.open(tiny_sdxl / "style.png"), content_prompt="a cat")
    b = _run(style, "a house", Image.open(tiny_sdxl / "style2.png"), content_prompt="a tree", content_scale=0.2)
    assert counted == {"read": 1, "load": 1}  # new style image, prompt and content: no loading at all
    assert weights_before == {n: p.data_ptr() for n, p in pipe.unet.named_parameters()}
    assert not torch.equal(a, b)

    report = style.configure(target="layout", scale=0.5)  # re-sliced from memory, never re-read
    assert counted == {"read": 1, "load": 2}
    assert all(name.startswith("down_blocks.2.attentions.1.") for name in report.adapters[0].layers)
    style.configure(target="layout", scale=0.5)  # unchanged: nothing happens
    assert counted["load"] == 2


def test_img2img_pipeline(tiny_sdxl):
    pipe = AutoPipelineForImage2Image.from_pretrained(tiny_sdxl / "model")
    style = _style(tiny_sdxl, pipe, target="style")
    init = Image.open(tiny_sdxl / "control.png").resize((32, 32))
    out = _run(style, "a dog", Image.open(tiny_sdxl / "style.png"), image=init, strength=0.75, num_inference_steps=4)
    assert out.shape == (1, 3, 32, 32) and torch.isfinite(out).all()


def test_sdxl_inpaint_pipeline(tiny_sdxl):
    from diffusers import AutoPipelineForInpainting

    pipe = AutoPipelineForInpainting.from_pretrained(tiny_sdxl / "model")
    style = _style(tiny_sdxl, pipe, target="style+layout")
    init = Image.open(tiny_sdxl / "control.png").resize((32, 32))
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (8, 8, 24, 24))
    out = _run(style, "a dog", Image.open(tiny_sdxl / "style.png"), image=init, mask_image=mask, strength=0.75, num_inference_steps=4)
    assert out.shape == (1, 3, 32, 32) and torch.isfinite(out).all()


def test_failed_configure_changes_nothing(tiny_sdxl):
    """Issue 10: a target change that fails must leave the model, target, scale and report as they were."""
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl / "model")
    style = _style(tiny_sdxl, pipe, target="style", scale=0.7)
    report, procs = style.report, dict(pipe.unet.attn_processors)
    with pytest.raises(ValueError, match="matches no cross-attention layer"):
        style.configure(target=["no_such_block.attentions.0"], scale=0.2)
    assert (style.target, style.scale, style.report) == ("style", 0.7, report)
    assert dict(pipe.unet.attn_processors) == procs


def test_hub_style_arguments_and_image_encoder_next_to_the_checkpoint(tiny_sdxl):
    """diffusers' (folder, weight_name) form; the encoder comes from 'image_encoder' beside it."""
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl / "model")
    assert pipe.image_encoder is None
    style = InstantStyle(pipe, tiny_sdxl, weight_name="ip-adapter.safetensors", target="style")
    assert type(pipe.image_encoder).__name__ == "CLIPVisionModelWithProjection" and pipe.feature_extractor is not None
    out = _run(style, "a dog", Image.open(tiny_sdxl / "style.png"), content_prompt="a cat")
    assert torch.isfinite(out).all()
