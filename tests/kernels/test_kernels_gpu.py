"""The native kernels on a GPU against the library paths they replace: labels identical to
``postprocess.labels_refined`` (numpy on the CPU and CuPy on the GPU), blend buffers identical to the
sequential per-tile loop of ``window.sliding_window_blocks``; on blended logits of the demo model on
a real CT and on random shapes (edge tiles, ties, strided views), fp32 and fp16, with the module
loaded both ways (prebuilt fatbin and NVRTC). Skipped without CuPy and a CUDA device."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from kernel_tools import REPO
from flare_rt.bundle import Bundle
from flare_rt.kernels import accumulate_tiles, labels_from_logits, load_kernels, ops
from flare_rt.kernels.loader import load_module
from flare_rt.postprocess import labels_refined, refine_plane
from flare_rt.resample import make_plan, z_source_index
from flare_rt.resources import packaged_model
from flare_rt.window import WindowConfig, gaussian_map, tile_origins

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module", params=["prebuilt", "nvrtc"])
def kernels(request, cupy_device, tmp_path_factory):
    """The module loaded from the fatbin, then compiled by NVRTC (into a temporary cache folder)."""
    cp = cupy_device
    mp = pytest.MonkeyPatch()
    mp.setenv("FLARE_RT_CACHE", str(tmp_path_factory.mktemp("cache")))
    module = load_module(cp, int(cp.cuda.Device().compute_capability), request.param)
    mp.setattr(ops, "load_kernels", lambda _cp: module)
    yield module
    mp.undo()


def test_real_cupy_loads_the_prebuilt_fatbin_or_says_why(cupy_device, tmp_path, monkeypatch):
    monkeypatch.setenv("FLARE_RT_CACHE", str(tmp_path))
    module = load_kernels(cupy_device)
    print(module.describe())
    cc = int(cupy_device.cuda.Device().compute_capability)
    if 75 <= cc < 100:  # a cubin of the fatbin runs here (PTX above)
        assert module.choice.how == "prebuilt", module.describe()


def test_nvrtc_uses_the_flare_rt_cache(cupy_device, tmp_path):
    """In a fresh process (CuPy memoizes compiled modules per process): NVRTC's cubin lands in the
    flare-rt cache folder, and the next process loads it from there."""
    code = ("import cupy; from flare_rt.kernels.loader import load_module; "
            "m = load_module(cupy, int(cupy.cuda.Device().compute_capability), 'nvrtc'); print(m.describe())")
    env = {**os.environ, "FLARE_RT_CACHE": str(tmp_path)}
    env.pop("CUPY_CACHE_DIR", None)
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=REPO)
    cached = sorted(p.name for p in (tmp_path / "kernels").iterdir())
    assert any(name.endswith(".cubin") for name in cached), cached
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=REPO)
    assert sorted(p.name for p in (tmp_path / "kernels").iterdir()) == cached  # reused, not recompiled


# -- labels_from_logits --------------------------------------------------------------------------
def reference_labels(logits: np.ndarray, src, out_plane) -> np.ndarray:
    return np.stack([refine_plane(logits[:, s], out_plane) for s in src]) if len(src) else \
        np.zeros((0, *out_plane), np.uint8)


def emitted(acc: np.ndarray, w: np.ndarray, empty_background: bool) -> np.ndarray:
    """window.sliding_window_blocks' normalisation of a block (its emit step), numpy."""
    out = np.where(w > 0, acc / np.maximum(w, 1e-30), 0).astype(np.float32)
    if empty_background:
        out[0][w == 0] = 1.0
    return out


CASES = [  # K, (nz, Yn, Xn), (Yo, Xo), quantised (ties), dtype
    (15, (6, 37, 45), (101, 90), False, np.float32),
    (15, (6, 37, 45), (101, 90), False, np.float16),
    (3, (4, 50, 40), (50, 40), True, np.float32),  # same plane: weights 0 and 0.5
    (5, (5, 64, 64), (23, 31), True, np.float32),  # downsampling
    (14, (3, 9, 300), (513, 17), True, np.float16),
    (2, (2, 1, 7), (5, 9), False, np.float32),  # one network row
    (256, (2, 6, 6), (13, 11), False, np.float32),  # the most classes uint8 holds
]


@pytest.mark.parametrize("k, shape, plane, quantised, dtype", CASES)
def test_labels_random(kernels, cupy_device, k, shape, plane, quantised, dtype):
    cp = cupy_device
    rng = np.random.default_rng(k * 1000 + shape[1])
    full = rng.normal(0, 3, (k, shape[0] + 2, shape[1] + 5, shape[2] + 4)).astype(np.float32)
    if quantised:
        full = np.round(full)  # many exact ties between classes
    full = full.astype(dtype)
    view = (slice(None), slice(1, 1 + shape[0]), slice(2, 2 + shape[1]), slice(3, 3 + shape[2]))
    logits = full[view]  # strided, as the un-padding view of the blend buffer
    src = np.sort(rng.integers(0, shape[0], 2 * shape[0]))
    got = labels_from_logits(cp.asarray(full)[view], src, plane)
    np.testing.assert_array_equal(got.get(), reference_labels(logits, src, plane))


def test_labels_nan_as_numpy(kernels, cupy_device):
    cp = cupy_device
    rng = np.random.default_rng(7)
    logits = rng.normal(size=(6, 2, 20, 20)).astype(np.float32)
    logits[2, 0, 5:9, 5:9] = np.nan
    logits[4, 1, ::3, ::3] = np.nan
    src = np.array([0, 1])
    got = labels_from_logits(cp.asarray(logits), src, (45, 41))
    np.testing.assert_array_equal(got.get(), reference_labels(logits, src, (45, 41)))


@pytest.mark.parametrize("empty_background", [False, True])
def test_labels_fused_with_normalisation(kernels, cupy_device, empty_background):
    cp = cupy_device
    rng = np.random.default_rng(int(empty_background))
    k, nz, yn, xn = 15, 5, 40, 48
    w = rng.uniform(0.5, 30, (nz, yn, xn)).astype(np.float32)
    w[:, :10, :12] = 0  # rows no kept tile covers
    w[1, 20, 20] = 1e-31  # below the 1e-30 floor
    acc = (rng.normal(0, 3, (k, nz, yn, xn)) * w).astype(np.float32)
    src = np.array([0, 0, 1, 2, 3, 4, 4])
    out = cp.zeros((len(src) + 2, 97, 101), cp.uint8)
    labels_from_logits(cp.asarray(acc), src, (97, 101), weights=cp.asarray(w), empty_background=empty_background,
                       out=out[1:-1])
    want = reference_labels(emitted(acc, w, empty_background), src, (97, 101))
    np.testing.assert_array_equal(out[1:-1].get(), want)
    assert not out[0].any() and not out[-1].any()  # nothing written outside `out`


#: Slices of the example CT the real-data tests run on (156 mm of abdomen: 18 tiles of the demo model).
REAL_SLICES = slice(60, 112)
#: Output grids of the back plans: the CT's own (3 mm: the network plane is downsampled) and the same
#: field of view at 0.75 mm in-plane (upsampled, as for a typical 512 x 512 CT).
REAL_OUT_SPACINGS = ((3.0, 3.0, 3.0), (3.0, 0.75, 0.75))


@pytest.fixture(scope="module")
def real_blocks(example_ct_path):
    """Blended logits of the demo model (onnxruntime, CPU) on a real CT (the repository's example),
    computed as the pipeline does (normalise, resample to the network spacing, sliding window), and
    back plans from the network grid to two output grids."""
    from flare_rt.backends import create_backend
    from flare_rt.io import load_volume
    from flare_rt.postprocess import refinable
    from flare_rt.preprocess import compute_new_shape, ct_normalize
    from flare_rt.resample import resample
    from flare_rt.window import sliding_window_blocks

    bundle = Bundle.load(packaged_model())
    meta = bundle.meta
    vol = load_volume(example_ct_path)
    ct = vol.array[REAL_SLICES]
    net_shape = compute_new_shape(ct.shape, vol.spacing, meta.spacing)
    plan = make_plan(ct.shape, net_shape, vol.spacing, meta.spacing, meta.resampling, probabilities=False)
    data = resample(ct_normalize(ct, meta.normalization)[None], plan, np.float32, np.float32)
    with create_backend(bundle, "onnxruntime", "cpu") as backend:
        blocks = [(z0, z1, blk.copy()) for z0, z1, blk in sliding_window_blocks(
            data, backend, meta.num_classes, WindowConfig(meta.patch_size, batch_size=2))]
    plans = []
    for spacing in REAL_OUT_SPACINGS:
        out_shape = compute_new_shape(net_shape, meta.spacing, spacing)
        back = make_plan(net_shape, out_shape, meta.spacing, spacing, meta.resampling, probabilities=True)
        assert refinable(back), back
        plans.append(back)
    return blocks, plans


@pytest.mark.parametrize("which", range(len(REAL_OUT_SPACINGS)))
def test_labels_real_ct_equal_labels_refined(kernels, cupy_device, real_blocks, which):
    cp = cupy_device
    blocks, plans = real_blocks
    plan = plans[which]
    cpu = labels_refined(iter(blocks), plan)
    gpu_library = labels_refined(((z0, z1, cp.asarray(b)) for z0, z1, b in blocks), plan).get()
    np.testing.assert_array_equal(gpu_library, cpu)  # the library path it replaces, on the GPU
    idx = z_source_index(plan.in_shape[0], plan.out_shape[0])
    plane = plan.out_shape[1:]
    labels = cp.zeros(plan.out_shape, cp.uint8)
    for z0, z1, blk in blocks:
        targets = np.flatnonzero((idx >= z0) & (idx < z1))  # consecutive: idx never decreases
        if not targets.size:
            continue
        src = idx[targets] - z0
        labels_from_logits(cp.asarray(blk), src, plane, out=labels[targets[0]:targets[-1] + 1])
        half = blk.astype(np.float16)  # fp16 logits: identical to the CPU path on the same values
        np.testing.assert_array_equal(labels_from_logits(cp.asarray(half), src, plane).get(),
                                      reference_labels(half, src, plane))
    np.testing.assert_array_equal(labels.get(), cpu)
    assert len(np.unique(cpu)) > 2  # a real segmentation, not one class


# -- accumulate_tiles ----------------------------------------------------------------------------
def sequential_blend(acc, wsum, pred, gauss, origins):
    """window.sliding_window_blocks' flush_batch, numpy: tile after tile, float32."""
    pz, py, px = gauss.shape
    for p, (z, y, x) in zip(pred.astype(np.float32), origins):
        p *= gauss
        acc[:, z:z + pz, y:y + py, x:x + px] += p
        wsum[z:z + pz, y:y + py, x:x + px] += gauss


def tile_batch(rng, k, buffer, patch, b):
    """b origins over the buffer, edges included, with repeats (the order must count)."""
    hi = np.array(buffer) - np.array(patch)
    origins = np.stack([rng.integers(0, h + 1, b) for h in hi], axis=1)
    origins[0] = 0
    origins[-1] = hi  # the far edge tile
    if b > 2:
        origins[1] = origins[0]
    return origins


@pytest.mark.parametrize("k, buffer, patch, b", [
    (15, (16, 70, 90), (8, 32, 40), 7),
    (3, (5, 33, 47), (5, 16, 16), 70),  # two launches (64 + 6): order across launches
    (1, (4, 9, 300), (2, 9, 31), 3),
    (15, (32, 128, 192), (32, 128, 192), 1),  # the patch fills the buffer
])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_accumulate_random(kernels, cupy_device, k, buffer, patch, b, dtype):
    cp = cupy_device
    rng = np.random.default_rng(b)
    acc = rng.normal(size=(k, *buffer)).astype(np.float32)  # earlier batches already in the buffer
    wsum = rng.uniform(0, 5, buffer).astype(np.float32)
    pred = rng.normal(0, 4, (b, k, *patch)).astype(dtype)
    gauss = gaussian_map(patch)
    origins = tile_batch(rng, k, buffer, patch, b)
    acc_d, wsum_d = cp.asarray(acc), cp.asarray(wsum)
    accumulate_tiles(acc_d, wsum_d, cp.asarray(pred), cp.asarray(gauss), origins)
    sequential_blend(acc, wsum, pred, gauss, origins)
    np.testing.assert_array_equal(acc_d.get(), acc)  # bit-identical: same operations, same order
    np.testing.assert_array_equal(wsum_d.get(), wsum)


def test_accumulate_real_logits_and_the_fp16_library_bound(kernels, cupy_device, real_blocks):
    """Tiles cut from the real CT's blended logits, at the window's own tile origins: identical to the
    sequential loop; the library loop on fp16 network output (``p *= gauss`` rounds to fp16) stays
    within its rounding bound of the kernel, which widens to fp32 first."""
    cp = cupy_device
    blocks, _ = real_blocks
    logits = np.concatenate([b for _, _, b in blocks], axis=1)
    k = logits.shape[0]
    patch = Bundle.load(packaged_model()).meta.patch_size
    shape = tuple(max(s, p) for s, p in zip(logits.shape[1:], patch))
    origins = np.array(tile_origins(shape, WindowConfig(patch)))
    padded = np.zeros((k, *shape), np.float32)
    padded[:, :logits.shape[1], :logits.shape[2], :logits.shape[3]] = logits
    pred = np.stack([padded[:, z:z + patch[0], y:y + patch[1], x:x + patch[2]] for z, y, x in origins])
    gauss = gaussian_map(patch)
    for dtype in (np.float32, np.float16):
        p = pred.astype(dtype)
        acc, wsum = np.zeros((k, *shape), np.float32), np.zeros(shape, np.float32)
        acc_d, wsum_d = cp.asarray(acc), cp.asarray(wsum)
        accumulate_tiles(acc_d, wsum_d, cp.asarray(p), cp.asarray(gauss), origins)
        sequential_blend(acc, wsum, p, gauss, origins)
        np.testing.assert_array_equal(acc_d.get(), acc)
        np.testing.assert_array_equal(wsum_d.get(), wsum)
    # the GPU library loop on fp16 predictions: p *= gauss is rounded to fp16 before the fp32 sum
    p16 = cp.asarray(pred.astype(np.float16))
    lib = cp.zeros((k, *shape), cp.float32)
    g = cp.asarray(gauss)
    for p, (z, y, x) in zip(p16, origins):
        p *= g
        lib[:, z:z + patch[0], y:y + patch[1], x:x + patch[2]] += p
    # |lib - kernel| <= S * (2**-10 + 2**-18) + 1e-6 with S = sum over tiles of |p * g|: each product
    # rounded to fp16 (2**-11, doubled in case the library also rounds g to fp16), the fp32 sums'
    # rounding of different operands (2**-18 covers 64 additions), fp16 subnormals (absolute)
    s = np.zeros((k, *shape), np.float32)
    sequential_blend(s, np.zeros(shape, np.float32), np.abs(pred.astype(np.float16)), gauss, origins)
    diff = np.abs(lib.get() - acc)
    excess = diff - (s * (2.0 ** -10 + 2.0 ** -18) + 1e-6)
    assert (excess <= 0).all(), float(excess.max())
    assert diff.max() > 0  # the library's fp16 rounding is real: the kernel is not that path
