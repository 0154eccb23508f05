"""Backward of the fused decoupled attention in Triton: kernels and launcher.

The math (and its PyTorch form) is in :mod:`.backward`.  Three kernels:

1. ``_bwd_preprocess``, one program per query tile: recomputes each stream's softmax
   (text + joint keys in one online softmax, then every IP stream) and writes its
   log-sum-exp ``L_s`` (base 2) and ``D_s = rowsum(dO * O_s)``, both ``(S+1, B, H, N)``
   fp32.  The forward stays as it is (no LSE output): ``O_s`` must be recomputed
   anyway, since the forward only keeps ``sum_s w_s O_s``, and streams are short.
2. ``_bwd_query_tiles``, one program per query tile.  A key range (the text keys, the
   joint keys, each IP stream) that fits one key tile is handled whole: P_s from L_s,
   dS_s, dQ accumulated in registers, and dK_s / dV_s / d bias as per-query-tile
   *partials* that the host sums over tiles (torch's sum: deterministic, atomics are
   not).  Ranges longer than a tile only add to dQ here, walking their key tiles.
3. ``_bwd_key_tiles``, one program per key tile of a LONG range (the second pass of
   FlashAttention-2): walks every query tile and writes dK / dV / d bias directly.

Every kernel is specialised (constexprs) on which gradients are needed: a style-block
adapter (dK_ip / dV_ip only) never touches the text keys after the preprocess, which
then skips them too.  Layout, grid folding and int64 batch offsets follow the forward.
The launcher (tiles, buffers, the host-side reductions) is :mod:`.triton_bwd_launch`.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .triton_decoupled import LOG2E, _load_values, _online_softmax_pass, _stream_weight

# --------------------------------------------------------------------------- kernels


@triton.jit
def _load_rows(PTR, offs_m, offs_d, stride_m, N, HEAD_DIM, EVEN_M: tl.constexpr, EVEN_D: tl.constexpr):
    """A (BLOCK_M, BLOCK_D) tile of query rows (Q or dO); rows/dims outside read 0."""
    ptrs = PTR + offs_m[:, None] * stride_m + offs_d[None, :]
    if EVEN_M and EVEN_D:
        return tl.load(ptrs)
    return tl.load(ptrs, mask=(offs_m[:, None] < N) & (offs_d[None, :] < HEAD_DIM), other=0.0)


@triton.jit
def _probs_and_dlogits(q, do, k, v, lse, delta, w, BIAS, offs_n, key_ok, stride_bias_n, qk_scale,
                       HAS_BIAS: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """P (BLOCK_M, BLOCK_N) and dS = w P (dO V^T - D) for one key tile of one stream.

    ``lse`` is +inf for padded and fully masked rows, so their P is exactly 0."""
    qk = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION) * qk_scale
    if HAS_BIAS:
        qk += tl.load(BIAS + offs_n * stride_bias_n, mask=key_ok, other=0.0)[None, :] * LOG2E
    qk = tl.where(key_ok[None, :], qk, float("-inf"))
    p = tl.math.exp2(qk - lse[:, None])
    dp = tl.dot(do, tl.trans(v), input_precision=INPUT_PRECISION)
    ds = p * (dp - delta[:, None]) * w[:, None]
    return p, ds


@triton.jit
def _range_one_tile(
    dq, q, do, lse, delta, w, K, V, BIAS, length, stride_kn, stride_vn, stride_bias_n,
    DK_P, DV_P, DB_P, stride_pn, stride_dbn, offs_d, HEAD_DIM, qk_scale, sm_scale,
    BLOCK_N: tl.constexpr, HAS_BIAS: tl.constexpr, NEED_DQ: tl.constexpr, NEED_DKV: tl.constexpr,
    NEED_DB: tl.constexpr, EVEN_D: tl.constexpr, DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """A whole key range in one tile: dQ into registers, dK/dV/d bias partials of this query tile.

    Ordered for short live ranges (register pressure): dV is stored before dP and dS exist."""
    offs_n = tl.arange(0, BLOCK_N)
    key_ok = offs_n < length
    k = _load_values(K, offs_n, offs_d, stride_kn, 0, length, HEAD_DIM, EVEN_D)
    if DOT_FP32:
        k = k.to(tl.float32)
    qk = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION) * qk_scale
    if HAS_BIAS:
        qk += tl.load(BIAS + offs_n * stride_bias_n, mask=key_ok, other=0.0)[None, :] * LOG2E
    qk = tl.where(key_ok[None, :], qk, float("-inf"))
    p = tl.math.exp2(qk - lse[:, None]) * w[:, None]  # w P: what dV and dS both use
    part_ok = key_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
    part = offs_n[:, None] * stride_pn + offs_d[None, :]
    if NEED_DKV:
        dv = tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=INPUT_PRECISION)
        tl.store(DV_P + part, dv, mask=part_ok)
    v = _load_values(V, offs_n, offs_d, stride_vn, 0, length, HEAD_DIM, EVEN_D)
    if DOT_FP32:
        v = v.to(tl.float32)
    ds = p * (tl.dot(do, tl.trans(v), input_precision=INPUT_PRECISION) - delta[:, None])
    if NEED_DB:
        tl.store(DB_P + offs_n * stride_dbn, tl.sum(ds, 0), mask=key_ok)
    if NEED_DKV:
        dk = tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=INPUT_PRECISION) * sm_scale
        tl.store(DK_P + part, dk, mask=part_ok)
    if NEED_DQ:
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=INPUT_PRECISION)
    return dq


@triton.jit
def _range_dq_loop(
    dq, q, do, lse, delta, w, K, V, BIAS, length, stride_kn, stride_vn, stride_bias_n, offs_d, HEAD_DIM, qk_scale,
    BLOCK_N: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN_D: tl.constexpr, DOT_FP32: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """dQ of a key range longer than a tile (its dK/dV come from ``_bwd_key_tiles``)."""
    for start_n in range(0, length, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        key_ok = offs_n < length
        k = _load_values(K, offs_n, offs_d, stride_kn, 0, length, HEAD_DIM, EVEN_D)
        v = _load_values(V, offs_n, offs_d, stride_vn, 0, length, HEAD_DIM, EVEN_D)
        if DOT_FP32:
            k, v = k.to(tl.float32), v.to(tl.float32)
        _, ds = _probs_and_dlogits(q, do, k, v, lse, delta, w, BIAS, offs_n, key_ok, stride_bias_n, qk_scale,
                                   HAS_BIAS, INPUT_PRECISION)
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=INPUT_PRECISION)
    return dq


@triton.jit
def _bwd_preprocess(
    Q, DO, K, V, IPK, IPV, JK, JV, TEXT_BIAS, JOINT_BIAS, IP_OFFSETS, LSE, DELTA,
    N, H, HEAD_DIM, LT, LJ, NUM_STREAMS, NUM_M_TILES, qk_scale,
    stride_qb, stride_qn, stride_qh, stride_dob, stride_don, stride_doh,
    stride_kb, stride_kn, stride_kh, stride_vb, stride_vn, stride_vh,
    stride_ipkb, stride_ipkn, stride_ipkh, stride_ipvb, stride_ipvn, stride_ipvh,
    stride_jkb, stride_jkn, stride_jkh, stride_jvb, stride_jvn, stride_jvh,
    stride_bias_b, stride_bias_n, stride_jbias_b, stride_jbias_n,
    stride_ls, stride_lb, stride_lh,  # LSE and DELTA: (S + 1, B, H, N), last dim contiguous
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_N_IP: tl.constexpr, BLOCK_D: tl.constexpr,
    TEXT: tl.constexpr,  # the text softmax's L/D are needed (dQ, text or joint grads)
    HAS_TEXT_BIAS: tl.constexpr, HAS_JOINT: tl.constexpr, HAS_JOINT_BIAS: tl.constexpr,
    EVEN_M: tl.constexpr, EVEN_D: tl.constexpr, DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_m = pid % NUM_M_TILES
    pid_bh = pid // NUM_M_TILES
    off_b = pid_bh // H
    off_h = pid_bh % H
    off_b64 = off_b.to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < N
    q = _load_rows(Q + off_b64 * stride_qb + off_h * stride_qh, offs_m, offs_d, stride_qn, N, HEAD_DIM, EVEN_M, EVEN_D)
    do = _load_rows(DO + off_b64 * stride_dob + off_h * stride_doh, offs_m, offs_d, stride_don, N, HEAD_DIM, EVEN_M,
                    EVEN_D).to(tl.float32)
    if DOT_FP32:
        q = q.to(tl.float32)
    out_off = off_b64 * stride_lb + off_h * stride_lh + offs_m
    if TEXT:
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        acc, m_i, l_i = _online_softmax_pass(
            acc, m_i, l_i, q, K + off_b64 * stride_kb + off_h * stride_kh, V + off_b64 * stride_vb + off_h * stride_vh,
            TEXT_BIAS + off_b64 * stride_bias_b, LT, stride_kn, stride_vn, stride_bias_n, offs_d, HEAD_DIM, qk_scale,
            BLOCK_N, HAS_TEXT_BIAS, EVEN_D, DOT_FP32, INPUT_PRECISION,
        )
        if HAS_JOINT:
            acc, m_i, l_i = _online_softmax_pass(
                acc, m_i, l_i, q, JK + off_b64 * stride_jkb + off_h * stride_jkh,
                JV + off_b64 * stride_jvb + off_h * stride_jvh, JOINT_BIAS + off_b64 * stride_jbias_b, LJ, stride_jkn,
                stride_jvn, stride_jbias_n, offs_d, HEAD_DIM, qk_scale, BLOCK_N, HAS_JOINT_BIAS, EVEN_D, DOT_FP32,
                INPUT_PRECISION,
            )
        # Fully masked rows (l = 0): L = +inf makes every P exactly 0 in the backward.
        lse = tl.where(l_i == 0.0, float("inf"), m_i + tl.math.log2(tl.where(l_i == 0.0, 1.0, l_i)))
        delta = tl.sum(do * acc, 1) / tl.where(l_i == 0.0, 1.0, l_i)
        tl.store(LSE + out_off, lse, mask=row_ok)
        tl.store(DELTA + out_off, delta, mask=row_ok)
    ipk_base = IPK + off_b64 * stride_ipkb + off_h * stride_ipkh
    ipv_base = IPV + off_b64 * stride_ipvb + off_h * stride_ipvh
    for s in range(0, NUM_STREAMS):
        # Every stream, zero scales included: d scale_s needs D_s even where scale_s = 0.
        start = tl.load(IP_OFFSETS + s)
        end = tl.load(IP_OFFSETS + s + 1)
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        acc, m_i, l_i = _online_softmax_pass(
            acc, m_i, l_i, q, ipk_base + start * stride_ipkn, ipv_base + start * stride_ipvn, TEXT_BIAS, end - start,
            stride_ipkn, stride_ipvn, 0, offs_d, HEAD_DIM, qk_scale, BLOCK_N_IP, False, EVEN_D, DOT_FP32,
            INPUT_PRECISION,
        )
        tl.store(LSE + (s + 1) * stride_ls + out_off, m_i + tl.math.log2(l_i), mask=row_ok)
        tl.store(DELTA + (s + 1) * stride_ls + out_off, tl.sum(do * acc, 1) / l_i, mask=row_ok)


@triton.jit
def _bwd_query_tiles(
    Q, DO, K, V, IPK, IPV, JK, JV, TEXT_BIAS, JOINT_BIAS, IP_SCALE, IP_MASK, IP_OFFSETS, IP_SLOTS, LSE, DELTA,
    DQ, DK_P, DV_P, DB_P,  # DK_P/DV_P: (M tiles, B, slots, H, D) fp32; DB_P: (M tiles, B, H, slots) fp32
    N, H, HEAD_DIM, LT, LJ, NUM_STREAMS, NUM_M_TILES, JOINT_SLOT, qk_scale, sm_scale,
    stride_qb, stride_qn, stride_qh, stride_dob, stride_don, stride_doh,
    stride_kb, stride_kn, stride_kh, stride_vb, stride_vn, stride_vh,
    stride_ipkb, stride_ipkn, stride_ipkh, stride_ipvb, stride_ipvn, stride_ipvh,
    stride_jkb, stride_jkn, stride_jkh, stride_jvb, stride_jvn, stride_jvh,
    stride_bias_b, stride_bias_n, stride_jbias_b, stride_jbias_n,
    stride_scale_s, stride_scale_b, stride_mask_s, stride_mask_b, stride_mask_n,
    stride_ls, stride_lb, stride_lh,
    stride_dqb, stride_dqn, stride_dqh,
    stride_pm, stride_pb, stride_pn, stride_ph,
    stride_dbm, stride_dbb, stride_dbh, stride_dbn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_N_IP: tl.constexpr, BLOCK_D: tl.constexpr,
    TEXT_ONE_TILE: tl.constexpr, JOINT_ONE_TILE: tl.constexpr,  # LT / LJ <= BLOCK_N
    NEED_DQ: tl.constexpr, NEED_DKV_TEXT: tl.constexpr, NEED_DKV_JOINT: tl.constexpr, NEED_DKV_IP: tl.constexpr,
    NEED_DB_TEXT: tl.constexpr, NEED_DB_JOINT: tl.constexpr,
    HAS_TEXT_BIAS: tl.constexpr, HAS_JOINT: tl.constexpr, HAS_JOINT_BIAS: tl.constexpr, HAS_IP_MASK: tl.constexpr,
    EVEN_M: tl.constexpr, EVEN_D: tl.constexpr, DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_m = pid % NUM_M_TILES
    pid_bh = pid // NUM_M_TILES
    off_b = pid_bh // H
    off_h = pid_bh % H
    off_b64 = off_b.to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < N
    q = _load_rows(Q + off_b64 * stride_qb + off_h * stride_qh, offs_m, offs_d, stride_qn, N, HEAD_DIM, EVEN_M, EVEN_D)
    do = _load_rows(DO + off_b64 * stride_dob + off_h * stride_doh, offs_m, offs_d, stride_don, N, HEAD_DIM, EVEN_M,
                    EVEN_D)
    if DOT_FP32:
        q, do = q.to(tl.float32), do.to(tl.float32)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    stat_off = off_b64 * stride_lb + off_h * stride_lh + offs_m
    # This query tile's partials; a range's slot is added per range.
    part_base = pid_m.to(tl.int64) * stride_pm + off_b64 * stride_pb + off_h * stride_ph
    db_base = pid_m.to(tl.int64) * stride_dbm + off_b64 * stride_dbb + off_h * stride_dbh

    # ---- the text softmax: text keys, then joint keys, against the same L_0 / D_0 ----
    if NEED_DQ or (TEXT_ONE_TILE and (NEED_DKV_TEXT or NEED_DB_TEXT)) or (JOINT_ONE_TILE and (NEED_DKV_JOINT or NEED_DB_JOINT)):
        lse = tl.load(LSE + stat_off, mask=row_ok, other=float("inf"))
        delta = tl.load(DELTA + stat_off, mask=row_ok, other=0.0)
        w = tl.where(row_ok, 1.0, 0.0)
        k_base = K + off_b64 * stride_kb + off_h * stride_kh
        v_base = V + off_b64 * stride_vb + off_h * stride_vh
        bias_base = TEXT_BIAS + off_b64 * stride_bias_b
        if TEXT_ONE_TILE:
            dq = _range_one_tile(
                dq, q, do, lse, delta, w, k_base, v_base, bias_base, LT, stride_kn, stride_vn, stride_bias_n,
                DK_P + part_base, DV_P + part_base, DB_P + db_base, stride_pn, stride_dbn, offs_d, HEAD_DIM, qk_scale,
                sm_scale, BLOCK_N, HAS_TEXT_BIAS, NEED_DQ, NEED_DKV_TEXT, NEED_DB_TEXT, EVEN_D, DOT_FP32, INPUT_PRECISION,
            )
        elif NEED_DQ:
            dq = _range_dq_loop(dq, q, do, lse, delta, w, k_base, v_base, bias_base, LT, stride_kn, stride_vn,
                                stride_bias_n, offs_d, HEAD_DIM, qk_scale, BLOCK_N, HAS_TEXT_BIAS, EVEN_D, DOT_FP32,
                                INPUT_PRECISION)
        if HAS_JOINT:
            jk_base = JK + off_b64 * stride_jkb + off_h * stride_jkh
            jv_base = JV + off_b64 * stride_jvb + off_h * stride_jvh
            jbias_base = JOINT_BIAS + off_b64 * stride_jbias_b
            if JOINT_ONE_TILE:
                dq = _range_one_tile(
                    dq, q, do, lse, delta, w, jk_base, jv_base, jbias_base, LJ, stride_jkn, stride_jvn, stride_jbias_n,
                    DK_P + part_base + JOINT_SLOT * stride_pn, DV_P + part_base + JOINT_SLOT * stride_pn,
                    DB_P + db_base + JOINT_SLOT * stride_dbn, stride_pn, stride_dbn, offs_d, HEAD_DIM, qk_scale, sm_scale,
                    BLOCK_N, HAS_JOINT_BIAS, NEED_DQ, NEED_DKV_JOINT, NEED_DB_JOINT, EVEN_D, DOT_FP32, INPUT_PRECISION,
                )
            elif NEED_DQ:
                dq = _range_dq_loop(dq, q, do, lse, delta, w, jk_base, jv_base, jbias_base, LJ, stride_jkn, stride_jvn,
                                    stride_jbias_n, offs_d, HEAD_DIM, qk_scale, BLOCK_N, HAS_JOINT_BIAS, EVEN_D, DOT_FP32,
                                    INPUT_PRECISION)

    # ---- IP streams: each its own softmax and weight w_s = scale_s * mask_s ----------
    if NEED_DQ or NEED_DKV_IP:
        ipk_base = IPK + off_b64 * stride_ipkb + off_h * stride_ipkh
        ipv_base = IPV + off_b64 * stride_ipvb + off_h * stride_ipvh
        for s in range(0, NUM_STREAMS):
            _, w = _stream_weight(IP_SCALE, IP_MASK, s, off_b, off_b64, offs_m, row_ok, stride_scale_s,
                                  stride_scale_b, stride_mask_s, stride_mask_b, stride_mask_n, HAS_IP_MASK)
            lse = tl.load(LSE + (s + 1) * stride_ls + stat_off, mask=row_ok, other=float("inf"))
            delta = tl.load(DELTA + (s + 1) * stride_ls + stat_off, mask=row_ok, other=0.0)
            start = tl.load(IP_OFFSETS + s)
            length = tl.load(IP_OFFSETS + s + 1) - start
            if length <= BLOCK_N_IP:  # the launcher gave this stream partial slots
                slot = tl.load(IP_SLOTS + s)
                dq = _range_one_tile(
                    dq, q, do, lse, delta, w, ipk_base + start * stride_ipkn, ipv_base + start * stride_ipvn, TEXT_BIAS,
                    length, stride_ipkn, stride_ipvn, 0, DK_P + part_base + slot * stride_pn,
                    DV_P + part_base + slot * stride_pn, DB_P, stride_pn, 0, offs_d, HEAD_DIM, qk_scale, sm_scale,
                    BLOCK_N_IP, False, NEED_DQ, NEED_DKV_IP, False, EVEN_D, DOT_FP32, INPUT_PRECISION,
                )
            elif NEED_DQ:
                dq = _range_dq_loop(dq, q, do, lse, delta, w, ipk_base + start * stride_ipkn,
                                    ipv_base + start * stride_ipvn, TEXT_BIAS, length, stride_ipkn, stride_ipvn, 0,
                                    offs_d, HEAD_DIM, qk_scale, BLOCK_N_IP, False, EVEN_D, DOT_FP32, INPUT_PRECISION)

    if NEED_DQ:
        dq_ptrs = DQ + off_b64 * stride_dqb + off_h * stride_dqh + offs_m[:, None] * stride_dqn + offs_d[None, :]
        dq = (dq * sm_scale).to(DQ.dtype.element_ty)
        if EVEN_M and EVEN_D:
            tl.store(dq_ptrs, dq)
        else:
            tl.store(dq_ptrs, dq, mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM))


@triton.jit
def _bwd_key_tiles(
    Q, DO, K, V, BIAS, LSE, DELTA, IP_SCALE, IP_MASK, DK, DV, DB,
    N, H, HEAD_DIM, L, STREAM, NUM_N_TILES, qk_scale, sm_scale,
    stride_qb, stride_qn, stride_qh, stride_dob, stride_don, stride_doh,
    stride_kb, stride_kn, stride_kh, stride_vb, stride_vn, stride_vh,
    stride_bias_b, stride_bias_n,
    stride_ls, stride_lb, stride_lh,
    stride_scale_s, stride_scale_b, stride_mask_s, stride_mask_b, stride_mask_n,
    stride_dkb, stride_dkn, stride_dkh, stride_dvb, stride_dvn, stride_dvh,
    stride_dbb, stride_dbh, stride_dbn,  # DB: (B, H, L) fp32, summed over heads by the host
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    IS_IP: tl.constexpr,  # an IP stream (weight scale * mask, no bias) or a text-softmax range (weight 1)
    HAS_BIAS: tl.constexpr, HAS_IP_MASK: tl.constexpr, NEED_DKV: tl.constexpr, NEED_DB: tl.constexpr,
    EVEN_M: tl.constexpr, EVEN_D: tl.constexpr, DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """One key tile of a long range: walk every query tile, write dK, dV, d bias."""
    pid = tl.program_id(0)
    pid_n = pid % NUM_N_TILES
    pid_bh = pid // NUM_N_TILES
    off_b = pid_bh // H
    off_h = pid_bh % H
    off_b64 = off_b.to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    key_ok = offs_n < L
    k = _load_values(K + off_b64 * stride_kb + off_h * stride_kh, offs_n, offs_d, stride_kn, 0, L, HEAD_DIM, EVEN_D)
    v = _load_values(V + off_b64 * stride_vb + off_h * stride_vh, offs_n, offs_d, stride_vn, 0, L, HEAD_DIM, EVEN_D)
    if DOT_FP32:
        k, v = k.to(tl.float32), v.to(tl.float32)
    bias = tl.zeros([BLOCK_N], dtype=tl.float32)
    if HAS_BIAS:
        bias = tl.load(BIAS + off_b64 * stride_bias_b + offs_n * stride_bias_n, mask=key_ok, other=0.0) * LOG2E
    bias = tl.where(key_ok, bias, float("-inf"))
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    db = tl.zeros([BLOCK_N], dtype=tl.float32)
    rows = N
    if IS_IP:  # a sample whose scale is 0 gets zero gradients without a pass over the queries
        rows = tl.where(tl.load(IP_SCALE + (STREAM - 1) * stride_scale_s + off_b * stride_scale_b) != 0.0, N, 0)
    q_base = Q + off_b64 * stride_qb + off_h * stride_qh
    do_base = DO + off_b64 * stride_dob + off_h * stride_doh
    stat_base = STREAM * stride_ls + off_b64 * stride_lb + off_h * stride_lh
    for start_m in range(0, rows, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        row_ok = offs_m < N
        q = _load_rows(q_base, offs_m, offs_d, stride_qn, N, HEAD_DIM, EVEN_M, EVEN_D)
        do = _load_rows(do_base, offs_m, offs_d, stride_don, N, HEAD_DIM, EVEN_M, EVEN_D)
        if DOT_FP32:
            q, do = q.to(tl.float32), do.to(tl.float32)
        lse = tl.load(LSE + stat_base + offs_m, mask=row_ok, other=float("inf"))
        delta = tl.load(DELTA + stat_base + offs_m, mask=row_ok, other=0.0)
        if IS_IP:
            _, w = _stream_weight(IP_SCALE, IP_MASK, STREAM - 1, off_b, off_b64, offs_m, row_ok, stride_scale_s,
                                  stride_scale_b, stride_mask_s, stride_mask_b, stride_mask_n, HAS_IP_MASK)
        else:
            w = tl.where(row_ok, 1.0, 0.0)
        # Transposed tiles (keys x queries): the reductions below run over queries.
        qk_t = tl.dot(k, tl.trans(q), input_precision=INPUT_PRECISION) * qk_scale + bias[:, None]
        p_t = tl.math.exp2(qk_t - lse[None, :])
        dp_t = tl.dot(v, tl.trans(do), input_precision=INPUT_PRECISION)
        ds_t = p_t * (dp_t - delta[None, :]) * w[None, :]
        if NEED_DKV:
            dv = tl.dot((p_t * w[None, :]).to(do.dtype), do, dv, input_precision=INPUT_PRECISION)
            dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=INPUT_PRECISION)
        if NEED_DB:
            db += tl.sum(ds_t, 1)
    tile_ok = key_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
    if NEED_DKV:
        dk_ptrs = DK + off_b64 * stride_dkb + off_h * stride_dkh + offs_n[:, None] * stride_dkn + offs_d[None, :]
        tl.store(dk_ptrs, (dk * sm_scale).to(DK.dtype.element_ty), mask=tile_ok)
        dv_ptrs = DV + off_b64 * stride_dvb + off_h * stride_dvh + offs_n[:, None] * stride_dvn + offs_d[None, :]
        tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=tile_ok)
    if NEED_DB:
        tl.store(DB + off_b64 * stride_dbb + off_h * stride_dbh + offs_n * stride_dbn, db, mask=key_ok)
