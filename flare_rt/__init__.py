"""flare-rt: a fast, low-memory inference runtime for FLARE abdominal CT segmentation.

``import flare_rt`` needs only numpy, scipy, nibabel, onnx and onnxruntime; SimpleITK (DICOM, MHA, NRRD; NIfTI
when installed), torch, TensorRT and CuPy are imported lazily by the parts that need them.
"""
__version__ = "0.1.0"

__all__ = ["__version__"]
