"""The video helpers of the editing methods, without a model: per-frame reshaping of
attention probabilities and per-frame AdaIN toward the first frame, against loops
written from the definitions in float64."""
import pytest
import torch

from instantstyle.processors.methods.video_maps import frame_maps
from instantstyle.processors.methods.video_style_aligned import frame_adain


@pytest.mark.parametrize("grid", [(1, 1, 1), (3, 2, 5), (2, 7, 1)])
def test_frame_maps_put_each_query_at_its_frame_row_column(grid):
    f, h, w = grid
    probs = torch.rand(2, 3, f * h * w, 4, dtype=torch.float64)
    got = frame_maps(probs, grid)
    assert got.shape == (2, 3, 4, f, h, w)
    for n in range(f * h * w):
        assert torch.equal(got[..., n // (h * w), (n // w) % h, n % w], probs[:, :, n, :])


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_frame_adain_moves_every_frame_to_frame_zero_statistics(dtype, tol):
    frames, hw = 3, 5
    x = torch.randn(2, frames * hw, 2, 6, dtype=torch.float64) * 3 + 1
    got = frame_adain(x.to(dtype), frames).double()
    expected = torch.empty_like(x)
    for b in range(2):
        ref = x[b, :hw]
        ref_mean, ref_std = ref.mean(0), (ref.var(0) + 1e-5).sqrt()
        for f in range(frames):
            part = x[b, f * hw:(f + 1) * hw]
            expected[b, f * hw:(f + 1) * hw] = (part - part.mean(0)) / (part.var(0) + 1e-5).sqrt() * ref_std + ref_mean
    torch.testing.assert_close(got, expected, atol=tol, rtol=tol)
    torch.testing.assert_close(got[:, :hw], x[:, :hw], atol=10 * tol, rtol=10 * tol)  # frame 0 maps to itself (up to eps)
