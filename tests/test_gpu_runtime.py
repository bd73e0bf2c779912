"""The GPU runtime: on the CPU, what can be checked without a GPU (the fp16 network with fp32 norms,
out-of-memory retries, the backend's device choice); on a CUDA machine (marker ``gpu``), the CuPy
pipeline against the numpy one and the torch CUDA backend against the CPU path, on real CTs."""
from __future__ import annotations

import copy
import importlib.util

import numpy as np
import pytest

from flare_rt.bundle import Bundle
from flare_rt.errors import ResourceError
from flare_rt.io import load_volume
from flare_rt.pipeline import SegmentOptions, Segmenter
from flare_rt.resources import packaged_model
from trivial_nets import BandNet
from agreement import dice_per_class


def cuda_available() -> bool:
    if importlib.util.find_spec("torch") is None or importlib.util.find_spec("cupy") is None:
        return False
    import torch

    return torch.cuda.is_available()


needs_gpu = pytest.mark.skipif(not cuda_available(), reason="needs a CUDA GPU with torch and CuPy")


# -- on the CPU ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("flag, expected", [([], False), (["--cuda-graphs"], True)])
def test_cuda_graphs_are_opt_in_on_the_command_line(small_ct_path, tmp_path, monkeypatch, flag, expected):
    import flare_rt.backends as backends
    from flare_rt.cli import main

    seen = {}

    def stop(bundle, *args, cuda_graphs=None, **kwargs):
        seen["cuda_graphs"] = cuda_graphs
        raise ResourceError("stop here: only the options were wanted")

    monkeypatch.setattr(backends, "create_backend", stop)
    assert main(["segment", str(small_ct_path), str(tmp_path / "out.nii.gz"), "-q", *flag]) == 7
    assert seen == {"cuda_graphs": expected} and not (tmp_path / "out.nii.gz").exists()


def test_torch_allocator_gets_expandable_segments_unless_configured():
    from flare_rt.backends.torch_backend import allocator_settings

    env = {}
    allocator_settings(env)
    assert env == {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}
    for name in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"):  # the user's setting wins, either name
        env = {name: "max_split_size_mb:64"}
        allocator_settings(env)
        assert env == {name: "max_split_size_mb:64"}

def test_fp16_network_keeps_its_norms_in_fp32():
    torch = pytest.importorskip("torch", reason="the torch extra (pip install -e '.[dev]')")
    from flare_rt.nets import UNetConfig, build_network
    from flare_rt.nets.build import half_with_fp32_norm

    cfg = UNetConfig(features_per_stage=(4, 8), kernel_sizes=((3, 3, 3),) * 2, strides=((1, 1, 1), (2, 2, 2)),
                     n_conv_per_stage=(2, 2), n_conv_per_stage_decoder=(2,))
    torch.manual_seed(0)
    net = build_network(cfg)
    half = half_with_fp32_norm(copy.deepcopy(net))
    seen = []
    for m in half.modules():
        if isinstance(m, torch.nn.modules.instancenorm._InstanceNorm):
            m.register_forward_hook(lambda mod, inp, out: seen.append((inp[0].dtype, out.dtype, mod.weight.dtype)))
    x = torch.randn(1, 1, 8, 16, 16)
    with torch.no_grad():
        ref, out = net(x), half(x.half())
    assert len(seen) == 6 and set(seen) == {(torch.float32, torch.float32, torch.float32)}
    assert out.dtype == torch.float16
    convs = [m for m in half.modules() if isinstance(m, (torch.nn.Conv3d, torch.nn.ConvTranspose3d))]
    assert convs and all(c.weight.dtype == torch.float16 for c in convs)
    err = (out.float() - ref).abs().max().item()
    assert err < 2e-2 * ref.abs().max().item(), err  # fp16 rounding only


class OutOfMemoryError(RuntimeError):
    """Named as torch's and CuPy's out-of-memory errors."""


class TightBackend:
    """A network that runs out of memory above ``limit`` tiles per call (``limit`` 0: always)."""

    def __init__(self, limit: int):
        self.limit, self.calls = limit, []
        self.net = BandNet()

    def __call__(self, batch):
        self.calls.append(len(batch))
        if len(batch) > self.limit:
            raise OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self.net(batch)


def test_out_of_memory_retries_with_smaller_batches(small_ct_path, caplog):
    bundle = Bundle.load(packaged_model())
    ct = load_volume(small_ct_path)
    ref = Segmenter(bundle, BandNet(), SegmentOptions(batch_size=1)).predict(ct)
    backend = TightBackend(limit=2)
    pred = Segmenter(bundle, backend, SegmentOptions(batch_size=8)).predict(ct)
    np.testing.assert_array_equal(pred.labels, ref.labels)
    assert backend.calls[:3] == [8, 4, 2] and max(backend.calls[3:]) <= 2  # halved until it fits, then kept
    assert "retrying with 4" in caplog.text and "retrying with 2" in caplog.text


def test_out_of_memory_with_one_tile_is_a_resource_error(small_ct_path):
    bundle = Bundle.load(packaged_model())
    with pytest.raises(ResourceError, match="out of .* memory even with one tile per batch") as info:
        Segmenter(bundle, TightBackend(limit=0), SegmentOptions(batch_size=2)).predict(load_volume(small_ct_path))
    assert info.value.exit_code == 7


def test_other_errors_are_not_retried(small_ct_path):
    class Broken:
        calls = 0

        def __call__(self, batch):
            Broken.calls += 1
            raise RuntimeError("shape mismatch")

    with pytest.raises(RuntimeError, match="shape mismatch"):
        Segmenter(Bundle.load(packaged_model()), Broken(), SegmentOptions(batch_size=4)).predict(
            load_volume(small_ct_path))
    assert Broken.calls == 1


def test_out_of_memory_outside_the_window_is_a_resource_error(small_ct_path, monkeypatch):
    """Upload and preprocessing are not retried (nothing to make smaller): one typed error, exit code 7."""
    import flare_rt.pipeline as pipeline

    def tight_resample(*args, **kwargs):
        raise OutOfMemoryError("CUDA out of memory. Tried to allocate 26.00 MiB")

    monkeypatch.setattr(pipeline, "resample", tight_resample)
    ct = load_volume(small_ct_path)
    with pytest.raises(ResourceError, match="out of host memory outside the sliding window .OutOfMemoryError.") \
            as info:
        Segmenter(Bundle.load(packaged_model()), BandNet(), SegmentOptions()).predict(ct)
    assert info.value.exit_code == 7 and str(small_ct_path.name) in str(info.value)

    def broken_resample(*args, **kwargs):
        raise ValueError("not a memory problem")

    monkeypatch.setattr(pipeline, "resample", broken_resample)
    with pytest.raises(ValueError, match="not a memory problem"):
        Segmenter(Bundle.load(packaged_model()), BandNet(), SegmentOptions()).predict(ct)


def test_cupy_allocates_through_torch_and_empty_arrays_name_their_device(monkeypatch):
    """The allocator handed to CuPy (doubles of the CuPy and torch calls it makes): a block of torch's
    caching allocator per request, given back when CuPy drops it, on torch's stream; a 0-byte request
    (CuPy makes one for every empty array) is a null pointer that names its device, as CuPy requires."""
    import types

    from flare_rt.gpu import share_torch_pool_and_stream

    log = []

    class UnownedMemory:
        def __init__(self, ptr, size, owner, device_id=-1):
            if device_id < 0 and ptr == 0:  # cupy/cuda/memory.pyx
                raise RuntimeError("UnownedMemory requires explicit device ID for a null pointer.")
            self.ptr, self.size, self.owner, self.device_id = ptr, size, owner, device_id

    class MemoryPointer:
        def __init__(self, mem, offset):
            self.mem, self.ptr = mem, mem.ptr + offset

    class ExternalStream:
        def __init__(self, ptr):
            self.ptr = ptr

        def use(self):
            log.append(("stream", self.ptr))

    cuda = types.SimpleNamespace(Device=lambda: types.SimpleNamespace(id=3), UnownedMemory=UnownedMemory,
                                 MemoryPointer=MemoryPointer, ExternalStream=ExternalStream,
                                 set_allocator=lambda f: log.append(("allocator", f)))
    torch_cuda = types.SimpleNamespace(
        current_stream=lambda device=None: types.SimpleNamespace(cuda_stream=0, device=device),
        caching_allocator_alloc=lambda size, device, stream: log.append(("alloc", size, device)) or 4096,
        caching_allocator_delete=lambda ptr: log.append(("free", ptr)))
    monkeypatch.setattr(share_torch_pool_and_stream, "done", False, raising=False)
    share_torch_pool_and_stream(types.SimpleNamespace(cuda=cuda), types.SimpleNamespace(cuda=torch_cuda))
    allocate = log[0][1]
    assert log[1] == ("stream", 0)  # torch's current stream is CuPy's

    empty = allocate(0)
    assert empty.ptr == 0 and empty.mem.device_id == 3 and not any(e[0] == "alloc" for e in log)
    block = allocate(1024)
    assert block.ptr == 4096 and block.mem.device_id == 3 and log[-1] == ("alloc", 1024, 3)
    del block
    import gc

    gc.collect()
    assert log[-1] == ("free", 4096)


# -- on a GPU -----------------------------------------------------------------------------------------------


@pytest.mark.gpu
@needs_gpu
def test_cupy_preprocessing_matches_numpy(shared_data):
    import cupy

    from flare_rt.preprocess import compute_new_shape, ct_normalize, nonzero_crop
    from flare_rt.resample import make_plan, resample

    meta = Bundle.load(packaged_model()).meta
    ct = load_volume(shared_data / "ts_example_ct.nii.gz")  # (the GPU test machine carries this CT only)
    crop = nonzero_crop(ct.array)
    arr = ct.array[crop.slices]
    shape = compute_new_shape(arr.shape, ct.spacing, meta.spacing)
    plan = make_plan(arr.shape, shape, ct.spacing, meta.spacing, meta.resampling, False)
    pre = lambda a: ct_normalize(a, meta.normalization)  # noqa: E731
    for dtype, bound in ((np.float32, 1e-4), (np.float64, 1e-6)):
        ref = resample(arr[None], plan, np.float32, dtype, pre=pre)
        out = resample(cupy.asarray(arr)[None], plan, np.float32, dtype, pre=pre).get()
        assert float(np.abs(out - ref).max()) <= bound * max(1.0, float(np.abs(ref).max()))
    assert nonzero_crop(cupy.asarray(ct.array)) == crop


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("case", ["ts_example_ct.nii.gz", "ts_example_ct_sm.nii.gz"])
def test_torch_cuda_fp16_agrees_with_the_cpu_path(shared_data, case):
    from flare_rt.backends import create_backend

    bundle = Bundle.load(packaged_model())
    ct = load_volume(shared_data / case)
    cpu = Segmenter(bundle, create_backend(bundle, "onnxruntime", "cpu"), SegmentOptions()).predict(ct)
    gpu_backend = create_backend(bundle, "torch", "cuda")
    import cupy

    assert gpu_backend.xp is cupy
    gpu = Segmenter(bundle, gpu_backend, SegmentOptions()).predict(ct)
    assert gpu.labels.shape == cpu.labels.shape and gpu.labels.dtype == np.uint8
    dice = dice_per_class(gpu.labels, cpu.labels)
    assert dice and min(dice.values()) >= 0.98, dice
    assert float((gpu.labels == cpu.labels).mean()) >= 0.995


@pytest.mark.gpu
@needs_gpu
def test_cuda_graph_replay_equals_eager_and_one_pool_serves_both(shared_data):
    import cupy

    from flare_rt.backends import BackendOptions
    from flare_rt.backends.torch_backend import TorchBackend

    bundle = Bundle.load(packaged_model())
    graphed = TorchBackend(bundle, BackendOptions(device="cuda", cuda_graphs=True))
    eager = TorchBackend(bundle, BackendOptions(device="cuda"))
    x = cupy.asarray(np.random.default_rng(0).standard_normal((1, 1, *bundle.meta.patch_size), dtype=np.float32))
    a, b = graphed(x), eager(x)
    first = a.copy()
    graphed(x * 2)  # the next replay must not overwrite a returned array
    cupy.testing.assert_array_equal(a, first)
    assert float(cupy.abs(a.astype(cupy.float32) - b.astype(cupy.float32)).max()) <= 1e-2 * float(cupy.abs(b).max())
    pred = Segmenter(bundle, graphed, SegmentOptions()).predict(load_volume(shared_data / "ts_example_ct.nii.gz"))
    assert pred.labels.any()
    assert cupy.get_default_memory_pool().used_bytes() == 0  # CuPy allocated through torch's pool


@pytest.mark.gpu
@needs_gpu
def test_gpu_out_of_memory_is_retried_then_reported(shared_data, monkeypatch):
    """A real CUDA out-of-memory: the backend limited to a sliver of the card by torch's memory fraction."""
    import torch

    from flare_rt.backends import create_backend

    bundle = Bundle.load(packaged_model())
    backend = create_backend(bundle, "torch", "cuda")
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(64 * 2**20 / total)  # 64 MiB: not even one tile fits
    try:
        with pytest.raises(ResourceError, match="GPU memory"):
            Segmenter(bundle, backend, SegmentOptions(batch_size=2)).predict(
                load_volume(shared_data / "ts_example_ct.nii.gz"))
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
        torch.cuda.empty_cache()
