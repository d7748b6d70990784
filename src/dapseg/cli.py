"""The ``dapseg`` command. Each subcommand is a module of ``dapseg.commands`` with
``add_parser(subparsers)`` and ``run(args) -> int``."""

from __future__ import annotations

import argparse
import importlib
import sys

from dapseg import __version__
from dapseg.termination import EXIT_CODE as TERMINATED_EXIT_CODE
from dapseg.termination import Terminated, sigterm_interrupts

COMMANDS = [
    "segment", "export", "serve", "presets", "download", "demo", "eval", "eval_all", "sweep", "convert", "bench",
    "analyze",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dapseg", description="Training-free open-vocabulary semantic segmentation."
    )
    parser.add_argument("--version", action="version", version=f"dapseg {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMANDS:
        importlib.import_module(f"dapseg.commands.{name}").add_parser(sub)
    for command in {id(p): p for p in sub.choices.values()}.values():  # every command (aliases once)
        add_import_arg(command)
    return parser


def add_import_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--import", dest="imports", action="append", default=[], metavar="MODULE_OR_FILE",
        help="import a module (dotted name) or a .py file before the command runs, e.g. one that registers "
        "components or presets through dapseg.extend (repeatable). It runs as Python code: import only "
        "code you trust",
    )


def load_outside_code(args: argparse.Namespace) -> None:
    """The installed ``dapseg.components`` entry points, then the ``--import`` modules and files, in
    the order given: before the command looks anything up (``dapseg.outside``)."""
    from dapseg.outside import import_components, load_entry_points

    load_entry_points()
    import_components(getattr(args, "imports", []))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    sigterm_interrupts()  # a scheduler's SIGTERM saves progress exactly as Ctrl-C does
    try:
        _apply_pixel_limit(args)
        load_outside_code(args)
        return int(args.run(args) or 0)
    except BrokenPipeError:  # output piped into `head` and closed: not an error
        sys.stderr.close()
        return 0
    except Terminated:
        print("terminated (SIGTERM)", file=sys.stderr)
        return TERMINATED_EXIT_CODE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, PermissionError, OSError, RuntimeError, KeyError, MemoryError) as e:
        # Expected failures (bad input, missing weights, a memory estimate that cannot fit) end with one
        # clear line, not a traceback.
        print(f"dapseg: error: {error_message(e)}", file=sys.stderr)
        return 2


def _apply_pixel_limit(args: argparse.Namespace) -> None:
    """--max-pixels: the limit of every image this process (and its decoding workers) reads. dapseg
    checks each image's declared size itself before decoding, so Pillow's warning below its own hard
    limit would only repeat that check."""
    import warnings

    from PIL import Image

    from dapseg.images import set_pixel_limit

    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
    if getattr(args, "max_pixels", None) is not None:
        set_pixel_limit(args.max_pixels)


def error_message(e: BaseException) -> str:
    """The user-facing text of an expected error: a settings error as "invalid setting KEY: why"
    (without pydantic's input dump and help links), a KeyError without its quotes."""
    from pydantic import ValidationError

    if isinstance(e, ValidationError):
        lines = []
        for err in e.errors():
            key = ".".join(str(part) for part in err["loc"]) or "config"
            msg = str(err["msg"]).removeprefix("Value error, ")
            lines.append(f"invalid setting {key}: {msg}")
        return "; ".join(lines)
    if isinstance(e, KeyError) and len(e.args) == 1:
        return str(e.args[0])
    return str(e) or type(e).__name__
