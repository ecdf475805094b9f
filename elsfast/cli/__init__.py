"""The `elsfast` command line: `elsfast sample`, `explain`, `measure`, `info`, `scales`, `train`, `calibrate`,
`compare`, `reproduce`, `departure`.

    elsfast sample --out grid.png                      # 16 ELS samples from the embedded MNIST subset
    elsfast sample --dataset mnist --data-root /data --n 64 --patch-size 5 --out grid.png --save x.npz
    elsfast explain --n 4 --out-dir why/               # figures of where every pixel came from + measures.json
    elsfast measure --samples x.npz --json m.json      # creativity measures of saved samples
    elsfast info                                       # versions, devices, backends, datasets, scale lists
    elsfast scales                                     # the published calibrated patch-size lists

Every library error (ValueError, FileNotFoundError, BackendUnavailable) and every bad argument prints one
line, `elsfast: error: <message>`, to stderr and exits with status 2. Ctrl-C exits with 130. Output files are
written only once sampling has finished, atomically, and never over a file elsfast did not write (see
`elsfast.common.fileio`).

This package module holds only `build_parser()` and `main()` (the console script `elsfast = "elsfast.cli:main"`
and `python -m elsfast`). The commands live in one module per family, each with `add_commands(subparsers)`:
`elsfast.cli.sample` (sample, explain, measure), `elsfast.cli.info` (info, scales), `elsfast.cli.research`
(train, calibrate, compare, reproduce) and `elsfast.cli.departure` (departure); `elsfast.cli.args` holds what they
share (argument types and groups, `CLIError`, `PROG`). The import direction is one way: this module -> the
families -> `args` -> the library; no family imports another family or this module.

Imports of other elsfast packages (tests/test_layout.py): `elsfast.common`, `elsfast.reduce`, `elsfast.datasets`,
`elsfast.plots`, `elsfast.machine`, `elsfast.sampling`, `elsfast.nets`, `elsfast.research`, `elsfast.integrations`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ..common.checks import parse_bytes
from . import departure, info, research, sample
from .args import PROG, CLIError, Parser

__all__ = ["CLIError", "build_parser", "main", "parse_bytes"]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the `elsfast` command (errors raise `CLIError`)."""
    from .. import __version__

    parser = Parser(
        prog=PROG,
        description="Analytic patch-based diffusion score machines (Kamb & Ganguli 2025).",
        epilog="Run 'elsfast COMMAND --help' for the options of a command.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    sample.add_commands(commands)
    info.add_commands(commands)
    research.add_commands(commands)
    departure.add_commands(commands)
    return parser


# ------------------------------------------------------------------------------------------------------------
# entry point


def _fail(message: str, status: int = 2) -> int:
    message = " ".join(str(message).split())  # one line, whatever the library put in it
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return status


def main(argv: Sequence[str] | None = None) -> int:
    """Run the `elsfast` command line on `argv` (default: sys.argv[1:]); returns the exit status."""
    from ..reduce.registry import BackendUnavailable

    try:
        try:
            args = build_parser().parse_args(argv)
        except SystemExit as e:  # --help, --version
            return e.code if isinstance(e.code, int) else 0
        return args.func(args)
    except CLIError as e:
        return _fail(str(e))
    except (ValueError, FileNotFoundError, BackendUnavailable) as e:
        return _fail(str(e) or type(e).__name__)
    except OSError as e:  # permissions, full disk, ...: still one line
        return _fail(str(e) or type(e).__name__)
    except MemoryError:
        return _fail("out of memory; try a smaller --memory-budget, --limit or --n", status=1)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except RuntimeError as e:
        if "out of memory" in str(e).lower():
            return _fail("out of memory; try a smaller --memory-budget, --limit or --n", status=1)
        raise


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
