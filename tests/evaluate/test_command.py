"""``flare-rt evaluate`` through ``register`` on a fresh argparse parser."""
from __future__ import annotations

import argparse
import csv
import gzip
import logging
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from flare_rt.cli import run_command
from flare_rt.errors import ConfigError, InputImageError, OutputError
from flare_rt.evaluate.command import main, register
from flare_rt.evaluate.report import CSV_HEADER

LIVER, SPLEEN, AORTA = 1, 3, 5


def labels(shape=(20, 16, 12)) -> np.ndarray:
    """A small label map indexed (x, y, z) with blocks on even boundaries."""
    out = np.zeros(shape, np.uint8)
    out[2:10, 2:10, 2:8] = LIVER
    out[12:18, 4:12, 4:10] = SPLEEN
    out[10:12, 12:14, 0:12] = AORTA
    return out


def write(path: Path, array: np.ndarray, spacing=(1.0, 1.0, 2.0), origin=(0.0, 0.0, 0.0), direction=None) -> Path:
    image = sitk.GetImageFromArray(np.ascontiguousarray(array.transpose(2, 1, 0)))
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    if direction is not None:
        image.SetDirection(direction)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path))
    return path


def run(*argv: str) -> int:
    """``flare-rt evaluate ARGV`` through the CLI's error handling (typed errors: one line, exit code)."""
    parser = argparse.ArgumentParser(prog="flare-rt")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["evaluate", *argv])
    return run_command(args.func, args)


def error_lines(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if "error" in line.lower()]


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_folders_csv_markdown_plots_and_missing_prediction(tmp_path, caplog, capsys):
    gt = labels()
    write(tmp_path / "gt" / "case_a.nii.gz", gt)
    write(tmp_path / "gt" / "case_b.nii.gz", gt)
    pred = gt.copy()
    pred[2:4, 2:10, 2:8] = 0  # liver loses 2 of 8 x-slices: DSC 2 * 6 / 14
    write(tmp_path / "pred" / "case_a.nii.gz", pred)
    write(tmp_path / "pred" / "stray.nii.gz", pred)  # no ground truth: ignored
    out = tmp_path / "out"
    with caplog.at_level(logging.INFO):
        code = run(str(tmp_path / "pred"), str(tmp_path / "gt"), "--out", str(out), "--workers", "2")
    assert code == 0

    rows = read_csv(out / "scores.csv")
    assert tuple(rows[0]) == CSV_HEADER
    assert len(rows) == 2 * 14
    a = {int(r["class_id"]): r for r in rows if r["case"] == "case_a"}
    assert (a[LIVER]["class_name"], a[LIVER]["dsc"], a[LIVER]["nsd"]) == ("liver", f"{12 / 14:.4f}", "1.0000")
    assert (a[SPLEEN]["dsc"], a[SPLEEN]["nsd"]) == ("1.0000", "1.0000")
    b = {int(r["class_id"]): r for r in rows if r["case"] == "case_b"}
    assert (b[LIVER]["dsc"], b[LIVER]["nsd"]) == ("0.0000", "0.0000")  # missing: empty prediction
    assert (b[14]["dsc"], b[14]["nsd"]) == ("1.0000", "1.0000")  # no tumour in either

    markdown = (out / "summary.md").read_text()
    assert "## Missing predictions (scored as empty)\n\n- case_b" in markdown
    assert "- cases: 2 (1 without a prediction, scored as empty)" in markdown
    liver_mean = np.round(np.mean([round(12 / 14, 4), 0.0]), 4)  # numpy rounding, as official
    assert f"| 1 | liver | {liver_mean:.4f} ± " in markdown
    class_means = [np.round(np.mean([float(a[c]["dsc"]), float(b[c]["dsc"])]), 4) for c in range(1, 14)]
    assert f"| organs (13) | {np.round(np.mean(class_means), 4):.4f} ± " in markdown
    assert "| tumour | 1.0000 ± 0.0000 | 1.0000 ± 0.0000 |" in markdown
    assert markdown in capsys.readouterr().out  # the summary also goes to stdout

    plots = sorted(p.name for p in (out / "plots").glob("*.png"))
    assert len(plots) == 14 and plots[0] == "boxplot_01_liver.png"
    assert "case_b" in caplog.text and "without a prediction" in caplog.text
    assert "stray" in caplog.text


def test_shape_mismatch_is_one_line_error_naming_both_files(tmp_path, capsys):
    gt_file = write(tmp_path / "gt" / "c.nii.gz", labels())
    pred_file = write(tmp_path / "pred" / "c.nii.gz", labels((20, 16, 10)))
    code = run(str(tmp_path / "pred"), str(tmp_path / "gt"), "--no-plots", "--workers", "1")
    assert code == InputImageError.exit_code != 0
    errors = error_lines(capsys)
    assert len(errors) == 1 and errors[0].startswith("flare-rt: error: ")
    assert str(pred_file) in errors[0] and str(gt_file) in errors[0] and "--resample-pred" in errors[0]


def test_resample_pred_onto_gt_grid(tmp_path):
    gt = labels()
    write(tmp_path / "gt.nii.gz", gt, spacing=(1.0, 1.0, 2.0))
    # the same labels at half resolution: voxel centres of 2x2x2 GT blocks
    half = gt[::2, ::2, ::2]
    write(tmp_path / "pred.nii.gz", half, spacing=(2.0, 2.0, 4.0), origin=(0.5, 0.5, 1.0))
    assert run(str(tmp_path / "pred.nii.gz"), str(tmp_path / "gt.nii.gz"), "--out", str(tmp_path / "x"), "--no-plots") == 2
    code = run(
        str(tmp_path / "pred.nii.gz"), str(tmp_path / "gt.nii.gz"),
        "--resample-pred", "--out", str(tmp_path / "out"), "--no-plots",
    )
    assert code == 0
    rows = read_csv(tmp_path / "out" / "scores.csv")
    assert all((r["dsc"], r["nsd"]) == ("1.0000", "1.0000") for r in rows)
    assert {r["case"] for r in rows} == {"gt"}


def test_direction_mismatch_detected_and_resampled(tmp_path):
    gt = labels()
    write(tmp_path / "gt" / "c.nii.gz", gt)
    # flipped in y and stored with a flipped direction: same physical labels, other index order
    flipped = gt[:, ::-1, :]
    write(
        tmp_path / "pred" / "c.nii.gz", flipped, origin=(0.0, 15.0, 0.0),
        direction=(1, 0, 0, 0, -1, 0, 0, 0, 1),
    )
    assert run(str(tmp_path / "pred"), str(tmp_path / "gt"), "--no-plots") == InputImageError.exit_code
    out = tmp_path / "out"
    assert run(str(tmp_path / "pred"), str(tmp_path / "gt"), "--resample-pred", "--out", str(out), "--no-plots") == 0
    assert all(r["dsc"] == "1.0000" for r in read_csv(out / "scores.csv"))


def test_options_reach_the_scores(tmp_path):
    gt = labels()
    pred = gt.copy()
    pred[10:12, 12:14, 11] = 0  # aorta loses its top GT slice: dropped by the official cut anyway
    write(tmp_path / "gt.nii.gz", gt)
    write(tmp_path / "pred.nii.gz", pred)
    for extra, aorta_dsc in (([], "1.0000"), (["--inclusive-zrange"], f"{2 * 11 / 23:.4f}")):
        out = tmp_path / ("out" + "".join(extra))
        assert run(str(tmp_path / "pred.nii.gz"), str(tmp_path / "gt.nii.gz"), "--out", str(out), "--no-plots", "--flare23-cutoff", *extra) == 0
        aorta = [r for r in read_csv(out / "scores.csv") if r["class_id"] == str(AORTA)][0]
        assert aorta["dsc"] == aorta_dsc
        assert "NSD = 0 when DSC < 0.1" in (out / "summary.md").read_text()


@pytest.mark.parametrize(
    "kind", ["corrupt_gzip", "truncated_tail", "non_integer", "four_d", "missing_file", "negative"]
)
def test_bad_input_is_a_typed_error_naming_the_file(tmp_path, capsys, kind):
    gt_file = write(tmp_path / "gt" / "c.nii.gz", labels())
    bad = tmp_path / "pred" / "c.nii.gz"
    bad.parent.mkdir()
    if kind == "corrupt_gzip":
        good = gzip.decompress(gt_file.read_bytes())
        bad.write_bytes(gzip.compress(good)[: len(good) // 50])  # truncated stream
    elif kind == "truncated_tail":  # ITK alone reads this one without complaint
        bad.write_bytes(gt_file.read_bytes()[:-6])
    elif kind == "non_integer":
        image = sitk.GetImageFromArray(np.full((12, 16, 20), 0.5, np.float32))
        image.SetSpacing((1.0, 1.0, 2.0))
        sitk.WriteImage(image, str(bad))
    elif kind == "four_d":
        sitk.WriteImage(sitk.GetImageFromArray(np.zeros((2, 12, 16, 20), np.uint8)), str(bad))
    elif kind == "negative":
        write(bad, labels().astype(np.int16) - 1)
    pred_arg = bad if kind != "missing_file" else tmp_path / "pred" / "nothing.nii.gz"
    code = run(str(pred_arg), str(gt_file), "--no-plots")
    assert code == InputImageError.exit_code
    errors = error_lines(capsys)
    assert len(errors) == 1 and errors[0].startswith("flare-rt: error: ") and str(pred_arg) in errors[0]


def test_folder_and_file_mixed_is_a_config_error(tmp_path):
    write(tmp_path / "gt" / "c.nii.gz", labels())
    code = run(str(tmp_path / "gt" / "c.nii.gz"), str(tmp_path / "gt"), "--no-plots")
    assert code == ConfigError.exit_code
    assert run(str(tmp_path / "gt"), str(tmp_path / "gt"), "--workers", "0", "--no-plots") == ConfigError.exit_code


def test_module_main_without_out_prints_summary(tmp_path, capsys):
    write(tmp_path / "gt.nii.gz", labels())
    write(tmp_path / "pred.nii.gz", labels())
    assert main([str(tmp_path / "pred.nii.gz"), str(tmp_path / "gt.nii.gz")]) == 0
    assert "| organs (13) | 1.0000 ± 0.0000 | 1.0000 ± 0.0000 |" in capsys.readouterr().out
    assert not (tmp_path / "scores.csv").exists()


@pytest.fixture
def one_case(tmp_path) -> tuple[Path, Path]:
    return (write(tmp_path / "pred" / "c.nii.gz", labels()).parent,
            write(tmp_path / "gt" / "c.nii.gz", labels()).parent)


def test_out_that_cannot_be_written_is_refused_before_scoring(tmp_path, capsys, monkeypatch, one_case):
    def score(*args, **kwargs):
        raise AssertionError("scored before --out was checked")

    monkeypatch.setattr("flare_rt.evaluate.command.evaluate_folders", score)
    blocker = tmp_path / "afile"
    blocker.write_text("")
    for out in (blocker, blocker / "out"):
        assert run(str(one_case[0]), str(one_case[1]), "--out", str(out)) == OutputError.exit_code
        errors = error_lines(capsys)
        assert len(errors) == 1 and errors[0].startswith(f"flare-rt: error: {out}: cannot write"), errors


@pytest.mark.parametrize("in_the_way", ["scores.csv", "summary.md"])
def test_a_folder_in_the_way_leaves_the_other_outputs_unwritten(tmp_path, capsys, one_case, in_the_way):
    out = tmp_path / "out"
    (out / in_the_way).mkdir(parents=True)
    assert run(str(one_case[0]), str(one_case[1]), "--out", str(out), "--workers", "1") == OutputError.exit_code
    errors = error_lines(capsys)
    assert len(errors) == 1 and f"{out / in_the_way}: cannot write, a folder is in the way" in errors[0], errors
    assert sorted(p.name for p in out.iterdir()) == [in_the_way]


@pytest.mark.parametrize("preds", [[], ["other_case.nii.gz"]])
def test_a_prediction_folder_matching_no_case_is_refused(tmp_path, capsys, preds):
    """Every case would score 0 as an empty prediction: a wrong folder or naming, said as such."""
    write(tmp_path / "gt" / "c.nii.gz", labels())
    (tmp_path / "pred").mkdir()
    for name in preds:
        write(tmp_path / "pred" / name, labels())
    assert run(str(tmp_path / "pred"), str(tmp_path / "gt"), "--no-plots") == InputImageError.exit_code
    errors = error_lines(capsys)
    assert len(errors) == 1 and "no prediction is named like a ground-truth case (e.g. c.nii.gz)" in errors[0], errors
    assert ("other_case" in errors[0]) == bool(preds)
