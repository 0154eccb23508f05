"""InstantStyle on Flux and SD3.5 pipelines: content subtraction in each adapter's encoder
space (checked against the encoders called by hand), the pipeline inputs, and
``instantstyle stylize --model <flux or sd3 folder>`` end to end with hook-observed targets."""
import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from instantstyle.cli import main
from instantstyle.pipelines import ContentSubtractionError, InstantStyle

from helpers.dit_pipelines import SIGLIP_DIM, XLABS_DIM


def _load(folder, cls_name, sub):
    import transformers

    return getattr(transformers, cls_name).from_pretrained(folder / sub)


def _flux(root):
    from diffusers import FluxPipeline

    return FluxPipeline.from_pretrained(root / "model")


def _style(root, fmt, text=None, **kwargs):
    from instantstyle.loaders.hub import load_image_processor, load_pretrained_encoder

    enc_dir = root / ("clip_image_encoder" if fmt == "xlabs" else "siglip_image_encoder")
    encoder = load_pretrained_encoder(str(enc_dir))
    text_encoder = tokenizer = None
    if text:
        siglip = text.startswith("siglip")
        text_encoder = _load(root, "SiglipTextModel" if siglip else "CLIPTextModelWithProjection", text)
        tokenizer = _load(root, "AutoTokenizer" if siglip else "CLIPTokenizer", text)
    ckpt = root / ("xlabs.safetensors" if fmt == "xlabs" else "instantx.bin" if fmt == "instantx" else "ip-adapter.bin")
    pipe = _flux(root) if fmt != "sd3" else _sd3(root)
    return InstantStyle(pipe, str(ckpt), image_encoder=encoder, image_processor=load_image_processor(str(enc_dir), None, encoder),
                        text_encoder=text_encoder, tokenizer=tokenizer, image_encoder_folder=None, **kwargs)


def _sd3(root):
    from diffusers import StableDiffusion3Pipeline

    return StableDiffusion3Pipeline.from_pretrained(root / "model")


def _by_hand_text(style, prompt):
    tokens = style.tokenizer(prompt, padding="max_length", max_length=16, truncation=True, return_tensors="pt").input_ids
    out = style.text_encoder(tokens)
    return out.text_embeds if hasattr(out, "text_embeds") else out.pooler_output


def _by_hand_image(style, image):
    pixels = style.pipe.feature_extractor(image, return_tensors="pt").pixel_values
    out = style.pipe.image_encoder(pixels)
    return out.image_embeds if hasattr(out, "image_embeds") else out.pooler_output


@pytest.mark.parametrize("fmt,text,dim", [("xlabs", "clip_text", XLABS_DIM), ("instantx", "siglip_text", SIGLIP_DIM)])
def test_flux_content_subtraction_in_the_adapters_encoder_space(tiny_flux_dir, fmt, text, dim):
    target = None if fmt == "xlabs" else ["single_transformer_blocks.2"]
    style = _style(tiny_flux_dir, fmt, text, target=target)
    refs = [Image.open(tiny_flux_dir / "style.png"), Image.open(tiny_flux_dir / "style2.png")]
    inputs = style.ip_inputs(refs, content_prompt="a cat", content_scale=0.7)
    with torch.no_grad():
        expected = _by_hand_image(style, refs) - 0.7 * _by_hand_text(style, "a cat")
        black = _by_hand_image(style, [np.zeros((64, 64, 3), dtype=np.uint8)])
    (pos,), (neg,) = inputs["ip_adapter_image_embeds"], inputs["negative_ip_adapter_image_embeds"]
    assert pos.shape == (1, 2, dim)
    torch.testing.assert_close(pos[0], expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(neg[0], black, rtol=1e-6, atol=1e-6)  # diffusers' black image, not subtracted
    assert (pos - style.ip_inputs(refs)["ip_adapter_image_embeds"][0]).abs().max() > 1e-3  # the subtraction did something
    if fmt == "xlabs":  # default target: XLabs has weights in the double-stream blocks only
        assert style.target == "all" and sorted(style.report.layers[0]) == [f"transformer_blocks.{i}.attn.processor" for i in range(2)]
    image = style("a dog", refs, content_prompt="a cat", num_inference_steps=1, height=16, width=16, output_type="np").images
    assert image.shape == (1, 16, 16, 3) and np.isfinite(image).all()


def test_flux_content_errors_name_both_sizes_and_the_encoder_that_fits(tiny_flux_dir):
    ref = Image.open(tiny_flux_dir / "style.png")
    with pytest.raises(ContentSubtractionError, match=rf"{XLABS_DIM}-d but the text embeddings are 16-d.*CLIP ViT-L/14 text model with projection"):
        _style(tiny_flux_dir, "xlabs", "clip_text_16").ip_inputs([ref], content_prompt="a cat")
    with pytest.raises(ContentSubtractionError, match=r"expected a CLIP ViT-L/14.*CLIPVisionModelWithProjection, got SiglipTextModel"):
        _style(tiny_flux_dir, "xlabs", "siglip_text").ip_inputs([ref], content_prompt="a cat")
    with pytest.raises(ContentSubtractionError, match=r"SigLIP's text tower.*got CLIPTextModelWithProjection"):
        _style(tiny_flux_dir, "instantx", "clip_text", target="single").ip_inputs([ref], content_prompt="a cat")
    with pytest.raises(ContentSubtractionError, match=r"content_prompt: the XLabs Flux adapter needs a CLIP ViT-L/14"):
        _style(tiny_flux_dir, "xlabs").ip_inputs([ref], content_prompt="a cat")


def test_sd3_inputs_are_siglip_patch_features_with_zero_negatives_and_refuse_content(tiny_sd3_dir):
    style = _style(tiny_sd3_dir, "sd3")
    ref = Image.open(tiny_sd3_dir / "style.png")
    embeds = style.ip_inputs([ref])["ip_adapter_image_embeds"]
    pixels = style.pipe.feature_extractor([ref], return_tensors="pt").pixel_values
    with torch.no_grad():
        by_hand = style.pipe.image_encoder(pixels, output_hidden_states=True).hidden_states[-2]
    assert embeds.shape == (2, 16, SIGLIP_DIM) and not embeds[0].any()
    torch.testing.assert_close(embeds[1:], by_hand)
    assert style.ip_inputs([ref], do_classifier_free_guidance=False)["ip_adapter_image_embeds"].shape == (1, 16, SIGLIP_DIM)
    with pytest.raises(ContentSubtractionError, match="patch features"):
        style.ip_inputs([ref], content_prompt="a cat", content_scale=0.5)
    with pytest.raises(ValueError, match="style_images: the SD3.5 IP-Adapter takes one style image, got 2"):
        style.ip_inputs([ref, ref])


@pytest.fixture
def ip_calls(monkeypatch):
    """Layers whose IP K/V projections ran (forward hooks on the loaded processors)."""
    seen = set()
    original = InstantStyle._load

    def load_and_hook(self, *args, **kwargs):
        report = original(self, *args, **kwargs)
        for name, proc in self.pipe.transformer.attn_processors.items():
            linears = getattr(proc, "to_k_ip", None) or []
            for linear in [linears] if isinstance(linears, torch.nn.Linear) else linears:  # SD3: one Linear
                linear.register_forward_hook(lambda *_, name=name: seen.add(name))
        return report

    monkeypatch.setattr(InstantStyle, "_load", load_and_hook)
    return seen


def _cli(root, model_extra, out, *extra):
    return main(["stylize", "--model", str(root / "model"), *model_extra, "--style", str(root / "style.png"),
                 "--prompt", "a dog", "--steps", "2", "--height", "16", "--width", "16", "--seed", "3", "--out", str(out), *extra])


def test_stylize_cli_flux_xlabs_and_instantx_inject_only_their_targets(tiny_flux_dir, tmp_path, ip_calls):
    r = tiny_flux_dir
    xlabs = ["--ip-adapter", str(r / "xlabs.safetensors"), "--image-encoder", str(r / "clip_image_encoder")]
    assert _cli(r, xlabs, tmp_path / "x.png", "--content-prompt", "a cat", "--content-text-encoder", str(r / "clip_text")) == 0
    record = json.loads((tmp_path / "x.png.json").read_text())
    double = [f"transformer_blocks.{i}.attn.processor" for i in range(2)]
    assert record["targets"] == double and record["settings"]["target"] == "all" and ip_calls == set(double)
    assert Image.open(tmp_path / "x.png").size == (16, 16)
    assert _cli(r, xlabs, tmp_path / "x0.png", "--content-prompt", "a cat", "--content-text-encoder", str(r / "clip_text"),
                "--scale", "0") == 0
    a, b = (np.asarray(Image.open(tmp_path / n), dtype=np.int16) for n in ("x.png", "x0.png"))
    assert np.abs(a - b).max() > 0  # the reference reached the image

    ip_calls.clear()
    instantx = ["--ip-adapter", str(r / "instantx.bin"), "--image-encoder", str(r / "siglip_image_encoder")]
    assert _cli(r, instantx, tmp_path / "i.png", "--target", "single_transformer_blocks.1", "--content-prompt", "a cat",
                "--content-text-encoder", str(r / "siglip_text")) == 0
    record = json.loads((tmp_path / "i.png.json").read_text())
    assert record["targets"] == ["single_transformer_blocks.1.attn.processor"] == sorted(ip_calls)
    assert record["ip_params_held"] * 5 == record["ip_params_all_layers"]  # 1 of 2 double + 3 single layers


def test_stylize_cli_sd3(tiny_sd3_dir, tmp_path, ip_calls):
    r = tiny_sd3_dir
    args = ["--ip-adapter", str(r / "ip-adapter.bin"), "--image-encoder", str(r / "siglip_image_encoder")]
    assert _cli(r, args, tmp_path / "s.png", "--target", "transformer_blocks.1") == 0
    record = json.loads((tmp_path / "s.png.json").read_text())
    assert record["targets"] == ["transformer_blocks.1.attn.processor"] == sorted(ip_calls)
    assert record["ip_params_held"] * 3 == record["ip_params_all_layers"]


def test_stylize_cli_dit_mistakes_are_one_line(tiny_flux_dir, tiny_sd3_dir, tmp_path, capsys):
    r = tiny_flux_dir
    xlabs = ["--ip-adapter", str(r / "xlabs.safetensors"), "--image-encoder", str(r / "clip_image_encoder")]
    cases = [
        (r, xlabs, ["--content-prompt", "a cat", "--content-text-encoder", str(r / "clip_text_16")], r"32-d but the text embeddings are 16-d"),
        (r, xlabs, ["--preset", "single"], r"double-stream blocks \(transformer_blocks.N\) only"),
        (tiny_sd3_dir, ["--ip-adapter", str(tiny_sd3_dir / "ip-adapter.bin"), "--image-encoder", str(tiny_sd3_dir / "siglip_image_encoder")],
         ["--content-prompt", "a cat"], r"patch features"),
        (r, xlabs, ["--negative-style", str(r / "style2.png")], r"on Flux a negative image enters only true CFG"),
        (r, xlabs, ["--negative-prompt", "blurry"], r"--true-cfg-scale / --negative-prompt: Flux uses a negative prompt "
                                                    r"only under true CFG"),
        (r, xlabs, ["--true-cfg-scale", "2"], r"give both, or neither"),
        (r, xlabs, ["--true-cfg-scale", "1", "--negative-prompt", "blurry"], r"--true-cfg-scale: expected > 1, got 1.0"),
        (tiny_sd3_dir, ["--ip-adapter", str(tiny_sd3_dir / "ip-adapter.bin"), "--image-encoder", str(tiny_sd3_dir / "siglip_image_encoder")],
         ["--true-cfg-scale", "2"], r"--true-cfg-scale: Flux pipelines only; this sd3 pipeline runs classifier-free guidance"),
    ]
    for root, model, extra, message in cases:
        code = _cli(root, model, tmp_path / "e.png", *extra)
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and err[-1].startswith("instantstyle: error: "), err
        assert re.search(message, err[-1]), err[-1]
        assert not (tmp_path / "e.png").exists()


def _dit_run(style, prompts, refs, seeds, **kwargs):
    """One Flux or SD3.5 InstantStyle run at 16x16, 2 steps, one generator per seed; images as tensors."""
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    return style(prompts, refs, generator=generators if len(seeds) > 1 else generators[0], num_inference_steps=2,
                 height=16, width=16, output_type="pt", **kwargs).images


@pytest.mark.parametrize("fmt,text", [("xlabs", "clip_text"), ("instantx", None)])
def test_flux_prompts_with_their_own_references_equal_their_single_runs(tiny_flux_dir, fmt, text):
    """diffusers issue 9813 on Flux: B prompts with B references give image i from reference i."""
    style = _style(tiny_flux_dir, fmt, text, target="all")
    refs = [Image.open(tiny_flux_dir / name).convert("RGB") for name in ("style.png", "style2.png")]
    prompts, seeds = ["a dog", "a house by the sea"], [3, 4]
    contents = ["a cat", None] if text else None
    batched = _dit_run(style, prompts, refs, seeds, content_prompt=contents)
    alone = [_dit_run(style, p, [r], [s], content_prompt=c)
             for p, r, s, c in zip(prompts, refs, seeds, contents or [None, None])]
    assert batched.shape[0] == 2
    for i in range(2):
        torch.testing.assert_close(batched[i:i + 1], alone[i], rtol=1e-4, atol=1e-4)
    other = _dit_run(style, prompts[0], [refs[1]], seeds[:1], content_prompt=(contents or [None])[0])
    assert (other - alone[0]).abs().max() > 1e-3  # the reference matters, so the test can fail
    # two images per prompt: prompt i's images (rows 2i, 2i+1) from reference i
    two = _dit_run(style, prompts, refs, [3, 5, 4, 6], num_images_per_prompt=2, content_prompt=contents)
    torch.testing.assert_close(two[2:3], _dit_run(style, prompts[1], [refs[1]], [4],
                                                   content_prompt=(contents or [None, None])[1]), rtol=1e-4, atol=1e-4)


def test_sd3_prompts_with_their_own_references_and_negatives_equal_their_single_runs(tiny_sd3_dir):
    """diffusers issue 9813 on SD3.5: per-prompt references (and negative images) pair one-to-one."""
    style = _style(tiny_sd3_dir, "sd3")
    refs = [Image.open(tiny_sd3_dir / name).convert("RGB") for name in ("style.png", "style2.png")]
    prompts, seeds = ["a dog", "a house by the sea"], [3, 4]
    for negatives in (None, [refs[1], refs[0]]):
        batched = _dit_run(style, prompts, refs, seeds, negative_style_images=negatives)
        alone = [_dit_run(style, p, [r], [s], negative_style_images=n)
                 for p, r, s, n in zip(prompts, refs, seeds, negatives or [None, None])]
        for i in range(2):
            torch.testing.assert_close(batched[i:i + 1], alone[i], rtol=1e-4, atol=1e-4)
    other = _dit_run(style, prompts[0], [refs[1]], seeds[:1])
    assert (other - _dit_run(style, prompts[0], [refs[0]], seeds[:1])).abs().max() > 1e-3  # the reference matters
    two = _dit_run(style, prompts, refs, [3, 5, 4, 6], num_images_per_prompt=2)
    torch.testing.assert_close(two[2:3], _dit_run(style, prompts[1], [refs[1]], [4]), rtol=1e-4, atol=1e-4)


def test_sd3_negative_image_is_the_unconditional_half(tiny_sd3_dir):
    style = _style(tiny_sd3_dir, "sd3")
    ref, negative = (Image.open(tiny_sd3_dir / n).convert("RGB") for n in ("style.png", "style2.png"))
    embeds = style.ip_inputs([ref], negative_style_images=negative)["ip_adapter_image_embeds"]
    pixels = style.pipe.feature_extractor([negative, ref], return_tensors="pt").pixel_values
    with torch.no_grad():
        by_hand = style.pipe.image_encoder(pixels, output_hidden_states=True).hidden_states[-2]
    torch.testing.assert_close(embeds, by_hand)  # [negative ; reference], the pipeline's CFG order
    assert style.ip_inputs([ref], do_classifier_free_guidance=False,
                           negative_style_images=negative)["ip_adapter_image_embeds"].shape[0] == 1
    zeros, with_negative = (_dit_run(style, "a dog", [ref], [3], negative_style_images=n) for n in (None, negative))
    assert (zeros - with_negative).abs().max() > 1e-3
    with pytest.raises(ValueError, match="^negative_images: the SD3.5 IP-Adapter takes one style image, got 2$"):
        style.ip_inputs([ref], negative_style_images=[negative, negative])
    with pytest.raises(ContentSubtractionError, match="^negative_content_prompt: the SD3.5 IP-Adapter reads SigLIP"):
        style.ip_inputs([ref], negative_style_images=negative, negative_content_prompt="a cat")


@pytest.mark.parametrize("fmt,text", [("xlabs", "clip_text"), ("instantx", "siglip_text")])
def test_flux_negative_images_are_true_cfgs_negative_embeds(tiny_flux_dir, fmt, text):
    style = _style(tiny_flux_dir, fmt, text, target="all")
    refs = [Image.open(tiny_flux_dir / n).convert("RGB") for n in ("style.png", "style2.png")]
    inputs = style.ip_inputs([refs[0]], negative_style_images=refs[1], negative_content_prompt="a cat", content_scale=0.7)
    with torch.no_grad():
        expected = _by_hand_image(style, [refs[1]]) - 0.7 * _by_hand_text(style, "a cat")
    (neg,) = inputs["negative_ip_adapter_image_embeds"]
    torch.testing.assert_close(neg[0], expected, rtol=1e-6, atol=1e-6)
    true_cfg = {"true_cfg_scale": 2.0, "negative_prompt": "blurry"}  # diffusers reads the negatives only then
    black = _dit_run(style, "a dog", [refs[0]], [3], **true_cfg)
    assert (black - _dit_run(style, "a dog", [refs[0]], [3], negative_style_images=refs[1], **true_cfg)).abs().max() > 1e-3
    prompts, seeds, negatives = ["a dog", "a boat"], [3, 4], [refs[1], refs[0]]
    batched = _dit_run(style, prompts, refs, seeds, negative_style_images=negatives, **true_cfg)
    for i in range(2):
        alone = _dit_run(style, prompts[i], [refs[i]], [seeds[i]], negative_style_images=negatives[i], **true_cfg)
        torch.testing.assert_close(batched[i:i + 1], alone, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="^negative_style_images: on Flux a negative image enters only true CFG"):
        _dit_run(style, "a dog", [refs[0]], [3], negative_style_images=refs[1])  # no true CFG: it would do nothing
    with pytest.raises(ValueError, match=r"^negative_images\[0\]: expected 1 or 2 images \(one per style image\), got 3$"):
        style.ip_inputs([refs], negative_style_images=[refs[0]] * 3)


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_stylize_batch_packs_dit_rows_with_different_references(tiny_flux_dir, tiny_sd3_dir, family, tmp_path):
    r = tiny_flux_dir if family == "flux" else tiny_sd3_dir
    manifest = tmp_path / "jobs.jsonl"
    rows = [{"prompt": "a dog", "style": str(r / "style.png"), "name": "dog", "seed": 3},
            {"prompt": "a boat", "style": str(r / "style2.png"), "name": "boat", "seed": 4}]
    rows[0]["negative_style"] = str(r / "style2.png")  # in one row of the pack: the other keeps zeros / black
    true_cfg = []
    if family == "flux":  # Flux reads negatives only under true CFG: a negative prompt per row, and the flag
        rows[0]["negative_prompt"], rows[1]["negative_prompt"], true_cfg = "blurry", "dark", ["--true-cfg-scale", "2"]
    manifest.write_text("".join(json.dumps(row) + "\n" for row in rows))
    adapter = ["--ip-adapter", str(r / "xlabs.safetensors"), "--image-encoder", str(r / "clip_image_encoder")]
    if family == "sd3":
        adapter = ["--ip-adapter", str(r / "ip-adapter.bin"), "--image-encoder", str(r / "siglip_image_encoder")]
    common = ["stylize-batch", str(manifest), "--model", str(r / "model"), *adapter, "--steps", "2", "--height", "16",
              "--width", "16", "--threads", "1", *true_cfg]  # no --target: the adapter's default, all (XLabs: double blocks)
    assert main(common + ["--out", str(tmp_path / "one")]) == 0
    assert main(common + ["--out", str(tmp_path / "packed"), "--pack", "2"]) == 0
    blocks = 2 if family == "flux" else 3
    for name in ("dog", "boat"):
        record = json.loads((tmp_path / "packed" / f"{name}.png.json").read_text())
        assert record["packed"] == 2 and record["target"] == "all"
        assert record["settings"].get("true_cfg_scale") == (2.0 if family == "flux" else None)  # hashed only when set
        assert record["targets"] == [f"transformer_blocks.{i}.attn.processor" for i in range(blocks)]
        one, packed = (np.asarray(Image.open(tmp_path / d / f"{name}.png"), dtype=np.int16) for d in ("one", "packed"))
        assert np.abs(one - packed).max() <= 1, name  # batched float32 sums differ in the last bit
    dog, boat = (np.asarray(Image.open(tmp_path / "packed" / f"{n}.png"), dtype=np.int16) for n in ("dog", "boat"))
    assert np.abs(dog - boat).max() > 2  # paired, not blended: the rows of one pack differ


def test_stylize_cli_flux_true_cfg_reads_the_negative_prompt_and_image(tiny_flux_dir, tmp_path):
    r = tiny_flux_dir
    xlabs = ["--ip-adapter", str(r / "xlabs.safetensors"), "--image-encoder", str(r / "clip_image_encoder")]
    runs = {"plain": [], "negative prompt": ["--true-cfg-scale", "3", "--negative-prompt", "blurry"],
            "negative image": ["--true-cfg-scale", "3", "--negative-prompt", "blurry", "--negative-style",
                               str(r / "style2.png")]}
    pixels = {}
    for name, extra in runs.items():
        out = tmp_path / f"{name.replace(' ', '-')}.png"
        assert _cli(r, xlabs, out, *extra) == 0, name
        pixels[name] = np.asarray(Image.open(out), dtype=np.int16)
    record = json.loads((tmp_path / "negative-image.png.json").read_text())
    assert record["settings"]["true_cfg_scale"] == 3.0
    # each reaches the image: the negative pass runs, and the negative image enters it
    assert np.abs(pixels["plain"] - pixels["negative prompt"]).max() > 2
    assert np.abs(pixels["negative prompt"] - pixels["negative image"]).max() > 2


def test_stylize_batch_true_cfg_mistakes(tiny_flux_dir, tiny_sd3_dir, tmp_path, capsys):
    """A Flux row with a negative prompt but no --true-cfg-scale fails alone, with the reason
    (diffusers would ignore its negative prompt); --true-cfg-scale on another family stops
    the run in one line before any row."""
    r = tiny_flux_dir
    manifest = tmp_path / "jobs.jsonl"
    manifest.write_text(json.dumps({"prompt": "a dog", "style": str(r / "style.png"), "name": "dog"}) + "\n"
                        + json.dumps({"prompt": "a boat", "style": str(r / "style.png"), "name": "boat",
                                      "negative_prompt": "blurry"}) + "\n")
    flux = ["--ip-adapter", str(r / "xlabs.safetensors"), "--image-encoder", str(r / "clip_image_encoder")]
    common = ["--steps", "1", "--height", "16", "--width", "16", "--threads", "1"]
    assert main(["stylize-batch", str(manifest), "--model", str(r / "model"), *flux, *common,
                 "--out", str(tmp_path / "flux")]) == 1
    err = capsys.readouterr().err
    assert "1 written" in err and "1 failed" in err and "Flux uses a negative prompt only under true CFG" in err
    assert (tmp_path / "flux" / "dog.png").is_file() and not (tmp_path / "flux" / "boat.png").exists()
    s = tiny_sd3_dir
    sd3 = ["--ip-adapter", str(s / "ip-adapter.bin"), "--image-encoder", str(s / "siglip_image_encoder")]
    assert main(["stylize-batch", str(manifest), "--model", str(s / "model"), *sd3, *common, "--true-cfg-scale", "2",
                 "--out", str(tmp_path / "sd3")]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("instantstyle: error: --true-cfg-scale: Flux pipelines only; this sd3 pipeline"), last
