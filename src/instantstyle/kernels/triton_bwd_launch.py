"""Launcher of the Triton backward (:mod:`.triton_decoupled_bwd` has the kernels).

:func:`plan_backward` builds every launch of one backward (grids, arguments,
constexprs) and the buffers they fill; the compile report compiles from the same plans.
:func:`triton_decoupled_attention_backward` runs them and sums the one-tile ranges'
per-query-tile partials with torch (deterministic; each gradient its own tensor).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import triton

from .backward import GradNeeds, Grads, scale_and_mask_grads
from .inputs import AttentionInputs
from .tiles import dtype_class, head_dim_bucket, next_power_of_2
from .triton_decoupled import LOG2E, _constant, _offsets_on, _placeholder, interpreting
from .triton_decoupled_bwd import _bwd_key_tiles, _bwd_preprocess, _bwd_query_tiles

MAX_PROGRAMS = 2**31 - 1


@dataclass(frozen=True)
class BwdConfig:
    """Tiles of the three backward kernels (one compiled specialisation)."""

    BLOCK_M: int  # queries per program: preprocess and query-tile kernels
    BLOCK_N: int  # text/joint keys per step; a text or joint range up to this long is one tile
    BLOCK_N_IP: int  # IP keys per step; a stream up to this long is one tile
    BLOCK_D: int
    BLOCK_M_KV: int  # queries per step of the key-tile pass
    BLOCK_N_KV: int  # keys per key-tile program
    num_warps: int
    num_stages: int

    @property
    def name(self) -> str:
        return (f"m{self.BLOCK_M}_n{self.BLOCK_N}_nip{self.BLOCK_N_IP}_kv{self.BLOCK_M_KV}x{self.BLOCK_N_KV}"
                f"_d{self.BLOCK_D}_w{self.num_warps}_s{self.num_stages}")


# (BLOCK_M, BLOCK_N, IP tile cap, BLOCK_M_KV, BLOCK_N_KV, num_warps) per dtype class and
# head-dim bucket.  Found (triton 3.9, 2026-11) by compiling candidates from large to
# small for sm_80 and sm_90 with ``compile_report.compile_backward_variants`` (a style-block
# call and a "full" one: every gradient, biases, joint keys, masks, a 257-token stream,
# padded head dim) and keeping, per entry, the first that is spill-free on BOTH arches
# (``instantstyle compile-report --backward`` re-checks sm_80/86/89/90).  The query-tile
# kernel inlines every range's path (text, joint, IP one-tile and dQ loops), which is what
# bounds its tiles: 64-query tiles or 64-key IP tiles spilled at D = 64.  So a 77-token
# prompt takes the two-pass path (64-key text tiles) and IP streams over 16-32 tokens too.
_BWD_TILES = {
    "half": {16: (32, 64, 32, 64, 64, 8), 32: (32, 64, 32, 64, 64, 8), 64: (32, 64, 16, 32, 64, 8),
             128: (32, 32, 16, 32, 64, 8), 256: (16, 16, 16, 16, 32, 4)},
    "fp32": {16: (32, 64, 32, 64, 64, 8), 32: (32, 64, 32, 64, 64, 8), 64: (16, 32, 16, 32, 32, 4),
             128: (16, 32, 16, 32, 32, 4), 256: (16, 32, 16, 16, 16, 8)},
}


def bwd_config(head_dim: int, ip_lens=(), dtype_name: str = "float16", arch: str = "sm_90") -> BwdConfig:
    """The backward's tiles for a call (one table for every arch; ``arch`` kept for per-arch ones)."""
    block_d = head_dim_bucket(head_dim)
    bm, bn, ip_cap, bm_kv, bn_kv, warps = _BWD_TILES[dtype_class(dtype_name)][block_d]
    # 4-token streams don't pay for wide tiles; up to the cap one tile; longer: two passes.
    bn_ip = min(ip_cap, max(16, next_power_of_2(max(ip_lens, default=1))), bn)
    return BwdConfig(bm, bn, bn_ip, block_d, bm_kv, bn_kv, warps, 1)


@dataclass
class Launch:
    kernel: str
    fn: object
    grid: tuple
    args: tuple
    constexprs: dict
    options: dict

    def __call__(self):
        self.fn[self.grid](*self.args, **self.constexprs, **self.options)


@dataclass
class _Range:
    """A key range of the backward: text, joint, or one IP stream."""

    kind: str  # "text" | "joint" | "ip"
    index: int  # IP stream number
    k: torch.Tensor
    v: torch.Tensor
    bias: Optional[torch.Tensor]
    one_tile: bool
    need_dkv: bool
    need_db: bool
    slot: int = -1  # first partial slot when one_tile and a partial is needed
    dk: Optional[torch.Tensor] = None  # long ranges: written by the key-tile pass
    dv: Optional[torch.Tensor] = None
    db: Optional[torch.Tensor] = None


@dataclass
class BackwardPlan:
    """Every launch of one backward and the buffers they fill (the compile report reads the launches)."""

    config: BwdConfig
    launches: list
    inputs: AttentionInputs
    needs: GradNeeds
    ranges: list
    dq: Optional[torch.Tensor]
    dk_part: Optional[torch.Tensor]
    dv_part: Optional[torch.Tensor]
    db_part: Optional[torch.Tensor]
    delta: torch.Tensor


def _strides(t: Optional[torch.Tensor], n: int) -> tuple:
    return tuple(t.stride()[:n]) if t is not None else (0,) * n


def plan_backward(inputs: AttentionInputs, dout: torch.Tensor, needs: GradNeeds, arch: Optional[str] = None,
                  config: Optional[BwdConfig] = None, poison: bool = False) -> BackwardPlan:
    """Buffers, grids, arguments and constexprs of the backward's launches.

    ``poison`` fills every buffer a kernel writes with NaN (tests: nothing left unwritten)."""
    q, k, v = inputs.q, inputs.k, inputs.v
    B, N, H, D = q.shape
    device = q.device
    lengths = tuple(t.shape[1] for t in inputs.ip_k)
    S = len(lengths)
    lt = k.shape[1]
    lj = inputs.joint_k.shape[1] if inputs.joint_k is not None else 0
    dtype_name = str(q.dtype).replace("torch.", "")
    if config is None:
        from .triton_decoupled import arch_of

        config = bwd_config(D, lengths, dtype_name, arch or arch_of(device))
    alloc = (lambda *s, dtype: torch.full(s, float("nan"), dtype=dtype, device=device)) if poison else \
        (lambda *s, dtype: torch.empty(s, dtype=dtype, device=device))
    f32 = torch.float32

    ranges = [_Range("text", 0, k, v, inputs.text_bias, lt <= config.BLOCK_N, needs.kv,
                     needs.text_bias and inputs.text_bias is not None)]
    if lj:
        ranges.append(_Range("joint", 0, inputs.joint_k, inputs.joint_v, inputs.joint_bias, lj <= config.BLOCK_N,
                             needs.joint_kv, needs.joint_bias and inputs.joint_bias is not None))
    for s, (ik, iv) in enumerate(zip(inputs.ip_k, inputs.ip_v)):
        ranges.append(_Range("ip", s, ik, iv, None, lengths[s] <= config.BLOCK_N_IP, needs.any_ip_kv, False))
    slots = 0
    for r in ranges:
        if r.one_tile and (r.need_dkv or r.need_db):
            r.slot, slots = slots, slots + r.k.shape[1]
    ip_slots = tuple(max(r.slot, 0) for r in ranges if r.kind == "ip")

    num_m = triton.cdiv(N, config.BLOCK_M)
    if num_m * B * H > MAX_PROGRAMS:
        raise ValueError(f"q: expected at most {MAX_PROGRAMS} query tiles x batch x heads, got {num_m * B * H}")
    placeholder = _placeholder(device)
    need_ip_stats = needs.q or needs.any_ip_kv or needs.ip_scale or needs.ip_mask
    lse = alloc(S + 1, B, H, N, dtype=f32)
    delta = alloc(S + 1, B, H, N, dtype=f32)
    dq = alloc(B, N, H, D, dtype=q.dtype) if needs.q else None
    any_dkv_part = any(r.slot >= 0 and r.need_dkv for r in ranges)
    dk_part = alloc(num_m, B, slots, H, D, dtype=f32) if any_dkv_part else None
    dv_part = alloc(num_m, B, slots, H, D, dtype=f32) if any_dkv_part else None
    db_part = alloc(num_m, B, H, slots, dtype=f32) if any(r.slot >= 0 and r.need_db for r in ranges) else None

    if S == 1:
        ip_k, ip_v = inputs.ip_k[0], inputs.ip_v[0]
    elif S:
        ip_k, ip_v = torch.cat(inputs.ip_k, dim=1), torch.cat(inputs.ip_v, dim=1)
    else:
        ip_k, ip_v = k, v
    offsets = _offsets_on(lengths or (0,), device)
    slot_table = _constant(("ip_slots", ip_slots, device),
                           lambda: torch.tensor(ip_slots or (0,), dtype=torch.int32, device=device))
    jk, jv = (inputs.joint_k, inputs.joint_v) if lj else (k, v)
    bias = inputs.text_bias if inputs.text_bias is not None else placeholder
    jbias = inputs.joint_bias if inputs.joint_bias is not None else placeholder
    mask = inputs.ip_mask if inputs.ip_mask is not None else placeholder
    scale = inputs.ip_scale if S else placeholder
    qk_scale = inputs.sm_scale * LOG2E.value
    common = dict(
        BLOCK_M=config.BLOCK_M, BLOCK_D=config.BLOCK_D, EVEN_M=N % config.BLOCK_M == 0, EVEN_D=D == config.BLOCK_D,
        # Dated workaround (triton 3.6-3.9, issue 11584): bf16 tl.dot is wrong in the
        # interpreter; upcast there only, compiled kernels keep bf16 tensor-core dots.
        DOT_FP32=interpreting() and q.dtype == torch.bfloat16,
        INPUT_PRECISION="tf32" if q.dtype == torch.float32 else "ieee",
    )
    options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
    kv_strides = (*q.stride()[:3], *dout.stride()[:3], *k.stride()[:3], *v.stride()[:3], *ip_k.stride()[:3],
                  *ip_v.stride()[:3], *jk.stride()[:3], *jv.stride()[:3], *_strides(inputs.text_bias, 2),
                  *_strides(inputs.joint_bias, 2))
    launches = []
    pre_streams = S if need_ip_stats else 0
    launches.append(Launch("_bwd_preprocess", _bwd_preprocess, (num_m * B * H,), (
        q, dout, k, v, ip_k, ip_v, jk, jv, bias, jbias, offsets, lse, delta,
        N, H, D, lt, lj, pre_streams, num_m, qk_scale, *kv_strides, *lse.stride()[:3],
    ), dict(common, BLOCK_N=config.BLOCK_N, BLOCK_N_IP=config.BLOCK_N_IP, TEXT=needs.text_stream,
            HAS_TEXT_BIAS=inputs.text_bias is not None, HAS_JOINT=lj > 0, HAS_JOINT_BIAS=inputs.joint_bias is not None),
        options))

    text, joint = ranges[0], (ranges[1] if lj else None)
    need = dict(
        NEED_DQ=needs.q, NEED_DKV_TEXT=text.slot >= 0 and text.need_dkv,
        NEED_DKV_JOINT=joint is not None and joint.slot >= 0 and joint.need_dkv,
        NEED_DKV_IP=needs.any_ip_kv, NEED_DB_TEXT=text.slot >= 0 and text.need_db,
        NEED_DB_JOINT=joint is not None and joint.slot >= 0 and joint.need_db,
    )
    if needs.q or any(r.slot >= 0 for r in ranges):
        launches.append(Launch("_bwd_query_tiles", _bwd_query_tiles, (num_m * B * H,), (
            q, dout, k, v, ip_k, ip_v, jk, jv, bias, jbias, scale, mask, offsets, slot_table, lse, delta,
            dq if dq is not None else placeholder, dk_part if dk_part is not None else placeholder,
            dv_part if dv_part is not None else placeholder, db_part if db_part is not None else placeholder,
            N, H, D, lt, lj, S, num_m, max(joint.slot, 0) if joint else 0, qk_scale, inputs.sm_scale,
            *kv_strides, *_strides(scale if S else None, 2), *_strides(inputs.ip_mask, 3), *lse.stride()[:3],
            *_strides(dq, 3), *_strides(dk_part, 4),
            *_strides(db_part, 4),
        ), dict(common, BLOCK_N=config.BLOCK_N, BLOCK_N_IP=config.BLOCK_N_IP, TEXT_ONE_TILE=text.one_tile,
                JOINT_ONE_TILE=joint is not None and joint.one_tile, HAS_TEXT_BIAS=inputs.text_bias is not None,
                HAS_JOINT=lj > 0, HAS_JOINT_BIAS=inputs.joint_bias is not None,
                HAS_IP_MASK=inputs.ip_mask is not None, **need), options))

    for r in ranges:
        if r.one_tile or not (r.need_dkv or r.need_db):
            continue
        L = r.k.shape[1]
        if r.need_dkv:
            r.dk, r.dv = alloc(B, L, H, D, dtype=q.dtype), alloc(B, L, H, D, dtype=q.dtype)
        if r.need_db:
            r.db = alloc(B, H, L, dtype=f32)
        num_n = triton.cdiv(L, config.BLOCK_N_KV)
        is_ip = r.kind == "ip"
        launches.append(Launch("_bwd_key_tiles", _bwd_key_tiles, (num_n * B * H,), (
            q, dout, r.k, r.v, r.bias if r.bias is not None else placeholder, lse, delta, scale, mask,
            r.dk if r.dk is not None else placeholder, r.dv if r.dv is not None else placeholder,
            r.db if r.db is not None else placeholder,
            N, H, D, L, r.index + 1 if is_ip else 0, num_n, qk_scale, inputs.sm_scale,
            *q.stride()[:3], *dout.stride()[:3], *r.k.stride()[:3], *r.v.stride()[:3], *_strides(r.bias, 2),
            *lse.stride()[:3], *_strides(scale if S else None, 2), *_strides(inputs.ip_mask, 3),
            *_strides(r.dk, 3), *_strides(r.dv, 3), *_strides(r.db, 3),
        ), dict(BLOCK_M=config.BLOCK_M_KV, BLOCK_N=config.BLOCK_N_KV, BLOCK_D=config.BLOCK_D, IS_IP=is_ip,
                HAS_BIAS=r.bias is not None, HAS_IP_MASK=is_ip and inputs.ip_mask is not None, NEED_DKV=r.need_dkv,
                NEED_DB=r.need_db, EVEN_M=N % config.BLOCK_M_KV == 0, EVEN_D=common["EVEN_D"],
                DOT_FP32=common["DOT_FP32"], INPUT_PRECISION=common["INPUT_PRECISION"]), options))
    return BackwardPlan(config, launches, inputs, needs, ranges, dq, dk_part, dv_part, db_part, delta)


def _gather(plan: BackwardPlan) -> Grads:
    """Sum the one-tile ranges' partials over query tiles and assemble :class:`Grads`.

    One torch sum per range and buffer: deterministic, and each gradient its own tensor
    (a custom op's outputs may not alias one another)."""
    inputs, needs = plan.inputs, plan.needs
    out = {}
    for r in plan.ranges:
        lo, hi = r.slot, r.slot + r.k.shape[1]
        dk = dv = db = None
        if r.need_dkv:
            if r.one_tile:
                dk = plan.dk_part[:, :, lo:hi].sum(0).to(r.k.dtype)
                dv = plan.dv_part[:, :, lo:hi].sum(0).to(r.v.dtype)
            else:
                dk, dv = r.dk, r.dv
        if r.need_db:
            db = plan.db_part[:, :, :, lo:hi].sum((0, 2)) if r.one_tile else r.db.sum(1)
            db = db.to(r.bias.dtype)
        out[(r.kind, r.index)] = (dk, dv, db)
    text = out[("text", 0)]
    joint = out.get(("joint", 0), (None, None, None))
    grads = Grads(q=plan.dq, k=text[0], v=text[1], text_bias=text[2], joint_k=joint[0], joint_v=joint[1],
                  joint_bias=joint[2])
    S = len(inputs.ip_k)
    grads.ip_k = tuple(out[("ip", s)][0] if needs.ip_kv_of(s) else None for s in range(S))
    grads.ip_v = tuple(out[("ip", s)][1] if needs.ip_kv_of(s) else None for s in range(S))
    if S and (needs.ip_scale or needs.ip_mask):
        grads.ip_scale, grads.ip_mask = scale_and_mask_grads(inputs, plan.delta[1:], needs)
    return grads


def triton_decoupled_attention_backward(inputs: AttentionInputs, dout: torch.Tensor, needs: GradNeeds,
                                        arch: Optional[str] = None, config: Optional[BwdConfig] = None,
                                        poison: bool = False) -> Grads:
    """Gradients of the fused op (inputs must have passed ``dispatch.triton_unsupported``)."""
    if dout.stride(-1) != 1:  # e.g. the expanded ones of out.sum().backward()
        dout = dout.contiguous()
    plan = plan_backward(inputs, dout, needs, arch, config, poison)
    if inputs.q.numel():
        for launch in plan.launches:
            launch()
    return _gather(plan)
