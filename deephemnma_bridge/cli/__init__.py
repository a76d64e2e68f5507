"""The ``deephemnma`` command line: one module per subcommand, listed explicitly below.

Each subcommand module has a docstring (its help text), ``add_args(parser)`` and
``main(args) -> int``. `main` is callable from tests: ``main(["convert", "a.star", "b.cs"])``.
Errors caused by the user's input (`DeepHEMNMAError`) and file-system errors (`OSError`:
permissions, read-only folder, full disk) are printed as one line and give exit code 2; any other
exception is a bug: one line, exit code 1, and the full traceback in a file whose path the line
gives (``DEEPHEMNMA_DEBUG=1`` raises it instead). Modules are imported only when their command
runs, so ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import sys
import warnings
from collections.abc import Sequence

from .. import __version__
from ..errors import DeepHEMNMAError

__all__ = ["COMMANDS", "main", "os_error_message", "save_traceback"]

# (command name, module under deephemnma_bridge.cli, one-line summary)
COMMANDS: list[tuple[str, str, str]] = [
    ("convert", "convert", "convert particles between STAR 3.0, STAR 3.1+ and cryoSPARC .cs"),
    ("subset", "subset", "write the rows of a full particle file selected in another file"),
    ("modes", "modes", "normal modes of an atomic model or an EM map (elastic network)"),
    ("fit", "fit", "deform an atomic model into a map along its normal modes (flexible fit)"),
    ("align", "align", "HEMNMA: mode amplitudes, orientation and shifts of every particle"),
    ("train", "train", "train the ResNet34 + MLP network on HEMNMA results"),
    ("predict", "predict", "predict amplitudes, orientations and shifts with trained networks"),
    ("analyze", "analyze", "conformational space: PCA, groups, subsets, models, report"),
    ("run", "run", "the whole pipeline: modes, HEMNMA, network, prediction, analysis"),
    ("demo", "demo", "the whole pipeline on simulated adenylate kinase, with accuracy"),
    ("cryosparc", "cryosparc", "run on a cryoSPARC job's particles and publish an External job"),
    ("simulate", "simulate", "simulate particle images with ground truth (synthetic benchmark)"),
]


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="deephemnma",
        description="DeepHEMNMA for RELION and cryoSPARC: normal modes, HEMNMA, deep learning.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, _module, summary in COMMANDS:
        sub.add_parser(name, help=summary, add_help=False)
    return parser


def os_error_message(err: OSError) -> str:
    """One line for an `OSError`: what failed, on which file, and what to do."""
    what = err.strerror or str(err)
    where = f": {err.filename}" if err.filename else ""
    hint = {
        errno.EACCES: "check the permissions, or write the output elsewhere",
        errno.EPERM: "check the permissions, or write the output elsewhere",
        errno.EROFS: "the file system is read-only; write the output elsewhere",
        errno.ENOSPC: "the disk is full; free space or write the output elsewhere",
        errno.ENOENT: "check the path",
        errno.EISDIR: "give a file, not a folder",
        errno.ENOTDIR: "a part of the path is a file, not a folder",
    }.get(err.errno or 0, "check the file and the path")
    return f"{what}{where}; {hint}"


def save_traceback(command: str) -> str:
    """Write the current exception's traceback to a file in the temporary folder; its path."""
    import tempfile
    import traceback

    fd, path = tempfile.mkstemp(prefix=f"deephemnma-{command}-", suffix=".traceback.txt")
    with os.fdopen(fd, "w") as f:
        f.write(f"deephemnma {__version__}, argv {sys.argv}\n")
        traceback.print_exc(file=f)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``deephemnma`` with ``argv`` (default: ``sys.argv[1:]``); return the exit code."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    top = _build_parser()
    if not args_list or args_list[0].startswith("-"):
        top.parse_args(args_list)  # handles --help / --version
        top.print_help()
        return 2
    name = args_list[0]
    modules = {n: m for n, m, _ in COMMANDS}
    if name not in modules:
        top.error(f"unknown command {name!r}; choose from {', '.join(modules)}")
    module = importlib.import_module(f"{__name__}.{modules[name]}")
    parser = argparse.ArgumentParser(
        prog=f"deephemnma {name}",
        description=module.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    module.add_args(parser)
    args = parser.parse_args(args_list[1:])
    previous = warnings.formatwarning

    def one_line(message: Warning | str, *_: object, **__: object) -> str:
        return f"deephemnma {name}: warning: {message}\n"

    warnings.formatwarning = one_line
    try:
        return int(module.main(args))
    except DeepHEMNMAError as err:
        print(f"deephemnma {name}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"deephemnma {name}: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except MemoryError:
        print(
            f"deephemnma {name}: error: out of memory; use a smaller --batch-size (or fewer "
            "particles per run) or a machine with more memory",
            file=sys.stderr,
        )
        return 2
    except OSError as err:  # a file the user named: unreadable, read-only folder, disk full
        print(f"deephemnma {name}: error: {os_error_message(err)}", file=sys.stderr)
        return 2
    except Exception as err:  # a bug: one line here, the traceback in a file
        if os.environ.get("DEEPHEMNMA_DEBUG"):
            raise
        where = save_traceback(name)
        print(
            f"deephemnma {name}: internal error ({type(err).__name__}: {err}); the full "
            f"traceback is in {where}: please report it",
            file=sys.stderr,
        )
        return 1
    finally:
        warnings.formatwarning = previous
