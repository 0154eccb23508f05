"""Per-run K/V caches inside a Wan forward: text and image K/V projected once per
distinct context per run, outputs bit-identical with caches on and off, and a changed
context or changed weights miss."""
import pytest
import torch

from instantstyle.processors.core.model_state import clear_caches, set_caches
from instantstyle.processors.core.step_cache import one_run
from instantstyle.processors.wan.context_cache import same_bits
from instantstyle.processors.wan.conversion import use_fused_wan


@pytest.fixture
def counted(monkeypatch):
    """``{name: calls}`` of F.linear with block 0's attn2 to_k / add_k_proj weight."""
    calls = {"to_k": 0, "add_k_proj": 0}
    real = torch.nn.functional.linear
    watched = {}

    def linear(x, weight, bias=None):
        name = watched.get(id(weight))
        if name is not None and weight is watched["tensors"][name]:
            calls[name] += 1
        return real(x, weight, bias)

    def watch(attn):
        watched["tensors"] = {"to_k": attn.to_k.weight, "add_k_proj": attn.add_k_proj.weight}
        watched.update({id(attn.to_k.weight): "to_k", id(attn.add_k_proj.weight): "add_k_proj"})

    monkeypatch.setattr(torch.nn.functional, "linear", linear)
    return calls, watch


def _contexts(n):
    g = torch.Generator().manual_seed(11)
    return [(torch.randn(2, 512, 32, generator=g, dtype=torch.float64), torch.randn(2, 5, 4, generator=g, dtype=torch.float64))
            for _ in range(n)]


def _call(model, x, t, ctx):
    with torch.no_grad():
        return model(hidden_states=x, timestep=torch.full((2,), float(t), dtype=torch.float64),
                     encoder_hidden_states=ctx[0], encoder_hidden_states_image=ctx[1]).sample


def _cfg_run(model, x, contexts, steps=(900, 700, 500)):
    """A pipeline-like run: every step calls the model once per context (cond, uncond)."""
    return [_call(model, x, t, ctx) for t in steps for ctx in contexts]


@pytest.mark.parametrize("family", ["wan", "skyreels"])
def test_kv_once_per_distinct_context_per_run_and_outputs_bitwise_equal(family, request, wan_inputs, counted):
    model = request.getfixturevalue(family)
    calls, watch = counted
    use_fused_wan(model)
    watch(model.blocks[0].attn2)
    x, contexts = wan_inputs["hidden_states"], _contexts(2)
    set_caches(model, False)
    off = _cfg_run(model, x, contexts)
    assert calls == {"to_k": 6, "add_k_proj": 6}
    calls.update(to_k=0, add_k_proj=0)
    set_caches(model, True)
    with one_run():  # cond and uncond at one timestep are one run (pinned here; see the README)
        on = _cfg_run(model, x, contexts)
    assert calls == {"to_k": 2, "add_k_proj": 2}
    assert all(torch.equal(a, b) for a, b in zip(on, off))


def test_a_cfg_run_reuses_kv_without_one_run(wan, wan_inputs, counted):
    """diffusers' Wan pipelines call the model once per CFG half at each step: the second
    call at a timestep continues the run (use_fused_wan marks the model), so both halves'
    K/V are projected once per run, and a new run (the timestep rises) computes again."""
    calls, watch = counted
    use_fused_wan(wan)
    watch(wan.blocks[0].attn2)
    x, contexts = wan_inputs["hidden_states"], _contexts(2)
    on = _cfg_run(wan, x, contexts)
    assert calls == {"to_k": 2, "add_k_proj": 2}
    _cfg_run(wan, x, contexts)
    assert calls == {"to_k": 4, "add_k_proj": 4}
    set_caches(wan, False)
    assert all(torch.equal(a, b) for a, b in zip(on, _cfg_run(wan, x, contexts)))


def test_falling_timesteps_without_cfg_reuse_kv_in_the_models_own_run(wan, wan_inputs, counted):
    calls, watch = counted
    use_fused_wan(wan)
    set_caches(wan, True)
    watch(wan.blocks[0].attn2)
    x, (ctx,) = wan_inputs["hidden_states"], _contexts(1)
    _cfg_run(wan, x, [ctx])  # 900, 700, 500: one run
    assert calls == {"to_k": 1, "add_k_proj": 1}
    _cfg_run(wan, x, [ctx])  # the timestep rises again: a new run computes again
    assert calls == {"to_k": 2, "add_k_proj": 2}


def test_a_changed_context_or_weight_misses(wan, wan_inputs, counted):
    calls, watch = counted
    use_fused_wan(wan)
    set_caches(wan, True)
    attn = wan.blocks[0].attn2
    watch(attn)
    x, (ctx, other) = wan_inputs["hidden_states"], _contexts(2)
    with one_run():
        _call(wan, x, 900, ctx)
        same = (ctx[0].clone(), ctx[1].clone())  # new tensors, same bits: a hit
        _call(wan, x, 800, same)
        assert calls == {"to_k": 1, "add_k_proj": 1}
        nudged = (ctx[0].clone(), ctx[1])
        nudged[0][0, 3, 0] += 1e-12  # one text value: text and image K/V both miss (one context)
        _call(wan, x, 700, nudged)
        assert calls == {"to_k": 2, "add_k_proj": 2}
        with torch.no_grad():
            attn.add_k_proj.weight.mul_(1.5)  # an autograd-visible edit: its version moves
        cached = _call(wan, x, 600, ctx)
        assert calls == {"to_k": 2, "add_k_proj": 3}
        _call(wan, x, 500, other)
    set_caches(wan, False)
    assert torch.equal(cached, _call(wan, x, 600, ctx))


def test_clear_caches_empties_wan_layers(wan, wan_inputs, counted):
    calls, watch = counted
    use_fused_wan(wan)
    set_caches(wan, True)
    watch(wan.blocks[0].attn2)
    x, (ctx,) = wan_inputs["hidden_states"], _contexts(1)
    with one_run():
        _call(wan, x, 900, ctx)
        clear_caches(wan)
        _call(wan, x, 800, ctx)
    assert calls == {"to_k": 2, "add_k_proj": 2}


def test_same_bits_is_bitwise():
    a = torch.tensor([0.0, float("nan"), 1.0])
    assert same_bits(a, a.clone()) and not same_bits(a, torch.tensor([-0.0, float("nan"), 1.0]))
    assert not same_bits(a, a.double())


def test_use_fused_wan_turns_caches_on_unless_turned_off(wan):
    from instantstyle.processors.core.model_state import caches_enabled

    assert not caches_enabled(wan)
    use_fused_wan(wan)
    assert caches_enabled(wan)  # on by default, as after the UNet/DiT conversions
    set_caches(wan, False)
    use_fused_wan(wan)
    assert not caches_enabled(wan)  # a user's choice is kept
