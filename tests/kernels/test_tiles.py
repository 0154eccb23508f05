"""Every tile configuration, both kernel paths, multi-tile N and odd sizes, run through the
interpreter against the float64 reference into NaN-poisoned outputs."""
import pytest
import torch

from instantstyle.kernels import check_close, normalize_inputs, reference_decoupled_attention
from instantstyle.kernels.tiles import ARCHS, all_kernel_configs, kernel_config, mac_count
from instantstyle.kernels.triton_decoupled import _CONSTANTS, _offsets_on, launch_plan, triton_decoupled_attention

from helpers.kernel_cases import make_case

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
TORCH_NAME = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
_PADDED = {16: 8, 32: 24, 64: 40, 128: 80, 256: 160}


def _run(kwargs, dtype_name, **launch):
    inputs = normalize_inputs(**kwargs)
    poisoned = torch.full(inputs.q.shape, float("nan"), dtype=inputs.q.dtype)
    out = triton_decoupled_attention(inputs, out=poisoned, **launch)
    assert out is poisoned
    check_close(out, reference_decoupled_attention(inputs), dtype_name)
    return inputs, out


def _case_for(cfg, dtype, full):
    """A small call that fits ``cfg``: two query tiles (the second ragged when ``full``)."""
    D = _PADDED[cfg.BLOCK_D] if full else cfg.BLOCK_D
    N = cfg.BLOCK_M + (3 if full else cfg.BLOCK_M)
    if cfg.SINGLE_TILE:
        lt, joint, ip = (cfg.BLOCK_N - 20, 7, (4, 9)) if full else (77, 0, (4,))
    else:
        lt, joint, ip = (78, 33, (5, cfg.BLOCK_N_IP + 3)) if full else (cfg.BLOCK_N + 13, 0, (cfg.BLOCK_N_IP + 1,))
    extras = dict(masks=True, bias="bool", joint=joint, joint_bias="additive") if full else {}
    return make_case(1, N, 1, D, lt, ip, dtype, **extras)


def _unique_configs():
    seen = []
    for arch in ARCHS:
        for dtype_name in DTYPES:
            for cfg in all_kernel_configs(TORCH_NAME[dtype_name], arch):
                if (dtype_name, cfg) not in seen:
                    seen.append((dtype_name, cfg))
    return seen


@pytest.mark.slow  # every tile table entry in the interpreter
@pytest.mark.parametrize("full", [False, True], ids=["plain", "full"])
@pytest.mark.parametrize("dtype_name, cfg", _unique_configs(), ids=lambda x: x if isinstance(x, str) else x.name)
def test_every_tile_table_entry_matches_reference(dtype_name, cfg, full):
    kwargs = _case_for(cfg, DTYPES[dtype_name], full)
    inputs = normalize_inputs(**kwargs)
    plan = launch_plan(inputs, torch.empty_like(inputs.q), config=cfg)
    assert plan.constexprs["EVEN_M"] is not full and plan.constexprs["EVEN_D"] is not full  # both flag values run
    _run(kwargs, dtype_name, config=cfg)


@pytest.mark.parametrize("arch", ARCHS)
def test_arch_override_launches_that_arch_config(arch):
    kwargs = make_case(1, 131, 2, 64, 77, (4,), torch.float16)
    inputs = normalize_inputs(**kwargs)
    plan = launch_plan(inputs, torch.empty_like(inputs.q), arch=arch)
    assert plan.config == kernel_config(64, 77, 0, (4,), "float16", arch)
    _run(kwargs, "fp16", arch=arch)


# (id, B, N, H, D, Lt, ip_lens, extras): N past one query tile, odd sizes, both paths.
ODD_CASES = [
    ("n259_single", 1, 259, 2, 64, 78, (4,), {}),
    ("n300_single_masked_bias", 2, 300, 1, 40, 78, (4, 16), {"masks": True, "bias": "additive"}),
    ("n259_multi_lt78_long_ip", 1, 259, 1, 64, 78, (60,), {}),
    ("n300_multi_joint", 1, 300, 2, 80, 78, (4,), {"joint": 90, "joint_bias": "bool"}),
    ("n300_multi_three_streams", 2, 300, 1, 24, 150, (4, 257, 16), {"masks": True}),
]


@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("case", ODD_CASES, ids=[c[0] for c in ODD_CASES])
def test_multi_tile_n_and_odd_sizes(case, dtype_name):
    name, B, N, H, D, lt, ip, extras = case
    kwargs = make_case(B, N, H, D, lt, ip, DTYPES[dtype_name], **extras)
    inputs = normalize_inputs(**kwargs)
    # fp32 has no single-tile entry at every head dim: force the half-precision one there
    config = kernel_config(D, lt, 0, ip, "float16", "sm_90") if "single" in name else None
    plan = launch_plan(inputs, torch.empty_like(inputs.q), config=config)
    assert plan.config.SINGLE_TILE == ("single" in name)
    assert plan.grid[0] >= 2 * B * H  # more than one query tile per (batch, head)
    _run(kwargs, dtype_name, config=config)


def test_single_tile_and_multi_tile_paths_agree():
    kwargs = make_case(2, 70, 2, 64, 77, (4, 16), torch.float32, masks=True, bias="bool", scales=[torch.tensor([0.0, 1.3]), 0.6])
    inputs = normalize_inputs(**kwargs)
    single = kernel_config(64, 77, 0, (4, 16), "float16", "sm_90")  # tiles only; the interpreter runs fp32 dots
    multi = kernel_config(64, 77, 0, (257,), "float16", "sm_90")
    assert single.SINGLE_TILE and not multi.SINGLE_TILE
    a = triton_decoupled_attention(inputs, config=single)
    b = triton_decoupled_attention(inputs, config=multi)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    check_close(a, reference_decoupled_attention(inputs), "fp32")


def test_single_tile_config_refuses_keys_that_do_not_fit():
    kwargs = make_case(1, 8, 1, 64, 120, (16,), torch.float32)
    single = kernel_config(64, 77, 0, (4,), "float16", "sm_90")
    with pytest.raises(ValueError, match=r"config: single tile of 128 keys, got 136 keys"):
        triton_decoupled_attention(normalize_inputs(**kwargs), config=single)


def test_headline_shape_mac_ratio_within_target():
    """77 text + 4 IP keys: issued/useful <= 1.6 on every arch (it was 1.88 before the single tile)."""
    for arch in ARCHS:
        for dtype_name in ("float16", "bfloat16"):
            cfg = kernel_config(64, 77, 0, (4,), dtype_name, arch)
            macs = mac_count(cfg, (2, 4096, 10, 64, 77), 0, (4,))
            assert cfg.SINGLE_TILE and macs["ratio"] <= 1.6, (arch, cfg.name, macs)
            assert macs["useful"] == 2 * 4096 * 10 * 64 * 2 * 81


def test_multi_tile_mac_accounting_counts_padding_and_the_second_ip_pass():
    cfg = kernel_config(64, 77, 0, (257,), "float16", "sm_90")
    macs = mac_count(cfg, (1, 128, 1, 64, 77), 0, (257,))
    text = -(-77 // cfg.BLOCK_N) * cfg.BLOCK_N
    ip = -(-257 // cfg.BLOCK_N_IP) * cfg.BLOCK_N_IP
    assert (macs["qk_columns"], macs["pv_columns"]) == (text + 2 * ip, text + ip)


def test_grid_is_one_axis_so_batch_times_heads_can_pass_65535():
    q = torch.empty(4096, 1, 32, 64, device="meta", dtype=torch.float16)  # B*H = 131072 > 65535
    k = torch.empty(4096, 77, 32, 64, device="meta", dtype=torch.float16)
    inputs = normalize_inputs(q, k, k, [k[:, :4]], [k[:, :4]])
    plan = launch_plan(inputs, torch.empty_like(q))
    assert len(plan.grid) == 1 and plan.grid[0] == 4096 * 32
    # ...and the kernel decodes (tile, batch, head) from that one axis correctly:
    kwargs = make_case(3, 40, 5, 16, 7, (4,), torch.float32)
    _run(kwargs, "fp32")


def test_device_constants_are_never_evicted():
    """A captured CUDA graph keeps raw pointers: the offsets table must outlive any LRU."""
    first = _offsets_on((4,), torch.device("cpu"))
    for n in range(200):  # more distinct tables than the old LRU (64) held
        _offsets_on((n + 1, 3), torch.device("cpu"))
    assert _offsets_on((4,), torch.device("cpu")) is first
    assert sum(1 for key in _CONSTANTS if key[0] == "offsets") >= 201
