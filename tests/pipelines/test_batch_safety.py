"""Issue 16's defects in `instantstyle stylize-batch`, without models: nothing written outside --out,
no row stops the run, reruns see changed rows, files get the umask's mode.

The model wiring (`batch_cli._wire`) is replaced by a stub that opens the style images and returns
a tiny image, so everything else (argument checks, manifest reading, sharding, names, seeds,
writing, the summary) runs for real, hundreds of times in seconds.
"""
import contextlib
import json
import os
import random
import re

import pytest
from PIL import Image

import instantstyle.pipelines.batch_cli as batch_cli
from instantstyle.cli import main
from instantstyle.pipelines.batch import STATUSES, OutsideOut, out_file
from instantstyle.pipelines.manifest import read_manifest
from instantstyle.pipelines.outputs import TEMP_PREFIX, atomic_write_bytes
from instantstyle.pipelines.stylize_cli import open_image

NAME_OK = re.compile(r"[\w.\-+= ,()]+")


@pytest.fixture
def stub(monkeypatch):
    """``_wire`` without models; ``calls`` lists (name, seed) of every generated row."""
    calls = []

    def wire(args, state, hub):
        def generate(job, seed):
            for path in job.style:
                open_image("style", path)
            if "boom" in job.prompt:
                raise RuntimeError("the model failed on this row")
            calls.append((job.name, seed))
            return Image.new("RGB", (8, 8), (seed % 251, len(job.prompt) % 251, 7)), {"scheduler": "Stub"}

        return generate

    monkeypatch.setattr(batch_cli, "_wire", wire)
    return calls


@pytest.fixture
def style(tmp_path):
    path = tmp_path / "style.png"
    Image.new("RGB", (4, 4), (1, 2, 3)).save(path)
    return path


def _args(manifest, out, *extra):
    return ["stylize-batch", str(manifest), "--out", str(out), "--model", "stub-model", "--ip-adapter", "stub.bin",
            "--seed", "3", *extra]


def _jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _files(root, skip=None):
    """{path: (size, mtime)} of every file under root, except under ``skip`` folders."""
    found = {}
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if os.path.join(folder, d) not in (skip or ())]
        for name in files + [d for d in dirs if os.path.islink(os.path.join(folder, d))]:
            path = os.path.join(folder, name)
            st = os.lstat(path)
            found[path] = (st.st_size, st.st_mtime_ns)
    return found


@contextlib.contextmanager
def writes_recorded(monkeypatch):
    """Every path Python code asks the OS to create, replace, rename or remove while inside."""
    seen = []
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    real = {name: getattr(os, name) for name in ("open", "replace", "rename", "unlink", "remove", "mkdir", "rmdir")}
    import builtins

    real_open = builtins.open

    def spy(name):
        def call(*args, **kwargs):
            if name != "open" or (args[1] if len(args) > 1 else kwargs.get("flags", 0)) & write_flags:
                seen.extend(a for a in args[:2 if name in ("replace", "rename") else 1])
            return real[name](*args, **kwargs)
        return call

    def open_spy(file, mode="r", *args, **kwargs):
        if isinstance(file, (str, bytes, os.PathLike)) and set(mode) & set("wax+"):
            seen.append(file)
        return real_open(file, mode, *args, **kwargs)

    with monkeypatch.context() as m:
        for name in real:
            m.setattr(os, name, spy(name))
        m.setattr(builtins, "open", open_spy)
        yield seen


def _assert_inside(seen, out):
    root = os.path.realpath(out)
    for path in seen:
        real = os.path.realpath(os.fsdecode(path))
        assert real == root or os.path.dirname(real) == root, f"wrote {path!r} outside --out {root!r}"


HOSTILE = ["../escape", "../../x", "a/b", "a\\b", "a\x00b", "..", ".", "", ".hidden", "x" * 201, "é" * 101, "name\n",
           "\u202e", "a:b", "*", "~", "$HOME"]


def test_hostile_names_fail_their_row_and_nothing_leaves_out(stub, style, tmp_path, monkeypatch, capsys):
    """Issue 16: `../escape` wrote `<name>.png.error.json` outside --out, and `a/b` or NUL ended the run."""
    victim = tmp_path / "victim"
    victim.mkdir()
    names = HOSTILE + [str(victim / "abs")]
    rows = [{"prompt": "ok first", "style": str(style), "name": "first"}]
    rows += [{"prompt": f"p{i}", "style": str(style), "name": n} for i, n in enumerate(names)]
    rows += [{"prompt": "ok last", "style": str(style), "name": "last"}]
    manifest, out = _jsonl(tmp_path / "m.jsonl", rows), tmp_path / "run" / "out"
    out.parent.mkdir()
    before = _files(tmp_path, skip={str(out)})
    with writes_recorded(monkeypatch) as seen:
        assert main(_args(manifest, out)) == 1
    assert any(os.fspath(p).endswith("first.png") for p in seen)  # the spy sees the batch's writes
    _assert_inside(seen, out)
    after = _files(tmp_path, skip={str(out)})
    assert after == before  # nothing created or changed outside --out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["ok"] == 2 and summary["failed"] == len(names)
    for row in summary["failed_rows"]:
        assert row["name"] == f"row-{row['index']}" and "name: expected a plain file stem" in row["reason"], row
    assert sorted(os.listdir(out)) == ["first.png", "first.png.json", "last.png", "last.png.json", "summary.json"]
    assert {n for n, _ in stub} == {"first", "last"}
    err = capsys.readouterr().err
    assert "\x00" not in err and "\u202e" not in err  # names are shown escaped (repr)


def test_the_write_site_refuses_a_path_that_resolves_outside_out(stub, style, tmp_path):
    out, victim = tmp_path / "out", tmp_path / "victim.png"
    out.mkdir()
    victim.write_bytes(b"precious")
    (out / "link.png").symlink_to(victim)
    with pytest.raises(OutsideOut, match="outside --out"):
        out_file(str(out), "link.png")
    with pytest.raises(OutsideOut):
        out_file(str(out), "../x.png")  # never reached by a name, but refused here too
    assert out_file(str(out), "ok.png") == os.path.join(str(out), "ok.png")
    manifest = _jsonl(tmp_path / "m.jsonl", [{"prompt": "p", "style": str(style), "name": "link"}])
    assert main(_args(manifest, out)) == 1
    summary = json.loads((out / "summary.json").read_text())
    assert "outside --out" in summary["failed_rows"][0]["reason"]
    assert victim.read_bytes() == b"precious" and (out / "link.png").is_symlink()


def test_excel_csv_with_a_bom_reads_every_row(stub, style, tmp_path):
    """Issue 16: "CSV UTF-8" from Excel failed every row with `unknown field(s) \\ufeffprompt`."""
    manifest = tmp_path / "m.csv"
    manifest.write_bytes(b"\xef\xbb\xbfprompt,style,name\r\na dog,style.png,dog\r\na cat,style.png,cat\r\n")
    assert main(_args(manifest, tmp_path / "out")) == 0
    assert sorted(n for n, _ in stub) == ["cat", "dog"]
    utf16 = tmp_path / "u.csv"  # Excel's "Unicode text": UTF-16 with its BOM
    utf16.write_bytes("prompt,style,name\r\nun café,style.png,café\r\n".encode("utf-16"))
    assert main(_args(utf16, tmp_path / "out16")) == 0 and (tmp_path / "out16" / "café.png").exists()


def test_no_row_stops_the_run(stub, style, tmp_path):
    """Issue 16 and its kin: rows that raised out of the manifest reader (an integer too large for a
    float, nesting deeper than the JSON parser's recursion, bytes that are not UTF-8) or that were
    checked as the whole manifest (a duplicate name) now fail only themselves."""
    good = {"prompt": "fine", "style": str(style)}
    lines = [
        json.dumps(dict(good, name="a")),
        json.dumps(dict(good, name="b", scale=10**400)),
        "[" * 100000 + "]" * 100000,
        json.dumps(dict(good, name="c", prompt="caf\udce9"), ensure_ascii=False),  # Latin-1 "café": not UTF-8
        json.dumps(dict(good, name="d", scale=float("nan"))),  # NaN: not strict JSON
        json.dumps(dict(good, name="a")),  # a duplicate of row 0
        json.dumps(dict(good, name="A")),  # the same file as "a" on macOS/Windows
        json.dumps(dict(good, name="e", prompt="boom")),  # the model fails
        json.dumps(dict(good, name="f", style="missing.png")),
        json.dumps(dict(good, name="g", target=7)),
        json.dumps(dict(good, name="h", negative_prompt=["x"])),
        '"just a string"',
        json.dumps(dict(good, name="z")),
    ]
    manifest = tmp_path / "m.jsonl"
    manifest.write_bytes(("\n".join(lines) + "\n").encode("utf-8", "surrogateescape"))
    out = tmp_path / "out"
    assert main(_args(manifest, out)) == 1
    summary = json.loads((out / "summary.json").read_text())
    assert [r["status"] for r in summary["results"]] == ["ok"] + ["failed"] * 11 + ["ok"]
    reasons = {r["index"]: r["reason"] for r in summary["results"]}
    assert "scale: expected a number" in reasons[1]
    assert reasons[2].startswith("ValueError: manifest row 2: line 3: not JSON (RecursionError")
    assert "expected UTF-8 text" in reasons[3] and "NaN is not a number in strict JSON" in reasons[4]
    assert "row 0 already writes" in reasons[5] and "row 0 already writes" in reasons[6]
    assert "the model failed" in reasons[7] and "missing.png" in reasons[8] and "target: expected" in reasons[9]
    assert "negative_prompt: expected a string" in reasons[10]
    assert reasons[11] == "ValueError: manifest row 11: line 12: expected a JSON object, got 'just a string'"
    assert (out / "e.png.error.json").exists() and not (out / "row-5.png.error.json").exists()


def test_a_changed_row_is_redone_and_no_redo_says_so(stub, style, tmp_path, capsys):
    """Issue 16: a row edited after it completed was skipped on rerun, its old image kept as the new."""
    rows = [{"prompt": "a dog", "style": str(style), "name": "dog"}, {"prompt": "a cat", "style": str(style), "name": "cat"}]
    manifest, out = _jsonl(tmp_path / "m.jsonl", rows), tmp_path / "out"
    assert main(_args(manifest, out)) == 0
    first = json.loads((out / "dog.png.json").read_text())
    assert len(first["settings_hash"]) == 64 and first["settings"]["prompt"] == "a dog"
    stub.clear()
    assert main(_args(manifest, out)) == 0 and stub == []  # unchanged: skipped
    _jsonl(manifest, [dict(rows[0], prompt="a wolf"), rows[1]])
    assert main(_args(manifest, out, "--no-redo")) == 1  # changed, refused: said so, exit 1
    summary = json.loads((out / "summary.json").read_text())
    stale = summary["stale_rows"]
    assert summary["stale"] == 1 and stale[0]["name"] == "dog" and "--no-redo" in stale[0]["reason"]
    assert stub == [] and "1 stale" in capsys.readouterr().err
    assert main(_args(manifest, out)) == 0 and [n for n, _ in stub] == ["dog"]  # redone
    assert json.loads((out / "dog.png.json").read_text())["settings"]["prompt"] == "a wolf"
    stub.clear()
    assert main(_args(manifest, out, "--scale", "0.5")) == 0 and sorted(n for n, _ in stub) == ["cat", "dog"]  # a flag
    stub.clear()
    Image.new("RGB", (4, 4), (9, 9, 9)).save(style)  # the reference image's bytes
    assert main(_args(manifest, out, "--scale", "0.5")) == 0 and len(stub) == 2
    stub.clear()
    assert main(_args(manifest, out, "--scale", "0.5", "--device", "cpu", "--threads", "1")) == 0 and stub == []


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_files_get_the_umask_mode(stub, style, tmp_path, umask):
    """Issue 16: mkstemp made every output 0600, unreadable to others in a shared --out."""
    rows = [{"prompt": "p", "style": str(style), "name": "ok"}, {"prompt": "boom", "style": str(style), "name": "bad"}]
    manifest, out = _jsonl(tmp_path / "m.jsonl", rows), tmp_path / "out"
    old = os.umask(umask)
    try:
        assert main(_args(manifest, out)) == 1
        atomic_write_bytes(str(tmp_path / "direct.bin"), b"x")
    finally:
        os.umask(old)
    for path in [out / n for n in ("ok.png", "ok.png.json", "bad.png.error.json", "summary.json")] + [tmp_path / "direct.bin"]:
        assert os.stat(path).st_mode & 0o777 == 0o666 & ~umask, path


def test_seeds_in_a_manifest(stub, style, tmp_path):
    """Issue 16: seed 2**70 failed only at generate time, naming no field; -1 was refused only here."""
    good = {"prompt": "p", "style": str(style)}
    rows = [dict(good, seed=2**64 - 1), dict(good, seed=2**70), dict(good, seed=-1), dict(good, seed=1.5),
            dict(good, seed=True), dict(good, seed="12"), dict(good)]
    manifest, out = _jsonl(tmp_path / "m.jsonl", rows), tmp_path / "out"
    assert main(_args(manifest, out)) == 1
    results = json.loads((out / "summary.json").read_text())["results"]
    assert [r["status"] for r in results] == ["ok", "failed", "failed", "failed", "failed", "ok", "ok"]
    assert results[1]["reason"] == "ValueError: manifest row 1: seed: expected an integer in [0, 18446744073709551615], " \
                                   "got 1180591620717411303424"
    assert "got -1 (-1 does not mean random here" in results[2]["reason"]
    assert dict(stub) == {"0": 2**64 - 1, "5": 12, "6": 3 + 6}
    csv_manifest = tmp_path / "m.csv"
    csv_manifest.write_text(f"prompt,style,seed\np,{style},18446744073709551615\np,{style},-1\np,{style},\n")
    stub.clear()
    assert main(_args(csv_manifest, tmp_path / "csv", "--seed", str(2**64 - 1))) == 1
    results = json.loads((tmp_path / "csv" / "summary.json").read_text())["results"]
    assert results[0]["status"] == "ok" and results[1]["status"] == "failed"
    assert "--seed + row index <= 18446744073709551615" in results[2]["reason"]  # 2**64 - 1 + 2: that row only


def test_manifest_level_mistakes_are_one_line_before_anything_runs(stub, tmp_path, capsys):
    empty = tmp_path / "e.jsonl"
    empty.write_text("\n\n")
    assert main(_args(empty, tmp_path / "out")) == 2
    assert capsys.readouterr().err.strip().startswith("instantstyle: error: MANIFEST: expected at least one row")
    assert main(_args(tmp_path / "none.jsonl", tmp_path / "out")) == 2
    assert main(_args(empty, tmp_path / "out", "--seed", "-1")) == 2
    assert "--seed: expected an integer in [0, 18446744073709551615], got -1" in capsys.readouterr().err
    assert stub == []


def test_help_documents_exit_codes(capsys):
    with pytest.raises(SystemExit):
        main(["stylize-batch", "--help"])
    text = capsys.readouterr().out
    assert "exit status:" in text and "--no-redo" in text
    for code in ("0", "1", "2", "130"):
        assert re.search(rf"^\s+{code}\s+\S", text, re.M), code


# ---- the property: random manifests never write outside --out, never crash, always summarise ----

ALPHABET = list("abcXYZ019 _-.,+=()/\\:*?\"'\n\r\t\x00\x7f") + ["é", "日", "\u2028", "\x85", "🙂", "\u202e", "\ufeff"]


def _text(rng, longest=12):
    n = rng.choice([0, 1, 2, 5, longest, 250])
    return "".join(rng.choice(ALPHABET) for _ in range(n))


def _name(rng, victim):
    return rng.choice(HOSTILE + [str(victim), str(victim / "x"), "../victim", "../../cases", "dup", "DUP", "ok", "row-1",
                                 7, 7.5, None, ["a"], True, _text(rng), _text(rng)])


def _value(rng, style):
    return rng.choice([str(style), [str(style), str(style)], f"{style}|{style}", "missing.png", "", None, 0, -1,
                       2**64 - 1, 2**64, 2**70, 10**400, 1.5, -0.5, 1e308, True, [], {}, [[[]]], {"single": {"1": 1}},
                       float("nan"), float("inf"), "nan", "[not json", _text(rng), _text(rng)])


SAFE = list("abcXYZ019 _-.,+=()") + ["é", "日", "ß"]
VALID = {"negative_prompt": lambda rng: rng.choice(["blurry", ""]), "seed": lambda rng: rng.choice([0, 7, "12", 2**64 - 1]),
         "scale": lambda rng: rng.choice([0, 0.5, "1.5"]), "target": lambda rng: rng.choice(["style", ["up_blocks.0"]]),
         "content_prompt": lambda rng: "a cat", "content_scale": lambda rng: rng.choice([0.2, "0.7"])}


def _row(rng, style, victim):
    """Mostly a good row with one or two bad things, so both the failing and the writing paths run."""
    row = {"prompt": rng.choice(["a dog", "a dog", "boom", _text(rng), "", 3]),
           "style": str(style) if rng.random() < 0.8 else _value(rng, style)}
    for key in rng.sample(sorted(VALID), rng.randint(0, 3)):
        row[key] = VALID[key](rng) if rng.random() < 0.7 else _value(rng, style)
    if rng.random() < 0.1:
        row[rng.choice(["unknown", "\ufeffprompt", _text(rng)])] = _value(rng, style)
    kind = rng.random()
    if kind < 0.4:
        row["name"] = "n" + "".join(rng.choice(SAFE) for _ in range(rng.randint(0, 8)))
    elif kind < 0.75:
        row["name"] = _name(rng, victim)
    return row


def _encode(rng, text):
    encoding = rng.choice(["utf-8", "utf-8-sig", "utf-16", "latin-1", "utf-8-junk"])
    if encoding == "utf-8-junk":
        return text.encode("utf-8", "surrogatepass") + b"\n\xff\xfe\xc0junk\n"
    return text.encode(encoding, "surrogatepass" if encoding.startswith("utf") else "replace")


def _manifest(rng, folder, style, victim):
    rows = [_row(rng, style, victim) for _ in range(rng.randint(1, 5))]
    if rng.random() < 0.5:
        path = folder / "m.jsonl"
        lines = [json.dumps(r, ensure_ascii=rng.random() < 0.5) for r in rows]
        if rng.random() < 0.3:
            lines.insert(rng.randint(0, len(lines)), rng.choice(["{not json", "[1, 2]", "null", "\x00", _text(rng)]))
        text = "\n".join(lines) + rng.choice(["\n", "\r\n", ""])
    else:
        import csv
        import io

        path = folder / "m.csv"
        header = sorted({k for r in rows for k in r}, key=str)
        buf = io.StringIO()
        writer = csv.writer(buf)
        writer.writerow(header)
        for r in rows:
            writer.writerow(["" if r.get(k) is None else r[k] if isinstance(r.get(k), str) else json.dumps(r[k])
                             for k in header])
        text = buf.getvalue()
    path.write_bytes(_encode(rng, text))
    return path


@pytest.mark.slow
def test_random_manifests_never_escape_never_crash_always_summarise(stub, style, tmp_path, monkeypatch):
    """A seeded random loop (hypothesis is not installed here): 200 manifests of fuzzed names,
    fields and encodings.  --debug makes any exception the CLI would have caught fail the test."""
    rng = random.Random(16)
    cases = tmp_path / "cases"
    for case in range(200):
        folder = cases / f"c{case}"
        victim = folder / "victim"
        victim.mkdir(parents=True)
        manifest, out = _manifest(rng, folder, style, victim), folder / "out"
        extra = ["--debug", "--format", rng.choice(["png", "jpg", "webp"]), "--seed", str(rng.choice([0, 5, 2**64 - 1]))]
        for attempt in range(1 + (rng.random() < 0.25)):  # sometimes a rerun over the first run's files
            before = _files(folder, skip={str(out)}), os.listdir(cases), os.listdir(tmp_path)
            with writes_recorded(monkeypatch) as seen:
                code = main(_args(manifest, out, *extra, *(["--no-redo"] if attempt else [])))
            assert code in (0, 1), (case, code)
            _assert_inside(seen, out)  # every write, wherever; and the neighbourhood unchanged:
            assert (_files(folder, skip={str(out)}), os.listdir(cases), os.listdir(tmp_path)) == before, case
            summary = json.loads((out / "summary.json").read_text())
            assert len(summary["results"]) == summary["rows"] == len(read_manifest(str(manifest))), case
            assert sum(summary[s] for s in STATUSES) == summary["rows"], case
            names = set()
            for row in summary["results"]:
                assert row["status"] in STATUSES
                plain = NAME_OK.fullmatch(row["name"]) and not row["name"].startswith(".")
                assert row["name"] == f"row-{row['index']}" or plain, row
                names.add(row["name"])
            for f in os.listdir(out):
                assert f == "summary.json" or any(f.startswith(n + ".") for n in names), (case, f)
                assert not f.startswith((TEMP_PREFIX, ".rank-")), (case, f)
