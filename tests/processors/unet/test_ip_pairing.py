"""Per-sample image states stay per-sample (diffusers issue 9813): sample i attends to image row
i only; one row is shared by all samples; any other count is refused in one line."""
import pytest
import torch
from helpers.ip_attention import CROSS, HEADS, inputs, ip_states, make_attn, make_pair

from instantstyle.processors.core.ip_pairing import paired_ip_states


def _reference(attn, ref, hidden, text, states, scale):
    """float64 by hand: softmax(QK_text) V_text + scale * softmax(QK_ip) V_ip, per sample, per head."""
    b, n, _ = hidden.shape
    d = attn.to_q.out_features // HEADS

    def heads(x):
        return x.view(x.shape[0], -1, HEADS, d).transpose(1, 2)

    def attend(q, k, v):
        w = torch.softmax(q @ k.transpose(-1, -2) / d ** 0.5, dim=-1)
        return w @ v

    q = heads(attn.to_q(hidden))
    out = attend(q, heads(attn.to_k(text)), heads(attn.to_v(text)))
    ip = states.reshape(states.shape[0], -1, CROSS)  # a row's images share one softmax
    out = out + scale * attend(q, heads(ref.to_k_ip[0](ip)), heads(ref.to_v_ip[0](ip)))
    out = out.transpose(1, 2).reshape(b, n, -1)
    return attn.to_out[0](out)


# float64 inputs; the fused path sums in another order than this reference (about 1e-7 apart)
@pytest.mark.parametrize("batch,n_images", [(3, 1), (4, 2), (2, 3)])
def test_each_sample_attends_to_its_own_row(batch, n_images):
    attn = make_attn()
    ref, ours = make_pair(scale=0.7)
    hidden, (text, _) = inputs(batch=batch, n=9, lt=5, seed=batch)
    states = ip_states(batch, n_images, 4, seed=10 + batch)
    attn.set_processor(ours)
    with torch.no_grad():
        got = attn(hidden, encoder_hidden_states=(text, [states]))
        expected = _reference(attn, ref, hidden, text, states, 0.7)
        alone = [attn(hidden[i:i + 1], encoder_hidden_states=(text[i:i + 1], [states[i:i + 1]])) for i in range(batch)]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got, torch.cat(alone), rtol=1e-5, atol=1e-6)


def test_one_row_is_shared_by_every_sample():
    attn = make_attn()
    ref, ours = make_pair(scale=1.3)
    hidden, (text, _) = inputs(batch=3, n=6, lt=5, seed=4)
    states = ip_states(1, 2, 4, seed=5)
    attn.set_processor(ours)
    with torch.no_grad():
        got = attn(hidden, encoder_hidden_states=(text, [states]))
        expected = _reference(attn, ref, hidden, text, states.expand(3, -1, -1, -1), 1.3)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("rows", [2, 9])  # e.g. what diffusers makes of 3 per-prompt rows: 3 x 3
def test_rows_that_cant_be_paired_are_refused_in_one_line(rows):
    attn = make_attn()
    _, ours = make_pair()
    hidden, (text, _) = inputs(batch=3, n=6, lt=5, seed=1)
    attn.set_processor(ours)
    with pytest.raises(ValueError) as info:
        attn(hidden, encoder_hidden_states=(text, [ip_states(rows, 1, 4, seed=2)]))
    message = str(info.value)
    assert "\n" not in message and "1 or 3 samples" in message and f"got {rows}" in message


def test_pairing_keeps_matching_tensors_untouched():
    states = torch.randn(4, 1, 4, CROSS)
    assert paired_ip_states([states], 4)[0] is states  # no copy: the step cache keys on identity
    shared = paired_ip_states([states[:1]], 4)[0]
    assert shared.shape == (4, 1, 4, CROSS) and shared.data_ptr() == states.data_ptr()
