"""Flux: fused XLabs/InstantX processors against diffusers (float64), loading into
targets only, registry sites/presets/dict targets."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from diffusers.models.transformers.transformer_flux import FluxAttnProcessor, FluxIPAdapterAttnProcessor

import instantstyle
from instantstyle.processors.conversion import use_fused_processors
from instantstyle.processors.dit.flux import FusedFluxInstantXAttnProcessor
from instantstyle.processors.targets.registry import registry_of

from helpers.dit_fixtures import embeds, flux_inputs, instantx_flux_state, tiny_flux, xlabs_original_file, xlabs_state

TOL = 1e-12


def run(model, ip=None):
    with torch.no_grad():
        kwargs = {"joint_attention_kwargs": {"ip_adapter_image_embeds": ip}} if ip is not None else {}
        return model(**flux_inputs(), **kwargs).sample


def set_scales(model, scales):
    """diffusers' FluxIPAdapterMixin.set_ip_adapter_scale, for a bare transformer."""
    n = model.config.num_layers
    configs = [[s] * n if not isinstance(s, list) else s for s in scales]
    for proc, *scale in zip(model.attn_processors.values(), *configs):
        proc.scale = scale


def test_swapped_xlabs_matches_diffusers_multi_adapter_per_block_scales_and_zero():
    model = tiny_flux()
    model._load_ip_adapter_weights([xlabs_state(model, 1), xlabs_state(model, 2)], low_cpu_mem_usage=False)
    model.to(torch.float64)
    ip = [embeds(2, 1, 32), embeds(2, 2, 32, seed=6)]
    for scales in ([0.5, 0.25], [[0.75, 0.0], 1.0], [0.0, 0.0]):
        set_scales(model, scales)
        ref = run(model, ip)
        ours_model = copy.deepcopy(model)
        replaced = use_fused_processors(ours_model)
        assert len(replaced) == 2 and all(isinstance(p, FluxIPAdapterAttnProcessor) for p in replaced.values())
        ours = run(ours_model, ip)
        assert (ours - ref).abs().max() < TOL, scales
    # diffusers' set_ip_adapter_scale still reaches the fused processors
    set_scales(ours_model, [0.5, 0.25])
    set_scales(model, [0.5, 0.25])
    assert (run(ours_model, ip) - run(model, ip)).abs().max() < TOL
    assert (run(ours_model, ip) - run(ours_model, [ip[0], ip[1] * 2])).abs().max() > 1e-6  # IP reaches the output


def test_loader_xlabs_all_matches_diffusers_and_reads_original_file(tmp_path):
    model = tiny_flux()
    state = xlabs_state(model)
    ref_model = copy.deepcopy(model)
    ref_model._load_ip_adapter_weights([copy.deepcopy(state)], low_cpu_mem_usage=False)
    ref_model.to(torch.float64)
    ip = [embeds(2, 1, 32)]
    ref = run(ref_model, ip)
    path = tmp_path / "ip_adapter.safetensors"
    xlabs_original_file(state, path)
    for source in (state, str(path)):
        ours = copy.deepcopy(model)
        report = instantstyle.load_ip_adapter(ours, source, target="all")
        assert report.format == "xlabs" and report.params_saved == 0 and len(report.layers[0]) == 2
        assert (run(ours, ip) - ref).abs().max() < TOL


def _ip_outputs(model, ip):
    """Per double block: max |third output| of its attention (the IP branch), by hooks."""
    seen = {}
    hooks = [blk.attn.register_forward_hook(lambda m, a, out, i=i: seen.__setitem__(i, float(out[2].abs().max())))
             for i, blk in enumerate(model.transformer_blocks)]
    run(model, ip)
    for h in hooks:
        h.remove()
    return seen


@pytest.mark.parametrize("target", [["transformer_blocks.1"], {"double": [0.0, 1.0]}, {"transformer_blocks": {1: 1.0}}])
def test_narrow_target_only_those_blocks_get_ip_and_hold_weights(target):
    model = tiny_flux()
    state = xlabs_state(model)
    ours = copy.deepcopy(model)
    report = instantstyle.load_ip_adapter(ours, state, target=target, scale=0.5)
    assert report.layers == [["transformer_blocks.1.attn.processor"]] and report.ip_params * 2 == report.ip_params_all_layers
    ip = [embeds(2, 1, 32)]
    outs = _ip_outputs(ours, ip)
    assert outs[0] == 0.0 and outs[1] > 0.0
    procs = ours.attn_processors
    assert sum(p.numel() for p in procs["transformer_blocks.0.attn.processor"].parameters()) == 0
    # same as diffusers with per-block scales [0, 0.5]
    ref_model = copy.deepcopy(model)
    ref_model._load_ip_adapter_weights([state], low_cpu_mem_usage=False)
    ref_model.to(torch.float64)
    set_scales(ref_model, [[0.0, 0.5]])
    assert (run(ours, ip) - run(ref_model, ip)).abs().max() < TOL
    assert registry_of(ours).injections["ip_adapter[0]"].weights == {"transformer_blocks.1.attn.processor": 0.5}


class InstantXReference(FluxAttnProcessor):
    """The InstantX math as Shakker-Labs' ComfyUI node computes it (one SDPA per adapter),
    on diffusers' Flux attention: k/v RMS-normed, added before to_out (double) or to the
    returned output (single)."""

    def __init__(self, k, v, scale):
        super().__init__()
        self.k, self.v, self.scale = k, v, scale

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None, ip_hidden_states=None):
        q = attn.norm_q(attn.to_q(hidden_states).unflatten(-1, (attn.heads, -1))).transpose(1, 2)
        states = ip_hidden_states[0]
        b = states.shape[0]
        rms = lambda x: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5)  # noqa: E731
        k = rms(F.linear(states, self.k).view(b, -1, attn.heads, attn.head_dim)).transpose(1, 2)
        v = rms(F.linear(states, self.v).view(b, -1, attn.heads, attn.head_dim)).transpose(1, 2)
        ip = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2) * self.scale
        if encoder_hidden_states is None:
            return super().__call__(attn, hidden_states, None, attention_mask, image_rotary_emb) + ip
        hook = attn.to_out[0].register_forward_pre_hook(lambda m, args: (args[0] + ip,))  # ip joins before to_out
        try:
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        finally:
            hook.remove()


def test_instantx_double_and_single_blocks_match_reference_and_gate_by_target():
    model = tiny_flux()
    state = instantx_flux_state(model)
    ours = copy.deepcopy(model)
    report = instantstyle.load_ip_adapter(ours, state, target="all", scale=0.5)
    assert report.format == "instantx" and len(report.layers[0]) == 5
    assert all(isinstance(p, FusedFluxInstantXAttnProcessor) for p in ours.attn_processors.values())
    ref = copy.deepcopy(model)
    from diffusers.models.embeddings import MultiIPAdapterImageProjection

    ref.encoder_hid_proj = MultiIPAdapterImageProjection([copy.deepcopy(ours.encoder_hid_proj.image_projection_layers[0])])
    ref.config.encoder_hid_dim_type = "ip_image_proj"
    names = list(ref.attn_processors)
    ref.set_attn_processor({n: InstantXReference(state["ip_adapter"][f"{i}.to_k_ip.weight"].double(),
                                                 state["ip_adapter"][f"{i}.to_v_ip.weight"].double(), 0.5) for i, n in enumerate(names)})
    ip = [embeds(2, 1, 24)]
    # 1e-7, not TOL: diffusers' RMSNorm (the node's) takes the variance in float32, the reference in float64
    assert (run(ours, ip) - run(ref, ip)).abs().max() < 1e-7
    assert (run(ours, ip) - run(ours, [ip[0] * 2])).abs().max() > 1e-4
    # style preset: later single blocks only (SplitFlux); the tiny model has single blocks 0-2
    styled = copy.deepcopy(model)
    report = instantstyle.load_ip_adapter(styled, state, target=["single_transformer_blocks.2"])
    held = {n for n, p in styled.attn_processors.items() if sum(q.numel() for q in p.parameters())}
    assert held == {"single_transformer_blocks.2.attn.processor"} and report.params_saved == 4 * report.ip_params


def test_bad_checkpoints_one_line_error_model_unchanged():
    model = tiny_flux()
    before = dict(model.attn_processors)
    wrong_layers = xlabs_state(tiny_flux(layers=3))
    bad_shape = xlabs_state(model)
    bad_shape["ip_adapter"]["1.to_k_ip.weight"] = torch.zeros(32, 16)
    not_flux = {"image_proj": {"latents": torch.zeros(1, 4, 8)}, "ip_adapter": {"0.to_k_ip.weight": torch.zeros(2, 2)}}
    for state, words in ((wrong_layers, "holds IP layers"), (bad_shape, "expected shape (32, 32), got (32, 16)"), (not_flux, "not a Flux")):
        with pytest.raises(ValueError, match=words.replace("(", r"\(").replace(")", r"\)")) as err:
            instantstyle.load_ip_adapter(model, state)
        assert "\n" not in str(err.value)
        assert model.attn_processors == before and getattr(model, "encoder_hid_proj", None) is None
    with pytest.raises(ValueError, match="double-stream blocks"):
        instantstyle.load_ip_adapter(model, xlabs_state(model), target="single")


def test_sites_presets_and_meta_block_listing():
    model = tiny_flux()
    reg = registry_of(model)
    assert reg.arch == "flux"
    assert [s.kind for s in reg.sites] == ["joint"] * 2 + ["single"] * 3
    assert len(reg.resolve("double")) == 2 and len(reg.resolve("single")) == 3 and len(reg.resolve("all")) == 5
    with pytest.raises(ValueError, match="expected 2 weights"):
        reg.resolve({"double": [1.0]})
    with pytest.raises(ValueError, match="expected dict keys among"):
        reg.resolve({"up": 1.0})
    from instantstyle.blocks_cli import describe_blocks

    rows, summary = describe_blocks("flux", "style")
    assert len(rows) == 57 and sum(bool(r["injected"]) for r in rows) == 28 and rows[0]["queries"] == 4608
    assert rows[0]["heads"] == 24 and rows[0]["head_dim"] == 128 and summary["ip_layers_all"] == 57
    rows, summary = describe_blocks("flux", "content")
    assert [r["name"] for r in rows if r["injected"]][0] == "single_transformer_blocks.0.attn.processor"


def test_blocks_xlabs_counts_the_19_capable_layers_and_refuses_single_blocks(capsys):
    from instantstyle.blocks_cli import describe_blocks
    from instantstyle.cli import main

    rows, summary = describe_blocks("flux", "all", fmt="xlabs")
    assert summary["ip_layers"] == summary["ip_layers_all"] == 19
    assert sum(bool(r["injected"]) for r in rows) == 19 and all(r["kind"] == "joint" for r in rows if r["injected"])
    assert main(["blocks", "--arch", "flux", "--format", "xlabs", "--preset", "all"]) == 0
    assert "IP weights in 19 of 19 attention layers" in capsys.readouterr().out
    assert main(["blocks", "--arch", "flux", "--format", "xlabs", "--preset", "single"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("instantstyle: error: target: a xlabs checkpoint") and len(err.strip().splitlines()) == 1


def _sample(inputs, i):
    """Row i of ``flux_inputs`` (the ids are per token, not per sample)."""
    return {k: v if k.endswith("_ids") else v[i:i + 1] for k, v in inputs.items()}


@pytest.mark.parametrize("fmt", ["xlabs", "instantx"])
def test_each_sample_attends_to_its_own_image_row_and_other_counts_are_refused(fmt):
    """diffusers issue 9813 on Flux: FluxPipeline repeats per-prompt embeds once per prompt, and
    the processors' ``view(batch, -1, ...)`` would fold the extra rows into the tokens (a blend
    of every prompt's references).  Ours pair row i with sample i, share one row, refuse the rest."""
    model = tiny_flux()
    state, dim = (xlabs_state(model), 32) if fmt == "xlabs" else (instantx_flux_state(model), 24)
    instantstyle.load_ip_adapter(model, state, target="all", scale=0.7)
    inputs, ip = flux_inputs(batch=2), embeds(2, 1, dim)
    with torch.no_grad():
        both = model(**inputs, joint_attention_kwargs={"ip_adapter_image_embeds": [ip]}).sample
        alone = [model(**_sample(inputs, i), joint_attention_kwargs={"ip_adapter_image_embeds": [ip[i:i + 1]]}).sample
                 for i in range(2)]
        shared = model(**inputs, joint_attention_kwargs={"ip_adapter_image_embeds": [ip[:1]]}).sample
        repeated = model(**inputs, joint_attention_kwargs={"ip_adapter_image_embeds": [ip[:1].repeat(2, 1, 1)]}).sample
        swapped = model(**_sample(inputs, 0), joint_attention_kwargs={"ip_adapter_image_embeds": [ip[1:]]}).sample
    for i in range(2):
        assert (both[i:i + 1] - alone[i]).abs().max() < 1e-10
    assert (shared - repeated).abs().max() < 1e-10
    assert (swapped - alone[0]).abs().max() > 1e-6  # the reference matters, so the test can fail
    with pytest.raises(ValueError, match=r"ip_adapter_image_embeds\[0\]: expected image states for 1 or 2 samples"):
        with torch.no_grad():
            model(**inputs, joint_attention_kwargs={"ip_adapter_image_embeds": [ip.repeat(2, 1, 1)]})
