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
