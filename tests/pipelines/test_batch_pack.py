"""`stylize-batch --pack N`: rows with different prompts, styles and seeds share one batched call and
each row's image equals its unpacked run; negative_style and the controls are manifest fields."""
import json

import numpy as np
import pytest

from helpers.stylize import batch_args, pixels
from instantstyle.cli import main
from instantstyle.pipelines.batch import effective_settings, read_manifest
from instantstyle.pipelines.batch_cli import pack_key

ROWS = [
    {"prompt": "a dog", "style": "style.png", "content_prompt": "a cat", "name": "dog"},
    {"prompt": "a house", "style": "style2.png", "seed": 5, "negative_style": "control.png", "name": "house"},
    {"prompt": "a tree", "style": "control.png", "content_scale": 0.2, "name": "tree"},
    {"prompt": "a boat", "style": ["style.png", "style2.png"], "name": "boat"},  # 2 images: its own pack
    {"prompt": "a car", "style": "style2.png", "scale": 0.5, "name": "car"},  # another scale: its own pack
    {"prompt": "a cup", "style": "style.png", "negative_prompt": "blurry", "name": "cup"},
]


def _manifest(root, tmp_path, rows=ROWS):
    def fix(value):
        return [str(root / v) for v in value] if isinstance(value, list) else str(root / value)

    path = tmp_path / "jobs.jsonl"
    path.write_text("".join(json.dumps({k: fix(v) if k in ("style", "negative_style") else v for k, v in r.items()}) + "\n"
                            for r in rows))
    return path


def test_packed_rows_equal_their_unpacked_runs(tiny_sdxl, tmp_path):
    manifest = _manifest(tiny_sdxl, tmp_path)
    assert main(batch_args(tiny_sdxl, manifest, tmp_path / "one")) == 0
    assert main(batch_args(tiny_sdxl, manifest, tmp_path / "packed", "--pack", "4")) == 0
    packed_sizes = {}
    for row in ROWS:
        a, b = tmp_path / "one" / f"{row['name']}.png", tmp_path / "packed" / f"{row['name']}.png"
        assert np.abs(pixels(a) - pixels(b)).max() <= 1, row["name"]  # float noise, at most one 8-bit level
        one, packed = (json.loads((p.parent / (p.name + ".json")).read_text()) for p in (a, b))
        assert one["settings_hash"] == packed["settings_hash"]  # --pack is how it runs, not what
        packed_sizes[row["name"]] = packed.get("packed", 1)
    # dog, house, tree (and cup's negative prompt keeps it apart): one call of 3
    assert packed_sizes == {"dog": 3, "house": 3, "tree": 3, "boat": 1, "car": 1, "cup": 1}
    # the references are paired, not blended: rows of one pack differ from each other
    assert np.abs(pixels(tmp_path / "packed" / "dog.png") - pixels(tmp_path / "packed" / "tree.png")).max() > 2
    # resume: everything is complete, nothing runs again
    assert main(batch_args(tiny_sdxl, manifest, tmp_path / "packed", "--pack", "4")) == 0
    summary = json.loads((tmp_path / "packed" / "summary.json").read_text())
    assert summary["skipped"] == len(ROWS)


def test_a_bad_row_in_a_pack_fails_alone(tiny_sdxl, tmp_path):
    (tmp_path / "broken.png").write_bytes(b"not an image")
    rows = [dict(ROWS[0]), {"prompt": "x", "style": str(tmp_path / "broken.png"), "name": "bad"}, dict(ROWS[2])]
    manifest = _manifest(tiny_sdxl, tmp_path, rows)
    assert main(batch_args(tiny_sdxl, manifest, tmp_path / "out", "--pack", "3")) == 1
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["ok"] == 2 and [r["name"] for r in summary["failed_rows"]] == ["bad"]


def test_negative_style_and_controls_enter_the_settings_hash_only_when_set(tiny_sdxl, tmp_path):
    jobs = read_manifest(str(_manifest(tiny_sdxl, tmp_path)))
    defaults = {"negative_prompt": None, "scale": 1.0, "target": "style", "content_prompt": None, "content_scale": 0.5,
                "steps": 2, "negative_style": None}
    plain = effective_settings(jobs[0], 1, defaults)
    assert not {"weight_type", "embeds_scaling", "composition_weight", "negative_style"} & set(plain)
    with_negative = effective_settings(jobs[1], 1, defaults)
    assert with_negative["negative_style"] == str(tiny_sdxl / "control.png")
    flag = effective_settings(jobs[0], 1, dict(defaults, negative_style="/x.png", composition_weight=0.5))
    assert flag["negative_style"] == "/x.png" and flag["composition_weight"] == 0.5
    # the pack key ignores what one call can hold per row, and separates what it can't
    assert pack_key(jobs[0], plain) == pack_key(jobs[1], with_negative)
    assert pack_key(jobs[0], plain) != pack_key(jobs[4], effective_settings(jobs[4], 1, defaults))


def test_manifest_control_fields(tmp_path):
    path = tmp_path / "m.jsonl"
    rows = [{"prompt": "a", "style": "x.png", "composition_weight": -0.5, "negative_style": "n.png"},
            {"prompt": "b", "style": "x.png", "composition_weight": "nan"},
            {"prompt": "c", "style": "x.png", "negative_style": ["a.png", "b.png"]}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    jobs = read_manifest(str(path))
    assert jobs[0].error is None and jobs[0].composition_weight == -0.5
    assert jobs[0].negative_style == str(tmp_path / "n.png")
    assert "composition_weight: expected a finite number, got 'nan'" in jobs[1].error
    assert "negative_style: expected one image path, got 2" in jobs[2].error


def _weight_types():
    try:
        from instantstyle.processors.targets import weight_types
    except ImportError:
        return None
    return weight_types


@pytest.mark.skipif(_weight_types() is None,
                    reason="instantstyle.processors.targets.weight_types (WEIGHT_TYPES, EMBEDS_SCALING) is missing")
def test_unknown_control_names_fail_the_row_listing_the_valid_ones(tmp_path):
    wt = _weight_types()
    path = tmp_path / "m.jsonl"
    rows = [{"prompt": "a", "style": "x.png", "weight_type": "sideways"},
            {"prompt": "b", "style": "x.png", "embeds_scaling": "K+Q"},
            {"prompt": "c", "style": "x.png", "weight_type": wt.WEIGHT_TYPES[-1], "embeds_scaling": wt.EMBEDS_SCALING[-1]}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    jobs = read_manifest(str(path))
    assert f"weight_type: expected one of {', '.join(wt.WEIGHT_TYPES)}, got 'sideways'" in jobs[0].error
    assert f"embeds_scaling: expected one of {', '.join(wt.EMBEDS_SCALING)}, got 'K+Q'" in jobs[1].error
    assert jobs[2].error is None and jobs[2].weight_type == wt.WEIGHT_TYPES[-1]


def _loader_takes_controls():
    import inspect

    from instantstyle.loaders import load_ip_adapter

    return "weight_type" in inspect.signature(load_ip_adapter).parameters


@pytest.mark.skipif(_weight_types() is None or not _loader_takes_controls(),
                    reason="load_ip_adapter has no weight_type=/embeds_scaling= (processor/loader side) or "
                           "instantstyle.processors.targets.weight_types is missing")
def test_row_controls_apply_per_row_and_reset(tiny_sdxl, tmp_path):
    wt = _weight_types()
    rows = [{"prompt": "a dog", "style": "style.png", "name": "typed", "weight_type": wt.WEIGHT_TYPES[-1],
             "embeds_scaling": wt.EMBEDS_SCALING[-1]},
            {"prompt": "a dog", "style": "style.png", "name": "plain"}]
    manifest = _manifest(tiny_sdxl, tmp_path, rows)
    assert main(batch_args(tiny_sdxl, manifest, tmp_path / "out", "--pack", "2")) == 0
    typed, plain = (json.loads((tmp_path / "out" / f"{n}.png.json").read_text()) for n in ("typed", "plain"))
    assert typed["controls"] == {"weight_type": wt.WEIGHT_TYPES[-1], "embeds_scaling": wt.EMBEDS_SCALING[-1]}
    assert plain["controls"] == {} and plain["target"] == "style"  # the next row does not inherit them
    assert typed["settings"]["weight_type"] == wt.WEIGHT_TYPES[-1] and "weight_type" not in plain["settings"]
    assert typed.get("packed", 1) == plain.get("packed", 1) == 1  # other controls: not one call
