# The subset of TensorRT 10's Python API that engine/backends/tensorrt.py uses, with the signatures
# of tensorrt-stubs 10.13 (whose full stubs do not parse under mypy: a parameter named `in`).
from collections.abc import Iterator
from typing import ClassVar, overload

__version__: str

class DataType:
    FLOAT: ClassVar[DataType]
    HALF: ClassVar[DataType]
    BF16: ClassVar[DataType]
    INT8: ClassVar[DataType]
    INT32: ClassVar[DataType]
    INT64: ClassVar[DataType]
    FP8: ClassVar[DataType]
    BOOL: ClassVar[DataType]

class Dims:
    def __len__(self) -> int: ...
    def __iter__(self) -> Iterator[int]: ...  # sequence protocol (__getitem__ + __len__)
    @overload
    def __getitem__(self, arg0: int) -> int: ...
    @overload
    def __getitem__(self, arg0: slice) -> tuple[int, ...]: ...

class ILogger:
    class Severity:
        INTERNAL_ERROR: ClassVar[ILogger.Severity]
        ERROR: ClassVar[ILogger.Severity]
        WARNING: ClassVar[ILogger.Severity]
        INFO: ClassVar[ILogger.Severity]
        VERBOSE: ClassVar[ILogger.Severity]
    WARNING: ClassVar[ILogger.Severity]
    ERROR: ClassVar[ILogger.Severity]
    INFO: ClassVar[ILogger.Severity]

class Logger(ILogger):
    def __init__(self, min_severity: ILogger.Severity = ...) -> None: ...

class ExecutionContextAllocationStrategy:
    STATIC: ClassVar[ExecutionContextAllocationStrategy]
    ON_PROFILE_CHANGE: ClassVar[ExecutionContextAllocationStrategy]
    USER_MANAGED: ClassVar[ExecutionContextAllocationStrategy]

class IExecutionContext:
    def set_device_memory(self, memory: int, size: int) -> None: ...
    def set_optimization_profile_async(self, profile_index: int, stream_handle: int) -> bool: ...
    def set_input_shape(self, name: str, shape: tuple[int, ...] | list[int] | Dims) -> bool: ...
    def get_tensor_shape(self, name: str) -> Dims: ...
    def set_tensor_address(self, name: str, memory: int) -> bool: ...
    def execute_async_v3(self, stream_handle: int) -> bool: ...

class ICudaEngine:
    @property
    def num_io_tensors(self) -> int: ...
    @property
    def num_optimization_profiles(self) -> int: ...
    @property
    def device_memory_size_v2(self) -> int: ...
    def get_tensor_name(self, index: int) -> str: ...
    def get_tensor_dtype(self, name: str) -> DataType: ...
    def get_device_memory_size_for_profile_v2(self, profile_index: int) -> int: ...
    def create_execution_context(
        self, strategy: ExecutionContextAllocationStrategy = ...
    ) -> IExecutionContext: ...

class Runtime:
    def __init__(self, logger: ILogger) -> None: ...
    def deserialize_cuda_engine(self, serialized_engine: bytes) -> ICudaEngine | None: ...
