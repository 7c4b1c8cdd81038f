"""`kontext edit`: the EditRequest of its flags, the load, the edits (--then, --num-images), saving each
output with its metadata and signature, and the torch compile cache written after."""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from ..config import DEFAULT_PROMPT
from ..errors import ConfigError
from .common import (
    check_output,
    load_args,
    load_options,
    load_source,
    quiet_third_party,
    safety_and_signer,
    save_compile_cache,
)

if TYPE_CHECKING:
    from ..pipeline import EditResult
    from ..request import EditRequest
    from ..runtime import KontextEngine

log = logging.getLogger("engine.cli")


def edit_command(args: argparse.Namespace) -> int:
    """`kontext edit`: a preset or weights path (torch), or `--build build/...` (its artifacts), both
    through the runtime API that servers embed. --then chains edits through a session; --num-images and
    --then write OUT-1.png, OUT-2.png, ...

    Everything the user typed is checked first, without torch (the flags, the prompts, the images, the
    output path, the build folder): a mistake is answered in a fraction of a second. Then the heavy
    imports, the levers, the filters and the signer, and only then the load."""
    from ..prompts import check_prompt

    if args.then and args.num_images != 1:
        raise ConfigError("--then edits one image per turn: drop --num-images, or run the turns separately")
    image_path, demo = _input(args)
    for prompt in args.then:
        check_prompt(prompt)
    check_output(args.output)
    load_options(args)  # the flags' LoadOptions checks, before anything loads
    load_source(args)
    request = edit_request(args, image_path)  # decodes the images; the prompt and number rules
    if demo:  # said again on the "wrote" line, so it never silently becomes a default
        log.info("no image and no prompt: the demo, the bundled sample with %r", request.prompt)

    plan = load_args(args)  # imports torch: the levers, the device, FP8 on this device
    quiet_third_party(args.verbose)
    from ..runtime import load

    policy, signer = safety_and_signer(args)
    progress = not args.no_progress
    if progress and sys.stderr.isatty():  # the load is the long silent part (minutes for real weights)
        print(f"kontext edit: loading {plan.source} ...", file=sys.stderr)
    with load(
        plan.source,
        options=plan.options,
        safety=policy,
        signer=signer,
        torch_options=plan.torch_options,
        loras=plan.loras,
    ) as kontext:
        extra = {  # recorded in every output's metadata
            "references": ",".join(Path(r).name for r in args.ref) or None,
            "loras": ",".join(f"{spec.path.name}:{spec.scale:g}" for spec in plan.loras) or None,
        }
        if args.then:  # a session: each turn edits the previous turn's output
            session = kontext.session(image_path)
            previous: Path = image_path
            for turn, prompt in enumerate([request.prompt, *args.then], start=1):
                result = session.edit(replace(request, prompt=prompt), progress=progress)
                path = _numbered(args.output, turn)
                _save(kontext, result, 0, path, previous, args, extra)
                previous = path
            save_compile_cache(kontext)
            return 0
        result = kontext.edit(request, progress=progress)
        for i in range(len(result.images)):
            path = args.output if args.num_images == 1 else _numbered(args.output, i + 1)
            _save(kontext, result, i, path, image_path, args, extra)
        save_compile_cache(kontext)
    return 0


def _input(args: argparse.Namespace) -> tuple[Path, bool]:
    """The input image, and whether this is the demo: neither image nor prompt runs the bundled sample
    with the default prompt (said on the `wrote` line, and logged with -v). An image without a prompt is
    refused: a default would edit it as nobody asked."""
    from ..assets import sample_image_path

    if args.image and args.prompt is None:
        if not Path(args.image).exists():
            raise ConfigError(
                f"kontext edit takes IMAGE PROMPT; {args.image!r} is no file: give the image first, "
                "then the instruction in quotes"
            )
        raise ConfigError(
            f"{args.image}: say what to change, e.g. kontext edit {args.image} {DEFAULT_PROMPT!r}"
        )
    if not args.image:
        demo = args.prompt is None
        if demo:
            args.prompt = DEFAULT_PROMPT
        return sample_image_path(), demo
    return Path(args.image), False


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
    from ..assets import sample_image_path

    if not args.image and index == 0 and source == sample_image_path():  # no image given
        what += f"; the demo: the bundled sample, {args.prompt!r}"
    if saved.held:
        print(
            f"held for review: {saved.path} ({what}); a person must approve it before it is shared: "
            f"move it to {path}"
        )
    else:
        print(f"wrote {saved.path} ({what})")
