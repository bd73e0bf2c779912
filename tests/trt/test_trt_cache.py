"""The engine cache against the TensorRT double: the key, reuse when unchanged, rebuild when the key
changes, the self-describing header, the policies, and the errors for engines of another TensorRT
version or GPU."""
from __future__ import annotations

import json
import shutil

import pytest

from flare_rt.bundle import Bundle, write_bundle
from flare_rt.errors import EngineError
from flare_rt.trt.build import EngineConfig
from flare_rt.trt.cache import (
    MAGIC,
    EngineKey,
    EngineStore,
    file_sha256,
    load_engine,
    read_header,
    read_plan,
    write_engine,
)
from flare_rt.trt.runtime import current_gpu, host_platform


def load(stack, bundle, batch=2, policy="auto", exact=False, precision=None):
    config = EngineConfig.for_batch(batch, precision or bundle.meta.precision)
    return load_engine(bundle, config, trt=stack.trt, cp=stack.cp,
                       gpu=current_gpu(stack.cp), store=EngineStore(stack.cache), policy=policy, exact=exact)


def engines(stack):
    return sorted(p.name for p in stack.cache.glob("*.engine"))


def test_first_use_builds_then_the_cache_is_reused(gpu_stack, packaged_bundle, log_text):
    stack = gpu_stack()
    first = load(stack, packaged_bundle)
    assert first.source == "built" and first.build_seconds >= 0
    assert len(stack.trt.BUILDS) == 1
    header, offset = read_header(first.path)
    assert header["key"] == {
        "gpu": "Quadro RTX 5000", "compute_capability": "7.5", "tensorrt": "10.16.1.11", "platform": host_platform(),
        "bundle_sha256": file_sha256(packaged_bundle.path), "precision": "fp16",
        "min_batch": 1, "opt_batch": 2, "max_batch": 2}
    assert header["bundle"] == "ts_demo_small_fp16.onnx" and header["workspace_mb"] == 1024
    assert first.path.read_bytes()[:8] == MAGIC and read_plan(first.path) == first.path.read_bytes()[offset:]
    assert first.path.name.startswith("ts_demo_small_fp16-fp16-b1-2-2-quadro-rtx-5000-sm75-trt10.16.1.11-")
    assert (stack.cache / "timing-quadro-rtx-5000-sm75-trt10.16.1.11.cache").is_file()
    assert "no engine baked or cached for fp16, batch 1/2/2, Quadro RTX 5000 (sm_75)" in log_text()

    again = load(stack, packaged_bundle)
    assert again.source == "cache" and again.path == first.path and again.key == first.key
    assert len(stack.trt.BUILDS) == 1  # not rebuilt
    assert f"using cached engine {first.path}" in log_text()


@pytest.mark.parametrize("change", ["tensorrt", "gpu", "bundle", "precision", "larger batch"])
def test_a_changed_key_rebuilds(gpu_stack, packaged_bundle, tmp_path, change, log_text):
    stack = gpu_stack()
    old = load(stack, packaged_bundle)
    bundle, batch, precision = packaged_bundle, 2, None
    if change == "tensorrt":
        stack = gpu_stack(trt_version="10.16.2.3")
    elif change == "gpu":
        stack = gpu_stack(gpu="NVIDIA A100-SXM4-80GB", cc="8.0")
    elif change == "bundle":  # same metadata, one more byte of metadata: another content hash
        meta = packaged_bundle.meta.with_(description=packaged_bundle.meta.description + ".")
        bundle = Bundle.load(write_bundle(packaged_bundle.load_onnx(), meta, tmp_path / "other.onnx"))
    elif change == "precision":  # the fp16 bundle widened to an fp32 engine
        precision = "fp32"
    else:
        batch = 4
    new = load(stack, bundle, batch, precision=precision)
    assert new.source == "built" and new.path != old.path
    assert len(engines(stack)) == 2 and old.path.is_file()  # the other engine stays for its own machine
    why = {"tensorrt": "TensorRT 10.16.1.11, here 10.16.2.3",
           "gpu": "GPU Quadro RTX 5000 (sm_75), here NVIDIA A100-SXM4-80GB (sm_80)",
           "bundle": "another bundle", "precision": "fp16, wanted fp32",
           "larger batch": "batch 1/2/2, wanted 1/4/4"}[change]
    assert f"engines in {stack.cache} that do not fit: {old.path.name}: {why}" in log_text()


def test_a_smaller_batch_reuses_an_engine_whose_profile_covers_it(gpu_stack, packaged_bundle, log_text):
    stack = gpu_stack()
    big = load(stack, packaged_bundle, batch=4)
    small = load(stack, packaged_bundle, batch=2)
    assert small.source == "cache" and small.path == big.path and small.runner.max_batch == 4
    assert "its batch profile 1/4/4 covers 2" in log_text()
    exact = load(stack, packaged_bundle, batch=2, exact=True)  # build-engine asks for exactly its profile
    assert exact.source == "built" and exact.key.max_batch == 2


def test_force_rebuilds_in_place(gpu_stack, packaged_bundle):
    stack = gpu_stack()
    first = load(stack, packaged_bundle)
    forced = load(stack, packaged_bundle, policy="force")
    assert forced.source == "built" and forced.path == first.path and len(stack.trt.BUILDS) == 2
    assert engines(stack) == [first.path.name]


def test_policy_never_refuses_and_says_what_is_there(gpu_stack, packaged_bundle):
    stack = gpu_stack(gpu="NVIDIA GeForce RTX 3090", cc="8.6")
    baked = load(stack, packaged_bundle)  # an image baked on another card
    stack = gpu_stack()
    with pytest.raises(EngineError) as err:
        load(stack, packaged_bundle, policy="never")
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith("no TensorRT engine for fp16, batch 1/2/2, Quadro RTX 5000 (sm_75), TensorRT 10.16.1.11")
    assert f"{baked.path.name}: GPU NVIDIA GeForce RTX 3090 (sm_86), here Quadro RTX 5000 (sm_75)" in msg
    assert "flare-rt build-engine" in msg and "FLARE_RT_ENGINE_BUILD=auto" in msg
    assert len(stack.trt.BUILDS) == 0  # the fresh fake built nothing
    empty = gpu_stack()
    shutil.rmtree(empty.cache)
    with pytest.raises(EngineError, match="holds no engine"):
        load(empty, packaged_bundle, policy="never")


def _forge(path, **key_changes):
    """Rewrite an engine's header (the plan stays): a copied or stale file that claims to fit."""
    header, _ = read_header(path)
    plan = read_plan(path)
    header["key"].update(key_changes)
    write_engine(path, header, plan)


@pytest.mark.parametrize("mismatch", ["version", "gpu"])
def test_an_engine_tensorrt_refuses_gives_one_line_and_is_rebuilt_under_auto(gpu_stack, packaged_bundle, mismatch,
                                                                             log_text):
    if mismatch == "version":  # built by TensorRT 10.13, the header claims 10.16
        built = load(gpu_stack(trt_version="10.13.3.9"), packaged_bundle)
        _forge(built.path, tensorrt="10.16.1.11")
        expected = "Version tag does not match. Current Version: 10.16.1.11, Serialized Engine Version: 10.13.3.9"
    else:  # built on an sm_86 card under the same name
        built = load(gpu_stack(cc="8.6"), packaged_bundle)
        _forge(built.path, compute_capability="7.5")
        expected = "generated on an incompatible device, expecting compute 7.5 got compute 8.6"
    stack = gpu_stack()
    with pytest.raises(EngineError) as err:
        load(stack, packaged_bundle, policy="never")
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"{built.path}: TensorRT 10.16.1.11 cannot load this engine")
    assert expected in msg and "rebuild it with 'flare-rt build-engine BUNDLE --force'" in msg
    rebuilt = load(stack, packaged_bundle)
    assert rebuilt.source == "built" and len(stack.trt.BUILDS) == 1
    assert expected in log_text() and "building a new one" in log_text()
    assert not built.path.exists()  # the engine that claimed to fit is gone, so it is not found again
    assert load(stack, packaged_bundle, policy="never").source == "cache"  # the rebuilt one loads


def test_damaged_and_foreign_files_are_not_engines(gpu_stack, packaged_bundle, tmp_path):
    stack = gpu_stack()
    stack.cache.mkdir(parents=True)
    (stack.cache / "plain.engine").write_bytes(b"\x00" * 64)  # a bare TensorRT plan, no header
    (stack.cache / "cut.engine").write_bytes(MAGIC + b"\x40\x00\x00\x00{\"key\":")
    with pytest.raises(EngineError, match="not a flare-rt engine file"):
        read_header(stack.cache / "plain.engine")
    with pytest.raises(EngineError, match="damaged engine header"):
        read_header(stack.cache / "cut.engine")
    assert list(EngineStore(stack.cache).entries()) == []
    assert load(stack, packaged_bundle).source == "built"


def test_key_describes_itself():
    key = EngineKey("Quadro RTX 5000", "7.5", "10.16.1.11", "linux-x86_64", "ab" * 32, "fp16", 1, 4, 4)
    assert key.describe() == ("fp16, batch 1/4/4, Quadro RTX 5000 (sm_75), TensorRT 10.16.1.11, linux-x86_64, "
                              "bundle abababababab")
    assert EngineKey.from_dict(json.loads(json.dumps(key.__dict__))) == key
    assert key.serves(key) and not key.serves(EngineKey(*list(key.__dict__.values())[:6], 1, 8, 8))
    assert len(key.digest()) == 12


def test_an_unwritable_cache_is_a_backend_error(gpu_stack, packaged_bundle, tmp_path):
    stack = gpu_stack()
    blocker = tmp_path / "file"
    blocker.write_text("")
    store = EngineStore(blocker / "engines")  # a folder below a file: cannot be created, even by root
    with pytest.raises(EngineError, match="cannot write engines into .*FLARE_RT_CACHE"):
        load_engine(packaged_bundle, EngineConfig.for_batch(1), trt=stack.trt, cp=stack.cp,
                    gpu=current_gpu(stack.cp), store=store)
