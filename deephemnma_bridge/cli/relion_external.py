"""``deephemnma-relion``: the DeepHEMNMA pipeline as a RELION External job (3.1, 4.0, 5.0).

In RELION's External job, set "External executable" to ``deephemnma-relion``, "Input
particles" to the particles STAR (e.g. Refine3D/job025/run_data.star), optionally "Input 3D
reference" (a map: its pseudoatoms become the reference) and, under Params, ``model`` with a
PDB/mmCIF path (or ``modes`` with a .npz), plus any option of ``deephemnma run`` by its name
(``n_train``, ``epochs``, ``use_modes``, ``groups``, ...; dashes or underscores). RELION runs

    deephemnma-relion --o External/job012/ --in_parts run_data.star --model m.pdb --j 4 ...

from the project directory. The pipeline runs into the job directory; then
RELION_OUTPUT_NODES.star lists the particles of every particle and of each group (node types
of the calling RELION, detected from default_pipeline.star or given as ``relion_version``)
and RELION_JOB_EXIT_SUCCESS is written. Any error writes RELION_JOB_EXIT_FAILURE with the
reason in run.err; RELION_JOB_ABORT_NOW stops the job within a second and writes
RELION_JOB_EXIT_ABORTED (also when RELION started the job with SIGINT ignored, as its
``system("... &")`` does).

Nothing outside the job folder is touched: ``--o`` must be a folder strictly inside the project
(the working directory), else the job stops before writing anything (exit code 2). RELION's own
flags (``--o``, ``--in_parts``, ..., ``--j``, ``--pipeline_control``) are accepted; any other
parameter must be an option of ``deephemnma run`` (or ``relion_version``): a misspelt one fails
the job, naming it and the closest known name, instead of running with defaults.
"""

from __future__ import annotations

import difflib
import os
import signal
import sys
import threading
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import DeepHEMNMAError, InputError

__all__ = ["entry_point", "job_folder", "main", "parse_relion_args", "unknown_parameters"]

#: The flags RELION itself puts on the command line (INTEROP.md 5.1).
_RELION_FLAGS = (
    "o",
    "in_movies",
    "in_mics",
    "in_parts",
    "in_coords",
    "in_3dref",
    "in_mask",
    "j",
    "pipeline_control",
)
_POLL_S = 0.5  # how often the abort file is looked for


def parse_relion_args(argv: Sequence[str], *, strays: list[str] | None = None) -> dict[str, Any]:
    """``--label value`` pairs (dashes or underscores); a flag without a value is True.

    Words that belong to no ``--label`` (a value with spaces, which RELION does not quote) are
    appended to ``strays`` when a list is given.
    """
    out: dict[str, Any] = {}
    tokens = list(argv)
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if token.startswith("--") and len(token) > 2:
            key = token[2:].replace("-", "_")
            if i + 1 < len(tokens) and not tokens[i + 1].startswith("--"):
                out[key] = tokens[i + 1]
                i += 2
                continue
            out[key] = True
        elif strays is not None:
            strays.append(token)
        i += 1
    return out


def job_folder(value: Any, project: Path | None = None) -> Path:
    """The job folder ``--o`` names, checked to lie strictly inside ``project`` (default: the
    working directory, where RELION runs the job) and not to be a file.

    Raises
    ------
    InputError
        ``--o`` missing or empty, the project itself, outside it, or an existing file.
    """
    if value is True or value is None or not str(value).strip():
        raise InputError("--o JOB_DIR is required (RELION gives it, e.g. External/job012/)")
    root = (project or Path.cwd()).resolve()
    target = (root / str(value)).resolve()
    if target == root:
        raise InputError(
            f"--o {value}: that is the project directory itself; give a job folder inside it "
            "(e.g. External/job012/)"
        )
    if root not in target.parents:
        raise InputError(
            f"--o {value}: {target} is outside the project directory {root}; RELION runs "
            "External jobs from the project, with --o External/jobNNN/"
        )
    if target.exists() and not target.is_dir():
        raise InputError(f"--o {value}: {target} is an existing file, not a job folder")
    return target


def unknown_parameters(args: dict[str, Any], known: Sequence[str]) -> str | None:
    """One line naming every parameter not in ``known`` (with the closest known name), or
    None when all are known."""
    names = sorted(set(known))
    parts = []
    for key in sorted(k for k in args if k not in names):
        close = difflib.get_close_matches(key, names, n=1, cutoff=0.6)
        hint = f" (did you mean --{close[0]}?)" if close else ""
        parts.append(f"--{key}{hint}")
    if not parts:
        return None
    what = "unknown parameter" if len(parts) == 1 else "unknown parameters"
    return (
        f"{what} {', '.join(parts)}; the job parameters are the options of `deephemnma run` "
        "with underscores (see `deephemnma run --help`) and relion_version"
    )


def _watch_abort(
    job_dir: Path,
    stop: threading.Event,
    aborted: threading.Event,
    main_thread: int | None,
) -> None:
    """Poll for RELION_JOB_ABORT_NOW; when it appears, set ``aborted`` and send SIGINT to the
    main thread (``main_thread``; None: only set the flag).

    A real signal (not ``_thread.interrupt_main``) also breaks a blocking system call; it is
    caught because `main` installs Python's handler whatever disposition RELION left.
    """
    from ..adapters.relion_job import abort_requested

    while not stop.wait(_POLL_S):
        if abort_requested(job_dir):
            aborted.set()
            if main_thread is not None and not stop.is_set():
                signal.pthread_kill(main_thread, signal.SIGINT)
            return


_INTEGERS = (
    "n_modes",
    "n_train",
    "seed",
    "align_working_size",
    "epochs",
    "size",
    "batch_size",
    "min_count",
    "n_groups",
    "refine",
    "workers",
)
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off", "")


def typed_options(opts: dict[str, Any]) -> dict[str, Any]:
    """RELION passes every parameter as text: integers, floats and flags typed, with a clear
    error naming the parameter."""
    out = dict(opts)
    numbers = ((_INTEGERS, int, "an integer"), (("outliers", "search_step"), float, "a number"))
    for keys, kind, what in numbers:
        for key in keys:
            if isinstance(out.get(key), str):
                try:
                    out[key] = kind(out[key])
                except ValueError:
                    msg = f"parameter {key}: expected {what}, got {out[key]!r}"
                    raise InputError(msg) from None
    if isinstance(out.get("augment"), str):
        flag = out["augment"].strip().lower()
        if flag not in _TRUE + _FALSE:
            raise InputError(f"parameter augment: expected true or false, got {out['augment']!r}")
        out["augment"] = flag in _TRUE
    return out


def _error(message: str) -> None:
    print(f"deephemnma-relion: error: {message}", file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Run as RELION does; return the exit code (RELION reads the marker files)."""
    from ..adapters.relion_job import (
        abort_requested,
        acknowledge_abort,
        clear_exit_markers,
        write_exit_marker,
    )
    from .run import DEFAULTS

    strays: list[str] = []
    args = parse_relion_args(sys.argv[1:] if argv is None else argv, strays=strays)
    try:  # no marker without a safe job folder: nothing is written outside the project
        job_dir = job_folder(args.get("o"))
        job_dir.mkdir(parents=True, exist_ok=True)
    except (InputError, OSError) as err:
        _error(str(err) if isinstance(err, InputError) else f"--o {args.get('o')}: {err}")
        return 2
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = None
    if in_main_thread:  # RELION's `system("... &")` leaves SIGINT ignored: take it back
        previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    clear_exit_markers(job_dir)
    stop, aborted = threading.Event(), threading.Event()
    watcher = threading.Thread(
        target=_watch_abort,
        args=(job_dir, stop, aborted, threading.main_thread().ident if in_main_thread else None),
        daemon=True,
    )
    watcher.start()
    try:
        if strays:
            raise InputError(
                f"unexpected word(s) {' '.join(strays)!r}: parameters are --name value pairs "
                "(RELION does not quote values, so a value cannot contain spaces)"
            )
        unknown = unknown_parameters(args, [*DEFAULTS, *_RELION_FLAGS])
        if unknown:
            raise InputError(unknown)
        version, n_nodes = _run(args, job_dir, stop, watcher)
        if aborted.is_set() or abort_requested(job_dir):
            raise KeyboardInterrupt
        write_exit_marker(job_dir, "SUCCESS")
        print(
            f"deephemnma-relion: done; {n_nodes} particle node(s) for RELION {version}",
            flush=True,
        )
        return 0
    except KeyboardInterrupt:
        stop.set()
        if aborted.is_set() or abort_requested(job_dir):
            acknowledge_abort(job_dir)
            print(
                "deephemnma-relion: aborted on RELION's request; rerun to resume",
                file=sys.stderr,
                flush=True,
            )
            return 1
        write_exit_marker(job_dir, "FAILURE")
        print("deephemnma-relion: interrupted", file=sys.stderr, flush=True)
        return 130
    except DeepHEMNMAError as err:
        _error(str(err))
        write_exit_marker(job_dir, "FAILURE")
        return 1
    except SystemExit as exc:  # a stage's argument parser gave up
        _error(f"a stage stopped (exit code {exc.code}); see the message above")
        write_exit_marker(job_dir, "FAILURE")
        return 1
    except Exception:  # RELION must see FAILURE whatever went wrong
        traceback.print_exc()
        write_exit_marker(job_dir, "FAILURE")
        return 1
    finally:
        stop.set()
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


def _run(
    args: dict[str, Any], job_dir: Path, stop: threading.Event, watcher: threading.Thread
) -> tuple[str, int]:
    """The pipeline and RELION_OUTPUT_NODES.star; returns (the calling RELION's version,
    the number of nodes)."""
    import torch

    from ..adapters.relion_job import detect_relion_version, write_output_nodes
    from .run import DEFAULTS, pipeline_from_options

    opts = dict(DEFAULTS)
    for key in DEFAULTS:
        # relion_version names the calling RELION (node labels); particle files stay 3.1
        if key in args and key != "relion_version":
            if args[key] is True and key != "augment":
                raise InputError(f"parameter {key} needs a value")
            opts[key] = args[key]
    if args.get("in_parts") and args["in_parts"] is not True:
        opts["particles"] = args["in_parts"]
    if not opts.get("model") and not opts.get("modes"):
        if args.get("in_3dref") and args["in_3dref"] is not True:
            opts["model"] = args["in_3dref"]
        else:
            raise InputError(
                "no reference: add a parameter 'model' (a PDB/mmCIF file) or 'modes' (a "
                ".npz), or give an Input 3D reference map"
            )
    opts = typed_options(opts)
    if args.get("j") not in (None, True):
        try:
            threads = int(args["j"])
        except ValueError:
            raise InputError(f"--j: expected a number of threads, got {args['j']!r}") from None
        torch.set_num_threads(max(1, threads))
    version = args.get("relion_version") or detect_relion_version(".")
    if version not in ("3.1", "4.0", "5.0"):
        raise InputError(f"relion_version must be 3.1, 4.0 or 5.0, got {version!r}")
    outputs = pipeline_from_options(opts, _relative(job_dir), log=lambda s: print(s, flush=True))
    stop.set()  # no abort signal past this point: an abort file is still seen by the caller
    watcher.join()
    analysis = outputs.analysis
    nodes = [(str(analysis / "particles.star"), "particles")]
    nodes += [(str(p), "particles") for p in sorted((analysis / "groups").glob("*.star"))]
    write_output_nodes(job_dir, nodes, relion_version=version)
    return str(version), len(nodes)


def _relative(job_dir: Path) -> Path:
    """``job_dir`` relative to the project, as RELION wants node names."""
    return Path(os.path.relpath(job_dir, Path.cwd().resolve()))


def entry_point() -> None:
    """Console script ``deephemnma-relion``."""
    sys.exit(main())
