"""The kernel wrappers without a GPU: argument checks (typed errors) and what they launch, against a
CuPy double. Every launch's arguments are checked, position by position, against the kernel's
parameter list as compiled (NVRTC's PTX) and as written (the source's C types), so a missing,
swapped or wrongly sized argument fails here rather than corrupting memory on a GPU."""
from __future__ import annotations

import re

import numpy as np
import pytest

from fake_cupy import FakeArray, FakeCupy
from flare_rt.kernels import ops
from flare_rt.kernels.loader import ENTRY_POINTS, NVRTC_OPTIONS, Package
from flare_rt.kernels.ops import KernelArgumentError, accumulate_tiles, labels_from_logits
from flare_rt.resample import linear_weights

SOURCE = Package().source.read_text()


def source_params(entry: str) -> list[str]:
    """C parameter kinds of an entry point from its argument macro: ptr, i64, i32 or f32."""
    macro = {"labels_from_logits": "LABELS_ARGS", "accumulate_tiles": "ACCUMULATE_ARGS"}[entry.rsplit("_", 1)[0]]
    body = re.search(rf"#define {macro}\(T\)(.*?)\n(?=#define|\n)", SOURCE, re.S).group(1).replace("\\\n", " ")
    kinds = []
    for decl in body.split(","):
        decl = decl.replace("__restrict__", "").strip()
        kinds.append("ptr" if "*" in decl else {"i64": "i64", "int": "i32", "float": "f32"}[decl.split()[0]])
    return kinds


@pytest.fixture(scope="module")
def ptx_params(nvrtc) -> dict[str, list[str]]:
    status, log, ptx, _ = nvrtc.compile(SOURCE, (*NVRTC_OPTIONS, "--gpu-architecture=compute_75"))
    assert status == 0, log
    text = ptx.decode()
    out = {}
    for entry in ENTRY_POINTS:
        header = text[text.index(f".entry {entry}("):]
        header = header[:header.index(")")]
        out[entry] = re.findall(r"\.param \.(\w+) ", header)
    return out


def arg_kind(a) -> str:
    if isinstance(a, FakeArray) or (type(a) is np.uint64 and a == 0):  # an array or the null pointer
        return "ptr"
    kinds = {np.int64: "i64", np.int32: "i32", np.float32: "f32"}
    assert type(a) in kinds, f"argument {a!r} of type {type(a)} is not passed as a fixed-size C type"
    return kinds[type(a)]


PTX_OF = {"ptr": "u64", "i64": "u64", "i32": "u32", "f32": "f32"}


def check_signature(launch, ptx_params) -> None:
    kinds = [arg_kind(a) for a in launch.args]
    assert kinds == source_params(launch.name), launch.name
    assert [PTX_OF[k] for k in kinds] == ptx_params[launch.name], launch.name


@pytest.fixture
def cp(monkeypatch) -> FakeCupy:
    cp = FakeCupy(fatbin_entries=set(ENTRY_POINTS))
    monkeypatch.setitem(__import__("sys").modules, "cupy", cp)
    kernels = {name: cp.RawModule(path=str(Package().fatbin)).get_function(name) for name in ENTRY_POINTS}
    monkeypatch.setattr(ops, "load_kernels", lambda _cp: kernels)
    ops._axis_table.cache_clear()
    yield cp
    ops._axis_table.cache_clear()


def dev(a) -> FakeArray:
    return FakeArray(np.asarray(a))


@pytest.mark.parametrize("dtype, entry", [(np.float32, "labels_from_logits_f32"),
                                          (np.float16, "labels_from_logits_f16")])
def test_labels_launch(cp, ptx_params, dtype, entry):
    padded = np.zeros((5, 7, 40, 50), dtype=dtype)
    logits = dev(padded)[:, 1:6, 3:37, 2:47]  # an un-padding view: strided, offset
    weights = dev(np.ones((7, 40, 50), np.float32))[1:6, 3:37, 2:47]
    out = cp.empty((4, 61, 83), np.uint8)
    got = labels_from_logits(logits, [0, 0, 3, 4], (61, 83), weights=weights, empty_background=True, out=out)
    assert got is out
    (launch,) = cp.record.launches
    assert launch.name == entry
    check_signature(launch, ptx_params)
    a = launch.args
    assert a[0] is logits and int(a[1]) == 5
    assert [int(s) for s in a[2:6]] == [s // padded.itemsize for s in padded.strides]
    assert a[6] is weights and [int(s) for s in a[7:10]] == [50 * 40, 50, 1] and int(a[10]) == 1
    assert a[11].data.tolist() == [0, 0, 3, 4] and a[11].dtype == np.int32 and int(a[12]) == 4
    for tables, n_in, n_out in ((a[13:16], 34, 61), (a[17:20], 45, 83)):
        for got_t, want in zip(tables, linear_weights(n_in, n_out, np.float32)):
            np.testing.assert_array_equal(got_t.data, want)
    assert (int(a[16]), int(a[20])) == (61, 83)
    assert a[21].shape == (4, 61, 83) and np.shares_memory(a[21].data, out.data)
    assert launch.grid == (3, 8, 4) and launch.block == (32, 8, 1)


def test_labels_without_weights_allocates(cp, ptx_params):
    out = labels_from_logits(dev(np.zeros((3, 2, 10, 12), np.float32)), np.array([1], np.int64), (20, 24))
    assert out.shape == (1, 20, 24) and out.dtype == np.uint8
    (launch,) = cp.record.launches
    check_signature(launch, ptx_params)
    assert type(launch.args[6]) is np.uint64 and launch.args[6] == 0  # null: no weights
    assert [int(s) for s in launch.args[7:11]] == [0, 0, 0, 0]
    assert launch.grid == (1, 3, 1)


def test_labels_no_slices(cp):
    out = labels_from_logits(dev(np.zeros((3, 2, 10, 12), np.float32)), [], (20, 24))
    assert out.shape == (0, 20, 24) and not cp.record.launches


@pytest.mark.parametrize("kwargs, match", [
    (dict(logits=np.zeros((3, 2, 4, 4), np.float32)), "must be a CuPy array"),
    (dict(logits=FakeArray(np.zeros((3, 2, 4, 4), np.float64))), "logits must be float32 or float16, got float64"),
    (dict(logits=FakeArray(np.zeros((2, 4, 4), np.float32))), "4 dimensions"),
    (dict(logits=FakeArray(np.zeros((257, 2, 4, 4), np.float16))), "1 to 256 classes"),
    (dict(src=[0, 2]), r"index the block's 2 slices, got values 0\.\.2"),
    (dict(src=[0.5]), "1-D integer host array"),
    (dict(out_plane=(8,)), "two positive sizes"),
    (dict(weights=FakeArray(np.ones((2, 4, 5), np.float32))), r"weights must have shape \(2, 4, 4\)"),
    (dict(out=FakeArray(np.zeros((1, 8, 8), np.uint8))), r"out must have shape \(2, 8, 8\)"),
    (dict(out=FakeArray(np.zeros((2, 8, 16), np.uint8))[:, :, ::2]), "out must be C-contiguous"),
    (dict(out=FakeArray(np.zeros((2, 8, 8), np.int32))), "out must be uint8"),
    (dict(out=FakeArray(np.zeros((2, 8, 8), np.uint8), device=1)), "lives on GPU 1"),
])
def test_labels_argument_errors(cp, kwargs, match):
    args = dict(logits=FakeArray(np.zeros((3, 2, 4, 4), np.float32)), src=[0, 1], out_plane=(8, 8))
    args.update(kwargs)
    with pytest.raises(KernelArgumentError, match=match):
        labels_from_logits(args.pop("logits"), args.pop("src"), args.pop("out_plane"), **args)
    assert not cp.record.launches


def blend_args(k=3, d=8, y=40, x=50, patch=(4, 8, 10), b=2, dtype=np.float32):
    acc = dev(np.zeros((k, d, y, x), np.float32))
    wsum = dev(np.zeros((d, y, x), np.float32))
    pred = dev(np.zeros((b, k, *patch), dtype))
    gauss = dev(np.ones(patch, np.float32))
    return acc, wsum, pred, gauss


@pytest.mark.parametrize("dtype, entry", [(np.float32, "accumulate_tiles_f32"), (np.float16, "accumulate_tiles_f16")])
def test_accumulate_launch_chunks_by_64_tiles(cp, ptx_params, dtype, entry):
    b = 70
    acc, wsum, pred, gauss = blend_args(b=b, dtype=dtype)
    rng = np.random.default_rng(0)
    origins = np.stack([rng.integers(0, 5, b), rng.integers(0, 33, b), rng.integers(0, 41, b)], axis=1)
    accumulate_tiles(acc, wsum, pred, gauss, origins)
    first, second = cp.record.launches
    for launch, lo, hi in ((first, 0, 64), (second, 64, 70)):
        assert launch.name == entry
        check_signature(launch, ptx_params)
        a = launch.args
        assert a[0] is acc and a[1] is wsum and [int(v) for v in a[2:6]] == [3, 8, 40, 50]
        assert a[6].shape == (hi - lo, 3, 4, 8, 10) and np.shares_memory(a[6].data, pred.data)
        assert a[7] is gauss and [int(v) for v in a[8:11]] == [4, 8, 10]
        assert a[11].data.tolist() == origins[lo:hi].tolist() and a[11].dtype == np.int32 and int(a[12]) == hi - lo
        box_lo = origins[lo:hi].min(axis=0)
        box_hi = origins[lo:hi].max(axis=0) + (4, 8, 10)
        assert [int(v) for v in a[13:16]] == box_lo.tolist()
        assert [int(v) for v in a[16:18]] == (box_hi - box_lo)[1:].tolist()
        assert launch.grid == (-(-(box_hi - box_lo)[2] // 32), -(-(box_hi - box_lo)[1] // 8), (box_hi - box_lo)[0])


@pytest.mark.parametrize("change, match", [
    (dict(acc=np.zeros((3, 8, 40, 50), np.float32)), "acc must be a CuPy array"),
    (dict(acc=FakeArray(np.zeros((3, 8, 40, 50), np.float16))), "acc must be float32"),
    (dict(wsum=FakeArray(np.zeros((8, 40, 49), np.float32))), r"wsum must have shape \(8, 40, 50\)"),
    (dict(pred=FakeArray(np.zeros((2, 4, 4, 8, 10), np.float32))), "pred has 4 classes but acc has 3"),
    (dict(pred=FakeArray(np.zeros((2, 3, 4, 8, 20), np.float32))[..., ::2]), "pred must be C-contiguous"),
    (dict(gauss=FakeArray(np.ones((4, 8, 9), np.float32))), r"gauss must have shape \(4, 8, 10\)"),
    (dict(origins=[(0, 0, 0)]), r"origins must be \(2, 3\) host integers"),
    (dict(origins=[(0, 0, 0), (5, 0, 0)]), r"tile origin \(5, 0, 0\) with patch \(4, 8, 10\) does not fit"),
    (dict(origins=[(0, -1, 0), (0, 0, 0)]), r"tile origin \(0, -1, 0\)"),
])
def test_accumulate_argument_errors(cp, change, match):
    acc, wsum, pred, gauss = blend_args()
    args = dict(acc=acc, wsum=wsum, pred=pred, gauss=gauss, origins=[(0, 0, 0), (4, 32, 40)])
    args.update(change)
    with pytest.raises(KernelArgumentError, match=match):
        accumulate_tiles(**args)
    assert not cp.record.launches
