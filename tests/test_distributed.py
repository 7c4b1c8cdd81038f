"""Context parallelism (engine.distributed) on CPUs with gloo: N ranks give one process's latents.

Three kinds of test:
- the real launcher (rank 0 here, rank 1 spawned) through KontextPipeline's sampling loop on the tiny
  preset, against the same edits on one process: square and odd buckets, references, batch 2;
- the same sharding and attention in threads of this process (a gloo group per thread, no spawn) for
  world size 3 and for the negative controls that show the parity bound can fail (no communication;
  RoPE ids split unlike their tokens);
- failures: a worker that raises, rank 0 that raises, close(): a clear error and no process left.

The test transformer is the tiny preset's with its query/key norm weights raised, so attention logits
are large and a token's position changes the output by far more than the parity bound
(docs/context-parallel.md: with small random weights a RoPE bug shows only as 1e-5).
"""

from __future__ import annotations

import copy
import datetime
import multiprocessing
import os
import threading
import time
from collections.abc import Callable, Iterator

import pytest
import torch
import torch.distributed as dist

from engine import sampling
from engine.backends.torch import TorchDenoiser, velocity, weight_sharing_copy
from engine.backends.torch_options import TorchOptions
from engine.distributed import (
    ContextParallelDenoiser,
    Group,
    Layout,
    RankFailedError,
    check_context_parallel,
    context_parallel_denoiser,
    install_processors,
    shard_inputs,
    split_sizes,
)
from engine.errors import BackendUnavailableError, ConfigError
from engine.model.components import Components
from engine.pipeline import KontextPipeline
from engine.request import EditRequest

from .conftest import gradient_image

PARITY = 1e-5  # relative L2, fp32 (measured: ~1e-7)
CONTROL = 1e-3  # a broken split must miss by more than this (100x the parity bound)
QK_NORM_WEIGHT = 4.0  # raised query/key RMSNorm weights: logits 16x larger, position matters
WORKER_FAULT_BATCH = 3  # a forward of this batch raises in a worker (rank > 0)
RANK0_FAULT_BATCH = 5  # a forward of this batch raises in rank 0
HANG_BATCH = 7  # a forward of this batch sleeps in a worker, far past HANG_TIMEOUT_S
HANG_TIMEOUT_S = 3.0
STEPS = 4


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _fault(module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
    """A forward pre-hook on proj_out: raises in a worker at WORKER_FAULT_BATCH, in rank 0 at
    RANK0_FAULT_BATCH, hangs in a worker at HANG_BATCH (the test process has no multiprocessing parent;
    spawned workers do)."""
    worker = multiprocessing.parent_process() is not None
    batch = args[0].shape[0]  # [B, I_r, C]
    if worker and batch == HANG_BATCH:
        time.sleep(600)
    if (worker and batch == WORKER_FAULT_BATCH) or (not worker and batch == RANK0_FAULT_BATCH):
        raise RuntimeError(f"boom in the {'worker' if worker else 'rank 0'} forward")


@pytest.fixture(scope="module")
def positional(tiny: Components) -> torch.nn.Module:
    """A copy of the tiny transformer where position matters (see the module docstring), with the
    fault hook. Its own weights: the session's tiny preset is left as it is."""
    transformer = copy.deepcopy(tiny.transformer)
    with torch.no_grad():
        for name, p in transformer.named_parameters():
            if any(f"{n}.weight" in name for n in ("norm_q", "norm_k", "norm_added_q", "norm_added_k")):
                p.fill_(QK_NORM_WEIGHT)
    transformer.proj_out.register_forward_pre_hook(_fault)
    return transformer


class Launcher:
    """One spawned context-parallel denoiser shared by the module's tests; a new one after a test
    closed it (spawning costs seconds: most of it importing diffusers in the worker)."""

    def __init__(self, transformer: torch.nn.Module) -> None:
        self.transformer = transformer
        self.current: ContextParallelDenoiser | None = None
        self.timeout_s = 0.0

    def get(self, timeout_s: float = 60.0) -> ContextParallelDenoiser:
        if self.current is None or self.current.closed or self.timeout_s != timeout_s:
            self.close()
            self.current = context_parallel_denoiser(self.transformer, 2, threads=1, timeout_s=timeout_s)
            self.timeout_s = timeout_s
        return self.current

    def close(self) -> None:
        if self.current is not None:
            self.current.close()


@pytest.fixture(scope="module")
def launcher(positional: torch.nn.Module) -> Iterator[Launcher]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # rank 0 (this process) as the workers: 2 cores are shared
    owner = Launcher(positional)
    yield owner
    owner.close()
    torch.set_num_threads(threads)


# --------------------------------------------------------------------------- inputs


def edit_inputs(
    batch: int, target: tuple[int, int], context: tuple[int, int], text: int = 32, seed: int = 0
) -> dict[str, torch.Tensor]:
    """One call's Denoiser inputs with the real id layout: target (index 0) then context (index 1)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.cat(
        [sampling.image_ids(target[1], target[0], 0), sampling.image_ids(context[1], context[0], 1)]
    )
    return {
        "hidden_states": torch.randn(batch, ids.shape[0], 64, generator=g),  # [B, N + M, 64]
        "img_ids": ids,  # [N + M, 3]
        "encoder_hidden_states": torch.randn(batch, text, 32, generator=g),  # [B, L, 32]
        "txt_ids": torch.zeros(text, 3),  # [L, 3]
        "pooled_projections": torch.randn(batch, 32, generator=g),  # [B, 32]
        "timestep": torch.full((batch,), 0.7),
        "guidance": torch.full((batch,), 2.5),
    }


ODD = edit_inputs(2, (112, 144), (128, 128))  # 63 + 64 = 127 image tokens, batch 2


# --------------------------------------------------------------------------- layout and refusals


def test_split_sizes_cover_every_token_once() -> None:
    assert split_sizes(127, 2) == (64, 63)
    assert split_sizes(32, 3) == (11, 11, 10)
    assert split_sizes(8704, 8) == (1088,) * 8
    layout = Layout.of(32, 127, 3)
    assert layout.joint == (11 + 43, 11 + 42, 10 + 42)
    covered = [i for r in range(3) for i in range(127)[layout.image_slice(r)]]
    assert covered == list(range(127))
    with pytest.raises(ConfigError, match="at least 4 image tokens"):
        Layout.of(32, 3, 4)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"backend": "tensorrt"}, "built tensorrt engine runs as one process"),
        ({"backend": "onnxruntime"}, "built onnxruntime engine runs as one process"),
        ({"options": TorchOptions(cuda_graphs=True)}, "CUDA graphs"),
        ({"options": TorchOptions(attention="kernel-bf16")}, "attn-"),
        ({"mode": "fp8", "options": TorchOptions(fp8_scales="static")}, "dynamic scales only"),
    ],
)
def test_refusals_in_one_line(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigError, match=match) as info:
        check_context_parallel(2, **kwargs)  # type: ignore[arg-type]
    assert "\n" not in str(info.value)
    check_context_parallel(1, **kwargs)  # type: ignore[arg-type]  # 1: off, nothing to refuse


def test_refuses_fewer_than_one_process_and_missing_gpus() -> None:
    with pytest.raises(ConfigError, match="1 \\(off\\) or more"):
        check_context_parallel(0)
    if torch.cuda.device_count() < 64:
        with pytest.raises(BackendUnavailableError, match="needs 64 CUDA devices"):
            check_context_parallel(64, device="cuda")


# --------------------------------------------------------------------------- ranks as threads


Tamper = Callable[[dict[str, torch.Tensor], dict[str, torch.Tensor], Layout, int], dict[str, torch.Tensor]]


def run_in_threads(
    transformer: torch.nn.Module, inputs: dict[str, torch.Tensor], world: int, tamper: Tamper | None = None
) -> torch.Tensor:
    """The launcher's RankRunner.step in `world` threads of this process, one gloo group each; `tamper`
    (local inputs, full inputs, layout, rank) -> local inputs breaks the split on purpose."""
    store = dist.HashStore()
    outs: list[torch.Tensor | None] = [None] * world
    errors: list[BaseException] = []

    def rank(r: int) -> None:
        try:
            group = Group(None, r, world)
            module = install_processors(weight_sharing_copy(transformer), group)
            group.backend = dist.ProcessGroupGloo(store, r, world, datetime.timedelta(seconds=60))
            layout = Layout.of(
                inputs["encoder_hidden_states"].shape[1], inputs["hidden_states"].shape[1], world
            )
            group.joint = layout.joint
            local = shard_inputs(inputs, layout, r)
            if tamper is not None:
                local = tamper(local, inputs, layout, r)
            with torch.inference_mode():
                outs[r] = group.gather(velocity(module, local), layout.image)
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    assert all(not t.is_alive() for t in threads)
    for o in outs[1:]:
        assert o is not None and torch.equal(o, outs[0])  # every rank holds the same velocity
    assert outs[0] is not None
    return outs[0]


def reference(transformer: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.inference_mode():
        return velocity(transformer, inputs)  # [B, N + M, 64]


@pytest.mark.parametrize("world", [2, 3])
def test_threads_match_one_process(positional: torch.nn.Module, world: int) -> None:
    got = run_in_threads(positional, ODD, world)
    assert rel_l2(got, reference(positional, ODD)) < PARITY


def test_control_without_communication_fails_parity(positional: torch.nn.Module) -> None:
    """Each rank attending only to its own tokens (the stock processor on each shard) misses by far."""
    layout = Layout.of(32, 127, 2)
    with torch.inference_mode():
        parts = [velocity(positional, shard_inputs(ODD, layout, r)) for r in range(2)]
    assert rel_l2(torch.cat(parts, dim=1), reference(positional, ODD)) > CONTROL


def test_control_rope_ids_split_unlike_tokens_fails_parity(positional: torch.nn.Module) -> None:
    """Every rank keeps its tokens but takes the first ids of the sequence (the ids split unlike them)."""

    def first_ids(local: dict[str, torch.Tensor], full: dict[str, torch.Tensor], layout: Layout, r: int):
        return {**local, "img_ids": full["img_ids"][: layout.image[r]]}

    got = run_in_threads(positional, ODD, 2, tamper=first_ids)
    assert rel_l2(got, reference(positional, ODD)) > CONTROL


# --------------------------------------------------------------------------- the launcher, end to end


def edit(pipe: KontextPipeline, size: tuple[int, int] | None, refs: int, num_images: int) -> torch.Tensor:
    references = tuple(gradient_image(96, 144, seed=7 + i) for i in range(refs))
    image = gradient_image(128, 128)
    request = EditRequest(
        image, "a tiny edit", steps=STEPS, seed=3, size=size, references=references, num_images=num_images
    )
    result = pipe.edit(request, progress=False)
    assert result.latents.shape[0] == num_images
    return result.latents  # [B, N, 64]


@pytest.mark.slow  # spawns worker processes (the launcher)
@pytest.mark.parametrize(
    ("size", "refs", "num_images", "image_tokens"),
    [
        (None, 0, 1, 128),  # square bucket: 64 target + 64 context
        ((112, 144), 0, 1, 127),  # odd: 63 + 64, split 64 / 63
        ((112, 144), 1, 1, 181),  # a reference: 63 + 64 + 54
        ((112, 144), 0, 2, 127),  # num_images 2: batch 2
    ],
    ids=["square", "odd", "reference", "batch2"],
)
def test_two_processes_match_one_through_the_sampling_loop(
    tiny: Components,
    positional: torch.nn.Module,
    launcher: Launcher,
    size: tuple[int, int] | None,
    refs: int,
    num_images: int,
    image_tokens: int,
) -> None:
    cp = launcher.get()
    calls: list[int] = []

    def counted(**inputs: torch.Tensor) -> torch.Tensor:
        calls.append(int(inputs["hidden_states"].shape[1]))
        return cp(**inputs)

    counted.name = cp.name  # type: ignore[attr-defined]
    one = edit(
        KontextPipeline(tiny, TorchDenoiser(positional, name="torch-eager-fp32")), size, refs, num_images
    )
    two = edit(KontextPipeline(tiny, counted), size, refs, num_images)  # type: ignore[arg-type]
    assert calls == [image_tokens] * STEPS  # the shape the case claims, every step through the workers
    assert rel_l2(two, one) < PARITY
    assert cp.name == "torch-eager-fp32+cp2"


def _dead(cp: ContextParallelDenoiser) -> bool:
    return all(not w.process.is_alive() and w.process.exitcode is not None for w in cp.workers)


@pytest.mark.slow  # spawns worker processes
def test_close_stops_every_worker(launcher: Launcher) -> None:
    cp = launcher.get()
    cp.close()
    assert _dead(cp) and [w.process.exitcode for w in cp.workers] == [0]  # ended itself, not terminated
    cp.close()  # idempotent
    with pytest.raises(BackendUnavailableError, match="closed"):
        cp(**ODD)


@pytest.mark.slow  # spawns worker processes
def test_a_failing_worker_fails_the_edit_and_leaves_no_process(tiny: Components, launcher: Launcher) -> None:
    cp = launcher.get()
    pipe = KontextPipeline(tiny, cp)
    with pytest.raises(
        RankFailedError, match=r"rank 1 of 2 failed: RuntimeError: boom in the worker forward"
    ):
        pipe.edit(
            EditRequest(gradient_image(128, 128), "x", steps=2, num_images=WORKER_FAULT_BATCH), progress=False
        )
    assert cp.closed and _dead(cp)
    assert [w.process.exitcode for w in cp.workers] == [
        1
    ]  # it reported, then ended itself (process.exit_now)
    with pytest.raises(BackendUnavailableError, match="load the engine again"):
        cp(**ODD)


@pytest.mark.slow  # spawns worker processes
def test_a_failing_rank_zero_fails_the_call_and_leaves_no_process(launcher: Launcher) -> None:
    cp = launcher.get()
    inputs = edit_inputs(RANK0_FAULT_BATCH, (112, 144), (128, 128))
    with pytest.raises(
        RankFailedError, match=r"rank 0 of 2 failed: RuntimeError: boom in the rank 0 forward"
    ):
        cp(**inputs)
    assert cp.closed and _dead(cp)


@pytest.mark.slow  # spawns worker processes
def test_a_hung_worker_fails_the_call_after_the_timeout_and_is_terminated(launcher: Launcher) -> None:
    cp = launcher.get(timeout_s=HANG_TIMEOUT_S)
    with pytest.raises(RankFailedError, match=r"rank\(s\) 1 of 2 did not answer .*Timed out"):
        cp(**edit_inputs(HANG_BATCH, (112, 144), (128, 128)))
    assert cp.closed and _dead(cp)  # the sleeping worker was terminated, not waited for


def _explode_on_load(pickled_in: int) -> None:
    if os.getpid() != pickled_in:  # a spawned worker unpickling the transformer (before its bootstrap)
        raise RuntimeError("boom while a worker loads")


class _Poison:
    """An attribute that fails to unpickle in a worker (the spawn bootstrap, before any message)."""

    def __reduce__(self) -> tuple[Callable[[int], None], tuple[int]]:
        return (_explode_on_load, (os.getpid(),))

    def __deepcopy__(self, memo: dict[int, object]) -> _Poison:
        return self


@pytest.mark.slow  # spawns worker processes
def test_a_worker_that_fails_while_starting_fails_the_load_and_leaves_no_process(
    positional: torch.nn.Module,
) -> None:
    poisoned = weight_sharing_copy(positional)
    poisoned.poison = _Poison()  # type: ignore[assignment]
    children = set(multiprocessing.active_children())
    with pytest.raises(RankFailedError, match=r"rank 1 exited with code 1 while starting"):
        context_parallel_denoiser(poisoned, 2, threads=1, timeout_s=60)
    assert set(multiprocessing.active_children()) <= children  # the dead worker was joined


# --------------------------------------------------------------------------- engine.load(context_parallel=N)


@pytest.mark.slow  # spawns worker processes
def test_load_with_context_parallel_edits_like_one_process() -> None:
    """The wiring: engine.load("tiny", context_parallel=2) gives one process's latents (fp32, 1e-5)."""
    import engine

    image = gradient_image(128, 96)
    with engine.load("tiny") as one, engine.load("tiny", context_parallel=2) as two:
        assert two.dispatcher.primary.name != one.dispatcher.primary.name
        a = one.edit(image, "a tiny edit", steps=2, seed=4).latents
        b = two.edit(image, "a tiny edit", steps=2, seed=4).latents
    assert rel_l2(b, a) < PARITY


@pytest.mark.slow
def test_context_parallel_runs_the_compiled_path_too() -> None:
    """torch_mode="compile" on every rank (regional compile; each gather splits a block's graph): still
    one process's latents."""
    import engine

    image = gradient_image(128, 96)
    with engine.load("tiny") as one, engine.load("tiny", context_parallel=2, torch_mode="compile") as two:
        a = one.edit(image, "a tiny edit", steps=2, seed=4).latents
        b = two.edit(image, "a tiny edit", steps=2, seed=4).latents
    assert rel_l2(b, a) < PARITY


def test_load_refuses_context_parallel_for_built_engines(tiny_build) -> None:
    import engine

    with pytest.raises(ConfigError, match="built onnxruntime engine runs as one process"):
        engine.load(tiny_build, context_parallel=2)


@pytest.mark.slow
def test_a_script_without_a_main_guard_is_told_to_add_one_in_one_line(tmp_path):
    """The documented snippet run as a script without `if __name__ == "__main__":`: each worker
    re-imports it and multiprocessing refuses to spawn again; rank 0 says what to do, and no
    multiprocessing bootstrap traceback reaches the user."""
    import subprocess
    import sys
    from pathlib import Path

    script = tmp_path / "unguarded.py"
    script.write_text('import engine\nwith engine.load("tiny", context_parallel=2) as k:\n    pass\n')
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    out = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300
    )
    last = out.stderr.strip().splitlines()[-1]
    assert out.returncode == 1
    assert last.startswith("engine.distributed.launcher.RankFailedError: context-parallel rank 1 could not")
    assert 'under `if __name__ == "__main__":`' in last
    assert "bootstrapping phase" not in out.stderr
