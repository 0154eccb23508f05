"""load_b_lora on a B-LoRA file written by train-lora's export: part="style" loads only
up_blocks.0.attentions.1 (pipeline output equal to loading a file with only that block's keys),
part="content" only attentions.0, part="both" equals diffusers' load_lora_weights of the whole
file; scale against W x + s B A x by hand in float64; kohya key names (SGM and diffusers block names)
load the same part; the hub path on a local hub-cache layout;
one-line errors that leave the pipeline as it was."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers.hub_cache import make_hub_cache
from safetensors.torch import load_file, save_file

from instantstyle import load_b_lora
from instantstyle.training.lora import WEIGHT_NAME, install_lora, write_lora

STYLE, CONTENT = "up_blocks.0.attentions.1", "up_blocks.0.attentions.0"


def _pipe(root):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(str(root / "model"))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def b_lora(train_root, tmp_path_factory):
    """A B-LoRA file (both blocks) with random trained-looking weights, in diffusers' format."""
    pipe = _pipe(train_root)
    install_lora(pipe.unet, "b-lora", rank=3, alpha=3.0, seed=1)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in pipe.unet.named_parameters():
            if ".lora_" in name:  # B starts at zero: make every layer matter
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    folder = tmp_path_factory.mktemp("b-lora")
    return write_lora(pipe, str(folder))[WEIGHT_NAME]


def _only(path, block, tmp_path):
    """A file with only ``block``'s keys, filtered here by name."""
    state = {k: v for k, v in load_file(path).items() if k.startswith(f"unet.{block}.")}
    out = tmp_path / f"only-{block}.safetensors"
    save_file(state, str(out))
    return str(out)


def _image(pipe):
    return pipe(prompt="a red bus", height=32, width=32, num_inference_steps=2, guidance_scale=3.0,
                generator=torch.Generator().manual_seed(0), output_type="np").images


def _lora_blocks(unet):
    """The attention blocks that hold LoRA layers now."""
    return sorted({n.split(".transformer_blocks")[0] for n, m in unet.named_modules() if hasattr(m, "lora_A")
                   and len(m.lora_A)})


def test_style_part_loads_only_the_style_block(train_root, b_lora, tmp_path):
    ours = _pipe(train_root)
    kept = load_b_lora(ours, b_lora, part="style")
    assert kept and all(k.startswith(f"unet.{STYLE}.") for k in kept)
    assert _lora_blocks(ours.unet) == [STYLE]
    reference = _pipe(train_root)
    reference.load_lora_weights(_only(b_lora, STYLE, tmp_path))
    np.testing.assert_array_equal(_image(ours), _image(reference))
    assert np.abs(_image(ours) - _image(_pipe(train_root))).max() > 1e-4  # the part does something


def test_content_part_loads_only_the_content_block_and_both_equals_diffusers(train_root, b_lora, tmp_path):
    ours = _pipe(train_root)
    load_b_lora(ours, str(b_lora.rsplit("/", 1)[0]), part="content", adapter_name="content")  # a folder
    assert _lora_blocks(ours.unet) == [CONTENT]
    reference = _pipe(train_root)
    reference.load_lora_weights(_only(b_lora, CONTENT, tmp_path))
    np.testing.assert_array_equal(_image(ours), _image(reference))

    both, diffusers_own = _pipe(train_root), _pipe(train_root)
    load_b_lora(both, b_lora, part="both")
    diffusers_own.load_lora_weights(b_lora)
    assert _lora_blocks(both.unet) == [CONTENT, STYLE]
    np.testing.assert_array_equal(_image(both), _image(diffusers_own))


def test_scale_by_hand_in_float64(train_root, b_lora):
    pipe = _pipe(train_root)
    base = dict(_pipe(train_root).unet.named_modules())
    load_b_lora(pipe, b_lora, part="style", scale=0.37)
    state = load_file(b_lora)
    name = f"{STYLE}.transformer_blocks.2.attn1.to_out.0"
    down, up = state[f"unet.{name}.lora.down.weight"].double(), state[f"unet.{name}.lora.up.weight"].double()
    w, b = base[name].weight.double(), base[name].bias.double()
    x = torch.randn(2, 5, w.shape[1], dtype=torch.float64)
    expected = x @ w.T + b + 0.37 * (x @ down.T @ up.T)
    with torch.no_grad():
        torch.testing.assert_close(dict(pipe.unet.named_modules())[name](x.float()).double(), expected,
                                   atol=1e-5, rtol=1e-5)


def test_hub_id_on_a_local_hub_cache(train_root, b_lora, offline_cache):
    make_hub_cache(offline_cache, "someone/b-lora-test", {f"sub/{WEIGHT_NAME}": b_lora})
    from_hub, local = _pipe(train_root), _pipe(train_root)
    load_b_lora(from_hub, "someone/b-lora-test", subfolder="sub", part="style")
    load_b_lora(local, b_lora, part="style")
    np.testing.assert_array_equal(_image(from_hub), _image(local))


def _kohya(path, tmp_path, sgm: bool):
    """The file under kohya's key names: the original SDXL block names (output block N's attention
    = up_blocks[N // 3].attentions[N % 3]) or diffusers' names, with alpha = rank (scale 1)."""
    out = {}
    for key, value in load_file(path).items():
        module, kind = key[len("unet."):].split(".lora.")
        if sgm:
            _, block, _, index, rest = module.split(".", 4)
            module = f"output_blocks.{3 * int(block) + int(index)}.1.{rest}"
        name = "lora_unet_" + module.replace(".", "_")
        out[f"{name}.lora_{kind.split('.')[0]}.weight"] = value
        if kind.startswith("down"):
            out[f"{name}.alpha"] = torch.tensor(float(value.shape[0]))
    target = tmp_path / f"kohya-{'sgm' if sgm else 'diffusers'}.safetensors"
    save_file(out, str(target))
    return str(target)


@pytest.mark.parametrize("sgm", [True, False], ids=["sgm-names", "diffusers-names"])
def test_kohya_keys_load_the_same_part(train_root, b_lora, tmp_path, sgm):
    kohya, ours = _pipe(train_root), _pipe(train_root)
    kept = load_b_lora(kohya, _kohya(b_lora, tmp_path, sgm), part="style")
    assert kept and all(k.startswith("lora_unet_output_blocks_1_1_" if sgm else "lora_unet_up_blocks_0_attentions_1_")
                        for k in kept)
    load_b_lora(ours, b_lora, part="style")
    assert _lora_blocks(kohya.unet) == [STYLE]
    np.testing.assert_allclose(_image(kohya), _image(ours), atol=1e-6)


def test_one_line_errors_leave_the_pipeline_as_it_was(train_root, b_lora, tmp_path):
    pipe = _pipe(train_root)
    only_style = _only(b_lora, STYLE, tmp_path)
    cases = [
        ({"pretrained_model_name_or_path_or_dict": only_style, "part": "content"}, ValueError,
         rf"no LoRA weights in {CONTENT} \(part='content'\); the file has LoRA weights in: {STYLE}$"),
        ({"pretrained_model_name_or_path_or_dict": b_lora, "part": "styel"}, ValueError,
         r"part: expected one of style, content, both, got 'styel'"),
        ({"pretrained_model_name_or_path_or_dict": {"lora_unet_output_blocks_0_1_x.lora_down.weight": torch.zeros(1)}},
         ValueError, rf"no LoRA weights in {STYLE} \(part='style'\); the file has LoRA weights in: {CONTENT}$"),
        ({"pretrained_model_name_or_path_or_dict": b_lora, "scale": "1"}, TypeError, "scale: expected a number"),
        ({"pretrained_model_name_or_path_or_dict": str(tmp_path / "nothing")}, FileNotFoundError, "no such file"),
    ]
    for kwargs, error, message in cases:
        with pytest.raises(error, match=message) as info:
            load_b_lora(pipe, **kwargs)
        assert "\n" not in str(info.value)
    assert _lora_blocks(pipe.unet) == [] and not getattr(pipe.unet, "peft_config", None)
    with pytest.raises(TypeError, match="pipe: expected a diffusers UNet pipeline"):
        load_b_lora(object(), b_lora)
