"""`kontext build | edit | bench | info | serve | keys | loadtest | plan`: the only place argv and the
environment are read (this package: parser.py parses, one module per command runs it).

Every failure the user can fix is one line on stderr and exit status 2, never a traceback. A request or
output flagged by the content filters is one line and exit status 3, with nothing written. Each command
checks what the user typed before it imports torch, diffusers or transformers (a mistake is answered in
a fraction of a second), and quiets third-party noise unless -v.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

from ..errors import KontextError, ModeratedError
from .bench import bench_command
from .build import build_command, info_command
from .common import quiet_third_party
from .edit import edit_command
from .parser import build_parser
from .plan import plan_command
from .serve import keys_command, loadtest_command, serve_command

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)]
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    for flag in getattr(args, "deprecated_flags", None) or ():
        logging.getLogger("engine.cli").warning(
            "%s is deprecated: spell it --build (the one name of a build folder)", flag
        )
    try:
        if args.command == "edit":
            return edit_command(args)
        if args.command == "info":
            quiet_third_party(args.verbose)
            return info_command(args)
        if args.command == "build":
            quiet_third_party(args.verbose)
            return build_command(args)
        if args.command == "bench":
            return bench_command(args)
        if args.command == "serve":
            return serve_command(args)
        if args.command == "keys":
            return keys_command(args)
        if args.command == "loadtest":
            return loadtest_command(args)
        if args.command == "plan":
            return plan_command(args)
    except ModeratedError as e:
        print(f"kontext {args.command}: {e}; nothing was written", file=sys.stderr)
        return 3
    except KontextError as e:
        print(f"kontext {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"kontext {args.command}: interrupted", file=sys.stderr)
        return 130
    return 1
