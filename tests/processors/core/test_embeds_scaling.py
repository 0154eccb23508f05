"""Each embeds-scaling mode of one IP layer vs a float64 computation by hand."""
import pytest
import torch

from instantstyle.processors.core.embeds_scaling import scale_embeds
from instantstyle.processors.core.ip_adapter import swap_halves
from instantstyle.processors.targets.weight_types import EMBEDS_SCALING
from instantstyle.processors.unet.fused_processor import FusedIPAdapterAttnProcessor


class Attn(torch.nn.Module):
    """The parts of a diffusers Attention the processor reads, via the real class."""


def reference(x, text, ip, wq, wk, wv, wo, wk_ip, wv_ip, heads, w, mode):
    """float64: text softmax + the IP stream with ``mode``'s scaling, then to_out."""
    def split(t):
        return t.view(t.shape[0], t.shape[1], heads, -1).transpose(1, 2)

    def sdpa(q, k, v):
        a = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
        return a @ v

    q, k, v = x @ wq.T, text @ wk.T, text @ wv.T
    ik, iv = ip @ wk_ip.T, ip @ wv_ip.T
    C = ik.shape[-1]
    factor = w
    if mode != "V only":
        ww = w * (C / 1280 if "penalty" in mode else 1.0)
        ik = ik * ww
        if mode == "K+mean(V) w/ C penalty":
            m = iv.mean(dim=1, keepdim=True)
            iv = iv - m + ww * m
        else:
            iv = iv * ww
        factor = 1.0
    out = sdpa(split(q), split(k), split(v)) + factor * sdpa(split(q), split(ik), split(iv))
    return out.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1) @ wo.T


@pytest.mark.parametrize("mode", EMBEDS_SCALING)
@pytest.mark.parametrize("w", [0.37, 2.5])
def test_mode_matches_by_hand(mode, w):
    from diffusers.models.attention_processor import Attention

    torch.manual_seed(hash((mode, w)) % 1000)
    dim, cross, heads, tokens = 24, 16, 3, 5
    attn = Attention(dim, cross_attention_dim=cross, heads=heads, dim_head=dim // heads, out_bias=False).eval()
    proc = FusedIPAdapterAttnProcessor(dim, cross, num_tokens=(tokens,), scale=w)
    with torch.no_grad():
        for p in proc.parameters():
            p.normal_(0, 0.4)
    proc.embeds_scaling[0] = mode
    x, text, ip = torch.randn(2, 7, dim), torch.randn(2, 3, cross), torch.randn(2, tokens, cross)
    with torch.no_grad():
        got = proc(attn, x, (text, [ip.unsqueeze(1)]))
    d = lambda t: t.detach().double()  # noqa: E731
    want = reference(d(x), d(text), d(ip), d(attn.to_q.weight), d(attn.to_k.weight), d(attn.to_v.weight), d(attn.to_out[0].weight),
                     d(proc.to_k_ip[0].weight), d(proc.to_v_ip[0].weight), heads, w, mode)
    torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("mode", EMBEDS_SCALING[1:])
def test_factor_is_a_tensor_and_scaling_reads_no_host_value(mode):
    k, v = torch.randn(2, 4, 40, device="meta"), torch.randn(2, 4, 40, device="meta")
    k2, v2, factor = scale_embeds(k, v, torch.tensor(0.5, device="meta"), mode)  # meta: any .item() would raise
    assert k2.shape == k.shape and v2.shape == v.shape and factor.shape == ()


def test_swap_halves_gives_uncond_the_image_and_cond_zeros():
    s = torch.randn(4, 3, 8)
    out = swap_halves(s)
    torch.testing.assert_close(out[:2], s[2:])
    assert torch.count_nonzero(out[2:]) == 0
    odd = torch.randn(3, 2, 8)
    assert swap_halves(odd) is odd
