"""Pure ONNX graph transforms (no torch): fp16 conversion with InstanceNorm kept in fp32, the
inverse upcast used to run fp16 bundles on CPUs without fp16 kernels, and weight extraction."""
from __future__ import annotations

import numpy as np

FLOAT, FLOAT16 = 1, 10  # onnx.TensorProto.FLOAT / FLOAT16
FP32_OPS = ("InstanceNormalization",)  # normalisation stays in fp32: the largest fp16 error source


def _set_io_type(model, elem_type: int) -> None:
    for vi in list(model.graph.input) + list(model.graph.output):
        vi.type.tensor_type.elem_type = elem_type


def to_fp16(model):
    """Copy of an fp32 ModelProto with fp16 weights and activations, fp16 I/O, and fp32 InstanceNorm
    (Casts around each normalisation; its scale and bias stay fp32)."""
    import onnx
    from onnx import helper, numpy_helper

    m = onnx.ModelProto()
    m.CopyFrom(model)
    keep_fp32 = {name for node in m.graph.node if node.op_type in FP32_OPS for name in node.input[1:]}
    for i, init in enumerate(m.graph.initializer):
        if init.data_type == FLOAT and init.name not in keep_fp32:
            arr = numpy_helper.to_array(init).astype(np.float16)
            m.graph.initializer[i].CopyFrom(numpy_helper.from_array(arr, init.name))
    nodes = []
    for node in m.graph.node:
        if node.op_type in FP32_OPS:
            x, y = node.input[0], node.output[0]
            nodes.append(helper.make_node("Cast", [x], [f"{x}__fp32_{y}"], to=FLOAT))
            node.input[0] = f"{x}__fp32_{y}"
            node.output[0] = f"{y}__fp32"
            nodes.append(node)
            nodes.append(helper.make_node("Cast", [f"{y}__fp32"], [y], to=FLOAT16))
        else:
            if node.op_type == "Cast" and any(a.name == "to" and a.i == FLOAT for a in node.attribute):
                for a in node.attribute:
                    if a.name == "to":
                        a.i = FLOAT16
            nodes.append(node)
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    del m.graph.value_info[:]
    _set_io_type(m, FLOAT16)
    onnx.checker.check_model(m)
    return m


def to_fp32(model):
    """Upcast an fp16 bundle graph to fp32 (weights widened exactly; the casts become no-ops), for
    execution providers without fp16 kernels. Returns the model unchanged if it has no fp16 tensors."""
    import onnx
    from onnx import numpy_helper

    if not any(init.data_type == FLOAT16 for init in model.graph.initializer):
        return model
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for i, init in enumerate(m.graph.initializer):
        if init.data_type == FLOAT16:
            arr = numpy_helper.to_array(init).astype(np.float32)
            m.graph.initializer[i].CopyFrom(numpy_helper.from_array(arr, init.name))
    for node in m.graph.node:
        if node.op_type == "Cast":
            for a in node.attribute:
                if a.name == "to" and a.i == FLOAT16:
                    a.i = FLOAT
    del m.graph.value_info[:]
    _set_io_type(m, FLOAT)
    return m


def initializers(model) -> dict[str, np.ndarray]:
    from onnx import numpy_helper

    return {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}


def pool_plan(spatial, window: int = 4, rest: int = 4096) -> list[tuple[int, ...]]:
    """AveragePool kernels (= strides) that reduce ``spatial`` in short sums: each pass takes the largest
    divisor <= ``window`` of every axis (at most window**3 terms per sum), until at most ``rest`` voxels
    are left for the final mean or no axis divides further."""
    dims, plan = [int(d) for d in spatial], []
    while int(np.prod(dims)) > rest:
        k = tuple(max(f for f in range(1, window + 1) if d % f == 0) for d in dims)
        if all(f == 1 for f in k):
            break
        plan.append(k)
        dims = [d // f for d, f in zip(dims, k)]
    return plan


def _opset(model) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def pooled_instance_norm(model, min_voxels: int = 1 << 18):
    """Copy of a graph whose InstanceNormalization over at least ``min_voxels`` voxels computes its
    statistics by hierarchical averaging (AveragePool passes of at most 64 terms, then a mean of the
    few thousand left; shape inference finds the sizes), two-pass: mean, then the mean of the squared
    deviations; y = (x - mean) * scale / sqrt(var + eps) + bias. The same function, in a different
    summation order.

    OpenVINO's CPU plugin normalises a 5D tensor in the convolutions' channels-last layout with one
    long sequential fp32 sum per channel; on a real CT patch (786k voxels per channel at full
    resolution) that moved the logits up to 0.2 from a float64 reference (ONNX Runtime: 0.03). Short
    sums fix that where the data lie, with no layout change: measured on ts269 tiles (bench/README.md)
    0.006 from float64 at the speed of the native op, where running the op on a (N, C, D*H*W) view
    (planar kernel, the previous approach) was 0.010 and 24 % slower for its reorders."""
    import onnx
    from onnx import helper, numpy_helper

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    for vi in list(probe.graph.input) + list(probe.graph.output):
        dims = vi.type.tensor_type.shape.dim
        if dims and not dims[0].dim_value:
            dims[0].dim_value = 1
    del probe.graph.value_info[:]
    probe = onnx.shape_inference.infer_shapes(probe)
    shapes = {vi.name: [d.dim_value for d in vi.type.tensor_type.shape.dim]
              for vi in list(probe.graph.value_info) + list(probe.graph.input)}
    m = onnx.ModelProto()
    m.CopyFrom(model)
    axes_input = _opset(m) >= 18  # ReduceMean takes its axes as an input from opset 18
    pre = "flare_rt_pooled"
    consts = {f"{pre}_axes": np.array([2, 3, 4], dtype=np.int64),
              f"{pre}_shape5": np.array([1, -1, 1, 1, 1], dtype=np.int64)}
    nodes, changed = [], 0
    for node in m.graph.node:
        shape = shapes.get(node.input[0]) if node.op_type == "InstanceNormalization" else None
        if not shape or len(shape) != 5 or not all(shape[2:]) or int(np.prod(shape[2:])) < min_voxels:
            nodes.append(node)
            continue
        x, scale, bias = node.input
        y = node.output[0]
        eps = next((a.f for a in node.attribute if a.name == "epsilon"), 1e-5)
        consts[f"{y}__eps"] = np.array(eps, dtype=np.float32)
        plan = pool_plan(shape[2:])

        def mean(t, tag):
            for i, k in enumerate(plan):
                nodes.append(helper.make_node("AveragePool", [t], [f"{y}__{tag}_pool{i}"], kernel_shape=list(k),
                                              strides=list(k)))
                t = f"{y}__{tag}_pool{i}"
            if axes_input:
                nodes.append(helper.make_node("ReduceMean", [t, f"{pre}_axes"], [f"{y}__{tag}"], keepdims=1))
            else:
                nodes.append(helper.make_node("ReduceMean", [t], [f"{y}__{tag}"], axes=[2, 3, 4], keepdims=1))
            return f"{y}__{tag}"

        mu = mean(x, "mean")
        nodes += [helper.make_node("Sub", [x, mu], [f"{y}__dev"]),
                  helper.make_node("Mul", [f"{y}__dev", f"{y}__dev"], [f"{y}__dev2"])]
        var = mean(f"{y}__dev2", "var")
        nodes += [helper.make_node("Add", [var, f"{y}__eps"], [f"{y}__var_eps"]),
                  helper.make_node("Sqrt", [f"{y}__var_eps"], [f"{y}__std"]),
                  helper.make_node("Reshape", [scale, f"{pre}_shape5"], [f"{y}__scale5"]),
                  helper.make_node("Reshape", [bias, f"{pre}_shape5"], [f"{y}__bias5"]),
                  helper.make_node("Div", [f"{y}__scale5", f"{y}__std"], [f"{y}__gain"]),
                  helper.make_node("Mul", [f"{y}__dev", f"{y}__gain"], [f"{y}__scaled"]),
                  helper.make_node("Add", [f"{y}__scaled", f"{y}__bias5"], [y])]
        changed += 1
    if not changed:
        return model
    m.graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in consts.items())
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    return m


#: Operators of quantised graphs (Q/DQ pairs, integer kernels): not fp32/fp16 bundles.
QUANTIZED_OPS = ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "QLinearConv", "QLinearMatMul",
                 "ConvInteger", "MatMulInteger")


def quantized_ops(model) -> list[str]:
    """The quantisation operators in ``model`` (empty for an fp32 or fp16 graph)."""
    return sorted({node.op_type for node in model.graph.node if node.op_type in QUANTIZED_OPS})


def tensor_types(model) -> dict[str, int]:
    """ONNX element type of every named tensor (graph inputs, weights, inferred intermediates)."""
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model)
    g = inferred.graph
    types = {init.name: init.data_type for init in g.initializer}
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        if vi.type.tensor_type.elem_type:
            types[vi.name] = vi.type.tensor_type.elem_type
    for node in g.node:  # a Cast's output type is its "to", inferred or not
        if node.op_type == "Cast":
            types.setdefault(node.output[0], next(a.i for a in node.attribute if a.name == "to"))
    return types


def non_fp32_norms(model) -> list[str]:
    """Normalisation nodes (``FP32_OPS``) whose data input is not fp32: empty when a strongly typed
    build keeps every InstanceNorm in fp32, as flare-rt's fp16 bundles do."""
    types = tensor_types(model)
    return [node.name or node.output[0] for node in model.graph.node
            if node.op_type in FP32_OPS and types.get(node.input[0]) != FLOAT]
