"""`instantstyle stylize-batch`: 1 vs 2 processes (torchrun, gloo, CPU) give the same images; a killed
run resumes without duplicates or partial files; a bad row is reported and the run goes on."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from helpers.stylize import batch_args, pixels
from instantstyle.cli import main
from instantstyle.pipelines.batch import read_manifest, row_seed

ROWS = [
    {"prompt": "a dog", "style": "style.png", "content_prompt": "a cat", "name": "dog"},
    {"prompt": "a house", "style": ["style.png", "style2.png"], "seed": 5, "scale": 0.5},
    {"prompt": "a tree", "style": "style2.png", "target": "style+layout"},
    {"prompt": "a boat", "style": "style.png", "name": "boat", "content_scale": 0.2},
]


def _manifest(root, tmp_path, rows=ROWS, name="jobs.jsonl"):
    path = tmp_path / name
    # styles are relative to the manifest: point them at the fixture's images
    fixed = [dict(r, style=[str(root / s) for s in r["style"]] if isinstance(r["style"], list) else str(root / r["style"]))
             for r in rows]
    path.write_text("".join(json.dumps(r) + "\n" for r in fixed))
    return path


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def _torchrun(n, args, **kwargs):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(n), "--master-port", str(29500 + os.getpid() % 1000),
           "-m", "instantstyle", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=300, **kwargs)


def test_manifest_rules(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text('prompt,style,seed,name,target\n"a, b",x.png|y.png,3,n1,"[""up_blocks.0""]"\nno style,,,\n')
    jobs = read_manifest(str(path))
    assert jobs[0].style == [str(tmp_path / "x.png"), str(tmp_path / "y.png")] and jobs[0].seed == 3
    assert jobs[0].target == ["up_blocks.0"] and jobs[0].prompt == "a, b" and jobs[0].error is None
    assert "style: expected a path" in jobs[1].error and jobs[1].name == "1"
    assert row_seed(jobs[0], 100) == 3 and row_seed(jobs[1], 100) == 101  # independent of the process
    dup = tmp_path / "d.jsonl"
    dup.write_text('{"prompt": "a", "style": "s", "name": "x"}\n{"prompt": "b", "style": "s", "name": "x"}\n')
    first, second = read_manifest(str(dup))  # a duplicate fails the later row only, never the whole run
    assert first.error is None and first.name == "x"
    assert "row 0 already writes" in second.error and second.name == "row-1" and not second.writes_files


@pytest.mark.slow
def test_one_process_then_two_processes_same_images_and_a_bad_row_is_not_fatal(tiny_sdxl, tmp_path, capsys):
    rows = ROWS + [{"prompt": "broken", "style": "missing.png", "name": "bad"}, "not json"]
    manifest = _manifest(tiny_sdxl, tmp_path, [r for r in rows if isinstance(r, dict)])
    with open(manifest, "a") as f:
        f.write("{not json\n")
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(batch_args(tiny_sdxl, manifest, one)) == 1  # failed rows: exit 1, after every other row ran
    err = capsys.readouterr().err
    assert "4 written, 0 already complete, 2 failed" in err and "missing.png" in err
    summary = json.loads((one / "summary.json").read_text())
    assert [r["name"] for r in summary["failed_rows"]] == ["bad", "5"]
    assert "not JSON" in summary["failed_rows"][1]["reason"]
    assert (one / "bad.png.error.json").exists() and not (one / "bad.png").exists()

    start = time.perf_counter()
    proc = _torchrun(2, batch_args(tiny_sdxl, manifest, two))
    seconds = time.perf_counter() - start
    assert proc.returncode != 0  # a row failed (exit 1 on rank 0)
    summary2 = json.loads((two / "summary.json").read_text())
    assert summary2["processes"] == 2 and summary2["ok"] == 4 and summary2["failed"] == 2
    assert {r["rank"] for r in summary2["results"]} == {0, 1}
    for name in ("dog", "1", "2", "boat"):
        assert np.array_equal(pixels(one / f"{name}.png"), pixels(two / f"{name}.png")), name
        record = json.loads((two / f"{name}.png.json").read_text())
        assert record["status"] == "ok" and record["seed"] == json.loads((one / f"{name}.png.json").read_text())["seed"]
    assert json.loads(Image.open(two / "dog.png").text["instantstyle"])["prompt"] == "a dog"
    print(f"2-process run: {seconds:.1f} s")

    # a second run skips what is complete
    assert main(batch_args(tiny_sdxl, manifest, one)) == 1
    assert "0 written, 4 already complete, 2 failed" in capsys.readouterr().err


@pytest.mark.slow
def test_killed_run_resumes_without_duplicates_or_partials(tiny_sdxl, tmp_path):
    rows = [{"prompt": f"thing {i}", "style": "style.png"} for i in range(6)]
    manifest, out = _manifest(tiny_sdxl, tmp_path, rows), tmp_path / "out"
    args = batch_args(tiny_sdxl, manifest, out)
    args[args.index("--steps") + 1] = "6"  # slow enough to be killed midway
    proc = subprocess.Popen([sys.executable, "-m", "instantstyle", *args], env=_env(), stderr=subprocess.DEVNULL)
    # pathlib's "*" also matches a temporary ".instantstyle-tmp-...-0.png.json": count real sidecars only
    sidecars = lambda: {p.name for p in out.glob("*.png.json") if not p.name.startswith(".")}  # noqa: E731
    deadline = time.time() + 120
    while time.time() < deadline and not (out.exists() and sidecars()):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = sidecars()
    assert 0 < len(done_before) < 6, done_before  # killed midway
    assert main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["ok"] + summary["skipped"] == 6 and summary["skipped"] >= len(done_before)
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted([f"{i}.png" for i in range(6)] + [f"{i}.png.json" for i in range(6)] + ["summary.json"])
    for i in range(6):
        Image.open(out / f"{i}.png").load()  # whole files only


def test_an_image_row_with_a_per_block_scale_list_fails_alone(tiny_sdxl, tmp_path):
    """Lists are video rows' per-block scales; an image row says so, and the run goes on."""
    rows = [{"prompt": "a dog", "style": "style.png", "name": "listed", "scale": [1, 0]},
            {"prompt": "a dog", "style": "style.png", "name": "plain", "scale": 0.5}]
    out = tmp_path / "out"
    assert main(batch_args(tiny_sdxl, _manifest(tiny_sdxl, tmp_path, rows), out)) == 1
    results = {r["name"]: r for r in json.loads((out / "summary.json").read_text())["results"]}
    assert results["plain"]["status"] == "ok" and (out / "plain.png").exists()
    assert results["listed"]["status"] == "failed" and not (out / "listed.png").exists()
    assert "scale: a per-block list is for video rows (--format gif or mp4)" in results["listed"]["reason"]
