"""Engine building against the TensorRT double: strongly typed network, no weak-typing flag on 10.x or
11.x, the batch-only profile, workspace and timing cache, and the checks on the bundle's graph."""
from __future__ import annotations

import onnx
import pytest
from onnx import helper
from trt_doubles import TRT10, TRT11

from flare_rt.errors import ConfigError, EngineError
from flare_rt.onnx_graph import FLOAT16, non_fp32_norms, quantized_ops, tensor_types
from flare_rt.trt.build import EngineConfig, build_engine, prepare_graph
from flare_rt.trt.runtime import make_logger

ITEM = (1, 32, 128, 192)  # the packaged bundle: one channel, patch 32 x 128 x 192


@pytest.fixture(scope="module")
def fp16_model():
    from flare_rt.resources import packaged_model

    return onnx.load(str(packaged_model()))


def test_config_is_printable_and_validated():
    cfg = EngineConfig.for_batch(4, "fp16", 512)
    assert cfg.profile == (1, 4, 4)
    assert cfg.describe() == "precision=fp16, min_batch=1, opt_batch=4, max_batch=4, workspace_mb=512, timing_cache=None"
    assert "max_batch=4" in str(cfg)
    with pytest.raises(ConfigError, match="1 <= min <= opt <= max"):
        EngineConfig("fp16", 2, 1, 4)
    with pytest.raises(ConfigError, match="'int8'"):
        EngineConfig("int8")
    with pytest.raises(ConfigError, match="batch size must be >= 1, got 0"):
        EngineConfig.for_batch(0)
    with pytest.raises(ConfigError, match="--workspace"):
        EngineConfig(workspace_mb=0)


@pytest.mark.parametrize("version", [TRT10, TRT11])
def test_build_is_strongly_typed_with_a_batch_only_profile(gpu_stack, fp16_model, version):
    trt = gpu_stack(trt_version=version).trt
    cfg = EngineConfig.for_batch(4, "fp16", workspace_mb=256)
    plan, timing = build_engine(fp16_model.SerializeToString(), "image", cfg, trt, make_logger(trt), b"")
    calls = trt.CALLS
    (flags,) = [c[1] for c in calls if c[0] == "create_network"]
    assert flags == 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    assert not [c for c in calls if c[0] == "set_flag"]  # no BuilderFlag.FP16 (weak typing), on 10.x nor 11.x
    assert ("set_shape", "image", (1, *ITEM), (4, *ITEM), (4, *ITEM)) in calls
    assert ("set_memory_pool_limit", trt.MemoryPoolType.WORKSPACE, 256 << 20) in calls
    assert ("set_timing_cache", False) in calls
    built = trt.BUILDS[-1]
    assert built["strongly_typed"] and built["tensorrt"] == version
    assert built["input"] == ["image", [-1, *ITEM], "HALF"]  # fp16 I/O: the graph's own types
    assert built["output"][2] == "HALF" and built["output"][1][1] == 15
    assert plan.startswith(b"{") and timing  # the timing cache comes back with the build's entries


def test_timing_cache_is_fed_back_in(gpu_stack, fp16_model):
    trt = gpu_stack().trt
    cfg = EngineConfig.for_batch(2)
    _, first = build_engine(fp16_model.SerializeToString(), "image", cfg, trt, make_logger(trt), b"")
    _, second = build_engine(fp16_model.SerializeToString(), "image", cfg, trt, make_logger(trt), first)
    created = [c[1] for c in trt.CALLS if c[0] == "create_timing_cache"]
    assert created == [b"", first]
    assert len(second) > len(first)


def test_a_damaged_timing_cache_is_replaced(gpu_stack, fp16_model, caplog):
    trt = gpu_stack().trt
    plan, timing = build_engine(fp16_model.SerializeToString(), "image", EngineConfig(), trt, make_logger(trt),
                                b"\x00 not a timing cache")
    assert [c[1] for c in trt.CALLS if c[0] == "create_timing_cache"] == [b"\x00 not a timing cache", b""]
    assert plan and timing and "starting an empty one" in caplog.text


def test_parse_and_build_failures_carry_tensorrts_message(gpu_stack, fp16_model, monkeypatch):
    trt = gpu_stack().trt
    cfg = EngineConfig.for_batch(1)
    monkeypatch.setenv("FAKE_TRT_FAIL", "parse")
    with pytest.raises(EngineError, match="could not parse.*UNSUPPORTED_NODE"):
        build_engine(fp16_model.SerializeToString(), "image", cfg, trt, make_logger(trt))
    monkeypatch.setenv("FAKE_TRT_FAIL", "build")
    with pytest.raises(EngineError, match="could not build the engine: .*Could not find any implementation"):
        build_engine(fp16_model.SerializeToString(), "image", cfg, trt, make_logger(trt))


def test_only_the_batch_may_be_dynamic(gpu_stack, fp16_model):
    trt = gpu_stack().trt
    m = onnx.ModelProto()
    m.CopyFrom(fp16_model)
    m.graph.input[0].type.tensor_type.shape.dim[2].dim_param = "z"
    with pytest.raises(EngineError, match=r"shape \(-1, 1, -1, 128, 192\).*only the batch may be dynamic"):
        build_engine(m.SerializeToString(), "image", EngineConfig(), trt, make_logger(trt))
    with pytest.raises(EngineError, match="input is 'image'.*expected 'input'"):
        build_engine(fp16_model.SerializeToString(), "input", EngineConfig(), trt, make_logger(trt))


def test_the_packaged_fp16_bundle_keeps_instance_norm_in_fp32(fp16_model):
    norms = [n for n in fp16_model.graph.node if n.op_type == "InstanceNormalization"]
    assert len(norms) == 18
    types = tensor_types(fp16_model)
    assert all(types[n.input[0]] == 1 and types[n.output[0]] == 1 for n in norms)  # fp32 in and out
    assert types[fp16_model.graph.input[0].name] == FLOAT16
    assert prepare_graph(fp16_model, "fp16", "fp16") is fp16_model


def _without_norm_casts(model):
    """The fp16 graph with the Casts around each InstanceNorm removed: normalisation would run in fp16."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    nodes = list(m.graph.node)
    casts_in = {n.output[0]: n for n in nodes if n.op_type == "Cast"}
    casts_out = {n.input[0]: n for n in nodes if n.op_type == "Cast"}
    dropped, fp16_params = set(), set()
    for node in nodes:
        if node.op_type == "InstanceNormalization":
            before, after = casts_in[node.input[0]], casts_out[node.output[0]]
            node.input[0], node.output[0] = before.input[0], after.output[0]
            dropped |= {before.output[0], after.output[0]}
            fp16_params |= set(node.input[1:])
    for i, init in enumerate(m.graph.initializer):
        if init.name in fp16_params:
            arr = onnx.numpy_helper.to_array(init).astype("float16")
            m.graph.initializer[i].CopyFrom(onnx.numpy_helper.from_array(arr, init.name))
    keep = [n for n in nodes if not (n.op_type == "Cast" and n.output[0] in dropped)]
    del m.graph.node[:]
    m.graph.node.extend(keep)
    return m


def test_a_graph_with_fp16_instance_norm_is_refused(fp16_model):
    bad = _without_norm_casts(fp16_model)
    assert len(non_fp32_norms(bad)) == 18
    with pytest.raises(EngineError, match="18 InstanceNorm node.*fp16 input.*flare-rt export --precision fp16"):
        prepare_graph(bad, "fp16", "fp16", "bad.onnx")


def test_quantised_graphs_are_refused(fp16_model):
    with pytest.raises(EngineError, match="'int8' bundle is not an fp16/fp32 graph"):
        prepare_graph(fp16_model, "int8", "fp16", "q.onnx")
    m = onnx.ModelProto()
    m.CopyFrom(fp16_model)
    x = m.graph.input[0].name
    m.graph.node.insert(0, helper.make_node("QuantizeLinear", [x, "s", "zp"], ["xq"]))
    assert quantized_ops(m) == ["QuantizeLinear"]
    with pytest.raises(EngineError, match="bundle with QuantizeLinear is not an fp16/fp32 graph"):
        prepare_graph(m, "fp16", "fp16", "q.onnx")


def test_precision_conversions_use_the_export_transforms(fp16_model, caplog):
    from flare_rt.onnx_graph import to_fp32

    wide = prepare_graph(fp16_model, "fp16", "fp32")
    assert not any(i.data_type == FLOAT16 for i in wide.graph.initializer)
    assert wide.graph.input[0].type.tensor_type.elem_type == 1
    fp32 = to_fp32(fp16_model)
    narrowed = prepare_graph(fp32, "fp32", "fp16", "m.onnx")
    assert narrowed.graph.input[0].type.tensor_type.elem_type == FLOAT16
    assert non_fp32_norms(narrowed) == []
    assert "verify it first with 'flare-rt export m.onnx OUT.onnx --precision fp16'" in caplog.text
