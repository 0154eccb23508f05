"""Argument checking and normalisation for the decoupled-attention op.

Every backend receives the same :class:`AttentionInputs`, so shape rules live in one
place and a bad call fails here, with a message that names the argument, what was
expected and what was received, instead of deep inside a kernel.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

Scale = Union[float, torch.Tensor]


@dataclass  # not frozen: a frozen dataclass' __init__ costs ~5 us a call, on every layer
class AttentionInputs:
    """Checked inputs in the op's canonical form.

    ``ip_scale`` is ``(S, B)`` and ``ip_mask`` ``(S, B, N)`` (or None when no stream
    has a mask) so a kernel sees one tensor per concept, whatever the caller passed.
    ``text_bias`` is additive ``(B, Lt)`` (bool masks become 0/-inf), as is ``joint_bias``
    over the optional joint keys ``joint_k``/``joint_v``, which share the text softmax.  All are
    float32, or float64 for float64 queries (so a scale like 0.6 stays exact there).
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    ip_k: tuple
    ip_v: tuple
    ip_scale: torch.Tensor
    ip_mask: Optional[torch.Tensor]
    text_bias: Optional[torch.Tensor]
    sm_scale: float
    joint_k: Optional[torch.Tensor] = None
    joint_v: Optional[torch.Tensor] = None
    joint_bias: Optional[torch.Tensor] = None

    @property
    def shape(self):
        """``(B, N, H, D)`` of the queries (and of the output)."""
        return tuple(self.q.shape)

    @property
    def num_streams(self) -> int:
        return len(self.ip_k)

    def joint_softmax_keys(self):
        """``(k, v, bias)`` of the first softmax: the text keys, then any joint keys.

        The fused kernel walks both in one online softmax; the reference and the torch
        backend concatenate them (a copy of K/V, the price of running anywhere).
        """
        if self.joint_k is None:
            return self.k, self.v, self.text_bias
        k = torch.cat([self.k, self.joint_k], dim=1)
        v = torch.cat([self.v, self.joint_v], dim=1)
        bias = None
        if self.text_bias is not None or self.joint_bias is not None:
            zeros = lambda n: torch.zeros(self.q.shape[0], n, dtype=self.ip_scale.dtype, device=self.q.device)  # noqa: E731
            text = self.text_bias if self.text_bias is not None else zeros(self.k.shape[1])
            joint = self.joint_bias if self.joint_bias is not None else zeros(self.joint_k.shape[1])
            bias = torch.cat([text, joint], dim=1)
        return k, v, bias

    @property
    def tensors(self):
        """Every input tensor, for device/grad/stride checks."""
        extra = [t for t in (self.ip_mask, self.text_bias, self.joint_k, self.joint_v, self.joint_bias) if t is not None]
        return [self.q, self.k, self.v, *self.ip_k, *self.ip_v, self.ip_scale, *extra]


def _shape(t) -> str:
    return "(" + ", ".join(str(s) for s in t.shape) + ")"


def _require_tensor(name: str, t) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    return t


def _require_shape(name: str, t: torch.Tensor, expected: Sequence, layout: str) -> None:
    """``expected`` holds ints, or None for a free size; ``layout`` names the dims."""
    ok = t.dim() == len(expected) and all(e is None or s == e for s, e in zip(t.shape, expected))
    if not ok:
        want = ", ".join("*" if e is None else str(e) for e in expected)
        raise ValueError(f"{name}: expected shape {layout} = ({want}), got {_shape(t)}")


def _require_like(name: str, t: torch.Tensor, q: torch.Tensor, dtype: bool = True) -> None:
    if t.device != q.device:
        raise ValueError(f"{name}: expected device {q.device} (q's device), got {t.device}")
    if dtype and t.dtype != q.dtype:
        raise TypeError(f"{name}: expected dtype {q.dtype} (q's dtype), got {t.dtype}")


def _as_list(name: str, value, allow_none: bool = False) -> list:
    if value is None and allow_none:
        return []
    if isinstance(value, torch.Tensor):
        raise TypeError(f"{name}: expected a sequence with one tensor per IP stream, got a single tensor")
    if not isinstance(value, (list, tuple)):
        raise TypeError(f"{name}: expected a list or tuple, got {type(value).__name__}")
    return list(value)


def _param_dtype(q: torch.Tensor) -> torch.dtype:
    """Dtype of scales, masks and biases: fp32 accumulation, fp64 for fp64 inputs."""
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def _finite_float(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected a float, got {type(value).__name__}")
    if torch.compiler.is_compiling():
        return value  # a traced SymFloat: a run-time value, never baked in or guarded on
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name}: expected a finite float, got {value}")
    return value


def _scale_tensor(ip_scale, num_streams: int, batch: int, device, dtype) -> torch.Tensor:
    """Per stream: a float, or a ``(B,)`` tensor of per-sample scales -> ``(S, B)`` in ``dtype``."""
    if isinstance(ip_scale, torch.Tensor) and ip_scale.dim() == 2:  # already canonical (S, B)
        _require_shape("ip_scale", ip_scale, (num_streams, batch), "(S, B)")
        if ip_scale.device != device:
            raise ValueError(f"ip_scale: expected device {device} (q's device), got {ip_scale.device}")
        return ip_scale.to(dtype)
    if isinstance(ip_scale, (numbers.Real, torch.Tensor)):
        ip_scale = [ip_scale] * num_streams  # one value (or one (B,) tensor) for every stream
    scales = _as_list("ip_scale", ip_scale)
    if len(scales) != num_streams:
        raise ValueError(f"ip_scale: expected one scale per IP stream ({num_streams}), got {len(scales)}")
    rows = []
    for i, s in enumerate(scales):
        name = f"ip_scale[{i}]"
        if isinstance(s, torch.Tensor):
            if s.dim() == 0:
                s = s.expand(batch)
            _require_shape(name, s, (batch,), "(B,)")
            if s.device != device:
                raise ValueError(f"{name}: expected device {device} (q's device), got {s.device}")
            if not s.is_floating_point():
                raise TypeError(f"{name}: expected a floating-point tensor, got {s.dtype}")
            rows.append(s.to(dtype))
        else:
            value = _finite_float(name, s)
            if torch.compiler.is_compiling():
                # ones * s, not full(s): dynamo then keeps a float scale as a graph input
                # ("tensorified") instead of baking it in and guarding on it.
                rows.append(torch.ones((batch,), dtype=dtype, device=device) * value)
            else:  # eager: one fill launch instead of two (small calls are launch-bound on GPUs)
                rows.append(torch.full((batch,), value, dtype=dtype, device=device))
    if not rows:
        return torch.zeros((0, batch), dtype=dtype, device=device)
    return rows[0].unsqueeze(0) if len(rows) == 1 else torch.stack(rows)  # one stream: a view, no copy


def _mask_tensor(ip_mask, num_streams: int, batch: int, n: int, q: torch.Tensor):
    """Per stream: None or ``(B, N)`` weights -> ``(S, B, N)``, or None if no mask at all."""
    masks = _as_list("ip_mask", ip_mask, allow_none=True)
    if not masks or all(m is None for m in masks):
        return None
    if len(masks) != num_streams:
        raise ValueError(f"ip_mask: expected one entry (tensor or None) per IP stream ({num_streams}), got {len(masks)}")
    rows = []
    for i, m in enumerate(masks):
        name = f"ip_mask[{i}]"
        if m is None:
            rows.append(torch.ones((batch, n), dtype=_param_dtype(q), device=q.device))
            continue
        _require_tensor(name, m)
        _require_shape(name, m, (batch, n), "(B, N)")
        _require_like(name, m, q, dtype=False)
        rows.append(m.to(_param_dtype(q)))
    return torch.stack(rows)


def additive_bias(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A mask as an additive logit bias in ``dtype``: bool (True = attend, as SDPA) becomes
    0 / -inf, floats are cast.  The one place that convention is written."""
    if mask.dtype == torch.bool:
        zero = torch.zeros((), dtype=dtype, device=mask.device)
        return torch.where(mask, zero, zero - math.inf)
    return mask.to(dtype)


def _bias_tensor(name: str, bias, batch: int, length: int, q: torch.Tensor):
    """``(B, L)`` key-padding bias: bool (True = attend, as SDPA) or additive floats."""
    if bias is None:
        return None
    _require_tensor(name, bias)
    _require_shape(name, bias, (batch, length), "(B, L)" if name == "joint_bias" else "(B, Lt)")
    _require_like(name, bias, q, dtype=False)
    if bias.dtype != torch.bool and not bias.is_floating_point():
        raise TypeError(f"{name}: expected a bool or floating-point tensor, got {bias.dtype}")
    return additive_bias(bias, _param_dtype(q))


def _joint_tensors(joint_k, joint_v, joint_bias, q: torch.Tensor):
    """Checked ``(B, Lj, H, D)`` joint keys/values and their bias, or three Nones."""
    if joint_k is None and joint_v is None:
        if joint_bias is not None:
            raise ValueError("joint_bias: given without joint_k and joint_v")
        return None, None, None
    if joint_k is None or joint_v is None:
        raise ValueError(f"joint_k, joint_v: expected both or neither, got {'joint_v' if joint_k is None else 'joint_k'} only")
    B, _, H, D = q.shape
    _require_tensor("joint_k", joint_k)
    _require_tensor("joint_v", joint_v)
    _require_shape("joint_k", joint_k, (B, None, H, D), "(B, Lj, H, D)")
    _require_shape("joint_v", joint_v, (B, joint_k.shape[1], H, D), "(B, Lj, H, D)")
    if joint_k.shape[1] == 0:
        raise ValueError(f"joint_k: expected at least one joint token (Lj >= 1), got shape {_shape(joint_k)}")
    _require_like("joint_k", joint_k, q)
    _require_like("joint_v", joint_v, q)
    return joint_k, joint_v, _bias_tensor("joint_bias", joint_bias, B, joint_k.shape[1], q)


def normalize_inputs(q, k, v, ip_k=(), ip_v=(), ip_scale=1.0, ip_mask=None, text_bias=None, sm_scale=None,
                     joint_k=None, joint_v=None, joint_bias=None) -> AttentionInputs:
    """Check every argument of :func:`decoupled_attention` and bring it to canonical form."""
    q = _require_tensor("q", q)
    if q.dim() != 4:
        raise ValueError(f"q: expected a 4-D tensor (B, N, H, D), got shape {_shape(q)}")
    if q.dtype not in FLOAT_DTYPES:
        raise TypeError(f"q: expected dtype float16, bfloat16, float32 or float64, got {q.dtype}")
    B, N, H, D = q.shape
    if D == 0 or H == 0:
        raise ValueError(f"q: expected H > 0 and D > 0, got shape {_shape(q)}")
    k, v = _require_tensor("k", k), _require_tensor("v", v)
    _require_shape("k", k, (B, None, H, D), "(B, Lt, H, D)")
    _require_shape("v", v, (B, k.shape[1], H, D), "(B, Lt, H, D)")
    if k.shape[1] == 0:
        raise ValueError("k: expected at least one text token (Lt >= 1), got shape " + _shape(k))
    for name, t in (("k", k), ("v", v)):
        _require_like(name, t, q)

    ip_k, ip_v = _as_list("ip_k", ip_k), _as_list("ip_v", ip_v)
    if len(ip_k) != len(ip_v):
        raise ValueError(f"ip_v: expected one tensor per ip_k stream ({len(ip_k)}), got {len(ip_v)}")
    for i, (ik, iv) in enumerate(zip(ip_k, ip_v)):
        _require_tensor(f"ip_k[{i}]", ik)
        _require_tensor(f"ip_v[{i}]", iv)
        _require_shape(f"ip_k[{i}]", ik, (B, None, H, D), "(B, L_i, H, D)")
        _require_shape(f"ip_v[{i}]", iv, (B, ik.shape[1], H, D), "(B, L_i, H, D)")
        if ik.shape[1] == 0:
            raise ValueError(f"ip_k[{i}]: expected at least one IP token (L_i >= 1), got shape {_shape(ik)}")
        _require_like(f"ip_k[{i}]", ik, q)
        _require_like(f"ip_v[{i}]", iv, q)

    S = len(ip_k)
    joint_k, joint_v, joint_bias = _joint_tensors(joint_k, joint_v, joint_bias, q)
    sm_scale = D ** -0.5 if sm_scale is None else _finite_float("sm_scale", sm_scale)
    scales = _scale_tensor(ip_scale, S, B, q.device, _param_dtype(q))
    masks = _mask_tensor(ip_mask, S, B, N, q)
    # A stream whose scale is the Python number 0 is known to contribute nothing
    # without looking at device memory: drop it here so no backend pays for it.
    # (Zero *tensor* scales are skipped inside the Triton kernel, per sample.)
    keep = [i for i in range(S) if not _is_static_zero(ip_scale, i)]
    if len(keep) < S:
        ip_k, ip_v = [ip_k[i] for i in keep], [ip_v[i] for i in keep]
        scales = scales[keep]
        masks = None if masks is None or not keep else masks[keep]
    return AttentionInputs(
        q=q,
        k=k,
        v=v,
        ip_k=tuple(ip_k),
        ip_v=tuple(ip_v),
        ip_scale=scales,
        ip_mask=masks,
        text_bias=_bias_tensor("text_bias", text_bias, B, k.shape[1], q),
        sm_scale=sm_scale,
        joint_k=joint_k,
        joint_v=joint_v,
        joint_bias=joint_bias,
    )


def _is_static_zero(ip_scale, i: int) -> bool:
    """True when stream ``i``'s scale was given as the plain number 0."""
    if isinstance(ip_scale, (list, tuple)):
        ip_scale = ip_scale[i]
    if torch.compiler.is_compiling():
        return False  # comparing a traced float would guard on its value and recompile
    return isinstance(ip_scale, numbers.Real) and not isinstance(ip_scale, bool) and ip_scale == 0


def processor_inputs(q, k, v, ip_k=(), ip_v=(), ip_scale=(), text_bias=None) -> AttentionInputs:
    """Canonical inputs WITHOUT the argument checks, for calls whose inputs a processor
    built itself: q/k/v are views of the layer's own projections and each scale is a 0-D
    float tensor on q's device (IP-Adapter's scale buffer, times its gate).  The checks
    of :func:`normalize_inputs` cost more host time than a launch-bound layer's kernels;
    user calls (and editing methods' contributions) keep them."""
    batch = q.shape[0]
    dtype = _param_dtype(q)
    if len(ip_scale) == 1 and ip_scale[0].dtype == dtype:
        scales = ip_scale[0].expand(1, batch)  # one op, a view
    elif ip_scale:
        scales = torch.stack(list(ip_scale)).to(dtype)[:, None].expand(len(ip_scale), batch)
    else:
        scales = torch.zeros((0, batch), dtype=dtype, device=q.device)
    return AttentionInputs(q, k, v, tuple(ip_k), tuple(ip_v), scales, None,
                           _bias_tensor("text_bias", text_bias, batch, k.shape[1], q), q.shape[-1] ** -0.5)
