"""Step ramps vs the formula by hand; computed on the device without host reads."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from instantstyle.processors.core.gating import StepGate, ramp_arguments


def by_hand(t, start, end, kind, a, b, T=1000):
    p = 1 - t / (T - 1)
    lo, hi = (1 - end) * (T - 1), (1 - start) * (T - 1)
    if not lo <= t <= hi:
        return 0.0
    r = min(max((p - start) / (end - start), 0.0), 1.0)
    if kind == "ease":
        r = 3 * r * r - 2 * r ** 3
    return a + (b - a) * r


@pytest.mark.parametrize("kind", ["linear", "ease"])
@pytest.mark.parametrize("start,end,a,b", [(0.0, 1.0, 1.0, 0.0), (0.2, 0.7, 0.3, 1.5)])
def test_ramp_matches_by_hand(kind, start, end, a, b):
    gate = StepGate(start, end, ramp=kind, ramp_from=a, ramp_to=b)
    assert not gate.always_open
    for t in torch.linspace(999, 0, 23).round().tolist() + [(1 - start) * 999, (1 - end) * 999]:
        gate.update(torch.tensor([t, t]))
        assert gate.value.item() == pytest.approx(by_hand(t, start, end, kind, a, b), abs=1e-5), t


class NoHostReads(TorchDispatchMode):
    """Fails on any op that copies a value to the host (``.item()``, ``.cpu()``, ``.tolist()``)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if "_local_scalar_dense" in name or "_to_copy" in name and (kwargs or {}).get("device") == torch.device("cpu"):
            raise AssertionError(f"host read: {name}")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("kind", ["linear", "ease"])
def test_ramp_reads_nothing_on_the_host(kind):
    gate = StepGate(0.1, 0.9, ramp=kind)
    t = torch.tensor([400.0])
    with NoHostReads():
        gate.update(t)
    assert gate.value.item() == pytest.approx(by_hand(400.0, 0.1, 0.9, kind, 1.0, 0.0), abs=1e-5)


def test_ramp_on_meta_device():
    gate = StepGate(0.0, 1.0, ramp="ease")
    gate.update(torch.tensor([10.0], device="meta"))  # any host read would raise on meta
    assert gate.value.device.type == "meta"


def test_bad_ramps_are_refused():
    with pytest.raises(ValueError, match="ramp: expected one of None, 'linear', 'ease', got 'cubic'"):
        StepGate(ramp="cubic")
    with pytest.raises(ValueError, match="ramp: expected None"):
        ramp_arguments(("linear", 1.0))
    assert ramp_arguments(("ease", 0.5, 2)) == {"ramp": "ease", "ramp_from": 0.5, "ramp_to": 2.0}
