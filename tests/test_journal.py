"""The Ray engine's resume journal (issue 19, classes 4, 5 and 9): bound to the run that
wrote it (model sha256, threshold, --flagged-as, the input list), every field validated
on read, labels recomputed from the model's threshold, its text escaped wherever shown,
and a journal that cannot be written ends in one line (exit 2), never a traceback.

All files of these runs are in the journal, so ``--resume`` finishes without starting
Ray; the checks run before any worker would."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest

pytest.importorskip("ray", reason="the scale extra (ray[data]) is not installed")

from typer.testing import CliRunner  # noqa: E402

from pneumo_edge import scale  # noqa: E402
from pneumo_edge.cli import EXIT_OK, EXIT_USAGE, app  # noqa: E402
from pneumo_edge.images import collect_labelled  # noqa: E402
from pneumo_edge.predict import predict_paths  # noqa: E402
from pneumo_edge.records import Failure, Prediction, to_journal  # noqa: E402
from pneumo_edge.runtime import file_sha256, load_model  # noqa: E402

from helpers import make_tiny_onnx, prob_for_gray, write_gray_jpeg  # noqa: E402

runner = CliRunner()
LEVELS = {"NORMAL": (40, 90, 200), "PNEUMONIA": (150, 230, 70)}


@pytest.fixture
def finished(tmp_path):
    """A labelled folder, a model and the journal of a finished run over it."""
    root = tmp_path / "xr"
    for label, levels in LEVELS.items():
        for level in levels:
            write_gray_jpeg(root / label / f"{level}.jpeg", level)
    (root / "broken.jpeg").write_bytes(b"not an image")
    model = make_tiny_onnx(tmp_path / "m.onnx")
    items = collect_labelled([root])
    files, truths = [i[0] for i in items], [i[1] for i in items]
    run = predict_paths(load_model(model, device="cpu"), files, truths=truths)
    out = tmp_path / "out"
    binding = scale.journal_binding(file_sha256(model), 0.5, "warn", files, truths)
    scale.Journal(out / scale.JOURNAL).start(binding, [*run.predictions, *run.failures])
    return root, model, out, files, truths, binding


def _resume(root, model, out, *extra, quiet=True):
    return runner.invoke(app, ["predict", str(root), "--model", str(model), "--engine", "ray",
                               "--resume", "--report", "--out", str(out),
                               *(["-q"] if quiet else []), *extra])


def _lines(journal: Path) -> list:
    return [json.loads(line) for line in journal.read_text(encoding="utf-8").splitlines()]


def _write(journal: Path, objs) -> None:
    journal.write_text("".join(json.dumps(o) + "\n" for o in objs), encoding="utf-8")


def test_resume_of_a_finished_run_uses_its_journal(finished):
    root, model, out, *_ = finished
    journal = out / scale.JOURNAL
    lines = _lines(journal)
    for d in lines[1:]:
        if d["path"].endswith("NORMAL/40.jpeg"):
            d["probability"] = 0.75  # valid, and not what the model says: proves it was read
            d["label"] = "NORMAL"    # the journal's label is never trusted
    _write(journal, lines)
    res = _resume(root, model, out)
    assert res.exit_code == 1, res.output  # broken.jpeg failed
    report = json.loads((out / "report.json").read_text())
    assert report["n_images"] == 7 and report["n_failed"] == 1
    by = {Path(p["path"]).name: p for p in report["predictions"]}
    assert by["40.jpeg"]["probability"] == 0.75 and by["40.jpeg"]["label"] == "PNEUMONIA"
    assert by["230.jpeg"]["probability"] == pytest.approx(prob_for_gray(230), abs=1e-6)


@pytest.mark.parametrize("change, named", [("model", "model"), ("threshold", "threshold"),
                                           ("inputs", "input"), ("flagged", "--flagged-as")])
def test_resume_for_another_run_is_refused(finished, tmp_path, change, named):
    root, model, out, *_ = finished
    journal = out / scale.JOURNAL
    before = journal.read_bytes()
    extra = []
    if change == "model":
        model = make_tiny_onnx(tmp_path / "other.onnx", slope=12.0)
    elif change == "threshold":
        extra = ["--threshold", "0.3"]
    elif change == "inputs":
        write_gray_jpeg(root / "NORMAL" / "new.jpeg", 60)
    else:
        extra = ["--flagged-as", "fail"]
    res = _resume(root, model, out, *extra)
    assert res.exit_code == EXIT_USAGE, res.output
    assert scale.JOURNAL in res.output and named in res.output and "--resume" in res.output
    assert "Traceback" not in res.output and "internal error" not in res.output
    assert journal.read_bytes() == before  # nothing already written is lost
    assert not (out / "report.json").exists()


def test_a_journal_without_its_binding_is_refused(finished):
    root, model, out, *_ = finished
    journal = out / scale.JOURNAL
    _write(journal, _lines(journal)[1:])  # e.g. a journal of an earlier version
    res = _resume(root, model, out)
    assert res.exit_code == EXIT_USAGE and scale.JOURNAL in res.output, res.output


def test_every_journal_field_is_validated_on_read(finished):
    _, model, out, files, truths, binding = finished
    journal = out / scale.JOURNAL
    lines = _lines(journal)
    header, good = lines[0], lines[1:]
    first = dict(good[0])
    bad = [
        "a string, not a record", [1, 2, 3], 42, None,
        first | {"probability": float("nan")}, first | {"probability": 1e300},
        first | {"probability": "0.5"}, first | {"probability": True},
        first | {"path": ["x"]}, first | {"ood_score": float("inf")},
        first | {"warnings": "not a list"}, first | {"warnings": [1]},
        first | {"in_distribution": "yes"}, first | {"dicom": {"PatientName": "X"}},
        first | {"lung_box": [0, 0, 1]}, first | {"lung_box": [0, 0, 1, float("nan")]},
        {"path": first["path"], "error": 7},
        first | {"path": "/not/in/the/input.jpeg"},
    ]
    text = json.dumps(header) + "\n" + "".join(
        json.dumps(b, allow_nan=True) + "\n" for b in bad)
    text += "".join(json.dumps(d) + "\n" for d in good[1:])
    journal.write_text(text + '{"path": "cut mid-li', encoding="utf-8")
    done = scale.Journal(journal).resume(binding, files, truths)
    # the bad lines are skipped: the first file is not done (it will be predicted again),
    # the unknown path is ignored, every other file is back
    assert set(done) == {str(f) for f in files} - {first["path"]}
    for rec in done.values():
        assert isinstance(rec, (Prediction, Failure))
        if isinstance(rec, Prediction):
            assert 0.0 <= rec.probability <= 1.0
            assert rec.label == ("PNEUMONIA" if rec.probability >= 0.5 else "NORMAL")
    # read_journal (the CSV and Parquet writers' reader) knows no inputs: it yields the
    # valid records, the other file's line among them (resume rewrites the journal
    # without it before any writer reads it)
    assert len(list(scale.read_journal(journal))) == (len(good) - 1) + 1


def test_journal_text_reaches_html_and_terminal_escaped(finished):
    root, model, out, *_ = finished
    journal = out / scale.JOURNAL
    lines = _lines(journal)
    for d in lines[1:]:
        if "error" in d:
            d["error"] = "<b>bold</b> [red]not red[/red]"
        else:
            d["label"] = "<img src=x onerror=alert(1)>"
            d["truth"] = "[bold red]PNEUMONIA[/]"
            d["warnings"] = ["<script>alert(1)</script>", "[blink]markup[/blink]"]
    _write(journal, lines)
    res = _resume(root, model, out, "--show", "10", quiet=False)
    assert res.exit_code == 1, res.output
    html = (out / "report.html").read_text()
    for raw in ("<img src=x", "<script>", "<b>bold</b>"):
        assert raw not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html and "&lt;b&gt;bold" in html
    report = json.loads((out / "report.json").read_text())
    for p in report["predictions"]:
        assert p["label"] == ("PNEUMONIA" if p["probability"] >= 0.5 else "NORMAL")
        assert p["truth"] == Path(p["path"]).parent.name  # from the folders, not the journal
    # rich markup in journal text is printed literally, not interpreted
    assert "[blink]markup[/blink]" in res.output and "[red]not red[/red]" in res.output
    assert "onerror" not in res.output


def test_a_folder_where_the_journal_goes_is_one_line_exit_2(finished):
    root, model, out, *_ = finished
    journal = out / scale.JOURNAL
    journal.unlink()
    journal.mkdir()
    for resume in (["--resume"], []):
        res = runner.invoke(app, ["predict", str(root), "--model", str(model), "--engine",
                                  "ray", "--out", str(out), *resume])
        assert res.exit_code == EXIT_USAGE, res.output
        assert scale.JOURNAL in res.output and "internal error" not in res.output
        assert journal.is_dir()  # never removed


def test_a_full_disk_when_the_journal_is_started_is_one_line_exit_2(finished, monkeypatch):
    import pneumo_edge.io as io

    root, model, out, *_ = finished

    def full(path, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(io, "_write_temp", full)
    res = _resume(root, model, out)
    assert res.exit_code == EXIT_USAGE, res.output
    assert scale.JOURNAL in res.output and "No space left on device" in res.output


def test_a_full_disk_while_appending_is_a_journal_error(tmp_path, monkeypatch):
    import builtins

    journal = scale.Journal(tmp_path / scale.JOURNAL)
    def appends_to_a_full_disk(path, mode="r", **kwargs):
        return builtins.open("/dev/full" if mode == "a" else path, "w" if mode == "a" else mode,
                             **kwargs)

    monkeypatch.setattr(scale, "open", appends_to_a_full_disk, raising=False)
    journal.start({"pneumo_edge_journal": 1})
    with pytest.raises(scale.JournalError, match="No space left on device"):
        journal.append([Prediction("a.jpeg", 0.5, "PNEUMONIA", 0.5, None)])
    journal.close()
