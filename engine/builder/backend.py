"""Which backend a build targets (auto: TensorRT when it imports and a CUDA device exists), and its
version. Light to import: the CLI reads BUILD_BACKENDS before torch is loaded."""

from __future__ import annotations

from ..errors import BackendUnavailableError, ConfigError

BUILD_BACKENDS: tuple[str, ...] = ("auto", "tensorrt", "onnxruntime")  # what `kontext build --backend` takes


def choose_backend(requested: str) -> tuple[str, str]:
    """('tensorrt' | 'onnxruntime', why). auto: TensorRT when it imports AND a CUDA device exists."""
    if requested not in BUILD_BACKENDS:
        raise ConfigError(f"--backend must be one of {', '.join(BUILD_BACKENDS)}, got {requested!r}")
    from ..backends.tensorrt_plans import cuda_device, tensorrt_module  # torch: imported only when building

    device = cuda_device()
    has_trt = tensorrt_module() is not None
    if requested == "tensorrt":
        if device is None or not has_trt:
            missing = "a CUDA device" if device is None else "TensorRT (`pip install -e '.[trt]'`)"
            raise BackendUnavailableError(f"--backend tensorrt needs {missing}; use --backend onnxruntime")
        return "tensorrt", f"requested; GPU {device[0]}"
    if requested == "onnxruntime":
        return "onnxruntime", "requested"
    if device is not None and has_trt:
        return "tensorrt", f"auto: TensorRT and GPU {device[0]} found"
    why = "no CUDA device" if device is None else "TensorRT is not installed"
    return "onnxruntime", f"auto: {why}, building ONNX Runtime (CPU) artifacts"


def backend_version(backend: str) -> str:
    if backend == "tensorrt":
        from ..backends.tensorrt_plans import tensorrt_module

        trt = tensorrt_module()
        return str(trt.__version__) if trt is not None else "missing"
    import onnxruntime as ort

    return str(ort.__version__)
