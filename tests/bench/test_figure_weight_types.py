"""The README's weight-type figure: one panel per type, each the IP contribution of that type."""
import torch

from instantstyle.bench.figure_weight_types import contributions, save_figure
from instantstyle.processors.targets.weight_types import WEIGHT_TYPES


def test_every_type_has_its_own_contribution_and_the_png_is_written(tmp_path):
    maps = contributions(latent=8)
    assert list(maps) == list(WEIGHT_TYPES)
    assert all(torch.isfinite(m).all() and m.abs().max() > 0 for m in maps.values())
    # types that act on different modules add different things
    assert not torch.allclose(maps["style transfer"], maps["composition"])
    assert not torch.allclose(maps["linear"], maps["ease in"])
    out = tmp_path / "types.png"
    save_figure(maps, str(out))
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
