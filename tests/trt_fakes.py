"""Small fakes of TensorRT 10's Python objects and of torch.cuda, so the TensorRT build and runtime
logic runs on a CPU.

The fakes keep the real API's contracts that the audit (docs/tensorrt-audit.md) found the code relying on:
- a plan is what the builder's profiles said (JSON here), and `get_tensor_profile_shape` returns them;
- `set_input_shape` returns False outside the profile;
- the fake engine computes velocity = 2 * hidden_states + timestep from the addresses it was given
  (ctypes over the CPU buffers), so a stale address or an unreplayed graph gives a wrong number;
- a CUDA graph replays the enqueues recorded during its capture;
- a context keeps its engine alive (py::keep_alive), so a leaked context keeps an engine's weights;
- every TensorRT call must run under a `torch.cuda.device(...)` guard, else the fake raises.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import math
import threading
import types
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

VERSION = "10.13.0.35"
GPU = "NVIDIA H100 80GB HBM3"
INPUTS = (
    "hidden_states",
    "img_ids",
    "encoder_hidden_states",
    "txt_ids",
    "pooled_projections",
    "timestep",
    "guidance",
)


@dataclass
class FakeState:
    """What the fakes saw, for the tests to assert on."""

    device: Any = None  # the device of the innermost torch.cuda.device(...) block; None outside
    capturing: FakeGraph | None = None
    capture_modes: list[str] = field(default_factory=list)
    eager_runs: int = 0
    replays: int = 0
    capture_ok: bool = True  # execute_async_v3 inside a capture returns this
    refuse_shapes: bool = False  # set_input_shape returns False
    gates: dict[str, threading.Event] = field(default_factory=dict)  # plan name -> released when set
    deserializing: dict[str, threading.Event] = field(default_factory=dict)  # plan name -> started
    foreign_caches: set[bytes] = field(default_factory=set)  # timing caches set_timing_cache refuses
    cleared_flags: list[str] = field(default_factory=list)
    plans_built: list[dict[str, Any]] = field(default_factory=list)
    run_onnx: bool = False  # the engine runs its ONNX graph (ONNX Runtime) instead of 2 * x + t


STATE = FakeState()


def _guarded() -> None:
    if STATE.device is None:
        raise AssertionError(
            "a TensorRT call outside torch.cuda.device(...): it would use the current device"
        )


# ----------------------------------------------------------------------------- torch.cuda


class FakeStream:
    def __init__(self, device: Any = None) -> None:
        self.cuda_stream = id(self)

    def wait_stream(self, other: Any) -> None: ...

    def synchronize(self) -> None: ...


class FakeGraph:
    def __init__(self) -> None:
        self.calls: list[FakeContext] = []

    def replay(self) -> None:
        STATE.replays += 1
        for ctx in self.calls:
            ctx.compute()


@contextlib.contextmanager
def _device(device: Any) -> Iterator[None]:
    saved, STATE.device = STATE.device, device
    try:
        yield
    finally:
        STATE.device = saved


@contextlib.contextmanager
def _graph(
    graph: FakeGraph, pool: Any = None, stream: Any = None, capture_error_mode: str = "global"
) -> Iterator[None]:
    STATE.capture_modes.append(capture_error_mode)
    STATE.capturing = graph
    try:
        yield
    finally:
        STATE.capturing = None


def install_fake_cuda(monkeypatch: Any) -> None:
    """torch.cuda as a machine with one H100 would show it, with CPU tensors as device memory."""
    cuda = torch.cuda
    monkeypatch.setattr(cuda, "is_available", lambda: True)
    monkeypatch.setattr(cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(cuda, "get_device_name", lambda device=None: GPU)
    monkeypatch.setattr(
        cuda, "get_device_properties", lambda device=None: types.SimpleNamespace(total_memory=80 << 30)
    )
    monkeypatch.setattr(cuda, "device", _device)
    monkeypatch.setattr(cuda, "Stream", FakeStream)
    monkeypatch.setattr(cuda, "current_stream", lambda device=None: FakeStream())
    monkeypatch.setattr(cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(cuda, "CUDAGraph", FakeGraph)
    monkeypatch.setattr(cuda, "graph", _graph)
    monkeypatch.setattr(cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(torch.Tensor, "record_stream", lambda self, stream: None)


# ----------------------------------------------------------------------------- the runtime


class DataType:
    FLOAT = "FLOAT"
    HALF = "HALF"
    BF16 = "BF16"
    INT32 = "INT32"
    INT64 = "INT64"


class ExecutionContextAllocationStrategy:
    STATIC = "STATIC"
    USER_MANAGED = "USER_MANAGED"


class Logger:
    WARNING = "WARNING"

    def __init__(self, min_severity: Any = None) -> None: ...


def _floats(ptr: int, shape: tuple[int, ...]) -> np.ndarray:
    """The float32 array at a CPU address (what a TensorRT kernel would read)."""
    n = math.prod(shape)
    return np.ctypeslib.as_array((ctypes.c_float * n).from_address(ptr)).reshape(shape)


class FakeEngine:
    def __init__(self, plan: dict[str, Any]) -> None:
        self.name: str = plan["name"]
        self.profiles: list[dict[str, list[list[int]]]] = plan["profiles"]
        self.memory: list[int] = plan["memory"]
        self.onnx: str = plan["onnx"]
        self.session: Any = None
        self.streamable: int = plan.get("streamable", 0)  # weight bytes, when built with WEIGHT_STREAMING
        self.scratch: int = plan.get("scratch", 0)
        self._budget: int = self.streamable  # TensorRT's default: every weight on the card
        self.contexts = 0

    @property
    def streamable_weights_size(self) -> int:
        return self.streamable

    @property
    def weight_streaming_scratch_memory_size(self) -> int:
        return self.scratch if self._budget < self.streamable else 0

    @property
    def weight_streaming_budget_v2(self) -> int:
        return self._budget

    @weight_streaming_budget_v2.setter
    def weight_streaming_budget_v2(self, budget: int) -> None:
        if self.streamable == 0:
            raise RuntimeError("the engine was not built with weight streaming")
        if self.contexts:
            raise AssertionError("the weight streaming budget was set after a context was created")
        self._budget = budget

    @property
    def num_io_tensors(self) -> int:
        return len(INPUTS) + 1

    @property
    def num_optimization_profiles(self) -> int:
        return len(self.profiles)

    def get_tensor_name(self, i: int) -> str:
        return [*INPUTS, "velocity"][i]

    def get_tensor_dtype(self, name: str) -> str:
        return DataType.FLOAT

    def get_device_memory_size_for_profile_v2(self, p: int) -> int:
        return self.memory[p] + self.weight_streaming_scratch_memory_size

    def get_tensor_profile_shape(self, name: str, p: int) -> list[tuple[int, ...]]:
        _guarded()
        return [tuple(d) for d in self.profiles[p][name]]

    def create_execution_context(self, strategy: Any = None) -> FakeContext:
        _guarded()
        assert strategy == ExecutionContextAllocationStrategy.USER_MANAGED
        self.contexts += 1
        return FakeContext(self)


class FakeContext:
    def __init__(self, engine: FakeEngine) -> None:
        self.engine = engine  # keeps the engine alive, as py::keep_alive<0, 1> does
        self.profile: int | None = None
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.addresses: dict[str, int] = {}
        self.memory: tuple[int, int] | None = None

    def set_device_memory(self, ptr: int, size: int) -> None:
        _guarded()
        assert size >= max(self.engine.memory), "device memory block smaller than the plan needs"
        self.memory = (ptr, size)

    def set_optimization_profile_async(self, p: int, stream: int) -> bool:
        _guarded()
        if not 0 <= p < len(self.engine.profiles):
            raise RuntimeError("Error in set optimization profile async.")
        self.profile = p
        return True

    def set_input_shape(self, name: str, shape: tuple[int, ...]) -> bool:
        _guarded()
        assert self.profile is not None, "set_input_shape before set_optimization_profile_async"
        lo, _, hi = self.engine.profiles[self.profile][name]
        inside = len(shape) == len(lo) and all(a <= s <= b for a, s, b in zip(lo, shape, hi, strict=True))
        if STATE.refuse_shapes or not inside:
            return False
        self.shapes[name] = tuple(shape)
        return True

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        _guarded()
        hs = self.shapes.get("hidden_states")
        return hs if name == "velocity" and hs is not None else (-1, -1, -1)

    def set_tensor_address(self, name: str, ptr: int) -> bool:
        _guarded()
        self.addresses[name] = ptr
        return True

    def execute_async_v3(self, stream: int) -> bool:
        _guarded()
        assert self.memory is not None, "enqueue without device memory"
        if STATE.capturing is not None:
            STATE.capturing.calls.append(self)
            return STATE.capture_ok
        gate = STATE.gates.get(self.engine.name)
        if gate is not None:
            assert gate.wait(10), "the test never released the gate"
        STATE.eager_runs += 1
        self.compute()
        return True

    def compute(self) -> None:
        if STATE.run_onnx:
            self._run_onnx()
            return
        hs = _floats(self.addresses["hidden_states"], self.shapes["hidden_states"])  # [B, N + M, C]
        t = _floats(self.addresses["timestep"], self.shapes["timestep"])  # [B]
        out = _floats(self.addresses["velocity"], self.shapes["hidden_states"])
        out[...] = 2 * hs + t[:, None, None]

    def _run_onnx(self) -> None:
        """The plan's ONNX graph on the inputs at the bound addresses: a fake engine with real numbers."""
        import onnxruntime as ort

        if self.engine.session is None:
            self.engine.session = ort.InferenceSession(self.engine.onnx, providers=["CPUExecutionProvider"])
        feeds = {n: _floats(self.addresses[n], self.shapes[n]).copy() for n in INPUTS}
        out = _floats(self.addresses["velocity"], self.shapes["hidden_states"])
        out[...] = self.engine.session.run(["velocity"], feeds)[0]


class Runtime:
    def __init__(self, logger: Any) -> None:
        _guarded()

    def deserialize_cuda_engine(self, data: bytes) -> FakeEngine | None:
        _guarded()
        try:
            plan = json.loads(bytes(data))
        except ValueError:
            return None  # what TensorRT returns for a plan it cannot read
        started = STATE.deserializing.get(plan["name"])
        if started is not None:
            started.set()
        gate = STATE.gates.get("deserialize:" + plan["name"])
        if gate is not None:
            assert gate.wait(10), "the test never released the gate"
        return FakeEngine(plan)


# ----------------------------------------------------------------------------- the builder


class NetworkDefinitionCreationFlag:
    STRONGLY_TYPED = 0


class MemoryPoolType:
    WORKSPACE = "WORKSPACE"


class BuilderFlag:
    TF32 = "TF32"
    WEIGHT_STREAMING = "WEIGHT_STREAMING"


class HostMemory(bytearray):
    """IHostMemory: a buffer. bytes(...) of it is the 12 GB host copy the build must not make (B10)."""

    def __bytes__(self) -> bytes:
        raise AssertionError("the plan was copied into a bytes object")


class TimingCache:
    def __init__(self, data: bytes) -> None:
        self.data = data

    def serialize(self) -> HostMemory:
        return HostMemory(b"cache:" + VERSION.encode())


class OptimizationProfile:
    def __init__(self) -> None:
        self.shapes: dict[str, list[list[int]]] = {}
        self.extra_memory_target = 1.0

    def set_shape(self, name: str, lo: Any, opt: Any, hi: Any) -> None:
        self.shapes[name] = [list(lo), list(opt), list(hi)]


class BuilderConfig:
    def __init__(self) -> None:
        self.flags = {BuilderFlag.TF32}  # on by default, as in TensorRT
        self.profiles: list[OptimizationProfile] = []
        self.cache: TimingCache | None = None
        self.builder_optimization_level = 3

    def set_memory_pool_limit(self, pool: Any, size: int) -> None: ...

    def set_flag(self, flag: str) -> None:
        self.flags.add(flag)

    def clear_flag(self, flag: str) -> None:
        self.flags.discard(flag)
        STATE.cleared_flags.append(flag)

    def create_timing_cache(self, data: bytes) -> TimingCache | None:
        data = bytes(data)
        if data.startswith(b"garbage"):
            raise RuntimeError("Failed to deserialize the timing cache")
        return TimingCache(data)

    def set_timing_cache(self, cache: TimingCache, ignore_mismatch: bool) -> bool:
        if cache.data in STATE.foreign_caches and not ignore_mismatch:
            return False  # "The timing cache will not be used!"
        self.cache = cache
        return True

    def get_timing_cache(self) -> TimingCache | None:
        return self.cache

    def add_optimization_profile(self, profile: OptimizationProfile) -> int:
        self.profiles.append(profile)
        return len(self.profiles) - 1


class Network:
    onnx = ""


class OnnxParser:
    def __init__(self, network: Network, logger: Any) -> None:
        self.network = network

    def parse_from_file(self, path: str) -> bool:
        self.network.onnx = path
        return True

    num_errors = 0


class Builder:
    def __init__(self, logger: Any) -> None: ...

    def create_network(self, flags: int) -> Network:
        assert flags == 1 << NetworkDefinitionCreationFlag.STRONGLY_TYPED
        return Network()

    def create_builder_config(self) -> BuilderConfig:
        return BuilderConfig()

    def create_optimization_profile(self) -> OptimizationProfile:
        return OptimizationProfile()

    def build_serialized_network(self, network: Network, config: BuilderConfig) -> HostMemory:
        assert config.cache is not None, "built without a timing cache"
        plan = {
            "name": f"plan{len(STATE.plans_built)}",
            "onnx": network.onnx,
            "profiles": [p.shapes for p in config.profiles],
            "memory": [1000 * (i + 1) for i in range(len(config.profiles))],
            "tf32": BuilderFlag.TF32 in config.flags,
        }
        if BuilderFlag.WEIGHT_STREAMING in config.flags:
            plan |= {"streamable": 12_000, "scratch": 500}
        STATE.plans_built.append(plan)
        return HostMemory(json.dumps(plan).encode())


def install_fake_tensorrt(monkeypatch: Any) -> FakeState:
    """sys.modules['tensorrt'] = these fakes, plus a fake CUDA device; returns a fresh FakeState."""
    global STATE
    STATE = FakeState()
    module = types.ModuleType("tensorrt")
    for name, value in {
        "__version__": VERSION,
        "Logger": Logger,
        "Runtime": Runtime,
        "Builder": Builder,
        "OnnxParser": OnnxParser,
        "DataType": DataType,
        "ExecutionContextAllocationStrategy": ExecutionContextAllocationStrategy,
        "NetworkDefinitionCreationFlag": NetworkDefinitionCreationFlag,
        "MemoryPoolType": MemoryPoolType,
        "BuilderFlag": BuilderFlag,
    }.items():
        setattr(module, name, value)
    monkeypatch.setitem(__import__("sys").modules, "tensorrt", module)
    install_fake_cuda(monkeypatch)
    return STATE
