"""Fused decoupled cross-attention in Triton: the kernel and its launcher.

One program owns a BLOCK_M x D tile of queries for one (batch, head).  It reads that
tile ONCE, then

1. attends over the text keys (and any joint keys, which extend the same softmax) with
   an online softmax (keys longer than one block are looped), normalises, and keeps the
   result in a single fp32 accumulator;
2. for every IP stream whose scale for this sample is non-zero, makes two passes over
   the stream's keys: the first finds the row max and normaliser, the second adds
   ``scale * mask * softmax(q k_i^T) v_i`` straight into the same accumulator;
3. writes the output tile ONCE.

Why two passes for the IP keys instead of a second online-softmax accumulator: IP
streams are short (4, 16 or 257 tokens), so recomputing their QK^T is cheap, while a
second BLOCK_M x D fp32 accumulator would double register pressure and force smaller
tiles (or spills at D=256).  The op is memory-bound (intensity ~ Lt + L_ip FLOP/byte),
so Q read + O written is what matters.

Shapes the launcher guarantees: last dim of every tensor contiguous (stride 1);
any other strides are passed through, so slices and transposed views need no copy.
Several IP streams are concatenated along the token axis (a copy of the small K/V,
never of Q or O) and described by an offsets table.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from .inputs import AttentionInputs

LOG2E = tl.constexpr(1.4426950408889634)  # softmax runs in base 2: exp(x) = exp2(x * log2(e))


# --------------------------------------------------------------------------- kernel


@triton.jit
def _load_keys_t(K, offs_n, offs_d, stride_kn, length, HEAD_DIM, DOT_FP32: tl.constexpr):
    """Load a (BLOCK_D, BLOCK_N) tile of K^T; padded keys and dims read as 0."""
    ptrs = K + offs_n[None, :] * stride_kn + offs_d[:, None]
    k = tl.load(ptrs, mask=(offs_n[None, :] < length) & (offs_d[:, None] < HEAD_DIM), other=0.0)
    if DOT_FP32:
        k = k.to(tl.float32)
    return k


@triton.jit
def _load_values(V, offs_n, offs_d, stride_vn, length, HEAD_DIM, DOT_FP32: tl.constexpr):
    """Load a (BLOCK_N, BLOCK_D) tile of V; padded keys and dims read as 0."""
    ptrs = V + offs_n[:, None] * stride_vn + offs_d[None, :]
    v = tl.load(ptrs, mask=(offs_n[:, None] < length) & (offs_d[None, :] < HEAD_DIM), other=0.0)
    if DOT_FP32:
        v = v.to(tl.float32)
    return v


@triton.jit
def _safe_max(m):
    # A row whose keys so far are all masked has max -inf; exponentiating against 0
    # instead keeps exp2(-inf - -inf) = NaN out of the running sums.
    return tl.where(m == float("-inf"), 0.0, m)


@triton.jit
def _online_softmax_pass(
    acc, m_i, l_i, q, K, V, BIAS, length, stride_kn, stride_vn, stride_bias_n, offs_d, HEAD_DIM, qk_scale,
    BLOCK_N: tl.constexpr, DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """Fold ``length`` keys into the running (acc, row max, row sum) of one softmax."""
    for start_n in range(0, length, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        key_ok = offs_n < length
        k = _load_keys_t(K, offs_n, offs_d, stride_kn, length, HEAD_DIM, DOT_FP32)
        qk = tl.dot(q, k, input_precision=INPUT_PRECISION) * qk_scale
        bias = tl.load(BIAS + offs_n * stride_bias_n, mask=key_ok, other=0.0)
        qk = tl.where(key_ok[None, :], qk + bias[None, :] * LOG2E, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_use = _safe_max(m_new)
        p = tl.math.exp2(qk - m_use[:, None])
        alpha = tl.math.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_values(V, offs_n, offs_d, stride_vn, length, HEAD_DIM, DOT_FP32)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=INPUT_PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _decoupled_attn_fwd(
    # pointers
    Q, K, V, IPK, IPV, O,
    TEXT_BIAS,  # (B, Lt) additive fp32, or a 1-element zero with zero strides
    IP_SCALE,  # (S, B) fp32
    IP_MASK,  # (S, B, N) fp32, or a 1-element one with zero strides
    IP_OFFSETS,  # (S + 1,) int32: stream s owns IP tokens [off[s], off[s + 1])
    JK, JV,  # joint keys/values: they extend the text softmax (LJ = 0 when absent)
    JOINT_BIAS,  # (B, Lj) additive fp32, or a 1-element zero with zero strides
    # sizes
    N, H, HEAD_DIM, LT, LJ, NUM_STREAMS,
    qk_scale,  # sm_scale * log2(e): softmax runs in base 2
    # strides (elements); the last dim of every tensor is contiguous
    stride_qb, stride_qn, stride_qh,
    stride_kb, stride_kn, stride_kh,
    stride_vb, stride_vn, stride_vh,
    stride_ipkb, stride_ipkn, stride_ipkh,
    stride_ipvb, stride_ipvn, stride_ipvh,
    stride_ob, stride_on, stride_oh,
    stride_jkb, stride_jkn, stride_jkh,
    stride_jvb, stride_jvn, stride_jvh,
    stride_bias_b, stride_bias_n,
    stride_jbias_b, stride_jbias_n,
    stride_scale_s, stride_scale_b,
    stride_mask_s, stride_mask_b, stride_mask_n,
    # meta-parameters
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,  # text keys per step
    BLOCK_N_IP: tl.constexpr,  # IP keys per step (16 when every stream is that short)
    BLOCK_D: tl.constexpr,  # head dim padded to a power of two (>= 16 for tl.dot)
    DOT_FP32: tl.constexpr,  # upcast dot operands; only for bf16 under the interpreter
    INPUT_PRECISION: tl.constexpr,  # "tf32" for fp32 inputs; ignored for fp16/bf16
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = pid_bh // H
    off_h = pid_bh % H
    # int64 batch offsets: B * N * H * D can exceed 2**31 at large batch and resolution.
    off_b64 = off_b.to(tl.int64)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < N
    tile_ok = row_ok[:, None] & (offs_d[None, :] < HEAD_DIM)

    q_ptrs = Q + off_b64 * stride_qb + off_h * stride_qh + offs_m[:, None] * stride_qn + offs_d[None, :]
    q = tl.load(q_ptrs, mask=tile_ok, other=0.0)
    if DOT_FP32:
        q = q.to(tl.float32)

    # ---- text (+ joint) keys: one online softmax --------------------------------
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    acc, m_i, l_i = _online_softmax_pass(
        acc, m_i, l_i, q,
        K + off_b64 * stride_kb + off_h * stride_kh, V + off_b64 * stride_vb + off_h * stride_vh,
        TEXT_BIAS + off_b64 * stride_bias_b, LT, stride_kn, stride_vn, stride_bias_n,
        offs_d, HEAD_DIM, qk_scale, BLOCK_N, DOT_FP32, INPUT_PRECISION,
    )
    # Joint keys continue the same softmax, read in place: no [K; K_joint] copy.
    acc, m_i, l_i = _online_softmax_pass(
        acc, m_i, l_i, q,
        JK + off_b64 * stride_jkb + off_h * stride_jkh, JV + off_b64 * stride_jvb + off_h * stride_jvh,
        JOINT_BIAS + off_b64 * stride_jbias_b, LJ, stride_jkn, stride_jvn, stride_jbias_n,
        offs_d, HEAD_DIM, qk_scale, BLOCK_N, DOT_FP32, INPUT_PRECISION,
    )
    # Rows with every key masked give 0 (as SDPA does): acc is 0 there, so divide by 1.
    acc = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]

    # ---- IP streams: two passes each, added into the same accumulator -----------
    ipk_base = IPK + off_b64 * stride_ipkb + off_h * stride_ipkh
    ipv_base = IPV + off_b64 * stride_ipvb + off_h * stride_ipvh
    for s in range(0, NUM_STREAMS):
        scale = tl.load(IP_SCALE + s * stride_scale_s + off_b * stride_scale_b)
        # Scale 0 for this sample: the stream costs one scalar load, nothing more.
        if scale != 0.0:
            start = tl.load(IP_OFFSETS + s)
            end = tl.load(IP_OFFSETS + s + 1)
            mask_ptrs = IP_MASK + s * stride_mask_s + off_b64 * stride_mask_b + offs_m * stride_mask_n
            row_weight = scale * tl.load(mask_ptrs, mask=row_ok, other=0.0)

            # pass 1: row max and normaliser of softmax(q k_i^T)
            m_s = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
            l_s = tl.zeros([BLOCK_M], dtype=tl.float32)
            for start_n in range(start, end, BLOCK_N_IP):
                offs_n = start_n + tl.arange(0, BLOCK_N_IP)
                k = _load_keys_t(ipk_base, offs_n, offs_d, stride_ipkn, end, HEAD_DIM, DOT_FP32)
                qk = tl.dot(q, k, input_precision=INPUT_PRECISION) * qk_scale
                qk = tl.where((offs_n < end)[None, :], qk, float("-inf"))
                m_new = tl.maximum(m_s, tl.max(qk, 1))
                l_s = l_s * tl.math.exp2(m_s - m_new) + tl.sum(tl.math.exp2(qk - m_new[:, None]), 1)
                m_s = m_new

            # pass 2: weighted probabilities straight into the accumulator
            p_scale = row_weight / l_s
            for start_n in range(start, end, BLOCK_N_IP):
                offs_n = start_n + tl.arange(0, BLOCK_N_IP)
                k = _load_keys_t(ipk_base, offs_n, offs_d, stride_ipkn, end, HEAD_DIM, DOT_FP32)
                qk = tl.dot(q, k, input_precision=INPUT_PRECISION) * qk_scale
                qk = tl.where((offs_n < end)[None, :], qk, float("-inf"))
                p = tl.math.exp2(qk - m_s[:, None]) * p_scale[:, None]
                v = _load_values(ipv_base, offs_n, offs_d, stride_ipvn, end, HEAD_DIM, DOT_FP32)
                acc = tl.dot(p.to(v.dtype), v, acc, input_precision=INPUT_PRECISION)

    o_ptrs = O + off_b64 * stride_ob + off_h * stride_oh + offs_m[:, None] * stride_on + offs_d[None, :]
    tl.store(o_ptrs, acc.to(O.dtype.element_ty), mask=tile_ok)


# --------------------------------------------------------------------------- launcher

#: dtypes the kernel is built for (float32 runs its dots in tf32).
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MIN_HEAD_DIM, MAX_HEAD_DIM = 8, 256
#: IP streams no longer than this use 16-key steps, so 4/16-token streams don't pay for 64.
SHORT_STREAM = 16


@dataclass(frozen=True)
class KernelConfig:
    """One compiled specialisation of :func:`_decoupled_attn_fwd` (its constexprs)."""

    BLOCK_M: int
    BLOCK_N: int
    BLOCK_N_IP: int
    BLOCK_D: int
    num_warps: int
    num_stages: int

    @property
    def name(self) -> str:
        return f"m{self.BLOCK_M}_n{self.BLOCK_N}_nip{self.BLOCK_N_IP}_d{self.BLOCK_D}_w{self.num_warps}_s{self.num_stages}"


def head_dim_bucket(head_dim: int) -> int:
    """Head dim padded to a power of two, at least 16 (tl.dot's minimum K)."""
    return max(16, triton.next_power_of_2(head_dim))


# Tiles per (arch, dtype class) and head-dim bucket, as
# (short IP streams <= 16 tokens, longer IP streams), each (BLOCK_M, BLOCK_N, BLOCK_N_IP,
# num_warps, num_stages).  Found 2026-11 (triton 3.9) by compiling candidates from
# large to small with ``compile_report.compile_variant`` and keeping the first that has
# no local memory (spills) and uses tensor cores; ``instantstyle compile-report``
# re-checks every entry.  Findings: 128-query tiles need 8 warps (4 warps spill at
# D=64); sm_80's mma.sync keeps operands in registers, so D=256 (SD1.5's D=160) only
# fits 16x16 tiles there, while Hopper's wgmma reads them from shared memory.
# Spill-free is the only criterion so far: throughput tuning needs a GPU run of the bench.
_WIDE = ((128, 64, 16, 8, 2), (128, 64, 64, 8, 2))
_TILES = {
    ("sm_90", "half"): {16: _WIDE, 32: _WIDE, 64: _WIDE, 128: ((128, 32, 16, 8, 1), (128, 32, 32, 8, 1)),
                        256: ((64, 32, 16, 8, 1), (64, 32, 16, 8, 1))},
    ("sm_90", "fp32"): {16: _WIDE, 32: _WIDE, 64: ((128, 64, 16, 8, 1), (128, 64, 64, 8, 1)),
                        128: ((128, 32, 16, 8, 1), (64, 32, 32, 4, 1)), 256: ((16, 16, 16, 4, 1),) * 2},
    ("sm_80", "half"): {16: _WIDE, 32: ((128, 64, 16, 8, 1), (128, 64, 64, 8, 2)), 64: _WIDE,
                        128: ((128, 64, 16, 8, 2), (128, 64, 32, 8, 2)), 256: ((16, 16, 16, 4, 1),) * 2},
    ("sm_80", "fp32"): {16: ((128, 64, 16, 8, 1), (128, 64, 64, 8, 2)), 32: _WIDE, 64: _WIDE,
                        128: ((128, 64, 16, 8, 2), (128, 64, 32, 8, 1)), 256: ((16, 16, 16, 4, 1),) * 2},
}
def _dtype_class(dtype_name: str) -> str:
    return "fp32" if dtype_name == "float32" else "half"


def kernel_config(head_dim: int, max_ip_tokens: int, dtype_name: str = "float16", arch: str = "sm_90") -> KernelConfig:
    """The tile configuration the launcher uses for a head dim, IP length, dtype and arch."""
    block_d = head_dim_bucket(head_dim)
    short, long = _TILES[(arch, _dtype_class(dtype_name))][block_d]
    bm, bn, bn_ip, warps, stages = short if max_ip_tokens <= SHORT_STREAM else long
    return KernelConfig(bm, bn, bn_ip, block_d, warps, stages)


def all_kernel_configs(dtype_name: str, arch: str) -> list:
    """Every specialisation the launcher can pick for a dtype on an arch."""
    configs = []
    for block_d in (16, 32, 64, 128, 256):
        for max_ip in (SHORT_STREAM, SHORT_STREAM + 1):
            cfg = kernel_config(block_d, max_ip, dtype_name, arch)
            if cfg not in configs:
                configs.append(cfg)
    return configs


def arch_of(device: torch.device) -> str:
    """Which tile table a device uses; the interpreter (CPU) follows sm_90's tiles."""
    if device.type != "cuda":
        return "sm_90"
    return "sm_90" if torch.cuda.get_device_capability(device)[0] >= 9 else "sm_80"


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=16)
def _broadcast_constant(value: float, device: torch.device) -> tuple:
    """A 1-element tensor read through zero strides: an absent mask or bias costs no memory.

    Cached per device, so the steady state launches no fill kernel for it (eager calls at
    SDXL sizes are launch-bound) and CUDA-graph capture sees a tensor made before it.
    """
    return torch.full((1,), value, dtype=torch.float32, device=device), (0, 0, 0)


def _bias_or_zero(bias: Optional[torch.Tensor], device) -> tuple:
    return (bias, bias.stride()) if bias is not None else _broadcast_constant(0.0, device)


@functools.lru_cache(maxsize=64)
def _offsets_on(lengths: tuple, device: torch.device) -> torch.Tensor:
    """The stream offsets table, cached per (lengths, device).

    Lengths are shapes, so the table is constant for a given model; caching keeps the
    host-to-device copy out of the steady state and out of CUDA-graph capture.
    """
    offsets = [0]
    for n in lengths:
        offsets.append(offsets[-1] + n)
    return torch.tensor(offsets, dtype=torch.int32, device=device)


def triton_decoupled_attention(inputs: AttentionInputs, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Launch the fused kernel.  Inputs must have passed ``dispatch.triton_unsupported``.

    ``out`` lets tests hand in a NaN-poisoned buffer to prove every element is written.
    """
    q, k, v = inputs.q, inputs.k, inputs.v
    B, N, H, D = q.shape
    if out is None:
        out = torch.empty((B, N, H, D), dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out

    lengths = tuple(t.shape[1] for t in inputs.ip_k)
    if len(lengths) == 1:
        ip_k, ip_v = inputs.ip_k[0], inputs.ip_v[0]
    elif lengths:
        ip_k, ip_v = torch.cat(inputs.ip_k, dim=1), torch.cat(inputs.ip_v, dim=1)
    else:  # no streams: the IP pointers are never read
        ip_k, ip_v = k, v
    offsets = _offsets_on(lengths or (0,), q.device)

    bias, bias_strides = _bias_or_zero(inputs.text_bias, q.device)
    joint_bias, joint_bias_strides = _bias_or_zero(inputs.joint_bias, q.device)
    jk, jv = (inputs.joint_k, inputs.joint_v) if inputs.joint_k is not None else (k, v)  # LJ = 0: never read
    lj = inputs.joint_k.shape[1] if inputs.joint_k is not None else 0
    if inputs.ip_mask is not None:
        mask, mask_strides = inputs.ip_mask, inputs.ip_mask.stride()
    else:
        mask, mask_strides = _broadcast_constant(1.0, q.device)
    scale = inputs.ip_scale

    dtype_name = str(q.dtype).replace("torch.", "")
    cfg = kernel_config(D, max(lengths, default=1), dtype_name, arch_of(q.device))
    grid = (triton.cdiv(N, cfg.BLOCK_M), B * H)
    _decoupled_attn_fwd[grid](
        q, k, v, ip_k, ip_v, out, bias, scale, mask, offsets, jk, jv, joint_bias,
        N, H, D, k.shape[1], lj, len(lengths),
        inputs.sm_scale * LOG2E.value,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        ip_k.stride(0), ip_k.stride(1), ip_k.stride(2),
        ip_v.stride(0), ip_v.stride(1), ip_v.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        jk.stride(0), jk.stride(1), jk.stride(2),
        jv.stride(0), jv.stride(1), jv.stride(2),
        bias_strides[0], bias_strides[1],
        joint_bias_strides[0], joint_bias_strides[1],
        scale.stride(0), scale.stride(1),
        mask_strides[0], mask_strides[1], mask_strides[2],
        BLOCK_M=cfg.BLOCK_M,
        BLOCK_N=cfg.BLOCK_N,
        BLOCK_N_IP=cfg.BLOCK_N_IP,
        BLOCK_D=cfg.BLOCK_D,
        # Dated workaround (2026-11, triton 3.6-3.9): the interpreter multiplies bf16
        # bit patterns in tl.dot (triton issue 11584).  Upcast only there; compiled
        # kernels keep bf16 tensor-core dots.
        DOT_FP32=interpreting() and q.dtype == torch.bfloat16,
        INPUT_PRECISION="tf32" if q.dtype == torch.float32 else "ieee",
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    return out
