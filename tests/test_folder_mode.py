"""Folder mode (``segment IN_DIR OUT_DIR`` over ``*_0000.nii.gz``): good cases written, a bad case reported
without stopping the others, existing outputs skipped unless --overwrite, probabilities saved; several
workers on one folder share the cases (each written once), ``--part I/N`` shards statically."""
from __future__ import annotations

import contextlib
import gzip
import io
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from flare_rt.claims import ClaimBoard, WorkerId
from flare_rt.cli import main
from flare_rt.errors import ConfigError, InputImageError, OutputError
from flare_rt.folder import DONE, EXISTS, FAILED, CaseReport, list_cases, parse_part, run_folder, summary_table

REPO = Path(__file__).resolve().parents[1]
OLD_NS = 1_000_000_000  # an mtime (2001) no run of this test can produce
QUICK = ("--step", "1")  # abutting tiles: half the network time; folder handling is what is tested here


def run(capsys, *argv) -> tuple[int, str, str]:
    rc = main(["segment", *map(str, argv)])
    out = capsys.readouterr()
    return rc, out.out, out.err


def corrupt_gzip(path: Path) -> Path:
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 20_000, dtype=np.uint8).tobytes())
    return path


@pytest.fixture(scope="module")
def ct(small_ct_path):
    return sitk.ReadImage(str(small_ct_path))


@pytest.fixture(scope="module")
def cases(tmp_path_factory, small_ct_path) -> Path:
    src = tmp_path_factory.mktemp("folder_in")
    for name in ("a", "b"):
        shutil.copyfile(small_ct_path, src / f"{name}_0000.nii.gz")
    corrupt_gzip(src / "c_0000.nii.gz")
    shutil.copyfile(small_ct_path, src / "d_0001.nii.gz")  # a second channel: not a case, said so
    (src / "notes.txt").write_text("not an image\n")
    return src


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, cases):
    out = tmp_path_factory.mktemp("folder_out")
    err, stdout = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(stdout):  # module scope: no capsys
        rc = main(["segment", str(cases), str(out), *QUICK])
    return rc, out, err.getvalue(), stdout.getvalue()


def check_failure_report(err: str) -> None:
    assert "1 of 3 cases failed" in err, err
    block = err[err.index("1 of 3 cases failed"):].splitlines()[1:]
    failed = [line for line in block if line.startswith("  ")]
    assert len(failed) == 1 and failed[0].strip().startswith("c_0000.nii.gz:"), err
    assert "corrupt" in failed[0]
    assert "Traceback" not in err


def table_rows(stdout: str) -> dict[str, list[str]]:
    """case -> [time, tiles, status] from the summary table."""
    lines = stdout.strip().splitlines()
    header = lines.index(next(line for line in lines if line.startswith("case")))
    rows = {}
    for line in lines[header + 2:-1]:
        name, secs, tiles, *status = line.split()
        rows[name] = [secs, tiles, " ".join(status)]
    return rows


def test_first_run(first_run, ct, cases):
    rc, out, err, stdout = first_run
    assert rc == 1
    assert sorted(p.name for p in out.iterdir()) == ["a.nii.gz", "b.nii.gz"]  # no c, no temp or lock files
    check_failure_report(err)
    assert f"{cases}: 1 image file(s) not named *_0000.nii.gz are not segmented: d_0001.nii.gz" in err, err
    labels = []
    for name in ("a", "b"):
        seg = sitk.ReadImage(str(out / f"{name}.nii.gz"))
        assert seg.GetPixelID() == sitk.sitkUInt8
        assert seg.GetSize() == ct.GetSize()
        assert seg.GetSpacing() == ct.GetSpacing()
        assert seg.GetOrigin() == ct.GetOrigin()
        assert seg.GetDirection() == ct.GetDirection()
        labels.append(sitk.GetArrayFromImage(seg))
    assert len(np.unique(labels[0])) >= 3  # background and organs: the model really ran
    np.testing.assert_array_equal(labels[0], labels[1])  # same input, same result
    rows = table_rows(stdout)
    assert set(rows) == {"a", "b", "c"}
    assert rows["a"][2] == rows["b"][2] == DONE and rows["c"][2] == FAILED
    assert int(rows["a"][1]) > 0 and float(rows["a"][0]) > 0
    assert "2 done, 1 failed" in stdout


def read_report(path: Path) -> tuple[dict, dict[str, dict]]:
    """A folder run's --report: the run's fields and case -> its record."""
    import json

    report = json.loads(path.read_text())
    return report, {c["case"]: c for c in report["cases"]}


def test_rerun_without_overwrite_skips_existing(capsys, first_run, cases, tmp_path):
    _, out, _, _ = first_run
    capsys.readouterr()
    for name in ("a", "b"):
        os.utime(out / f"{name}.nii.gz", ns=(OLD_NS, OLD_NS))
    before = {name: (out / f"{name}.nii.gz").read_bytes() for name in ("a", "b")}
    (tmp_path / "run.json").write_text("an earlier run's report: folder mode rewrites it")
    rc, stdout, err = run(capsys, cases, out, *QUICK, "--report", tmp_path / "run.json")
    assert rc == 1  # c still fails: a later run retries the failures of earlier ones
    check_failure_report(err)
    for name in ("a", "b"):
        assert (out / f"{name}.nii.gz").stat().st_mtime_ns == OLD_NS, f"{name} was rewritten"
        assert (out / f"{name}.nii.gz").read_bytes() == before[name]
    assert sorted(p.name for p in out.iterdir()) == ["a.nii.gz", "b.nii.gz"]
    rows = table_rows(stdout)
    assert rows["a"][2] == rows["b"][2] == EXISTS
    report, by_case = read_report(tmp_path / "run.json")
    assert report["counts"] == {"done": 0, "exists": 2, "claimed": 0, "failed": 1, "failed elsewhere": 0}
    assert by_case["a"] == {"case": "a", "image": str(cases / "a_0000.nii.gz"), "output": str(out / "a.nii.gz"),
                            "status": EXISTS, "seconds": None, "tiles": None, "timings_s": {}, "reason": None}
    assert by_case["c"]["status"] == FAILED and "corrupt" in by_case["c"]["reason"]


def test_overwrite_redoes_and_saves_probabilities(capsys, first_run, cases, ct, tmp_path):
    _, out, _, _ = first_run
    capsys.readouterr()
    for name in ("a", "b"):
        os.utime(out / f"{name}.nii.gz", ns=(OLD_NS, OLD_NS))
    rc, stdout, err = run(capsys, cases, out, "--overwrite", "--save-probabilities", "--report", tmp_path / "run.json",
                          *QUICK)
    assert rc == 1
    check_failure_report(err)
    # the report says what the table says, with each case's stages
    report, by_case = read_report(tmp_path / "run.json")
    assert (report["input"], report["output"], report["mode"]) == (str(cases), str(out), "fast")
    assert " on cpu" in report["backend"] and 0 < report["model_load_s"] < report["total_s"]
    assert report["counts"]["done"] == 2 and report["counts"]["failed"] == 1
    rows = table_rows(stdout)
    for name in ("a", "b"):
        case = by_case[name]
        assert case["status"] == DONE and case["reason"] is None
        assert [f"{case['seconds']:.1f}", str(case["tiles"]), case["status"]] == rows[name]
        assert {"read", "preprocess", "network", "write"} <= set(case["timings_s"]) and case["timings_s"]["network"] > 0
    assert by_case["c"]["status"] == FAILED and by_case["c"]["tiles"] is None and "corrupt" in by_case["c"]["reason"]
    assert sorted(p.name for p in out.iterdir()) == ["a.nii.gz", "a.npz", "b.nii.gz", "b.npz"]
    nz, ny, nx = ct.GetSize()[::-1]
    hu = sitk.GetArrayFromImage(ct)
    for name in ("a", "b"):
        seg = out / f"{name}.nii.gz"
        assert seg.stat().st_mtime_ns != OLD_NS, f"{name} was not redone with --overwrite"
        labels = sitk.GetArrayFromImage(sitk.ReadImage(str(seg)))
        with np.load(out / f"{name}.npz") as z:
            probs = z["probabilities"].astype(np.float32)
            label_ids = z["label_ids"]
        assert probs.shape == (15, nz, ny, nx)
        assert label_ids.tolist() == list(range(15))
        assert probs.min() >= 0 and probs.max() <= 1 + 1e-3
        np.testing.assert_allclose(probs.sum(axis=0), 1.0, atol=5e-3)  # float16 storage
        # the winning class of 15 has at least 1/15; and labels and probabilities describe one prediction
        assert probs.max(axis=0).min() >= 1 / 15 - 1e-3
        agree = float(np.mean(probs.argmax(axis=0) == labels))
        assert agree > 0.999, agree  # float16 ties aside, the argmax is the label
        # outside air is certain background
        air = hu < -1000
        assert air.sum() > 1000 and float(np.median(probs[0][air])) > 0.99


# -- the strategy, with a trivial segmenter ---------------------------------------------------------------
def fake_cases(tmp_path: Path, names) -> tuple[Path, Path]:
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    for n in names:
        (src / f"{n}_0000.nii.gz").write_bytes(b"x")
    return src, out


def writer(calls: list):
    def segment(case):
        calls.append(case.name)
        if case.name.startswith("bad"):
            raise InputImageError(f"{case.image}: file is empty")
        case.output.write_bytes(b"labels")
        return CaseReport(tiles=3)

    return segment


def test_run_folder_outcomes_and_table(tmp_path):
    src, out = fake_cases(tmp_path, ["a", "bad1", "b"])
    calls = []
    outcomes = run_folder(list_cases(src, out), out, writer(calls))
    assert [(o.case.name, o.status) for o in outcomes] == [("a", DONE), ("b", DONE), ("bad1", FAILED)]
    assert calls == ["a", "b", "bad1"]
    assert "file is empty" in outcomes[2].reason
    # the last worker out removes the claims and failure records: the folder holds the outputs only
    assert sorted(p.name for p in out.iterdir()) == ["a.nii.gz", "b.nii.gz"]
    table = summary_table(outcomes)
    assert table.splitlines()[0].split() == ["case", "time", "s", "tiles", "status"]
    assert table.splitlines()[-1] == "2 done, 1 failed"


def test_part_shards_the_cases(tmp_path):
    src, out = fake_cases(tmp_path, [f"c{i}" for i in range(7)])
    shards = [[c.name for c in list_cases(src, out, parse_part(f"{i}/3"))] for i in (1, 2, 3)]
    assert shards == [["c0", "c3", "c6"], ["c1", "c4"], ["c2", "c5"]]
    for bad in ("0/3", "4/3", "1/0", "x/2", "2"):
        with pytest.raises(ConfigError, match="--part takes I/N"):
            parse_part(bad)


def test_a_held_claim_is_skipped_and_a_dead_workers_claim_is_taken_over(tmp_path):
    src, out = fake_cases(tmp_path, ["a", "b"])
    out.mkdir()
    # a live worker (another process) holds a's claim
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from flare_rt.claims import ClaimBoard; "
        f"b = ClaimBoard({str(out)!r}).__enter__(); c = b.try_claim('a'); print('held', flush=True); time.sleep(60)")],
        cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        calls = []
        outcomes = run_folder(list_cases(src, out), out, writer(calls))
        assert [(o.case.name, o.status) for o in outcomes] == [("a", "claimed"), ("b", DONE)]
        assert calls == ["b"]
    finally:
        holder.kill()
        holder.wait()
    # the holder died without releasing: its registration and lock file are still there, their locks are not
    assert (out / ".flare-rt" / "a.lock").exists() and (out / ".flare-rt" / "board.lock").exists()
    calls = []
    outcomes = run_folder(list_cases(src, out), out, writer(calls))
    assert [(o.case.name, o.status) for o in outcomes] == [("a", DONE), ("b", EXISTS)]
    assert calls == ["a"] and not (out / ".flare-rt").exists()


def test_failure_of_a_concurrent_worker_is_not_retried_but_an_old_one_is(tmp_path):
    src, out = fake_cases(tmp_path, ["bad"])
    out.mkdir()
    me = WorkerId.current()
    other = WorkerId(pid=2**22 + 12345, host=me.host, started=me.started - 5)  # no such process
    with ClaimBoard(out, other) as other_board:  # registered here, so its failure record outlives our runs
        with other_board.try_claim("bad") as claim:
            claim.fail("bad: file is empty")
        # recorded after this worker started: a concurrent failure, not retried
        calls = []
        outcomes = run_folder(list_cases(src, out), out, writer(calls), board=ClaimBoard(out, me))
        assert [(o.status, o.reason) for o in outcomes] == [("failed elsewhere", "bad: file is empty")]
        assert calls == []
        # a worker that started after the (dead) failing worker recorded it retries
        with other_board.try_claim("bad") as claim:
            claim.fail("bad: file is empty")
        later = WorkerId(me.pid, me.host, time.time() + 1)
        outcomes = run_folder(list_cases(src, out), out, writer(calls), board=ClaimBoard(out, later))
        assert [o.status for o in outcomes] == [FAILED] and calls == ["bad"]
    assert list(out.iterdir()) == []  # the last one out removed the state folder


def test_a_file_in_the_place_of_the_state_folder_is_named(tmp_path, capsys):
    src, out = fake_cases(tmp_path, ["a"])
    out.mkdir()
    (out / ClaimBoard.STATE).write_text("not a folder")
    with pytest.raises(OutputError, match=r"\.flare-rt: a file where folder mode keeps its state"):
        run_folder(list_cases(src, out), out, writer([]))
    assert sorted(p.name for p in out.iterdir()) == [".flare-rt"]


def test_a_claim_needs_a_registered_worker(tmp_path):
    with pytest.raises(RuntimeError, match="register the worker first"):
        ClaimBoard(tmp_path).try_claim("a")


def test_a_worker_registering_while_the_last_one_out_removes_the_folder(tmp_path, monkeypatch):
    """A worker that arrives while the last one out is removing the state folder waits, then registers in a new
    one: its registration, claims and failure records are not removed with the old one (before, they could be
    lost in that window, and two workers could then segment one case)."""
    import threading

    import flare_rt.claims as claims

    out = tmp_path / "out"
    out.mkdir()
    arrived, waited, threads = [], [], []

    def register():
        arrived.append(ClaimBoard(out).__enter__())

    retire = claims._retire_state

    def another_arrives_during_removal(state):
        newcomer = threading.Thread(target=register)
        newcomer.start()
        newcomer.join(0.5)
        waited.append(newcomer.is_alive())
        threads.append(newcomer)
        return retire(state)

    monkeypatch.setattr(claims, "_retire_state", another_arrives_during_removal)
    with ClaimBoard(out) as first:
        with first.try_claim("a"):
            pass
    monkeypatch.undo()
    threads[0].join(10)
    (newcomer,) = arrived
    assert waited == [True]  # it waited for the removal to end
    assert claims._same_file(newcomer._registration, newcomer.board_path)  # registered in the new state folder
    assert [p.name for p in out.iterdir()] == [".flare-rt"]  # the old one, renamed, is gone
    with newcomer.try_claim("b") as claim:
        claim.fail("b: file is empty")
    with ClaimBoard(out):  # a third worker leaving first does not remove what the newcomer holds
        pass
    assert newcomer.failure_path("b").exists()
    newcomer.__exit__()
    assert list(out.iterdir()) == []


def test_workers_coming_and_going_never_lose_their_state(tmp_path):
    """Threads (each its own worker: flock locks are per open file) register, claim, record a failure and leave
    over and over on one folder: what a registered worker wrote is always still on disk."""
    import threading

    import flare_rt.claims as claims

    out = tmp_path / "out"
    out.mkdir()
    lost, errors = [], []

    def worker(k):
        try:
            work(k)
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(repr(exc))

    def work(k):
        for i in range(150):
            with ClaimBoard(out, WorkerId(os.getpid(), "test", k * 1000 + i)) as board:
                name = f"case{k}"
                with board.try_claim(name) as claim:
                    claim.fail("failed")
                    if not (claims._same_file(claim._fd, board.lock_path(name)) and board.failure_path(name).exists()):
                        lost.append((k, i))

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == [] and lost == [] and not any(t.is_alive() for t in threads)
    assert list(out.iterdir()) == []


# -- several processes on one folder of real cases -----------------------------------------------------------
@pytest.fixture(scope="module")
def crowd_cases(tmp_path_factory, small_ct_path) -> Path:
    src = tmp_path_factory.mktemp("crowd_in")
    for i in range(6):
        shutil.copyfile(small_ct_path, src / f"case{i:02d}_0000.nii.gz")
    corrupt_gzip(src / "bad_corrupt_0000.nii.gz")
    (src / "bad_empty_0000.nii.gz").write_bytes(b"")
    with gzip.open(src / "bad_2d_0000.nii.gz", "wb") as fh:  # a valid file, but one slice
        img = sitk.ReadImage(str(small_ct_path))[:, :, 0]
        tmp = src / "slice.nii"
        sitk.WriteImage(img, str(tmp))
        fh.write(tmp.read_bytes())
        tmp.unlink()
    return src


def test_concurrent_workers_share_the_cases(tmp_path, crowd_cases):
    # three real processes (the registration, claim and clean-up mechanics under heavy churn are
    # test_workers_coming_and_going_never_lose_their_state's, with threads)
    workers = 3
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "flare_rt", "segment", str(crowd_cases), str(out), "--threads", "1", *QUICK]
    procs = []
    for _ in range(workers):
        procs.append(subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
        time.sleep(0.5)
    results = [(p.wait(timeout=600), *p.communicate()) for p in procs]
    good = {f"case{i:02d}" for i in range(6)}
    bad = {"bad_corrupt", "bad_empty", "bad_2d"}
    done, failed_listed = [], []
    for rc, stdout, stderr in results:
        assert "Traceback" not in stderr and "unexpected" not in stderr, stderr
        rows = table_rows(stdout)
        assert set(rows) == good | bad  # every worker looked at every case
        done += [n for n, r in rows.items() if r[2] == DONE]
        mine = [line.strip().split(":")[0] for line in stderr.splitlines() if line.startswith("  ")]
        failed_listed += mine
        assert rc == (1 if mine else 0), (rc, stderr)
    assert sorted(done) == sorted(good), done  # each good case written by exactly one worker
    assert sorted(failed_listed) == sorted(f"{b}_0000.nii.gz" for b in bad), failed_listed  # each bad one listed once
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{g}.nii.gz" for g in good)  # no state left
    ref = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "case00.nii.gz")))
    for g in good:
        np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(out / f"{g}.nii.gz"))), ref)


def test_reads_and_writes_overlap_the_compute_and_fail_alone(tmp_path):
    import threading

    src, out = fake_cases(tmp_path, ["a", "b_badread", "c", "d_badwrite", "e"])
    log, lock = [], threading.Lock()

    def note(what, case):
        with lock:
            log.append((what, case.name, threading.current_thread().name))

    def read(case):
        note("read", case)
        if "badread" in case.name:
            raise InputImageError(f"{case.image}: the file is empty (0 bytes)")
        return case.name

    def compute(case, data):
        note("compute start", case)
        time.sleep(0.2)  # the next case's read runs meanwhile
        note("compute end", case)
        return data.upper()

    def write(case, data, result):
        note("write", case)
        if "badwrite" in case.name:
            raise OSError(f"{case.output}: no space left on device")
        case.output.write_text(result)
        return CaseReport(tiles=1)

    from flare_rt.folder import CaseStages

    outcomes = run_folder(list_cases(src, out), out, CaseStages(read, compute, write))
    assert [(o.case.name, o.status) for o in outcomes] == [
        ("a", DONE), ("b_badread", FAILED), ("c", DONE), ("d_badwrite", FAILED), ("e", DONE)]
    assert "file is empty" in outcomes[1].reason and "no space left" in outcomes[3].reason
    assert sorted(p.name for p in out.iterdir()) == ["a.nii.gz", "c.nii.gz", "e.nii.gz"]
    assert (out / "c.nii.gz").read_text() == "C"
    order = [(w, n) for w, n, _ in log]
    # the next case is read while the current one computes; writes trail on their own thread
    assert order.index(("read", "b_badread")) < order.index(("compute end", "a"))
    assert order.index(("read", "d_badwrite")) < order.index(("compute end", "c"))
    threads = {w: t for w, n, t in log if n == "a"}
    assert threads["read"].startswith("flare-read") and threads["write"].startswith("flare-write")
    assert threads["compute start"] == threading.main_thread().name


def test_a_cases_time_ends_with_its_own_write_not_the_next_cases_compute(tmp_path):
    """Writes trail behind the next case's compute; the summary's time of a case is still its own (compute
    to written), not stretched by the case after it."""
    from flare_rt.folder import CaseStages

    src, out = fake_cases(tmp_path, ["a_quick", "b_slow"])
    pause = {"a_quick": 0.05, "b_slow": 1.5}

    def compute(case, data):
        time.sleep(pause[case.name])
        return case.name

    def write(case, data, result):
        case.output.write_text(result)
        return CaseReport(tiles=1)

    outcomes = run_folder(list_cases(src, out), out, CaseStages(lambda case: None, compute, write))
    seconds = {o.case.name: o.seconds for o in outcomes}
    assert seconds["b_slow"] >= 1.5
    assert 0.05 <= seconds["a_quick"] < 1.0, seconds  # was 1.55: collected after b_slow's compute
