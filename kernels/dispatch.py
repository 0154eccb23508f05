"""Backend selection, in the manner of xformers' fmha dispatch.

Each backend says what it can't take (``None`` when it can); ``"auto"`` walks the
priority list and picks the first that fits, and :func:`explain_dispatch` reports,
for every backend not chosen, *why not*.
"""
from __future__ import annotations

import contextlib
import importlib.util
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional

import torch

from .inputs import AttentionInputs, normalize_inputs

BACKENDS = ("triton", "torch")  # priority order for "auto"
#: Lowest compute capability the compile report checks (sm_80: A100 and newer).
MIN_CAPABILITY = (8, 0)


def triton_available() -> Optional[str]:
    """None if Triton can be imported, else why not."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (it ships for Linux only)"
    return None


def _needs_grad(inputs: AttentionInputs) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in inputs.tensors)


def triton_unsupported(inputs: AttentionInputs, explicit: bool = False) -> Optional[str]:
    """Why the fused Triton kernel can't run these inputs, or None if it can.

    ``explicit`` is True when the caller asked for ``backend="triton"``: then CPU
    tensors run in the interpreter (for tests) and fp32 runs with tf32 dots.
    """
    from .triton_decoupled import MAX_HEAD_DIM, MIN_HEAD_DIM, SUPPORTED_DTYPES, interpreting

    missing = triton_available()
    if missing:
        return missing
    q = inputs.q
    if q.device.type == "cpu":
        if not interpreting():
            return "CPU tensors: Triton kernels run on CUDA GPUs (or interpreted with TRITON_INTERPRET=1)"
        if not explicit:
            return "CPU tensors under TRITON_INTERPRET=1: the interpreter is for tests; ask for backend='triton'"
    elif q.device.type != "cuda":
        return f"device {q.device.type!r}: Triton kernels run on CUDA GPUs"
    elif torch.cuda.get_device_capability(q.device) < MIN_CAPABILITY:
        cap = torch.cuda.get_device_capability(q.device)
        return f"compute capability {cap[0]}.{cap[1]}: the kernel is built and checked for sm_80 and newer"
    if q.dtype not in SUPPORTED_DTYPES:
        return f"dtype {q.dtype}: the kernel supports float16, bfloat16 and float32"
    if q.dtype == torch.float32 and q.is_cuda and not explicit and not torch.backends.cuda.matmul.allow_tf32:
        return "float32 would run with tf32 dots, and torch.backends.cuda.matmul.allow_tf32 is False"
    head_dim = q.shape[-1]
    if not MIN_HEAD_DIM <= head_dim <= MAX_HEAD_DIM:
        return f"head dim {head_dim}: the kernel supports {MIN_HEAD_DIM} to {MAX_HEAD_DIM}"
    named = {"q": q, "k": inputs.k, "v": inputs.v}
    named.update({f"ip_k[{i}]": t for i, t in enumerate(inputs.ip_k)})
    named.update({f"ip_v[{i}]": t for i, t in enumerate(inputs.ip_v)})
    if inputs.joint_k is not None:
        named.update(joint_k=inputs.joint_k, joint_v=inputs.joint_v)
    for name, t in named.items():
        if t.stride(-1) != 1:
            return f"{name}: the last dim must be contiguous (stride 1), got strides {tuple(t.stride())}"
    if _needs_grad(inputs):
        return "inputs require grad: the Triton kernel is forward-only (training kernels are future work)"
    return None


def torch_unsupported(inputs: AttentionInputs, explicit: bool = False) -> Optional[str]:
    return None  # SDPA runs on every device and dtype and supports autograd


UNSUPPORTED: Dict[str, Callable[..., Optional[str]]] = {"triton": triton_unsupported, "torch": torch_unsupported}


@dataclass
class Dispatch:
    """Which backend runs, and why each other backend does not."""

    backend: str
    reasons: Dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        lines = [f"backend: {self.backend}"]
        lines += [f"  {name} not used: {why}" for name, why in self.reasons.items()]
        return "\n".join(lines)

    def as_dict(self) -> dict:
        return {"backend": self.backend, "not_chosen": dict(self.reasons)}


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


def choose_backend(inputs: AttentionInputs, backend: str = "auto") -> Dispatch:
    _check_backend_name(backend)
    if backend != "auto":
        why = UNSUPPORTED[backend](inputs, explicit=True)
        if why:
            raise ValueError(f"backend={backend!r} can't run these inputs: {why}")
        return Dispatch(backend, {b: "not requested" for b in BACKENDS if b != backend})
    reasons = {}
    for name in BACKENDS:
        why = UNSUPPORTED[name](inputs)
        if why is None:
            return Dispatch(name, reasons)
        reasons[name] = why
    raise AssertionError("the torch backend supports every input")  # pragma: no cover


def explain_dispatch(q, k, v, ip_k=(), ip_v=(), ip_scale=1.0, ip_mask=None, text_bias=None, sm_scale=None, backend=None,
                     *, joint_k=None, joint_v=None, joint_bias=None) -> Dispatch:
    """Say which backend :func:`decoupled_attention` would run for these arguments, and why not the others."""
    inputs = normalize_inputs(q, k, v, ip_k, ip_v, ip_scale, ip_mask, text_bias, sm_scale, joint_k, joint_v, joint_bias)
    return choose_backend(inputs, default_backend() if backend is None else backend)
