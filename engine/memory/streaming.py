"""Block streaming: the transformer's blocks live in pinned CPU memory, and each group of blocks is
copied to the card just before it runs, the next group's copy overlapping this group's compute on a
second CUDA stream, ordered by events. At most two groups are on the card at once (running +
prefetched); a group's copies are dropped after its last block runs (the allocator reuses them once the
compute stream is done with them: record_stream).

The scheduler is the same on a CPU, with a transfer that copies synchronously (NoOpTransfer): tests run
the real schedule and its tracker there. Each block is wrapped (StreamedBlock) rather than hooked, so the
order of loads is the order of calls, whatever wraps the blocks later (regional compile copies the
wrappers; the scheduler's calls are excluded from tracing).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from ..errors import ConfigError

log = logging.getLogger(__name__)

BLOCK_LISTS = ("transformer_blocks", "single_transformer_blocks")


class Transfer(Protocol):
    """Where copies run: `copy` issues one host->device copy, `record` marks the copies issued so far,
    `wait` makes the compute stream wait for a mark, `retire` tells the allocator a device tensor was read
    by the compute stream."""

    def copy(self, src: torch.Tensor) -> torch.Tensor: ...

    def record(self) -> Any: ...

    def wait(self, mark: Any) -> None: ...

    def retire(self, t: torch.Tensor) -> None: ...


class CudaTransfer:
    """Copies on a second CUDA stream, non-blocking from pinned memory; events order them."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stream = torch.cuda.Stream(device)

    def copy(self, src: torch.Tensor) -> torch.Tensor:
        with torch.cuda.stream(self.stream):
            return src.to(self.device, non_blocking=True)

    def record(self) -> Any:
        event = torch.cuda.Event()
        event.record(self.stream)
        return event

    def wait(self, mark: Any) -> None:
        torch.cuda.current_stream(self.device).wait_event(mark)

    def retire(self, t: torch.Tensor) -> None:
        t.record_stream(torch.cuda.current_stream(self.device))


class NoOpTransfer:
    """The CPU stand-in: a copy is a fresh tensor (so a block runs on its own copy, as on a card), no
    streams, no events."""

    def copy(self, src: torch.Tensor) -> torch.Tensor:
        return src.clone()

    def record(self) -> Any:
        return None

    def wait(self, mark: Any) -> None:
        pass

    def retire(self, t: torch.Tensor) -> None:
        pass


def transfer_for(device: torch.device) -> Transfer:
    return CudaTransfer(device) if device.type == "cuda" else NoOpTransfer()


@dataclass
class StreamTracker:
    """What the scheduler did, in order: ("load", group, bytes), ("run", block, 0), ("free", group, bytes).
    resident(): bytes of streamed weights on the card after each event."""

    events: list[tuple[str, int, int]] = field(default_factory=list)

    def __call__(self, kind: str, index: int, nbytes: int) -> None:
        self.events.append((kind, index, nbytes))

    def resident(self) -> list[int]:
        out, now = [], 0
        for kind, _, nbytes in self.events:
            now += nbytes if kind == "load" else -nbytes if kind == "free" else 0
            out.append(now)
        return out

    def runs(self) -> list[int]:
        return [i for kind, i, _ in self.events if kind == "run"]


@dataclass
class _Group:
    blocks: list[torch.nn.Module]
    first: int  # index of its first block in run order
    stored: dict[tuple[int, str], torch.Tensor] = field(default_factory=dict)  # (id(owner), name) -> host
    copies: list[torch.Tensor] = field(default_factory=list)
    mark: Any = None
    loaded: bool = False
    nbytes: int = 0


class BlockStreamer:
    """The schedule over `blocks` (run order), `group` blocks per group. Blocks' tensors stay where they
    are (the host copy) until their group loads; a group's tensors are swapped to their device copies for
    its run and back to the host copies after."""

    def __init__(
        self,
        blocks: Sequence[torch.nn.Module],
        *,
        group: int = 1,
        transfer: Transfer,
        pin: bool = False,
        tracker: Callable[[str, int, int], None] | None = None,
    ) -> None:
        if group < 1:
            raise ConfigError(f"streamed groups need at least 1 block, got {group}")
        self.transfer = transfer
        self.pin = pin
        self.tracker = tracker
        self.groups = [_Group(list(blocks[i : i + group]), i) for i in range(0, len(blocks), group)]
        self._group_of = {
            i: g for g, grp in enumerate(self.groups) for i in range(grp.first, grp.first + len(grp.blocks))
        }

    @property
    def window_bytes(self) -> int:
        """The most streamed bytes on the card at once: the two largest neighbouring groups."""
        sizes = [_group_bytes(g) for g in self.groups]
        return max((sizes[i] + sizes[(i + 1) % len(sizes)] for i in range(len(sizes))), default=0)

    # ------------------------------------------------------------------ the schedule

    @torch._dynamo.disable
    def before(self, index: int) -> None:
        """Block `index` is about to run: its group on the card (waited for), the next group's copy issued."""
        g = self._group_of[index]
        group = self.groups[g]
        if index == group.first:
            if not group.loaded:
                self._load(g)  # the first group of the first call: nobody prefetched it
            self.transfer.wait(group.mark)
            self._load((g + 1) % len(self.groups))  # overlaps this group's compute
        if self.tracker is not None:
            self.tracker("run", index, 0)

    @torch._dynamo.disable
    def after(self, index: int) -> None:
        g = self._group_of[index]
        group = self.groups[g]
        if index == group.first + len(group.blocks) - 1 and len(self.groups) > 2:
            self._free(g)

    def _load(self, g: int) -> None:
        group = self.groups[g]
        if group.loaded:
            return
        group.nbytes = 0
        for module, name, t in _slots(group.blocks):
            host = group.stored.get(id_slot(module, name))
            if host is None:  # first load: this tensor is the host copy from now on
                host = t.pin_memory() if self.pin and not t.is_pinned() else t
                group.stored[id_slot(module, name)] = host
            dev = self.transfer.copy(host)
            _set(module, name, dev)
            group.copies.append(dev)
            group.nbytes += dev.numel() * dev.element_size()
        group.mark = self.transfer.record()
        group.loaded = True
        if self.tracker is not None:
            self.tracker("load", g, group.nbytes)

    def _free(self, g: int) -> None:
        group = self.groups[g]
        for module, name, _ in _slots(group.blocks):
            _set(module, name, group.stored[id_slot(module, name)])
        for t in group.copies:
            self.transfer.retire(t)
        group.copies.clear()
        group.loaded = False
        if self.tracker is not None:
            self.tracker("free", g, group.nbytes)


def id_slot(module: torch.nn.Module, name: str) -> tuple[int, str]:
    return id(module), name


def _slots(blocks: Sequence[torch.nn.Module]) -> Iterator[tuple[torch.nn.Module, str, torch.Tensor]]:
    """Every parameter and buffer of the blocks as (owner module, attribute name, tensor)."""
    for block in blocks:
        for module in block.modules():
            for name, p in module._parameters.items():
                if p is not None:
                    yield module, name, p.data
            for name, b in module._buffers.items():
                if b is not None:
                    yield module, name, b


def _set(module: torch.nn.Module, name: str, t: torch.Tensor) -> None:
    if name in module._parameters:
        module._parameters[name].data = t  # type: ignore[union-attr]
    else:
        module._buffers[name] = t


def _group_bytes(group: _Group) -> int:
    return sum(t.numel() * t.element_size() for _, _, t in _slots(group.blocks))


class StreamedBlock(torch.nn.Module):
    """A block that asks the streamer for its weights before running. `Module.to()` / `.cuda()` on the
    transformer leave the inner block where the streamer keeps it (_apply stops here)."""

    def __init__(self, block: torch.nn.Module, index: int, streamer: BlockStreamer) -> None:
        super().__init__()
        self.block = block
        self.index = index
        self._streamer = [streamer]  # a list: not a submodule, not traced as one

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        streamer = self._streamer[0]
        streamer.before(self.index)
        out = self.block(*args, **kwargs)
        streamer.after(self.index)
        return out

    def _apply(self, fn: Any, recurse: bool = True) -> StreamedBlock:  # type: ignore[override]
        return self


def stream_blocks(
    transformer: torch.nn.Module,
    device: torch.device,
    *,
    group: int = 1,
    transfer: Transfer | None = None,
    tracker: Callable[[str, int, int], None] | None = None,
) -> BlockStreamer:
    """Wrap every block of `transformer` (in place) in a StreamedBlock of one streamer; the blocks'
    tensors stay where they are now (move them to the host first) and are pinned on a CUDA machine."""
    blocks: list[torch.nn.Module] = []
    for name in BLOCK_LISTS:
        blocks += list(getattr(transformer, name))
    if any(isinstance(b, StreamedBlock) for b in blocks):
        raise ConfigError("this transformer's blocks are streamed already")
    streamer = BlockStreamer(
        blocks,
        group=group,
        transfer=transfer or transfer_for(device),
        pin=device.type == "cuda",
        tracker=tracker,
    )
    i = 0
    for name in BLOCK_LISTS:
        wrapped = []
        for block in getattr(transformer, name):
            wrapped.append(StreamedBlock(block, i, streamer))
            i += 1
        transformer._modules[name] = torch.nn.ModuleList(wrapped)
    log.info("streaming %d blocks in groups of %d (%s)", len(blocks), group, type(streamer.transfer).__name__)
    return streamer


def is_streamed(transformer: torch.nn.Module) -> bool:
    return any(isinstance(m, StreamedBlock) for m in transformer.modules())
