"""Caches that cannot be stale (issue 16): every edit the run-less caches missed gives the
cache-free output now.

A cache lives for one denoising run (falling timesteps); a direct call repeated with the
same tensors starts a new run, so edits no cheap check sees (``.data``, numpy views, a
``.data`` swapped back onto the old address) and autocast toggles are seen.  Inside a
run, autograd-visible edits are seen by the checks, and ``clear_caches`` is the remedy
for the rest.  Every output is compared with the same call on a copy with the caches
off (``set_caches(copy, False)``)."""
from __future__ import annotations

import copy
import random

import pytest
import torch
from helpers.ip_fixtures import (
    CROSS,
    image_embeds,
    random_checkpoint,
    tiny_unet,
    unet_inputs,
)

import instantstyle
from instantstyle.loaders import load_ip_adapter
from instantstyle.processors import clear_caches, set_caches
from instantstyle.processors.core import step_cache
from instantstyle.processors.core.model_state import run_mark, same_run

pytestmark = pytest.mark.slow  # about 100 s on 2 cores: the whole defect matrix, with a cache-free twin each

WEIGHTS = ["to_k", "to_k_ip", "projection"]


def _model(kind="sdxl"):
    unet = tiny_unet(kind)
    load_ip_adapter(unet, random_checkpoint(unet, seed=3), target="style+layout" if kind == "sdxl" else "all")
    set_caches(unet, True)
    return unet


def _inputs(unet) -> dict:
    kwargs = unet_inputs(unet)
    kwargs["added_cond_kwargs"]["image_embeds"] = [image_embeds(2, 1, seed=7)]
    return kwargs


def _weight(unet, which: str) -> torch.nn.Parameter:
    """A weight every call uses: an IP layer's text key projection, its IP key projection,
    or the image projection's."""
    if which == "projection":
        return next(unet.encoder_hid_proj.parameters())
    name, proc = next((n, p) for n, p in unet.attn_processors.items() if len(getattr(p, "to_k_ip", ())) > 0)
    if which == "to_k_ip":
        return proc.to_k_ip[0].weight
    return unet.get_submodule(name[: -len(".processor")]).to_k.weight


def _embed(inputs, which: str) -> torch.Tensor:
    return inputs["encoder_hidden_states"] if which == "prompt" else inputs["added_cond_kwargs"]["image_embeds"][0]


def _call(unet, inputs, timestep, autocast=False):
    kwargs = dict(inputs, timestep=torch.tensor(timestep))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        return unet(**kwargs).sample.float()


def _cache_free(unet, inputs, timestep, autocast=False):
    """The same call on a copy of the model and inputs, caches off."""
    ref = copy.deepcopy(unet)
    set_caches(ref, False)
    return _call(ref, copy.deepcopy(inputs), timestep, autocast)


def _same(out, expected):
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


def _differs(a, b):
    assert (a - b).abs().max() > 1e-4, "the edit changes nothing: the check would be vacuous"


def _numpy_scale(t: torch.Tensor, factor: float) -> None:
    array = t.detach().numpy()
    array[...] = array * factor


# -- one test per defect of the issue: repeated direct calls with the same tensors ---------------
@pytest.mark.parametrize("which", WEIGHTS)
@pytest.mark.parametrize("edit", ["data.mul_", "data.copy_"])
def test_weight_edit_through_data_is_seen_by_the_next_call(which, edit):
    unet = _model()
    inputs = _inputs(unet)
    first = _call(unet, inputs, 500)
    w = _weight(unet, which)
    if edit == "data.mul_":
        w.data.mul_(1.5)  # bumps no version counter (peft's merge without safe_merge writes this way)
    else:
        w.data.copy_(w.detach() * -0.75)
    out = _call(unet, inputs, 500)
    expected = _cache_free(unet, inputs, 500)
    _differs(expected, first)
    _same(out, expected)


@pytest.mark.parametrize("which", ["prompt", "image"] + WEIGHTS)
def test_write_through_a_numpy_view_is_seen_by_the_next_call(which):
    unet = _model()
    inputs = _inputs(unet)
    first = _call(unet, inputs, 500)
    _numpy_scale(_weight(unet, which) if which in WEIGHTS else _embed(inputs, which), -1.5)
    out = _call(unet, inputs, 500)
    expected = _cache_free(unet, inputs, 500)
    _differs(expected, first)
    _same(out, expected)


@pytest.mark.parametrize("which", WEIGHTS)
def test_data_swapped_back_onto_the_old_address_is_seen(which):
    unet = _model()
    inputs = _inputs(unet)
    first = _call(unet, inputs, 500)
    w = _weight(unet, which)
    old, pointer, version = w.data, w.data_ptr(), w._version
    w.data = old.clone()  # swap 1
    old.mul_(1.5)  # the old storage changes under another tensor's version counter
    w.data = old  # swap 2: the old address, the same Parameter, the same version
    assert (w.data_ptr(), w._version) == (pointer, version)
    out = _call(unet, inputs, 500)
    expected = _cache_free(unet, inputs, 500)
    _differs(expected, first)
    _same(out, expected)


@pytest.mark.parametrize("order", [(True, False), (False, True)], ids=["bf16 then fp32", "fp32 then bf16"])
@pytest.mark.parametrize("timesteps", [(500, 500), (900, 500)], ids=["direct calls", "within a run"])
def test_autocast_toggles_never_share_a_cache(order, timesteps):
    unet = _model()
    inputs = _inputs(unet)
    for autocast, t in zip(order, timesteps):
        _same(_call(unet, inputs, t, autocast), _cache_free(unet, inputs, t, autocast))


# -- inside a run ------------------------------------------------------------------------------------------
def test_a_run_is_falling_timesteps():
    """Reuse within a run, never across: the same or a rising timestep starts a new run."""
    unet = _model()
    inputs = _inputs(unet)
    calls = []
    for layer in unet.encoder_hid_proj.image_projection_layers:
        layer.register_forward_hook(lambda *a: calls.append(1))
    counts = []
    for t in (900, 500, 100, 100, 300, 200):
        _call(unet, inputs, t)
        counts.append(len(calls))
    assert counts == [1, 1, 1, 2, 3, 3]
    set_caches(unet, False)
    _call(unet, inputs, 100)
    assert len(calls) == 4


def test_run_marks_without_reading_the_device():
    """Device timesteps are not read (a sync); a view of one schedule tensor at a later
    entry continues the run, anything else starts a new one."""
    schedule = torch.tensor([999.0, 500.0, 500.0, 1.0])
    marks = [run_mark(schedule[i], None) for i in range(4)]
    assert all(same_run(a, b) for a, b in zip(marks, marks[1:]))  # repeated values too: the index moves on
    assert not same_run(marks[1], marks[1]) and not same_run(marks[2], marks[1])
    assert same_run(marks[0], run_mark(schedule[1].expand(2), None))  # t.expand(batch) as pipelines pass it
    assert not same_run(marks[0], run_mark(schedule.clone()[1], None))  # another schedule: a new run
    assert not same_run(marks[0], run_mark(torch.tensor(5.0), None))  # not a view: unknown
    assert same_run(900.0, 500.0) and not same_run(500.0, 500.0) and not same_run(500.0, 900.0)


@pytest.mark.parametrize("which", WEIGHTS)
@pytest.mark.parametrize("edit", ["mul_", "copy_", "load_state_dict"])
def test_autograd_visible_weight_edits_inside_a_run_are_seen(which, edit):
    unet = _model()
    inputs = _inputs(unet)
    _call(unet, inputs, 900)
    w = _weight(unet, which)
    with torch.no_grad():
        if edit == "mul_":
            w.mul_(1.5)
        elif edit == "copy_":
            w.copy_(w * -0.75)
        else:
            module = unet.encoder_hid_proj if which == "projection" else None
            if module is None:
                module = next(m for m in unet.modules() if any(p is w for p in m.parameters(recurse=False)))
            state = {k: v * 1.25 for k, v in module.state_dict().items()}
            module.load_state_dict(state)
    out = _call(unet, inputs, 500)
    _same(out, _cache_free(unet, inputs, 500))


@pytest.mark.parametrize("edit", ["data", "numpy"])
@pytest.mark.parametrize("which", ["prompt", "image"] + WEIGHTS)
def test_clear_caches_after_an_invisible_edit_inside_a_run(which, edit):
    """The documented remedy: ``.data`` and numpy-view edits inside a run need clear_caches."""
    unet = _model()
    inputs = _inputs(unet)
    _call(unet, inputs, 900)
    target = _weight(unet, which) if which in WEIGHTS else _embed(inputs, which)
    if edit == "data":
        target.data.mul_(-1.5)
    else:
        _numpy_scale(target, -1.5)
    expected = _cache_free(unet, inputs, 500)
    instantstyle.clear_caches(unet)
    _same(_call(unet, inputs, 500), expected)


def test_without_clear_caches_an_invisible_edit_inside_a_run_is_the_documented_limit():
    """What the remedy is for (and proof that the run really reuses its caches)."""
    unet = _model()
    inputs = _inputs(unet)
    _call(unet, inputs, 900)
    _weight(unet, "to_k_ip").data.mul_(-1.5)
    assert (_call(unet, inputs, 500) - _cache_free(unet, inputs, 500)).abs().max() > 1e-4


def test_caches_off_sees_everything_inside_a_run():
    unet = _model()
    instantstyle.set_caches(unet, False)
    inputs = _inputs(unet)
    _call(unet, inputs, 900)
    _weight(unet, "to_k").data.mul_(-1.5)
    _numpy_scale(_embed(inputs, "image"), 2.0)
    _same(_call(unet, inputs, 500), _cache_free(unet, inputs, 500))
    with pytest.raises(TypeError, match="enabled"):
        set_caches(unet, "no")


def test_one_run_reuses_across_direct_calls_and_clear_caches_works_inside():
    unet = _model()
    inputs = _inputs(unet)
    with step_cache.one_run():
        _call(unet, inputs, 500)
        w = _weight(unet, "to_k")
        w.data.mul_(-1.5)
        assert (_call(unet, inputs, 500) - _cache_free(unet, inputs, 500)).abs().max() > 1e-4  # one run: reused
        clear_caches(unet)
        _same(_call(unet, inputs, 500), _cache_free(unet, inputs, 500))
    assert step_cache.active_run() is None


def test_the_run_ends_with_the_forward_even_when_it_raises():
    unet = _model()
    inputs = _inputs(unet)
    with pytest.raises(RuntimeError):  # the text width does not fit to_k
        _call(unet, dict(inputs, encoder_hidden_states=torch.zeros(2, 7, CROSS + 1)), 500)
    assert step_cache.active_run() is None
    _call(unet, inputs, 900)
    assert step_cache.active_run() is None


# -- a real pipeline: callback_on_step_end edits a weight after step 0 ---------------------------------------
def _pipeline(tmp_path, caches: bool):
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline
    from helpers.tiny_tokenizers import write_clip_vocab
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    write_clip_vocab(str(tmp_path))
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=514, hidden_size=CROSS, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
        max_position_embeddings=16, bos_token_id=512, eos_token_id=513, pad_token_id=513)).eval()
    vae = AutoencoderKL(block_out_channels=(8,), down_block_types=("DownEncoderBlock2D",),
                        up_block_types=("UpDecoderBlock2D",), latent_channels=4, norm_num_groups=8).eval()
    tokenizer = CLIPTokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"), pad_token="<|endoftext|>",
                              model_max_length=16)
    unet = _model("sd15")
    set_caches(unet, caches)
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=DDIMScheduler(clip_sample=False, steps_offset=1), safety_checker=None,
                                   feature_extractor=None, image_encoder=None, requires_safety_checker=False)


def _generate(pipe, edit, prompt_embeds=None):
    """4 steps with CFG; without CFG when ``prompt_embeds`` are given (then the pipeline
    passes that very tensor to the UNet at every call, as a direct caller would)."""
    def callback(p, step, timestep, kwargs):
        if step == 0:
            edit(p)
        return kwargs

    embeds = image_embeds(1, 1, seed=7)
    prompt = dict(prompt="a cat", guidance_scale=5.0) if prompt_embeds is None else \
        dict(prompt_embeds=prompt_embeds, guidance_scale=1.0)
    if prompt_embeds is None:
        embeds = torch.cat([torch.zeros_like(embeds), embeds])
    with torch.no_grad():
        return pipe(**prompt, num_inference_steps=4, height=16, width=16, output_type="latent",
                    ip_adapter_image_embeds=[embeds], callback_on_step_end=callback,
                    generator=torch.Generator().manual_seed(2)).images


@pytest.mark.parametrize("which", WEIGHTS)
def test_callback_edits_after_step_0(tmp_path, which):
    def in_place(p):  # autograd-visible: seen by the checks
        with torch.no_grad():
            _weight(p.unet, which).mul_(1.5)

    def through_data(p):  # invisible: the documented remedy
        _weight(p.unet, which).data.mul_(1.5)
        instantstyle.clear_caches(p)

    unedited = _generate(_pipeline(tmp_path, False), lambda p: None)
    for edit in (in_place, through_data):
        expected = _generate(_pipeline(tmp_path, False), edit)
        _differs(expected, unedited)
        _same(_generate(_pipeline(tmp_path, True), edit), expected)


def test_pipeline_calls_each_start_a_run(tmp_path):
    """Between two pipeline calls (a new schedule) even ``.data`` and numpy edits need
    nothing, also when the caller passes the same prompt embeddings again."""
    pipe, ref = _pipeline(tmp_path, True), _pipeline(tmp_path, False)
    prompt_embeds = torch.randn(1, 5, CROSS, generator=torch.Generator().manual_seed(4))
    before = _generate(pipe, lambda p: None, prompt_embeds)
    for p in (pipe, ref):
        _weight(p.unet, "to_k_ip").data.mul_(-1.5)
        _numpy_scale(_weight(p.unet, "to_k"), 1.5)
    expected = _generate(ref, lambda p: None, prompt_embeds)
    _differs(expected, before)
    _same(_generate(pipe, lambda p: None, prompt_embeds), expected)


# -- property: random edits between and within runs ---------------------------------------------------------
def _edit_ops(rng: random.Random):
    """A random edit as (visible to the checks?, fn(model, inputs)); fn is applied to both twins."""
    factor = rng.choice([-1.0, 0.8, 1.25])  # balanced: weights don't drift off over many edits
    which = rng.choice(WEIGHTS + ["prompt", "image"])
    how = rng.choice(["mul_", "copy_", "data", "numpy", "swap", "replace"] if which in ("prompt", "image")
                     else ["mul_", "copy_", "load_state_dict", "data", "numpy", "swap"])

    def fn(unet, inputs):
        t = _weight(unet, which) if which in WEIGHTS else _embed(inputs, which)
        with torch.no_grad():
            if how == "mul_":
                t.mul_(factor)
            elif how == "copy_":
                t.copy_(t.flip(-1) * factor)
            elif how == "load_state_dict":
                module = next(m for m in unet.modules() if any(p is t for p in m.parameters(recurse=False)))
                module.load_state_dict({k: v * factor for k, v in module.state_dict().items()})
            elif how == "data":
                t.data.mul_(factor)
            elif how == "numpy":
                _numpy_scale(t, factor)
            elif how == "swap":
                old = t.data
                t.data = old.clone()
                old.mul_(factor)
                t.data = old
            else:  # a new embeddings tensor
                new = t * factor
                if which == "prompt":
                    inputs["encoder_hidden_states"] = new
                else:
                    inputs["added_cond_kwargs"]["image_embeds"] = [new]

    return how in ("mul_", "copy_", "load_state_dict", "replace"), f"{how} {which} x{factor}", fn


def test_random_edit_sequences_give_the_cache_free_result():
    """~50 seeded sequences: edits, autocast toggles and dtype round trips, between and
    within runs; an invisible edit inside a run is followed by ``clear_caches`` (the
    documented remedy) or by a new run.  The twin has its caches off."""
    unet = _model()
    twin = copy.deepcopy(unet)
    set_caches(twin, False)
    inputs = _inputs(unet)
    twin_inputs = copy.deepcopy(inputs)
    rng = random.Random(16)
    t, autocast, invisible = None, False, False  # carried over: a sequence may continue the last run
    for sequence in range(50):
        log = []
        for _ in range(rng.randint(3, 6)):
            action = rng.random()
            if action < 0.45:  # a call: the next step of the run, or a new run
                continues = t is not None and t > 50 and rng.random() < 0.7
                if continues and invisible:
                    clear_caches(unet)
                    log.append("clear_caches")
                if continues:
                    t = rng.randint(1, t - 1)
                else:  # the same or a rising timestep
                    t = rng.randint(1, 999) if t is None else rng.choice([t, rng.randint(t, 999)])
                invisible = False
                log.append(f"call t={t}{' bf16' if autocast else ''}")
                out, expected = _call(unet, inputs, t, autocast), _call(twin, twin_inputs, t, autocast)
                assert torch.equal(out, expected) or torch.allclose(out, expected, rtol=1e-5, atol=1e-6), \
                    f"sequence {sequence}: {log}: {(out - expected).abs().max()}"
            elif action < 0.6:
                autocast = not autocast
                log.append(f"autocast {autocast}")
            elif action < 0.65:
                for model in (unet, twin):
                    model.half()
                    model.float()
                log.append("half/float")
            else:
                visible, name, fn = _edit_ops(rng)
                fn(unet, inputs)
                fn(twin, twin_inputs)
                invisible = invisible or not visible
                log.append(name)
