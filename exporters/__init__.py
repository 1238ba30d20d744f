"""Deployment exporters: `exporters.onnx` (checked ONNX with ONNX Runtime parity and the arch in its
metadata) and `exporters.tensorrt` (engines and their timing, where TensorRT and a GPU are present; its
int8 calibrator in `exporters.tensorrt_calibration`).

Submodules are not imported here, so that importing one never pulls in the other's runtime.
"""
