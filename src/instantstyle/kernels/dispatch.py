"""Backend selection, in the manner of xformers' fmha dispatch.

Each backend lists what it can't take (an empty list when it can); ``"auto"`` walks the
priority list and picks the first that fits, and :func:`explain_dispatch` reports, for
every backend not chosen, EVERY reason (``not_supported_reasons`` style).

``"auto"`` is also shape-aware.  The fused kernel exists for decoupled attention (IP
streams, joint keys) at short key lengths; two classes of call go to the torch backend
(``F.scaled_dot_product_attention``: cuDNN / flash on a GPU) unless a measurement
recorded for the device's arch (``instantstyle tune``, :func:`tiles.measured_ratio`)
says the kernel is faster there:

* **plain attention** (no IP stream, no joint keys): nothing to fuse, and SDPA's kernels
  are the state of the art for one softmax;
* **long keys** (more than :data:`LONG_KEYS` keys in all): the op's arithmetic intensity
  is about (keys) FLOP/byte (Q read + O written per 4*D*keys FLOP), past the ridge of
  every supported GPU (A100 ~150, H100 ~300, RTX 4090 ~160 FLOP/byte in fp16) it is
  compute-bound, where fusing saves little memory traffic and FA/cuDNN's warp-specialised
  pipelines out-run a generic Triton kernel.  512 keeps 77-231 token prompts with
  4/16/257-token IP streams on the kernel and sends 4096-key self-attention to SDPA.
  Wan's cross-attention (512 text + 257/514 image keys, D = 128, tens of thousands of
  queries) is past it: two SDPA calls (text, image) are its plan until a GPU measures
  the kernel faster there.

``backend="triton"`` still forces the kernel wherever it can run at all.

Training takes the same route: inputs that require grad go to whichever backend the
rules above pick, and the op's backward runs on that same backend (the Triton backward
for the kernel; autograd through SDPA, or :mod:`.backward`'s formulas under
``torch.compile``, for torch).
"""
from __future__ import annotations

import contextlib
import functools
import importlib.util
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch

from .inputs import AttentionInputs, normalize_inputs
from .tiles import ARCHS, arch_for_capability, measured_ratio

BACKENDS = ("triton", "torch")  # priority order for "auto"
#: Lowest compute capability the compile report checks (sm_80: A100 and newer).
MIN_CAPABILITY = (8, 0)
#: Above this many keys (Lt + Lj + sum L_i) "auto" prefers SDPA (see the module doc).
LONG_KEYS = 512


@dataclass(frozen=True)
class Target:
    """Where a call would run: the tensors' device, or one named for planning (``info``)."""

    device_type: str
    capability: Optional[tuple] = None  # (major, minor) on CUDA

    @property
    def arch(self) -> Optional[str]:
        return arch_for_capability(*self.capability) if self.capability else None


def capability_of_arch(arch: str) -> tuple:
    """``"sm_89"`` -> ``(8, 9)``; ``"sm_100"`` -> ``(10, 0)``."""
    if arch not in ARCHS:
        raise ValueError(f"arch: expected one of {', '.join(ARCHS)}, got {arch!r}")
    digits = arch[3:]
    return int(digits[:-1]), int(digits[-1])


@functools.lru_cache(maxsize=None)
def _cuda_capability(index: int) -> tuple:
    return torch.cuda.get_device_capability(index)


def target_of(device: torch.device) -> Target:
    if device.type == "cuda":
        return _target("cuda", device.index if device.index is not None else torch.cuda.current_device())
    return _target(device.type, None)


@functools.lru_cache(maxsize=None)
def _target(device_type: str, index: Optional[int]) -> Target:
    # cached: the dispatch runs at every layer call, where microseconds count
    return Target(device_type, _cuda_capability(index) if device_type == "cuda" else None)


@functools.lru_cache(maxsize=1)
def triton_available() -> Optional[str]:
    """None if Triton can be imported, else why not."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (it ships for Linux only)"
    return None


def _needs_grad(inputs: AttentionInputs) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in inputs.tensors)


@functools.lru_cache(maxsize=None)
def _target_reasons(target: Target, dtype: torch.dtype, explicit: bool, interpreting: bool, allow_tf32: bool) -> tuple:
    """The reasons that depend on where the call runs and its dtype only: found once per
    (target, dtype) — the dispatch runs at every layer call, where microseconds count."""
    from .triton_decoupled import SUPPORTED_DTYPES

    missing = triton_available()
    if missing:
        return (missing,)
    reasons = []
    if target.device_type == "cpu":
        if not interpreting:
            reasons.append("CPU tensors: Triton kernels run on CUDA GPUs (or interpreted with TRITON_INTERPRET=1)")
        elif not explicit:
            reasons.append("CPU tensors under TRITON_INTERPRET=1: the interpreter is for tests; ask for backend='triton'")
    elif target.device_type != "cuda":
        reasons.append(f"device {target.device_type!r}: Triton kernels run on CUDA GPUs")
    elif target.capability < MIN_CAPABILITY:
        cap = target.capability
        reasons.append(f"compute capability {cap[0]}.{cap[1]}: the kernel is built and checked for sm_80 and newer")
    if dtype not in SUPPORTED_DTYPES:
        reasons.append(f"dtype {dtype}: the kernel supports float16, bfloat16 and float32")
    elif dtype == torch.float32 and target.device_type == "cuda" and not explicit and not allow_tf32:
        reasons.append("float32 would run with tf32 dots, and torch.backends.cuda.matmul.allow_tf32 is False")
    return tuple(reasons)


def triton_reasons(inputs: AttentionInputs, explicit: bool = False, target: Optional[Target] = None,
                   first_only: bool = False) -> List[str]:
    """Every reason the fused Triton kernel can't run these inputs (empty: it can).

    ``explicit`` is True when the caller asked for ``backend="triton"``: then CPU
    tensors run in the interpreter (for tests) and fp32 runs with tf32 dots.
    ``first_only`` stops at the first reason (the per-call hot path needs no more).
    """
    from .triton_decoupled import MAX_HEAD_DIM, MIN_HEAD_DIM, interpreting

    q = inputs.q
    target = target or target_of(q.device)
    reasons = list(_target_reasons(target, q.dtype, explicit, interpreting(), torch.backends.cuda.matmul.allow_tf32))
    if reasons and first_only:
        return reasons[:1]
    head_dim = q.shape[-1]
    if not MIN_HEAD_DIM <= head_dim <= MAX_HEAD_DIM:
        reasons.append(f"head dim {head_dim}: the kernel supports {MIN_HEAD_DIM} to {MAX_HEAD_DIM}")
    if reasons and first_only:
        return reasons
    named = {"q": q, "k": inputs.k, "v": inputs.v}
    named.update({f"ip_k[{i}]": t for i, t in enumerate(inputs.ip_k)})
    named.update({f"ip_v[{i}]": t for i, t in enumerate(inputs.ip_v)})
    if inputs.joint_k is not None:
        named.update(joint_k=inputs.joint_k, joint_v=inputs.joint_v)
    for name, t in named.items():
        if t.stride(-1) != 1:
            reasons.append(f"{name}: the last dim must be contiguous (stride 1), got strides {tuple(t.stride())}")
    # Inputs that require grad need no reason: the op's autograd formula runs the Triton
    # backward (kernels/triton_decoupled_bwd.py) for every call the forward takes.
    return reasons[:1] if first_only else reasons


def total_keys(inputs: AttentionInputs) -> int:
    lj = inputs.joint_k.shape[1] if inputs.joint_k is not None else 0
    return inputs.k.shape[1] + lj + sum(t.shape[1] for t in inputs.ip_k)


def shape_reasons(inputs: AttentionInputs, target: Optional[Target] = None) -> List[str]:
    """Why ``auto`` prefers SDPA for this call's shape (empty: the kernel is worth it)."""
    reasons = []
    plain = not inputs.ip_k and inputs.joint_k is None
    keys = total_keys(inputs)
    if not plain and keys <= LONG_KEYS:
        return reasons
    target = target or target_of(inputs.q.device)
    dtype_name = str(inputs.q.dtype).replace("torch.", "")
    for case, applies, what in (
        ("plain", plain, "plain attention (no IP stream, no joint keys): one softmax, nothing to fuse"),
        ("long", keys > LONG_KEYS, f"{keys} keys > {LONG_KEYS}: compute-bound, where SDPA's flash/cuDNN kernels are faster "
         "(the torch backend makes one SDPA call per softmax: text keys, then each IP / image stream; two calls "
         "for a Wan cross-attention layer, a valid plan for these key lengths until a GPU measures otherwise)"),
    ):
        if not applies:
            continue
        ratio = measured_ratio(target.arch, dtype_name, case, inputs.q.shape[-1], keys)
        if ratio is None:
            reasons.append(f"{what}; no measurement on {target.arch or target.device_type} says the kernel wins")
        elif ratio >= 1.0:
            reasons.append(f"{what}; measured on {target.arch}: the kernel takes {ratio:.2f}x SDPA's time")
    return reasons


def torch_reasons(inputs: AttentionInputs, explicit: bool = False, target: Optional[Target] = None,
                  first_only: bool = False) -> List[str]:
    return []  # SDPA runs on every device and dtype and supports autograd


REASONS = {"triton": triton_reasons, "torch": torch_reasons}


def triton_unsupported(inputs: AttentionInputs, explicit: bool = False) -> Optional[str]:
    """The first reason the kernel can't run these inputs, or None (shape policy not included)."""
    reasons = triton_reasons(inputs, explicit, first_only=True)
    return reasons[0] if reasons else None


@dataclass
class Dispatch:
    """Which backend runs, and every reason each other backend does not."""

    backend: str
    reasons: Dict[str, List[str]] = field(default_factory=dict)

    def __str__(self) -> str:
        lines = [f"backend: {self.backend}"]
        lines += [f"  {name} not used: {why}" for name, whys in self.reasons.items() for why in whys]
        return "\n".join(lines)

    def as_dict(self) -> dict:
        return {"backend": self.backend, "not_chosen": {name: list(whys) for name, whys in self.reasons.items()}}


_default_backend = "auto"


@contextlib.contextmanager
def use_backend(backend: str):
    """Make ``backend`` the default of every op call inside the block (processors included).

        with use_backend("torch"):      # e.g. rule the fused kernel out while debugging
            image = pipe(prompt).images[0]

    A ``backend=`` passed to the op itself still wins.
    """
    global _default_backend
    _check_backend_name(backend)
    previous, _default_backend = _default_backend, backend
    try:
        yield
    finally:
        _default_backend = previous


def default_backend() -> str:
    return _default_backend


def _check_backend_name(backend) -> None:
    if backend not in ("auto", *BACKENDS):
        raise ValueError(f"backend: expected one of 'auto', {', '.join(map(repr, BACKENDS))}, got {backend!r}")


def choose_backend(inputs: AttentionInputs, backend: str = "auto", target: Optional[Target] = None,
                   explain: bool = False) -> Dispatch:
    """Pick the backend.  ``explain`` collects every reason (else the first one per backend)."""
    _check_backend_name(backend)
    first_only = not explain
    if backend != "auto":
        why = REASONS[backend](inputs, explicit=True, target=target, first_only=first_only)
        if why:
            raise ValueError(f"backend={backend!r} can't run these inputs: {'; '.join(why)}")
        return Dispatch(backend, {b: ["not requested"] for b in BACKENDS if b != backend})
    reasons = {}
    for name in BACKENDS:
        why = REASONS[name](inputs, target=target, first_only=first_only)
        if name == "triton" and (explain or not why):
            why = why + shape_reasons(inputs, target)
        if not why:
            return Dispatch(name, reasons)
        reasons[name] = why
    raise AssertionError("the torch backend supports every input")  # pragma: no cover


def explain_dispatch(q, k, v, ip_k=(), ip_v=(), ip_scale=1.0, ip_mask=None, text_bias=None, sm_scale=None, backend=None,
                     *, joint_k=None, joint_v=None, joint_bias=None, device: Optional[str] = None,
                     arch: Optional[str] = None) -> Dispatch:
    """Say which backend :func:`decoupled_attention` would run for these arguments, and every reason not the others.

    ``device``/``arch`` plan for a device that is not present (e.g. ``device="cuda",
    arch="sm_90"`` with meta tensors): the decision is made as if the tensors lived there.
    """
    inputs = normalize_inputs(q, k, v, ip_k, ip_v, ip_scale, ip_mask, text_bias, sm_scale, joint_k, joint_v, joint_bias)
    target = None
    if device is not None or arch is not None:
        device_type = device or "cuda"
        if arch is not None and device_type != "cuda":
            raise ValueError(f"arch: only meaningful with device='cuda', got device={device_type!r}")
        target = Target(device_type, capability_of_arch(arch or "sm_90") if device_type == "cuda" else None)
    return choose_backend(inputs, default_backend() if backend is None else backend, target, explain=True)
