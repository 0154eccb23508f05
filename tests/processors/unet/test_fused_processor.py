"""FusedIPAdapterAttnProcessor against diffusers' IPAdapterAttnProcessor2_0, one Attention
layer at a time: every input form diffusers accepts, in float32 and float64."""
from __future__ import annotations

import copy

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor2_0

from instantstyle.kernels import check_close
from instantstyle.processors import FusedAttnProcessor, FusedIPAdapterAttnProcessor
from instantstyle.processors.unet.conversion import fuse_ip_processor

from helpers.ip_attention import CROSS, DIM, inputs, make_attn, make_pair, run_both


@pytest.mark.parametrize(
    "adapters, scale",
    [
        (((1, 4),), 1.0),  # base adapter
        (((1, 16),), 0.625),  # Plus tokens
        (((3, 4),), 0.875),  # several images of one adapter: ONE joint softmax
        (((1, 4), (2, 16)), [0.5, 1.25]),  # several adapters, own scales
        (((1, 4), (1, 4)), [0.0, 0.75]),  # scale 0 skips an adapter
    ],
)
def test_matches_diffusers_float64(adapters, scale):
    attn = make_attn()
    ref, ours = make_pair(tuple(t for _, t in adapters), scale)
    hidden, enc = inputs(adapters=adapters)
    got, expected = run_both(attn, ref, ours, hidden, enc)
    check_close(got, expected, "fp64")
    assert ours.fallback_reason is None


def test_float32_and_cfg_batch():
    """CFG: the unconditional half has zero image embeds, the conditional half random ones."""
    attn = make_attn(torch.float32)
    ref, ours = make_pair((4,), 0.9, torch.float32)
    hidden, (text, ips) = inputs(batch=4, dtype=torch.float32)
    ips[0][:2] = 0
    got, expected = run_both(attn, ref, ours, hidden, (text, ips))
    check_close(got, expected, "fp32")


def test_ip_branch_matters():
    """The comparison is not vacuous: dropping the image branch changes the output."""
    attn = make_attn()
    ref, ours = make_pair((4,), 1.0)
    hidden, enc = inputs()
    got, _ = run_both(attn, ref, ours, hidden, enc)
    ours.scale = [0.0]
    off, _ = run_both(attn, ref, ours, hidden, enc)
    assert (got - off).abs().max() > 1e-2


@pytest.mark.parametrize("n_images, per_image_scale", [(1, False), (2, False), (2, True), (3, True)])
def test_masks_one_softmax_per_image(n_images, per_image_scale):
    attn = make_attn()
    scale = [[0.375, 1.125, 0.75][:n_images]] if per_image_scale else 0.875
    ref, ours = make_pair((4,), scale)
    hidden, enc = inputs(n=24, adapters=((n_images, 4),))  # 24 queries = a 4 x 6 latent
    g = torch.Generator().manual_seed(5)
    masks = [(torch.rand(1, n_images, 8, 12, generator=g) > 0.5).to(torch.float64)]
    got, expected = run_both(attn, ref, ours, hidden, enc, ip_adapter_masks=masks)
    check_close(got, expected, "fp64")


def test_masks_for_one_of_two_adapters():
    attn = make_attn()
    ref, ours = make_pair((4, 16), [0.75, 1.25])
    hidden, enc = inputs(n=16, adapters=((2, 4), (1, 16)))
    masks = [torch.tensor([[[[1.0, 0.0], [1.0, 1.0]], [[0.0, 1.0], [0.0, 0.0]]]], dtype=torch.float64), None]
    got, expected = run_both(attn, ref, ours, hidden, enc, ip_adapter_masks=masks)
    check_close(got, expected, "fp64")


@pytest.mark.parametrize("kind", ["bool", "additive_3d", "additive_2d"])
def test_key_padding_mask_is_fused(kind):
    attn = make_attn()
    ref, ours = make_pair((4,), 0.875)
    hidden, enc = inputs(lt=9)
    keep = torch.ones(2, 9, dtype=torch.bool)
    keep[0, 5:] = False
    keep[1, 2:4] = False
    if kind == "bool":
        mask = keep[:, None, :]
    else:
        mask = (1 - keep.to(torch.float64)) * -10000.0  # what the UNet makes of encoder_attention_mask
        mask = mask[:, None, :] if kind == "additive_3d" else mask
    got, expected = run_both(attn, ref, ours, hidden, enc, attention_mask=mask)
    check_close(got, expected, "fp64")
    assert ours.fallback_reason is None


def test_per_query_mask_takes_unfused_path_and_says_why():
    attn = make_attn()
    ref, ours = make_pair((4,), 0.875)
    hidden, enc = inputs(n=12, lt=7)
    g = torch.Generator().manual_seed(3)
    mask = torch.randn(2, 12, 7, generator=g).to(torch.float64)  # varies per query
    got, expected = run_both(attn, ref, ours, hidden, enc, attention_mask=mask)
    check_close(got, expected, "fp64")
    assert "varies per head or query" in ours.fallback_reason
    # the next ordinary call is fused again
    run_both(attn, ref, ours, hidden, enc)
    assert ours.fallback_reason is None


def test_4d_hidden_states_group_norm_residual_rescale():
    attn = make_attn(norm_num_groups=8, residual_connection=True, rescale_output_factor=2.5)
    ref, ours = make_pair((4,), 0.875)
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, DIM, 3, 5, generator=g).to(torch.float64)
    _, enc = inputs()
    got, expected = run_both(attn, ref, ours, hidden, enc)
    assert got.shape == (2, DIM, 3, 5)
    check_close(got, expected, "fp64")


@pytest.mark.parametrize("norm", ["layer_norm", "group_norm"])
def test_norm_cross(norm):
    attn = make_attn(cross_attention_norm=norm, cross_attention_norm_num_groups=8)
    ref, ours = make_pair((4,), 1.125)
    hidden, enc = inputs()
    got, expected = run_both(attn, ref, ours, hidden, enc)
    check_close(got, expected, "fp64")


def test_spatial_norm():
    attn = make_attn(spatial_norm_dim=6)
    ref, ours = make_pair((4,), 0.625)
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, DIM, 4, 4, generator=g).to(torch.float64)
    temb = torch.randn(2, 6, 2, 2, generator=g).to(torch.float64)
    _, enc = inputs()
    got, expected = run_both(attn, ref, ours, hidden, enc, temb=temb)
    check_close(got, expected, "fp64")


def test_bfloat16_within_dtype_tolerance():
    attn64 = make_attn()
    ref, _ = make_pair((4,), 0.875)
    hidden, (text, ips) = inputs()
    with torch.no_grad():
        attn64.set_processor(ref)
        truth = attn64(hidden, encoder_hidden_states=(text, ips))
    attn = copy.deepcopy(attn64).to(torch.bfloat16)
    ours = fuse_ip_processor(copy.deepcopy(ref).to(torch.bfloat16))
    with torch.no_grad():
        attn.set_processor(ours)
        got = attn(hidden.bfloat16(), encoder_hidden_states=(text.bfloat16(), [ips[0].bfloat16()]))
    check_close(got, truth, "bf16")


def test_scale_list_is_live():
    """diffusers' set_ip_adapter_scale writes ``processor.scale[i] = s`` in place."""
    ref, ours = make_pair((4, 4), [1.0, 1.0])
    ours.scale[1] = 0.25
    assert ours.scale_values[:, 0].tolist() == [1.0, 0.25]
    ours.scale = [[0.5, 0.75], 2.0]
    assert ours.scale_values.tolist() == [[0.5, 0.75], [2.0, 2.0]]
    assert copy.deepcopy(ours).scale == [[0.5, 0.75], 2.0]
    with pytest.raises(TypeError, match="scale"):
        ours.scale = 0.5  # diffusers always assigns a list


def test_unheld_adapter_is_ignored():
    """A layer holding only adapter 1 ignores adapter 0's tokens, even poisoned ones."""
    attn = make_attn()
    ref, full = make_pair((4, 4), [0.0, 0.875])
    ours = FusedIPAdapterAttnProcessor(DIM, CROSS, num_tokens=[4, 4], scale=[0.0, 0.875], adapter_ids=[1]).double()
    ours.load_state_dict({"to_k_ip.0.weight": ref.to_k_ip[1].weight, "to_v_ip.0.weight": ref.to_v_ip[1].weight})
    assert len(ours.to_k_ip) == 1
    hidden, (text, ips) = inputs(adapters=((1, 4), (1, 4)))
    expected, _ = run_both(attn, ref, full, hidden, (text, ips))
    ips[0] = torch.full_like(ips[0], float("nan"))
    got, _ = run_both(attn, ref, ours, hidden, (text, ips))
    check_close(got, expected, "fp64")


def test_scale_zero_skips_poisoned_adapter_like_diffusers():
    attn = make_attn()
    ref, ours = make_pair((4, 4), [0.0, 0.5])
    hidden, (text, ips) = inputs(adapters=((1, 4), (1, 4)))
    ips[0] = torch.full_like(ips[0], float("nan"))
    got, expected = run_both(attn, ref, ours, hidden, (text, ips))
    check_close(got, expected, "fp64")


def test_plain_cross_attention_drops_ip_tokens():
    attn = make_attn()
    hidden, (text, ips) = inputs()
    with torch.no_grad():
        attn.set_processor(AttnProcessor2_0())
        expected = attn(hidden, encoder_hidden_states=text)
        attn.set_processor(FusedAttnProcessor())
        got_tuple = attn(hidden, encoder_hidden_states=(text, ips))
        got_plain = attn(hidden, encoder_hidden_states=text)
    check_close(got_tuple, expected, "fp64")
    check_close(got_plain, expected, "fp64")


def test_bad_inputs_name_the_argument():
    attn = make_attn()
    _, ours = make_pair((4,), 1.0)
    attn.set_processor(ours)
    hidden, enc = inputs(adapters=((2, 4),))
    with pytest.raises(ValueError, match=r"ip_adapter_masks\[0\].*2 masks"), torch.no_grad():
        attn(hidden, encoder_hidden_states=enc, ip_adapter_masks=[torch.ones(1, 3, 4, 4, dtype=torch.float64)])
    with pytest.raises(ValueError, match=r"ip_adapter_masks\[0\].*\[1, num_images, height, width\]"), torch.no_grad():
        attn(hidden, encoder_hidden_states=enc, ip_adapter_masks=[torch.ones(2, 4, 4, dtype=torch.float64)])
    ours.scale = [[0.5, 1.0]]
    with pytest.raises(ValueError, match=r"scale\[0\].*need ip_adapter_masks"), torch.no_grad():
        attn(hidden, encoder_hidden_states=enc)
    with pytest.raises(ValueError, match="adapter_ids"):
        FusedIPAdapterAttnProcessor(DIM, CROSS, num_tokens=[4], adapter_ids=[1])
    with pytest.raises(TypeError, match=r"scale\[0\]"):
        ours.scale = ["big"]


def test_scales_stay_exact_float32_when_the_model_is_cast():
    _, ours = make_pair((4,), 0.6)
    ours.to(torch.float16)
    assert ours.to_k_ip[0].weight.dtype == torch.float16
    assert ours.scale_values.dtype == torch.float32 and ours.scale_values.item() == torch.tensor(0.6).item()
    ours.scale[0] = 0.3
    assert ours.scale_values.item() == torch.tensor(0.3).item()


@pytest.mark.filterwarnings("ignore:You have passed a tensor as `encoder_hidden_states`:FutureWarning")
def test_deprecated_ip_tokens_appended_to_text():
    """diffusers still accepts one tensor with the IP tokens after the text tokens."""
    attn = make_attn()
    ref, ours = make_pair((4,), 0.875)
    hidden, (text, ips) = inputs()
    joined = torch.cat([text, ips[0][:, 0]], dim=1)
    got, expected = run_both(attn, ref, ours, hidden, joined)
    check_close(got, expected, "fp64")
