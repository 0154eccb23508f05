"""B prompts with B style references: image i comes from reference i alone (diffusers issue
9813), and the negative style image replaces the zeros of the unconditional half."""
import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from PIL import Image
from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

from instantstyle.pipelines import InstantStyle
from instantstyle.pipelines.content import encode_images, encode_text

REFS = ("style.png", "style2.png", "control.png")


@pytest.fixture(scope="module")
def style(tiny_sdxl):
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl / "model")
    encoder = CLIPVisionModelWithProjection.from_pretrained(tiny_sdxl / "image_encoder")
    processor = CLIPImageProcessor.from_pretrained(tiny_sdxl / "image_encoder")
    return InstantStyle(pipe, tiny_sdxl / "ip-adapter.safetensors", image_encoder=encoder, image_processor=processor,
                        target="style+layout")


def _refs(root):
    return [Image.open(root / name).convert("RGB") for name in REFS]


def _run(style, prompts, refs, seeds, **kwargs):
    kwargs = {"num_inference_steps": 2, "height": 32, "width": 32, "output_type": "pt", **kwargs}
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    return style(prompts, refs, generator=generators if len(seeds) > 1 else generators[0], **kwargs).images


@pytest.mark.parametrize("guidance", [5.0, 1.0])
def test_three_prompts_three_references_equal_their_single_runs(style, tiny_sdxl, guidance):
    refs, prompts, seeds = _refs(tiny_sdxl), ["a dog", "a house by the sea", "a red car"], [3, 4, 5]
    contents = ["a cat", None, "a tree"]
    batched = _run(style, prompts, refs, seeds, guidance_scale=guidance, content_prompt=contents)
    alone = [_run(style, p, [r], [s], guidance_scale=guidance, content_prompt=c)
             for p, r, s, c in zip(prompts, refs, seeds, contents)]
    assert batched.shape == (3, 3, 32, 32)
    for i in range(3):
        torch.testing.assert_close(batched[i:i + 1], alone[i], rtol=1e-4, atol=1e-4)
    # the references matter: the same prompt and seed with another reference gives another image
    other = _run(style, prompts[0], [refs[1]], seeds[:1], guidance_scale=guidance, content_prompt=contents[0])
    assert (other - alone[0]).abs().max() > 1e-3


def test_per_prompt_lists_with_several_images_per_prompt(style, tiny_sdxl):
    refs = _refs(tiny_sdxl)
    batched = _run(style, ["a dog", "a cat"], [[refs[0], refs[1]], [refs[2], refs[0]]], [1, 2])
    first = _run(style, "a dog", [refs[0], refs[1]], [1])
    second = _run(style, "a cat", [refs[2], refs[0]], [2])
    torch.testing.assert_close(batched, torch.cat([first, second]), rtol=1e-4, atol=1e-4)


def test_num_images_per_prompt_keeps_each_prompts_reference(style, tiny_sdxl):
    refs = _refs(tiny_sdxl)
    seeds = [1, 2, 3, 4]  # prompt 0 makes images 0, 1; prompt 1 images 2, 3
    batched = _run(style, ["a dog", "a cat"], refs[:2], seeds, num_images_per_prompt=2)
    for i, (prompt, ref) in enumerate([("a dog", refs[0]), ("a dog", refs[0]), ("a cat", refs[1]), ("a cat", refs[1])]):
        torch.testing.assert_close(batched[i:i + 1], _run(style, prompt, [ref], [seeds[i]]), rtol=1e-4, atol=1e-4)


def test_unpairable_per_prompt_counts_are_refused_in_one_line(style, tiny_sdxl):
    refs = _refs(tiny_sdxl)
    with pytest.raises(ValueError, match=r"^style_images: every prompt .* same number") as info:
        _run(style, ["a", "b"], [[refs[0]], [refs[1], refs[2]]], [1, 2])
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match=r"^content_prompt: expected one value or a list of 3"):
        _run(style, ["a", "b", "c"], refs, [1, 2, 3], content_prompt=["x", "y"])


def test_plain_pipeline_call_with_per_prompt_embeds_is_refused_not_blended(style, tiny_sdxl):
    """diffusers repeats per-prompt embeds once per prompt; our processors refuse that batch."""
    refs = _refs(tiny_sdxl)
    embeds = style.embeds(refs, num_prompts=3)
    assert embeds[0].shape[0] == 6  # [negatives; positives]
    with pytest.raises(ValueError, match="1 or 6 samples.*got 18"):
        style.pipe(["a", "b", "c"], ip_adapter_image_embeds=embeds, num_inference_steps=1, height=32, width=32)


def test_negative_style_image_is_the_unconditional_half(style, tiny_sdxl):
    refs = _refs(tiny_sdxl)
    pipe = style.pipe
    encoder, processor = pipe.image_encoder, pipe.feature_extractor
    embeds = style.embeds([refs[0]], negative_style_images=refs[1])[0]
    torch.testing.assert_close(embeds[0], encode_images(encoder, processor, [refs[1]]), rtol=0, atol=0)
    torch.testing.assert_close(embeds[1], encode_images(encoder, processor, [refs[0]]), rtol=0, atol=0)

    # with content subtraction asked for the negative too, in float64 by hand
    content = style.embeds([refs[0], refs[2]], "a cat", 0.3, negative_style_images=refs[1],
                           negative_content_prompt="a wave")[0]
    image = encode_images(encoder, processor, [refs[1]]).double()
    text = encode_text(pipe.text_encoder_2, pipe.tokenizer_2, "a wave").double()
    expected = (image - 0.3 * text).expand(2, -1)  # one negative stands for both style images
    torch.testing.assert_close(content[0].double(), expected, rtol=1e-6, atol=1e-6)

    # and the image it makes differs from the zeros' one, which stays the default
    base = _run(style, "a dog", [refs[0]], [1])
    negative = _run(style, "a dog", [refs[0]], [1], negative_style_images=refs[1])
    assert (negative - base).abs().max() > 1e-3
    with pytest.raises(ValueError, match=r"^negative_images\[0\]: expected 1 or 2 images"):
        style.embeds([refs[0], refs[1]], negative_style_images=refs)
