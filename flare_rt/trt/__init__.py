"""TensorRT engines for flare-rt bundles, Polygraphy style: building and running are separate objects.

- :mod:`.build`: :class:`EngineConfig` (what to build: precision, batch profile, workspace, timing
  cache) and :func:`build_engine` (bundle ONNX → strongly typed network → serialized engine).
- :mod:`.cache`: the engine cache: self-describing engine files keyed by GPU, TensorRT version,
  bundle hash, precision and profile; the lookup that reuses, builds or refuses (``load_engine``).
- :mod:`.runner`: :class:`EngineRunner`, inference on CuPy device buffers on the current stream.
- :mod:`.runtime`: lazy imports of TensorRT and CuPy, the GPU's identity, TensorRT's logger.

Nothing here imports tensorrt, cupy or torch at import time.
"""
