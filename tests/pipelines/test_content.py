"""Content subtraction: the math, the diffusers layout, and the errors users hit."""
import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from PIL import Image
from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

from instantstyle.pipelines import ContentSubtractionError, InstantStyle, encode_images, encode_text, subtract_content

from helpers.sdxl_pipelines import PROJ


@pytest.fixture
def pipe(tiny_sdxl):
    return StableDiffusionXLPipeline.from_pretrained(tiny_sdxl / "model")


@pytest.fixture
def style(pipe, tiny_sdxl):
    encoder = CLIPVisionModelWithProjection.from_pretrained(tiny_sdxl / "image_encoder")
    processor = CLIPImageProcessor.from_pretrained(tiny_sdxl / "image_encoder")
    return InstantStyle(pipe, tiny_sdxl / "ip-adapter.bin", target="style", image_encoder=encoder, image_processor=processor)


def test_subtract_content_is_image_minus_scaled_text():
    image, text = torch.randn(3, PROJ, dtype=torch.float64), torch.randn(1, PROJ, dtype=torch.float64)
    torch.testing.assert_close(subtract_content(image, text, 0.7), image - 0.7 * text)


def test_width_mismatch_names_both_sizes_and_the_encoder_that_fits():
    with pytest.raises(ContentSubtractionError, match=r"image embeddings are 1280-d but the text embeddings are 1024-d.*text_encoder_2"):
        subtract_content(torch.randn(1, 1280), torch.randn(1, 1024), 0.5)
    with pytest.raises(ContentSubtractionError, match=r"1024-d but .* 768-d.*ViT-H"):
        subtract_content(torch.randn(1, 1024), torch.randn(1, 768), 0.5)


def test_embeddings_are_subtracted_exactly_in_the_diffusers_layout(style, pipe, tiny_sdxl):
    refs = [Image.open(tiny_sdxl / "style.png"), Image.open(tiny_sdxl / "style2.png")]
    out = style.embeds(refs, content_prompt="a cat", content_scale=0.8)
    assert len(out) == 1 and out[0].shape == (2, 2, PROJ)  # [negative | positive], 2 images, D
    assert out[0][0].abs().max() == 0  # the unconditional half is zeros and is not subtracted

    # by hand: the CLIP image embeds of both references minus 0.8 x text_encoder_2's pooled projection
    pixels = pipe.feature_extractor(refs, return_tensors="pt").pixel_values
    with torch.no_grad():
        image = pipe.image_encoder(pixels).image_embeds
        ids = pipe.tokenizer_2("a cat", padding="max_length", max_length=pipe.tokenizer_2.model_max_length,
                               truncation=True, return_tensors="pt").input_ids
        text = pipe.text_encoder_2(ids).text_embeds
    torch.testing.assert_close(out[0][1], image - 0.8 * text)
    assert (out[0][1] - encode_images(pipe.image_encoder, pipe.feature_extractor, refs)).abs().max() > 1e-3

    no_cfg = style.embeds(refs, do_classifier_free_guidance=False)
    assert no_cfg[0].shape == (1, 2, PROJ)
    torch.testing.assert_close(no_cfg[0][0], image)


def test_encode_text_refuses_a_text_model_without_projection(pipe):
    with pytest.raises(ContentSubtractionError, match="with projection"):
        encode_text(pipe.text_encoder, pipe.tokenizer, "a cat")


def test_patch_feature_adapters_refuse_subtraction(style, pipe, tiny_sdxl):
    from diffusers.models.embeddings import IPAdapterPlusImageProjection, MultiIPAdapterImageProjection

    plus = IPAdapterPlusImageProjection(embed_dims=16, output_dims=32, hidden_dims=32, heads=1, num_queries=16, depth=1)
    pipe.unet.encoder_hid_proj = MultiIPAdapterImageProjection([plus])
    ref = Image.open(tiny_sdxl / "style.png")
    with pytest.raises(ContentSubtractionError, match=r"patch-feature adapter \(IPAdapterPlusImageProjection.*global CLIP embeddings only"):
        style.embeds([ref], content_prompt="a cat")
    hidden = style.embeds([ref])[0]  # without subtraction, patch features as diffusers makes them
    assert hidden.shape == (2, 1, 17, 16)  # 16 patches + CLS, hidden width 16
