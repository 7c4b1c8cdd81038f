"""`kontext build | edit | bench | info | serve | keys | loadtest | plan`: the only place argv and the
environment are read (this package: parser.py parses, one module per command runs it).

Every failure the user can fix is one line on stderr and exit status 2, never a traceback. A request or
output flagged by the content filters is one line and exit status 3, with nothing written. Each command
checks what the user typed before it imports torch, diffusers or transformers (a mistake is answered in
a fraction of a second), and quiets third-party noise unless -v.
"""

from __future__ import annotations

import atexit
import logging
import sys
from collections.abc import Sequence

from ..errors import KontextError, ModeratedError
from ..process import exit_now
from .bench import bench_command
from .build import build_command, info_command
from .common import quiet_third_party
from .edit import edit_command
from .parser import RENAMED, build_parser
from .plan import plan_command
from .serve import keys_command, loadtest_command, serve_command

__all__ = ["main", "run"]


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)]
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    for flag in getattr(args, "deprecated_flags", None) or ():
        new, why = RENAMED[flag]
        logging.getLogger("engine.cli").warning("%s is deprecated: spell it %s (%s)", flag, new, why)
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


def run() -> None:
    """The `kontext` console script and `python -m engine.cli`: main(), then the interpreter's usual
    exit (threads joined, atexit handlers run, streams flushed) without tearing down its modules.

    After an edit the process holds torch, diffusers and transformers (some 4,000 modules); clearing
    them one by one took 1.5 to 1.8 s on 2 cores after the tiny edit's last byte was written, a quarter
    of the command's overhead. The exit code is main()'s, argparse's (0 or 2), 130 on Ctrl-C, or 1 after
    a traceback. Embedders and tests call main(), which returns, and keep the normal exit.
    """
    status = [1]  # until main() says otherwise: an uncaught exception's traceback prints, then 1
    atexit.register(_end_process, status)  # first registered, so it runs after every later handler
    try:
        status[0] = main()
    except SystemExit as e:  # argparse: --help, --version (0) and usage errors (2)
        status[0] = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
        raise
    except KeyboardInterrupt:  # outside main()'s own handler: while parsing or importing
        status[0] = 130
        raise
    sys.exit(status[0])


def _end_process(status: list[int]) -> None:
    """The last atexit handler: logging's (registered before ours, so skipped otherwise), then
    process.exit_now (streams flushed, no module teardown) with `status`."""
    logging.shutdown()
    exit_now(status[0])
