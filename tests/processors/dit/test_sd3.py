"""SD3.5: the fused SD3 IP processor against diffusers' (float64), loading into targets
only, bad checkpoints."""
from __future__ import annotations

import copy

import pytest
import torch
from diffusers.models.attention_processor import JointAttnProcessor2_0, SD3IPAdapterJointAttnProcessor2_0

import instantstyle
from instantstyle.processors.conversion import use_fused_processors
from instantstyle.processors.targets.registry import registry_of
from instantstyle.processors.dit.sd3 import FusedSD3IPAdapterJointAttnProcessor

from helpers.dit_fixtures import embeds, sd3_inputs, sd3_state, tiny_sd3

TOL = 1e-12


def run(model, ip=None):
    with torch.no_grad():
        kwargs = {"joint_attention_kwargs": {"ip_adapter_image_embeds": ip}} if ip is not None else {}
        return model(**sd3_inputs(), **kwargs).sample


def diffusers_model(model, state, scale):
    ref = copy.deepcopy(model)
    ref._load_ip_adapter_weights(copy.deepcopy(state), low_cpu_mem_usage=False)
    ref.to(torch.float64)
    for p in ref.attn_processors.values():
        if isinstance(p, SD3IPAdapterJointAttnProcessor2_0):
            p.scale = scale
    return ref


def test_swapped_matches_diffusers_and_scale_zero():
    model = tiny_sd3()
    state = sd3_state(model)
    ip = embeds(2, 1, 24)
    for scale in (0.5, 1.7, 0.0):
        ref = diffusers_model(model, state, scale)
        expected = run(ref, ip)
        replaced = use_fused_processors(ref)
        assert len(replaced) == 3 and all(isinstance(p, FusedSD3IPAdapterJointAttnProcessor) for p in ref.attn_processors.values()
                                          if not isinstance(p, type(ref.attn_processors["image_proj.layers.0.attn.processor"])))
        assert (run(ref, ip) - expected).abs().max() < TOL, scale
    assert (run(ref, ip) - run(model)).abs().max() == 0  # scale 0: no IP at all


def test_loader_all_matches_diffusers_narrow_target_only_there(tmp_path):
    model = tiny_sd3()
    state = sd3_state(model)
    ip = embeds(2, 1, 24)
    ours = copy.deepcopy(model)
    report = instantstyle.load_ip_adapter(ours, state, target="all", scale=0.5)
    assert report.format == "instantx-sd3" and report.params_saved == 0
    assert (run(ours, ip) - run(diffusers_model(model, state, 0.5), ip)).abs().max() < TOL
    narrow = copy.deepcopy(model)
    report = instantstyle.load_ip_adapter(narrow, state, target={"joint": {1: 1.0}}, scale=0.5)
    assert report.layers == [["transformer_blocks.1.attn.processor"]] and 3 * report.ip_params == report.ip_params_all_layers
    procs = narrow.attn_processors
    assert isinstance(procs["transformer_blocks.0.attn.processor"], JointAttnProcessor2_0)
    called = []
    hook = FusedSD3IPAdapterJointAttnProcessor.joint_kv
    try:
        FusedSD3IPAdapterJointAttnProcessor.joint_kv = lambda self, call: (called.append(self), hook(self, call))[1]
        out = run(narrow, ip)
    finally:
        FusedSD3IPAdapterJointAttnProcessor.joint_kv = hook
    assert called == [procs["transformer_blocks.1.attn.processor"]]
    # diffusers with the other blocks at scale 0 (it skips them) gives the same
    ref = diffusers_model(model, state, 0.5)
    for name, p in ref.attn_processors.items():
        if isinstance(p, SD3IPAdapterJointAttnProcessor2_0) and not name.startswith("transformer_blocks.1."):
            p.scale = 0.0
    assert (out - run(ref, ip)).abs().max() < TOL
    assert registry_of(narrow).injections["ip_adapter[0]"].weights == {"transformer_blocks.1.attn.processor": 0.5}


def test_bad_checkpoint_one_line_error_model_unchanged():
    model = tiny_sd3()
    before = dict(model.attn_processors)
    other = sd3_state(tiny_sd3(layers=2))
    wrong = sd3_state(model)
    wrong["ip_adapter"]["2.to_k_ip.weight"] = torch.zeros(32, 16)
    for state, words in ((other, "holds IP layers"), (wrong, "layer 2 does not fit")):
        with pytest.raises(ValueError, match=words) as err:
            instantstyle.load_ip_adapter(model, state)
        assert "\n" not in str(err.value) and model.attn_processors == before


def test_each_sample_attends_to_its_own_image_row_and_other_counts_are_refused():
    """diffusers issue 9813 on SD3.5: image row i pairs with sample i, one row is shared, and a
    processor given rows it can't pair refuses them (a ``view(batch, -1, ...)`` would blend them)."""
    model = tiny_sd3()
    instantstyle.load_ip_adapter(model, sd3_state(model), target="all", scale=0.7)
    inputs, ip = sd3_inputs(batch=2), embeds(2, 1, 24)

    def sample(i):
        return {k: v[i:i + 1] for k, v in inputs.items()}

    with torch.no_grad():
        both = model(**inputs, joint_attention_kwargs={"ip_adapter_image_embeds": ip}).sample
        alone = [model(**sample(i), joint_attention_kwargs={"ip_adapter_image_embeds": ip[i:i + 1]}).sample
                 for i in range(2)]
        swapped = model(**sample(0), joint_attention_kwargs={"ip_adapter_image_embeds": ip[1:]}).sample
    for i in range(2):
        assert (both[i:i + 1] - alone[i]).abs().max() < 1e-10
    assert (swapped - alone[0]).abs().max() > 1e-6  # the reference matters, so the test can fail
    attn = model.transformer_blocks[0].attn
    proc = attn.processor
    hidden = torch.randn(2, 6, 32, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"ip_adapter_image_embeds\[0\]: expected image states for 1 or 2 samples"):
        with torch.no_grad():
            proc(attn, hidden, encoder_hidden_states=torch.randn(2, 5, 32, dtype=torch.float64),
                 ip_hidden_states=torch.randn(4, 3, 32, dtype=torch.float64), temb=torch.randn(2, 32, dtype=torch.float64))
