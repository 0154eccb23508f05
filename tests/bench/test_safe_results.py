"""Issue 12: the bench keeps prior results, fails fast on bad arguments, and explains its output."""
import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402

from instantstyle.bench import plot as PL  # noqa: E402
from instantstyle.bench import results as R  # noqa: E402
from instantstyle.bench.suites import add_speedups  # noqa: E402
from instantstyle.cli import main  # noqa: E402

SMALL = ["bench", "--suite", "kernel", "--quick", "--shape", "sd15-256x8-d40-two-adapters", "--provider", "ours-torch"]


def test_corrupt_and_truncated_lines_are_skipped_with_a_warning_and_new_rows_stay_whole(tmp_path):
    path = tmp_path / "cpu.jsonl"
    path.write_text('{"run_id": "old", "x": 1}\nnot json at all\n{"run_id": "old", "x": 2}\n{"run_id": "cut", "x"')
    R.append_jsonl(path, [{"run_id": "new", "x": 3}, {"run_id": "new", "x": 4}])
    warnings = []
    rows = R.read_jsonl(path, warn=warnings.append)
    assert [r["x"] for r in rows] == [1, 2, 3, 4]  # the truncated line did not swallow the new first row
    assert len(warnings) == 1 and "skipped 2 unreadable line(s) (2, 4)" in warnings[0]
    assert R.read_jsonl(path, run_id="new") == [{"run_id": "new", "x": 3}, {"run_id": "new", "x": 4}]
    assert path.read_text().startswith('{"run_id": "old", "x": 1}\nnot json at all\n')  # prior data untouched


def test_a_run_over_a_damaged_results_file_completes_and_keeps_prior_rows(tmp_path, capsys):
    results = tmp_path / "res"
    assert main([*SMALL, "--results-dir", str(results)]) == 0
    jsonl = next(results.glob("*.jsonl"))
    first = jsonl.read_text()
    jsonl.write_text(first + "{garbage\n" + first.splitlines()[0][:40])  # a corrupt line and a cut-off last line
    capsys.readouterr()
    assert main([*SMALL, "--json", "--results-dir", str(results)]) == 0
    out, err = capsys.readouterr()
    rows = json.loads(out)
    assert rows and {r["run_id"] for r in rows} == {rows[0]["run_id"]}
    assert "skipped 2 unreadable line(s)" in err
    assert jsonl.read_text().startswith(first)
    assert len(R.read_jsonl(jsonl)) == 2 * len(rows)  # both runs, whole


def test_unwritable_results_dir_fails_before_timing(tmp_path, capsys, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    import instantstyle.bench.suites as suites

    monkeypatch.setattr(suites, "load_suite", lambda name: pytest.fail("timed although the results dir is unusable"))
    assert main([*SMALL, "--results-dir", str(blocker / "sub")]) == 2
    err = capsys.readouterr().err
    assert "instantstyle: error: --results-dir" in err and "not writable" in err and "Traceback" not in err


def test_quick_only_shape_without_quick_is_an_error_and_writes_nothing(tmp_path, capsys):
    assert main(["bench", "--suite", "kernel", "--shape", "sd15-256x8-d40-two-adapters", "--results-dir", str(tmp_path)]) == 2
    assert "matches only --quick cases; add --quick" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # no empty markdown replacing a real report


def test_unet_suite_with_a_kernel_shape_is_an_error_not_a_lone_baseline(tmp_path, capsys):
    assert main(["bench", "--suite", "unet", "--shape", "sdxl-4096x10", "--results-dir", str(tmp_path)]) == 2
    assert "matches no case of the unet suite" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_unet_plan_keeps_no_ip_only_with_an_ip_case():
    from instantstyle.bench.suite_unet import UNetSuite
    from instantstyle.bench.suites import Context

    import torch

    ctx = Context(device=torch.device("cpu"), dtypes=[torch.float32], quick=True, shape_filter=["style+layout"])
    assert {c for c, _ in UNetSuite()._plan(ctx)} == {"no-ip", "style+layout"}
    ctx.shape_filter = ["sdxl-4096x10"]
    assert UNetSuite()._plan(ctx) == []


def _row(case, provider, ms, baseline=False, suite="unet"):
    return {"suite": suite, "case": case, "provider": provider, "baseline": baseline, "dtype": "float32",
            "status": "ok", "ms": ms, "ms_p20": ms * 0.9, "ms_p80": ms * 1.2, "shape_desc": "tiny"}


def test_no_ip_is_a_reference_never_a_speedup():
    rows = [_row("c", "diffusers", 2.0, True, "processor"), _row("c", "fused", 1.0, suite="processor"),
            _row("c", "no-ip", 0.5, suite="processor")]
    add_speedups(rows)
    assert rows[1]["speedup"] == pytest.approx(2.0) and rows[2]["speedup"] is None
    text = R.render_text(rows, [])
    assert "500.0 us (reference)" in text and "(4.00x)" not in text
    assert "no-ip: no IP-Adapter at all" in text and "fused: our fused processor as a drop-in" in text


def test_unet_plot_has_a_legend_distinct_colours_error_bars_and_a_reference_line():
    rows = [_row("no-ip", "diffusers", 1.0, True)]
    for case in ("style", "all-blocks"):
        rows += [_row(case, "diffusers", 2.0, True), _row(case, "fused", 1.5), _row(case, "fused-targeted", 1.2)]
    fig, ax = plt.subplots()
    PL._unet_panel(ax, rows)
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert set(labels) >= {"diffusers", "fused", "fused-targeted"} and any("(reference)" in t for t in labels)
    bars = [c for c in ax.containers if hasattr(c, "patches")]
    assert len(bars) == 3 and all(c.errorbar is not None for c in bars)  # p20-p80
    colours = {tuple(c.patches[0].get_facecolor()) for c in bars}
    assert len(colours) == 3
    assert sum(len(c.patches) for c in bars) == 6  # no bar for no-ip
    plt.close(fig)


def test_speedup_plot_error_bars_come_from_p20_p80():
    row = dict(_row("c", "fused", 1.0, suite="processor"), speedup=2.0)
    down, up = PL._speedup_errors(row, "ms")
    assert down == pytest.approx(2.0 - 2.0 / 1.2) and up == pytest.approx(2.0 / 0.9 - 2.0)


def test_piped_into_head_is_not_an_error(monkeypatch, capsys):
    """`instantstyle bench --list | head -1`: the reader leaves; no traceback, exit 0."""
    with capsys.disabled():
        read_end, write_end = os.pipe()
        os.close(read_end)  # the reader is gone
        closed = os.fdopen(write_end, "w", buffering=1)
        monkeypatch.setattr("sys.stdout", closed)
        assert main(["bench", "--list"]) == 0
        monkeypatch.undo()
        closed.close()
