"""Tile configurations of the fused kernel: per-arch tables, selection, and work accounting.

Pure Python (no Triton, no tensors), so the dispatch, ``instantstyle info`` and the
compile report can reason about a GPU that is not present.

Three kinds of launch, chosen per call from the key lengths:

* ``single``: every key (Lt text + Lj joint + sum of L_i IP tokens) fits ONE key tile:
  one QK^T, a segmented softmax, one PV (77 text + 4 or 16 IP tokens: the SDXL case).
* ``short`` / ``long``: the multi-tile path; text keys are walked in BLOCK_N steps and
  each IP stream in BLOCK_N_IP steps (16 when every stream has <= 16 tokens).

Where the numbers come from: ``_SPILL_FREE`` was found by compiling candidates from large
to small with ``compile_report.search`` and keeping the first that has no local memory
and uses tensor cores (``instantstyle compile-report`` re-checks every entry, compiled with
the launcher's own specialisation).  ``instantstyle tune`` measures tiles on a GPU and
writes a JSON table (:data:`TUNED_DIR` in the package, or ``$INSTANTSTYLE_TUNED_DIR``);
a measured entry overrides the spill-free one for its (arch, dtype, head-dim bucket,
key-length bucket).
"""
from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from typing import Optional, Sequence

#: Arches with a tile table.  sm_86/sm_89 (RTX 3090/4090, A10, L4, L40) allow ~100 KB of
#: shared memory per block, sm_80 164 KB, sm_90 and sm_100 228 KB (opt-in maxima, bytes).
SHARED_LIMIT = {"sm_80": 163 * 1024, "sm_86": 99 * 1024, "sm_89": 99 * 1024, "sm_90": 227 * 1024, "sm_100": 227 * 1024}
ARCHS = tuple(SHARED_LIMIT)
#: IP streams no longer than this use 16-key steps, so 4/16-token streams don't pay for 64.
SHORT_STREAM = 16
HEAD_DIM_BUCKETS = (16, 32, 64, 128, 256)
#: Measured tables shipped with the package (written by ``instantstyle tune --out``).
TUNED_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tuned")


@dataclass(frozen=True)
class KernelConfig:
    """One compiled specialisation's tile constexprs and launch options."""

    BLOCK_M: int
    BLOCK_N: int  # text keys per step; in the single-tile path, the whole key tile
    BLOCK_N_IP: int  # IP keys per step (multi-tile path only)
    BLOCK_D: int
    num_warps: int
    num_stages: int
    SINGLE_TILE: bool = False

    @property
    def name(self) -> str:
        kind = "one" if self.SINGLE_TILE else "nip" + str(self.BLOCK_N_IP)
        return f"m{self.BLOCK_M}_n{self.BLOCK_N}_{kind}_d{self.BLOCK_D}_w{self.num_warps}_s{self.num_stages}"


def next_power_of_2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def head_dim_bucket(head_dim: int) -> int:
    """Head dim padded to a power of two, at least 16 (tl.dot's minimum K)."""
    return max(16, next_power_of_2(head_dim))


# (BLOCK_M, BLOCK_N, BLOCK_N_IP, num_warps, num_stages) for "short"/"long",
# (BLOCK_M, BLOCK_N, num_warps, num_stages) for "single" (None: no single-tile path).
# Findings (triton 3.9, 2026-11, compile report with the launcher's specialisation and a
# "full" call: biases, joint keys, IP masks, padded head dim): 128-query tiles need 8 warps;
# mma.sync (sm_8x) keeps operands in registers, so D=256 only fits 16x16 tiles there and
# the 128-key single tile fits 16-64 queries (none at D=128 or in fp32), while Hopper's wgmma
# reads operands from shared memory and takes 64-128 queries.  sm_86/sm_89 (~100 KB of
# shared memory) get their own entries where sm_80's spilled or overflowed.
_WIDE = {"short": (128, 64, 16, 8, 2), "long": (128, 64, 64, 8, 2)}
_ONE_128, _ONE_64 = (128, 128, 8, 1), (64, 128, 8, 1)
_SPILL_FREE = {
    ("sm_90", "half"): {
        16: dict(_WIDE, single=_ONE_128), 32: dict(_WIDE, single=_ONE_128), 64: dict(_WIDE, single=_ONE_64),
        128: {"short": (128, 32, 16, 8, 1), "long": (128, 32, 32, 8, 1), "single": _ONE_128},
        256: {"short": (64, 32, 16, 8, 1), "long": (64, 32, 16, 8, 1), "single": None},
    },
    ("sm_90", "fp32"): {
        16: dict(_WIDE, single=_ONE_128), 32: dict(_WIDE, single=_ONE_128),
        64: {"short": (128, 64, 16, 8, 1), "long": (128, 64, 64, 8, 1), "single": None},
        128: {"short": (128, 32, 16, 8, 1), "long": (64, 32, 32, 4, 1), "single": None},
        256: {"short": (16, 16, 16, 4, 1), "long": (16, 16, 16, 4, 1), "single": None},
    },
    ("sm_80", "half"): {
        16: {"short": (128, 64, 16, 8, 2), "long": (128, 64, 64, 8, 1), "single": (64, 128, 4, 1)},
        32: {"short": (64, 32, 16, 4, 1), "long": (128, 64, 64, 8, 2), "single": (16, 128, 4, 1)},
        64: dict(_WIDE, single=(32, 128, 4, 1)),
        128: {"short": (128, 64, 16, 8, 1), "long": (128, 64, 32, 8, 1), "single": None},
        256: {"short": (16, 16, 16, 4, 1), "long": (16, 16, 16, 4, 1), "single": None},
    },
    ("sm_80", "fp32"): {
        16: {"short": (128, 64, 16, 8, 1), "long": (128, 64, 64, 8, 2), "single": None},
        32: {"short": (128, 64, 16, 8, 2), "long": (128, 64, 64, 8, 1), "single": None},
        64: {"short": (128, 64, 16, 8, 2), "long": (128, 64, 64, 8, 1), "single": None},
        128: {"short": (128, 64, 16, 8, 1), "long": (128, 64, 32, 8, 1), "single": None},
        256: {"short": (16, 16, 16, 2, 1), "long": (16, 16, 16, 2, 1), "single": None},
    },
    # ~100 KB of shared memory; ptxas allocates differently from sm_80 (sm_89 = sm_86 here).
    ("sm_86", "half"): {
        16: {"short": (128, 64, 16, 8, 2), "long": (64, 64, 64, 4, 1), "single": (64, 128, 4, 1)},
        32: {"short": (64, 64, 16, 4, 1), "long": (128, 64, 64, 8, 2), "single": (16, 128, 4, 1)},
        64: dict(_WIDE, single=(32, 128, 8, 1)),
        128: {"short": (128, 64, 16, 8, 1), "long": (128, 64, 32, 8, 1), "single": None},
        256: {"short": (16, 16, 16, 2, 1), "long": (16, 16, 16, 2, 1), "single": None},
    },
    ("sm_86", "fp32"): {
        16: {"short": (128, 64, 16, 8, 1), "long": (128, 64, 64, 8, 2), "single": None},
        32: {"short": (128, 64, 16, 8, 2), "long": (128, 64, 64, 8, 1), "single": None},
        64: {"short": (128, 64, 16, 8, 2), "long": (128, 64, 64, 8, 1), "single": None},
        128: {"short": (32, 32, 16, 4, 1), "long": (32, 32, 32, 4, 1), "single": None},
        256: {"short": (16, 16, 16, 4, 1), "long": (16, 16, 16, 4, 1), "single": None},
    },
}
_SPILL_FREE[("sm_89", "half")], _SPILL_FREE[("sm_89", "fp32")] = _SPILL_FREE[("sm_86", "half")], _SPILL_FREE[("sm_86", "fp32")]
# sm_100 (tcgen05): sm_90's tiles, with 64-query single tiles where 128 spilled.
_SPILL_FREE[("sm_100", "half")] = {bd: dict(e, single=_ONE_64 if e["single"] else None) for bd, e in _SPILL_FREE[("sm_90", "half")].items()}
_SPILL_FREE[("sm_100", "fp32")] = {bd: dict(e, single=_ONE_64 if e["single"] else None) for bd, e in _SPILL_FREE[("sm_90", "fp32")].items()}


def dtype_class(dtype_name: str) -> str:
    return "fp32" if dtype_name == "float32" else "half"


def arch_for_capability(major: int, minor: int) -> str:
    """The tile table a compute capability uses (the nearest one it can run)."""
    if major >= 12:  # consumer Blackwell: ~100 KB of shared memory, mma.sync like sm_89
        return "sm_89"
    if major >= 10:
        return "sm_100"
    if major == 9:
        return "sm_90"
    if (major, minor) >= (8, 9):
        return "sm_89"
    if (major, minor) >= (8, 6):
        return "sm_86"
    return "sm_80"


def key_length_bucket(total_keys: int) -> int:
    """Key-length bucket of the tuned tables: the next power of two, at least 64."""
    return max(64, next_power_of_2(total_keys))


@functools.lru_cache(maxsize=None)
def _tuned_tables() -> dict:
    """{(arch, dtype_name, block_d, keys_bucket, kind): KernelConfig} from every tuned JSON table.

    Package tables load first, then ``$INSTANTSTYLE_TUNED_DIR`` (a user's own ``tune`` run wins).
    """
    found = {}
    for folder in (TUNED_DIR, os.environ.get("INSTANTSTYLE_TUNED_DIR", "")):
        if not folder or not os.path.isdir(folder):
            continue
        for name in sorted(os.listdir(folder)):
            if name.endswith(".json"):
                with open(os.path.join(folder, name), encoding="utf-8") as f:
                    table = json.load(f)
                for e in table.get("tiles", []):
                    key = (e["arch"], e["dtype"], e["block_d"], e["keys_bucket"], e["kind"])
                    found[key] = KernelConfig(**e["config"])
    return found


def reload_tuned() -> None:
    """Forget the cached tuned tables (after ``instantstyle tune`` wrote a new one)."""
    _tuned_tables.cache_clear()
    measured_wins.cache_clear()


def launch_kind(config_table: dict, lt: int, lj: int, ip_lens: Sequence[int]) -> str:
    """``single`` when every key fits the arch's single tile, else ``short``/``long``."""
    single = config_table.get("single")
    if single is not None and lt + lj + sum(ip_lens) <= single[1]:
        return "single"
    return "short" if max(ip_lens, default=1) <= SHORT_STREAM else "long"


def kernel_config(head_dim: int, lt: int, lj: int = 0, ip_lens: Sequence[int] = (), dtype_name: str = "float16",
                  arch: str = "sm_90", tuned: bool = True) -> KernelConfig:
    """The tile configuration the launcher uses for these sizes on ``arch``."""
    if arch not in ARCHS:
        raise ValueError(f"arch: expected one of {', '.join(ARCHS)}, got {arch!r}")
    block_d = head_dim_bucket(head_dim)
    table = _SPILL_FREE[(arch, dtype_class(dtype_name))][block_d]
    kind = launch_kind(table, lt, lj, ip_lens)
    if tuned:
        hit = _tuned_tables().get((arch, dtype_name, block_d, key_length_bucket(lt + lj + sum(ip_lens)), kind))
        if hit is not None:
            return hit
    if kind == "single":
        bm, bn, warps, stages = table["single"]
        return KernelConfig(bm, bn, bn, block_d, warps, stages, SINGLE_TILE=True)
    bm, bn, bn_ip, warps, stages = table[kind]
    return KernelConfig(bm, bn, bn_ip, block_d, warps, stages)


def spill_free_configs(dtype_name: str, arch: str) -> list:
    """Every spill-free-table specialisation the launcher can pick for a dtype on an arch."""
    configs = []
    for block_d in HEAD_DIM_BUCKETS:
        table = _SPILL_FREE[(arch, dtype_class(dtype_name))][block_d]
        shapes = [(300, (4,)), (77, (257,))] + ([(1, (1,))] if table.get("single") else [])  # short, long, single
        for lt, ip in shapes:
            cfg = kernel_config(block_d, lt, 0, ip, dtype_name, arch, tuned=False)
            if cfg not in configs:
                configs.append(cfg)
    return configs


def all_kernel_configs(dtype_name: str, arch: str) -> list:
    """Spill-free configs plus every tuned one for this arch and dtype."""
    configs = spill_free_configs(dtype_name, arch)
    for (a, dt, *_), cfg in sorted(_tuned_tables().items(), key=lambda kv: str(kv[0])):
        if a == arch and dt == dtype_name and cfg not in configs:
            configs.append(cfg)
    return configs


# --------------------------------------------------------------------------- work accounting


def issued_key_columns(cfg: KernelConfig, lt: int, lj: int, ip_lens: Sequence[int]) -> dict:
    """Key columns of QK^T and of PV that one query row computes with this tiling.

    Padding to the tile width counts, and so does the IP path's second QK^T pass.
    """
    def padded(n, step):
        return -(-n // step) * step if n else 0

    if cfg.SINGLE_TILE:
        return {"qk": cfg.BLOCK_N, "pv": cfg.BLOCK_N}
    text = padded(lt, cfg.BLOCK_N) + padded(lj, cfg.BLOCK_N)
    ip = sum(padded(n, cfg.BLOCK_N_IP) for n in ip_lens)
    return {"qk": text + 2 * ip, "pv": text + ip}


def mac_count(cfg: KernelConfig, shape: Sequence[int], lj: int, ip_lens: Sequence[int]) -> dict:
    """Issued vs useful multiply-accumulates of one launch.

    useful = B*N*H * D * 2 * (Lt + Lj + sum L_i)   (one QK^T and one PV MAC per key and dim)
    issued = B*N_pad*H * BLOCK_D * (QK^T columns + PV columns) of the tiling
    """
    B, N, H, D, lt = shape
    cols = issued_key_columns(cfg, lt, lj, ip_lens)
    n_pad = -(-N // cfg.BLOCK_M) * cfg.BLOCK_M
    useful = B * N * H * D * 2 * (lt + lj + sum(ip_lens))
    issued = B * n_pad * H * cfg.BLOCK_D * (cols["qk"] + cols["pv"])
    return {"issued": issued, "useful": useful, "ratio": round(issued / useful, 3) if useful else None,
            "qk_columns": cols["qk"], "pv_columns": cols["pv"], "useful_columns": lt + lj + sum(ip_lens)}


# --------------------------------------------------------------------------- measured dispatch wins


@functools.lru_cache(maxsize=None)
def measured_wins() -> dict:
    """{(arch, dtype_name, case, block_d, keys_bucket): triton_ms / sdpa_ms} from tuned tables.

    ``case`` is ``plain`` (no IP stream, no joint keys) or ``long`` (long keys).  Empty
    until ``instantstyle tune`` has run on a GPU of that arch.
    """
    found = {}
    for folder in (TUNED_DIR, os.environ.get("INSTANTSTYLE_TUNED_DIR", "")):
        if not folder or not os.path.isdir(folder):
            continue
        for name in sorted(os.listdir(folder)):
            if name.endswith(".json"):
                with open(os.path.join(folder, name), encoding="utf-8") as f:
                    for e in json.load(f).get("dispatch", []):
                        found[(e["arch"], e["dtype"], e["case"], e["block_d"], e["keys_bucket"])] = e["triton_over_sdpa"]
    return found


def measured_ratio(arch: Optional[str], dtype_name: str, case: str, head_dim: int, total_keys: int) -> Optional[float]:
    """Recorded triton/SDPA time ratio for this class of call on ``arch``, or None."""
    if arch is None:
        return None
    return measured_wins().get((arch, dtype_name, case, head_dim_bucket(head_dim), key_length_bucket(total_keys)))
