"""Fused decoupled cross-attention in Triton: the kernel and its launcher.

One program owns a BLOCK_M x D tile of queries for one (batch, head).  It reads that
tile ONCE, writes the output tile ONCE, and in between takes one of two paths (a
constexpr, picked per call by :mod:`.tiles`):

* **single tile** (``SINGLE_TILE``): when every key (Lt text + Lj joint + sum L_i IP)
  fits one BLOCK_N tile, as for 77 text + 4/16 IP tokens, the program loads that tile
  from its three sources, makes ONE QK^T, a segmented softmax (the text+joint segment and
  each IP stream are max-shifted, normalised, scaled and masked on their own), and ONE PV.
  At 77+4 keys that issues 128+128 key columns per row for 2x81 useful ones (1.58x).
* **multi tile**: text (+ joint) keys in an online softmax over BLOCK_N steps, then every
  IP stream whose scale for this sample is non-zero in two passes over BLOCK_N_IP steps
  (row max and normaliser, then ``scale * mask * p`` into the same accumulator).  Two
  passes instead of a second accumulator: IP streams are short, recomputing their QK^T is
  cheap, a second BLOCK_M x D fp32 accumulator would double register pressure.

Constexpr flags (FlashAttention's EVEN_M / HAS_BIAS style) remove the loads and masks
of absent biases and IP masks, of exact head dims and of N that fills whole tiles.

The grid is 1-D: (query tiles) x B x H folded into axis 0 (2**31 - 1 programs), since
CUDA's axis 1 stops at 65,535 and B * H passes that at batch 2,048 with 32 heads.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from .inputs import AttentionInputs
from .tiles import (  # noqa: F401
    KernelConfig,
    all_kernel_configs,
    arch_for_capability,
    head_dim_bucket,
    kernel_config,
)

LOG2E = tl.constexpr(1.4426950408889634)  # softmax runs in base 2: exp(x) = exp2(x * log2(e))


# --------------------------------------------------------------------------- kernel


@triton.jit
def _load_keys_t(K, offs_n, offs_d, stride_kn, lo, hi, HEAD_DIM, EVEN_D: tl.constexpr):
    """A (BLOCK_D, BLOCK_N) tile of K^T for key columns offs_n in [lo, hi); others read 0.

    ``K`` points at key ``lo``; columns outside the range are masked, never dereferenced.
    """
    ptrs = K + (offs_n[None, :] - lo) * stride_kn + offs_d[:, None]
    key_ok = (offs_n[None, :] >= lo) & (offs_n[None, :] < hi)
    if EVEN_D:
        return tl.load(ptrs, mask=key_ok, other=0.0)
    return tl.load(ptrs, mask=key_ok & (offs_d[:, None] < HEAD_DIM), other=0.0)


@triton.jit
def _load_values(V, offs_n, offs_d, stride_vn, lo, hi, HEAD_DIM, EVEN_D: tl.constexpr):
    """A (BLOCK_N, BLOCK_D) tile of V for key rows offs_n in [lo, hi); others read 0."""
    ptrs = V + (offs_n[:, None] - lo) * stride_vn + offs_d[None, :]
    key_ok = (offs_n[:, None] >= lo) & (offs_n[:, None] < hi)
    if EVEN_D:
        return tl.load(ptrs, mask=key_ok, other=0.0)
    return tl.load(ptrs, mask=key_ok & (offs_d[None, :] < HEAD_DIM), other=0.0)


@triton.jit
def _safe_max(m):
    # A row whose keys so far are all masked has max -inf; exponentiating against 0
    # instead keeps exp2(-inf - -inf) = NaN out of the running sums.
    return tl.where(m == float("-inf"), 0.0, m)


@triton.jit
def _online_softmax_pass(
    acc, m_i, l_i, q, K, V, BIAS, length, stride_kn, stride_vn, stride_bias_n, offs_d, HEAD_DIM, qk_scale,
    BLOCK_N: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN_D: tl.constexpr, DOT_FP32: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """Fold ``length`` keys into the running (acc, row max, row sum) of one softmax."""
    for start_n in range(0, length, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        key_ok = offs_n < length
        k = _load_keys_t(K, offs_n, offs_d, stride_kn, 0, length, HEAD_DIM, EVEN_D)
        v = _load_values(V, offs_n, offs_d, stride_vn, 0, length, HEAD_DIM, EVEN_D)
        if DOT_FP32:
            k, v = k.to(tl.float32), v.to(tl.float32)
        qk = tl.dot(q, k, input_precision=INPUT_PRECISION) * qk_scale
        if HAS_BIAS:
            qk += tl.load(BIAS + offs_n * stride_bias_n, mask=key_ok, other=0.0)[None, :] * LOG2E
        qk = tl.where(key_ok[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_use = _safe_max(m_new)
        p = tl.math.exp2(qk - m_use[:, None])
        alpha = tl.math.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=INPUT_PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _stream_weight(IP_SCALE, IP_MASK, s, off_b, off_b64, offs_m, row_ok, stride_scale_s, stride_scale_b,
                   stride_mask_s, stride_mask_b, stride_mask_n, HAS_IP_MASK: tl.constexpr):
    """(scale, per-row weight) of stream ``s`` for this sample: scale * mask[row]."""
    scale = tl.load(IP_SCALE + s * stride_scale_s + off_b * stride_scale_b)
    if HAS_IP_MASK:
        mask_ptrs = IP_MASK + s * stride_mask_s + off_b64 * stride_mask_b + offs_m * stride_mask_n
        return scale, scale * tl.load(mask_ptrs, mask=row_ok, other=0.0)
    return scale, tl.zeros_like(offs_m).to(tl.float32) + scale


@triton.jit
def _decoupled_attn_fwd(
    # pointers
    Q, K, V, IPK, IPV, O,
    TEXT_BIAS,  # (B, Lt) additive fp32 (read only when HAS_TEXT_BIAS)
    IP_SCALE,  # (S, B) fp32
    IP_MASK,  # (S, B, N) fp32 (read only when HAS_IP_MASK)
    IP_OFFSETS,  # (S + 1,) int32: stream s owns IP tokens [off[s], off[s + 1])
    JK, JV,  # joint keys/values: they extend the text softmax (read only when HAS_JOINT)
    JOINT_BIAS,  # (B, Lj) additive fp32 (read only when HAS_JOINT_BIAS)
    # sizes
    N, H, HEAD_DIM, LT, LJ, LIP, NUM_STREAMS, NUM_M_TILES,
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
    BLOCK_N: tl.constexpr,  # text keys per step; the whole key tile when SINGLE_TILE
    BLOCK_N_IP: tl.constexpr,  # IP keys per step (multi-tile path)
    BLOCK_D: tl.constexpr,  # head dim padded to a power of two (>= 16 for tl.dot)
    SINGLE_TILE: tl.constexpr,  # LT + LJ + LIP <= BLOCK_N: one QK^T, segmented softmax, one PV
    HAS_TEXT_BIAS: tl.constexpr,
    HAS_JOINT: tl.constexpr,
    HAS_JOINT_BIAS: tl.constexpr,
    HAS_IP_MASK: tl.constexpr,
    EVEN_M: tl.constexpr,  # N % BLOCK_M == 0: no row masks
    EVEN_D: tl.constexpr,  # HEAD_DIM == BLOCK_D: no head-dim masks
    DOT_FP32: tl.constexpr,  # upcast dot operands; only for bf16 under the interpreter
    INPUT_PRECISION: tl.constexpr,  # "tf32" for fp32 inputs; ignored for fp16/bf16
):
    pid = tl.program_id(0)
    pid_m = pid % NUM_M_TILES  # neighbouring programs share (b, h): K/V stay in L2
    pid_bh = pid // NUM_M_TILES
    off_b = pid_bh // H
    off_h = pid_bh % H
    # int64 batch offsets: B * N * H * D can exceed 2**31 at large batch and resolution.
    off_b64 = off_b.to(tl.int64)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < N
    tile_ok = row_ok[:, None] & (offs_d[None, :] < HEAD_DIM)

    q_ptrs = Q + off_b64 * stride_qb + off_h * stride_qh + offs_m[:, None] * stride_qn + offs_d[None, :]
    if EVEN_M and EVEN_D:
        q = tl.load(q_ptrs)
    else:
        q = tl.load(q_ptrs, mask=tile_ok, other=0.0)
    if DOT_FP32:
        q = q.to(tl.float32)

    k_base = K + off_b64 * stride_kb + off_h * stride_kh
    v_base = V + off_b64 * stride_vb + off_h * stride_vh
    jk_base = JK + off_b64 * stride_jkb + off_h * stride_jkh
    jv_base = JV + off_b64 * stride_jvb + off_h * stride_jvh
    ipk_base = IPK + off_b64 * stride_ipkb + off_h * stride_ipkh
    ipv_base = IPV + off_b64 * stride_ipvb + off_h * stride_ipvh

    if SINGLE_TILE:
        # ---- every key in one tile: [text | joint | stream 0 | stream 1 | ...] ----------
        n_text = LT + LJ
        offs_n = tl.arange(0, BLOCK_N)
        k = _load_keys_t(k_base, offs_n, offs_d, stride_kn, 0, LT, HEAD_DIM, EVEN_D)
        v = _load_values(v_base, offs_n, offs_d, stride_vn, 0, LT, HEAD_DIM, EVEN_D)
        if HAS_JOINT:  # masked loads read disjoint columns, so adding them assembles the tile
            k += _load_keys_t(jk_base, offs_n, offs_d, stride_jkn, LT, n_text, HEAD_DIM, EVEN_D)
            v += _load_values(jv_base, offs_n, offs_d, stride_jvn, LT, n_text, HEAD_DIM, EVEN_D)
        if NUM_STREAMS > 0:
            k += _load_keys_t(ipk_base, offs_n, offs_d, stride_ipkn, n_text, n_text + LIP, HEAD_DIM, EVEN_D)
            v += _load_values(ipv_base, offs_n, offs_d, stride_ipvn, n_text, n_text + LIP, HEAD_DIM, EVEN_D)
        if DOT_FP32:
            k, v = k.to(tl.float32), v.to(tl.float32)
        qk = tl.dot(q, k, input_precision=INPUT_PRECISION) * qk_scale
        if HAS_TEXT_BIAS:
            bias = tl.load(TEXT_BIAS + off_b64 * stride_bias_b + offs_n * stride_bias_n, mask=offs_n < LT, other=0.0)
            qk += bias[None, :] * LOG2E
        if HAS_JOINT_BIAS:
            jbias_ptrs = JOINT_BIAS + off_b64 * stride_jbias_b + (offs_n - LT) * stride_jbias_n
            jbias = tl.load(jbias_ptrs, mask=(offs_n >= LT) & (offs_n < n_text), other=0.0)
            qk += jbias[None, :] * LOG2E
        qk = tl.where((offs_n < n_text + LIP)[None, :], qk, float("-inf"))

        # Segmented softmax.  Per column: the row max of ITS segment (m_col) and the
        # factor that normalises, scales and masks ITS segment (w_col); one exp2 for all.
        in_text = (offs_n < n_text)[None, :]
        m_col = tl.where(in_text, _safe_max(tl.max(tl.where(in_text, qk, float("-inf")), 1))[:, None], 0.0)
        for s in range(0, NUM_STREAMS):
            lo = n_text + tl.load(IP_OFFSETS + s)
            hi = n_text + tl.load(IP_OFFSETS + s + 1)
            seg = ((offs_n >= lo) & (offs_n < hi))[None, :]
            m_col = tl.where(seg, _safe_max(tl.max(tl.where(seg, qk, float("-inf")), 1))[:, None], m_col)
        p = tl.math.exp2(qk - m_col)  # padding columns: exp2(-inf) = 0
        l_text = tl.sum(tl.where(in_text, p, 0.0), 1)
        # Rows with every text key masked give 0 (as SDPA does): weight 0, not 1/0.
        w_col = tl.where(in_text, tl.where(l_text == 0.0, 0.0, 1.0 / tl.where(l_text == 0.0, 1.0, l_text))[:, None], 0.0)
        for s in range(0, NUM_STREAMS):
            scale, row_weight = _stream_weight(IP_SCALE, IP_MASK, s, off_b, off_b64, offs_m, row_ok, stride_scale_s,
                                               stride_scale_b, stride_mask_s, stride_mask_b, stride_mask_n, HAS_IP_MASK)
            if scale != 0.0:  # a zero-scale stream keeps weight 0 (its p is finite: no NaN)
                lo = n_text + tl.load(IP_OFFSETS + s)
                hi = n_text + tl.load(IP_OFFSETS + s + 1)
                seg = ((offs_n >= lo) & (offs_n < hi))[None, :]
                l_s = tl.sum(tl.where(seg, p, 0.0), 1)
                w_col = tl.where(seg, (row_weight / l_s)[:, None], w_col)
        p = p * w_col
        acc = tl.dot(p.to(v.dtype), v, input_precision=INPUT_PRECISION)
    else:
        # ---- text (+ joint) keys: one online softmax ---------------------------------
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        acc, m_i, l_i = _online_softmax_pass(
            acc, m_i, l_i, q, k_base, v_base, TEXT_BIAS + off_b64 * stride_bias_b, LT, stride_kn, stride_vn,
            stride_bias_n, offs_d, HEAD_DIM, qk_scale, BLOCK_N, HAS_TEXT_BIAS, EVEN_D, DOT_FP32, INPUT_PRECISION,
        )
        if HAS_JOINT:  # joint keys continue the same softmax, read in place: no [K; K_joint] copy
            acc, m_i, l_i = _online_softmax_pass(
                acc, m_i, l_i, q, jk_base, jv_base, JOINT_BIAS + off_b64 * stride_jbias_b, LJ, stride_jkn, stride_jvn,
                stride_jbias_n, offs_d, HEAD_DIM, qk_scale, BLOCK_N, HAS_JOINT_BIAS, EVEN_D, DOT_FP32, INPUT_PRECISION,
            )
        # Rows with every key masked give 0 (as SDPA does): acc is 0 there, so divide by 1.
        acc = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]

        # ---- IP streams: two passes each, added into the same accumulator -----------
        for s in range(0, NUM_STREAMS):
            scale, row_weight = _stream_weight(IP_SCALE, IP_MASK, s, off_b, off_b64, offs_m, row_ok, stride_scale_s,
                                               stride_scale_b, stride_mask_s, stride_mask_b, stride_mask_n, HAS_IP_MASK)
            # Scale 0 for this sample: the stream costs one scalar load, nothing more.
            if scale != 0.0:
                start = tl.load(IP_OFFSETS + s)
                end = tl.load(IP_OFFSETS + s + 1)
                # pass 1: row max and normaliser of softmax(q k_i^T)
                m_s = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
                l_s = tl.zeros([BLOCK_M], dtype=tl.float32)
                for start_n in range(start, end, BLOCK_N_IP):
                    offs_n = start_n + tl.arange(0, BLOCK_N_IP)
                    k = _load_keys_t(ipk_base, offs_n, offs_d, stride_ipkn, 0, end, HEAD_DIM, EVEN_D)
                    if DOT_FP32:
                        k = k.to(tl.float32)
                    qk = tl.dot(q, k, input_precision=INPUT_PRECISION) * qk_scale
                    qk = tl.where((offs_n < end)[None, :], qk, float("-inf"))
                    m_new = tl.maximum(m_s, tl.max(qk, 1))
                    l_s = l_s * tl.math.exp2(m_s - m_new) + tl.sum(tl.math.exp2(qk - m_new[:, None]), 1)
                    m_s = m_new
                # pass 2: weighted probabilities straight into the accumulator
                p_scale = row_weight / l_s
                for start_n in range(start, end, BLOCK_N_IP):
                    offs_n = start_n + tl.arange(0, BLOCK_N_IP)
                    k = _load_keys_t(ipk_base, offs_n, offs_d, stride_ipkn, 0, end, HEAD_DIM, EVEN_D)
                    v = _load_values(ipv_base, offs_n, offs_d, stride_ipvn, 0, end, HEAD_DIM, EVEN_D)
                    if DOT_FP32:
                        k, v = k.to(tl.float32), v.to(tl.float32)
                    qk = tl.dot(q, k, input_precision=INPUT_PRECISION) * qk_scale
                    qk = tl.where((offs_n < end)[None, :], qk, float("-inf"))
                    p = tl.math.exp2(qk - m_s[:, None]) * p_scale[:, None]
                    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=INPUT_PRECISION)

    o_ptrs = O + off_b64 * stride_ob + off_h * stride_oh + offs_m[:, None] * stride_on + offs_d[None, :]
    if EVEN_M and EVEN_D:
        tl.store(o_ptrs, acc.to(O.dtype.element_ty))
    else:
        tl.store(o_ptrs, acc.to(O.dtype.element_ty), mask=tile_ok)


# --------------------------------------------------------------------------- launcher

#: dtypes the kernel is built for (float32 runs its dots in tf32).
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MIN_HEAD_DIM, MAX_HEAD_DIM = 8, 256
#: Largest grid: axis 0 of a CUDA launch.
MAX_PROGRAMS = 2**31 - 1


def arch_of(device: torch.device) -> str:
    """Which tile table a device uses; the interpreter (CPU) follows sm_90's tiles."""
    if device.type != "cuda":
        return "sm_90"
    return arch_for_capability(*torch.cuda.get_device_capability(device))


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# Device constants the kernel reads: created once per key and NEVER evicted.  An LRU
# cache would free an entry that a captured CUDA graph still reads (the graph keeps raw
# pointers, not references).  Keys are (lengths, device): a handful per model.
_CONSTANTS: dict = {}


def _constant(key, make) -> torch.Tensor:
    t = _CONSTANTS.get(key)
    if t is None:
        t = _CONSTANTS[key] = make()
    return t


def _placeholder(device: torch.device) -> torch.Tensor:
    """A 1-element fp32 tensor for pointers the constexpr flags say are never read."""
    return _constant(("zero", device), lambda: torch.zeros((1,), dtype=torch.float32, device=device))


def _offsets_on(lengths: tuple, device: torch.device) -> torch.Tensor:
    """The stream offsets table (kept outside the steady state and out of graph capture)."""
    def make():
        offsets = [0]
        for n in lengths:
            offsets.append(offsets[-1] + n)
        return torch.tensor(offsets, dtype=torch.int32, device=device)

    return _constant(("offsets", lengths, device), make)


@dataclass
class LaunchPlan:
    """Everything one launch passes: the compile report compiles from the same plan."""

    config: KernelConfig
    grid: tuple
    args: tuple
    constexprs: dict

    @property
    def options(self) -> dict:
        return {"num_warps": self.config.num_warps, "num_stages": self.config.num_stages}


def launch_plan(inputs: AttentionInputs, out: torch.Tensor, arch: Optional[str] = None,
                config: Optional[KernelConfig] = None) -> LaunchPlan:
    """Grid, arguments and constexprs of the launch for these inputs.

    ``arch`` picks another arch's tile table (tests run every table in the interpreter);
    ``config`` forces a tile configuration (``instantstyle tune`` measures candidates).
    """
    q, k, v = inputs.q, inputs.k, inputs.v
    B, N, H, D = q.shape
    lengths = tuple(t.shape[1] for t in inputs.ip_k)
    if len(lengths) == 1:
        ip_k, ip_v = inputs.ip_k[0], inputs.ip_v[0]
    elif lengths:
        ip_k, ip_v = torch.cat(inputs.ip_k, dim=1), torch.cat(inputs.ip_v, dim=1)
    else:  # no streams: the IP pointers are never read
        ip_k, ip_v = k, v
    offsets = _offsets_on(lengths or (0,), q.device)
    placeholder = _placeholder(q.device)
    bias = inputs.text_bias if inputs.text_bias is not None else placeholder
    joint_bias = inputs.joint_bias if inputs.joint_bias is not None else placeholder
    jk, jv = (inputs.joint_k, inputs.joint_v) if inputs.joint_k is not None else (k, v)
    lj = inputs.joint_k.shape[1] if inputs.joint_k is not None else 0
    mask = inputs.ip_mask if inputs.ip_mask is not None else placeholder
    scale = inputs.ip_scale
    zero3 = (0, 0, 0)
    bias_strides = bias.stride() if inputs.text_bias is not None else zero3
    jbias_strides = joint_bias.stride() if inputs.joint_bias is not None else zero3
    mask_strides = mask.stride() if inputs.ip_mask is not None else zero3

    dtype_name = str(q.dtype).replace("torch.", "")
    if config is None:
        config = kernel_config(D, k.shape[1], lj, lengths, dtype_name, arch or arch_of(q.device))
    num_m = triton.cdiv(N, config.BLOCK_M)
    programs = num_m * B * H
    if programs > MAX_PROGRAMS:
        raise ValueError(f"q: expected at most {MAX_PROGRAMS} query tiles x batch x heads, got {programs} for shape {tuple(q.shape)}")
    args = (
        q, k, v, ip_k, ip_v, out, bias, scale, mask, offsets, jk, jv, joint_bias,
        N, H, D, k.shape[1], lj, sum(lengths), len(lengths), num_m,
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
        jbias_strides[0], jbias_strides[1],
        scale.stride(0), scale.stride(1),
        mask_strides[0], mask_strides[1], mask_strides[2],
    )
    constexprs = dict(
        BLOCK_M=config.BLOCK_M,
        BLOCK_N=config.BLOCK_N,
        BLOCK_N_IP=config.BLOCK_N_IP,
        BLOCK_D=config.BLOCK_D,
        SINGLE_TILE=config.SINGLE_TILE,
        HAS_TEXT_BIAS=inputs.text_bias is not None,
        HAS_JOINT=lj > 0,
        HAS_JOINT_BIAS=inputs.joint_bias is not None,
        HAS_IP_MASK=inputs.ip_mask is not None,
        EVEN_M=N % config.BLOCK_M == 0,
        EVEN_D=D == config.BLOCK_D,
        # Dated workaround (2026-11, triton 3.6-3.9): the interpreter multiplies bf16
        # bit patterns in tl.dot (triton issue 11584).  Upcast only there; compiled
        # kernels keep bf16 tensor-core dots.
        DOT_FP32=interpreting() and q.dtype == torch.bfloat16,
        INPUT_PRECISION="tf32" if q.dtype == torch.float32 else "ieee",
    )
    if config.SINGLE_TILE and k.shape[1] + lj + sum(lengths) > config.BLOCK_N:
        raise ValueError(f"config: single tile of {config.BLOCK_N} keys, got {k.shape[1] + lj + sum(lengths)} keys")
    return LaunchPlan(config, (programs,), args, constexprs)


def triton_decoupled_attention(inputs: AttentionInputs, out: Optional[torch.Tensor] = None, arch: Optional[str] = None,
                               config: Optional[KernelConfig] = None) -> torch.Tensor:
    """Launch the fused kernel.  Inputs must have passed ``dispatch.triton_unsupported``.

    ``out`` lets tests hand in a NaN-poisoned buffer to prove every element is written;
    ``arch``/``config`` override the tile choice (see :func:`launch_plan`).
    """
    B, N, H, D = inputs.q.shape
    if out is None:
        out = torch.empty((B, N, H, D), dtype=inputs.q.dtype, device=inputs.q.device)
    if out.numel() == 0:
        return out
    plan = launch_plan(inputs, out, arch, config)
    _decoupled_attn_fwd[plan.grid](*plan.args, **plan.constexprs, **plan.options)
    return out
