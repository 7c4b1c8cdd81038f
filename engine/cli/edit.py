"""`kontext edit`: the EditRequest of its flags, the load, the edits (--then, --num-images), saving each
output with its metadata and signature, and the torch compile cache written after."""

from __future__ import annotations

import argparse
import logging
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from ..config import LoadOptions
from ..errors import ConfigError
from .common import resolve_device, safety_and_signer

if TYPE_CHECKING:
    from ..pipeline import EditResult
    from ..request import EditRequest
    from ..runtime import KontextEngine

log = logging.getLogger("engine.cli")  # the name its log lines carried before the split


def edit_command(args: argparse.Namespace) -> int:
    """`kontext edit`: a preset or weights path (torch eager), or `--engine build/...` (its artifacts),
    both through the runtime API that servers embed. --then chains edits through a session; --num-images
    and --then write OUT-1.png, OUT-2.png, ..."""

    from ..assets import sample_image_path
    from ..backends.torch_options import check_options, parse_levers
    from ..images import output_format
    from ..model.lora import LoraSpec
    from ..runtime import load

    # Validate the request, the images, the filters and the signer before loading a model (a minute).
    if args.then and args.num_images != 1:
        raise ConfigError("--then edits one image per turn: drop --num-images, or run the turns separately")
    output_format(args.output)
    image_path = Path(args.image) if args.image else sample_image_path()
    request = edit_request(args, image_path)
    loras = [LoraSpec.parse(text) for text in args.lora]
    torch_options = replace(parse_levers(args.levers), compile_cache=args.compile_cache)
    check_options(args.torch_mode, torch_options)
    policy, signer = safety_and_signer(args)
    source = args.engine if args.engine is not None else args.model
    options = LoadOptions(
        backend=args.backend,
        precision=args.precision,
        device=resolve_device(args.device),
        miss_policy=args.miss_policy,
        threads=args.threads,
        torch_mode=args.torch_mode,
        dtype=args.dtype,
        context_parallel=args.context_parallel,
        cache=args.cache,
    )
    progress = not args.no_progress
    with load(
        source, options=options, safety=policy, signer=signer, torch_options=torch_options, loras=loras
    ) as kontext:
        extra = {  # recorded in every output's metadata
            "references": ",".join(Path(r).name for r in args.ref) or None,
            "loras": ",".join(f"{spec.path.name}:{spec.scale:g}" for spec in loras) or None,
        }
        if args.then:  # a session: each turn edits the previous turn's output
            session = kontext.session(image_path)
            previous: Path = image_path
            for turn, prompt in enumerate([args.prompt, *args.then], start=1):
                result = session.edit(replace(request, prompt=prompt), progress=progress)
                path = _numbered(args.output, turn)
                _save(kontext, result, 0, path, previous, args, extra)
                previous = path
            _save_compile_cache(kontext)
            return 0
        result = kontext.edit(request, progress=progress)
        for i in range(len(result.images)):
            path = args.output if args.num_images == 1 else _numbered(args.output, i + 1)
            _save(kontext, result, i, path, image_path, args, extra)
        _save_compile_cache(kontext)
    return 0


def _save_compile_cache(kontext: KontextEngine) -> None:
    """After the edits (everything compiled by now): write the torch compile cache, if one was named."""
    from ..backends.torch import TorchDenoiser

    primary = kontext.dispatcher.primary
    if isinstance(primary, TorchDenoiser) and (saved := primary.save_compile_cache()) is not None:
        log.info("compile cache written to %s", saved)


def edit_request(args: argparse.Namespace, image: Path) -> EditRequest:
    """The EditRequest of `kontext edit`'s flags: steps None stays None (the engine's default_steps)."""
    from ..request import EditRequest

    return EditRequest.of(
        image,
        args.prompt,
        references=[Path(r) for r in args.ref],
        steps=args.steps,
        guidance=args.guidance,
        seed=args.seed,
        size=args.size,
        num_images=args.num_images,
    )


def _numbered(output: Path, n: int) -> Path:
    """out.png -> out-1.png, out-2.png, ..."""
    return output.with_name(f"{output.stem}-{n}{output.suffix}")


def _save(
    kontext: KontextEngine,
    result: EditResult,
    index: int,
    path: Path,
    source: Path,
    args: argparse.Namespace,
    extra: dict[str, str | None],
) -> None:
    """Write image `index` of `result` through the engine (metadata, C2PA, review hold), and say where."""
    saved = kontext.outputs.save(
        result,
        path,
        index=index,
        source=source,
        include_prompt=not args.no_prompt_metadata,
        review_dir=args.review_dir,
        extra=extra,
    )
    steps = len(result.step_times)
    computed = f", {result.steps_computed} computed" if result.cache else ""  # a step cache ran
    what = f"{result.size[0]}x{result.size[1]}, {steps} steps{computed}, " + (
        f"{result.timings['total']:.2f}s, {result.backend}" + (", C2PA-signed" if saved.signed else "")
    )
    if saved.held:
        print(
            f"held for review: {saved.path} ({what}); a person must approve it before it is shared: "
            f"move it to {path}"
        )
    else:
        print(f"wrote {saved.path} ({what})")
