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
RELION_JOB_EXIT_ABORTED. Unknown flags (--pipeline_control, additional arguments) are ignored.
"""

from __future__ import annotations

import _thread
import sys
import threading
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import DeepHEMNMAError, InputError

__all__ = ["entry_point", "main", "parse_relion_args"]

_RELION_FLAGS = ("o", "in_movies", "in_mics", "in_parts", "in_coords", "in_3dref", "in_mask", "j")


def parse_relion_args(argv: Sequence[str]) -> dict[str, Any]:
    """``--label value`` pairs (dashes or underscores); a flag without a value is True."""
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
        i += 1
    return out


def _watch_abort(job_dir: Path, stop: threading.Event, aborted: threading.Event) -> None:
    from ..adapters.relion_job import abort_requested

    while not stop.wait(1.0):
        if abort_requested(job_dir):
            aborted.set()
            _thread.interrupt_main()
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


def main(argv: Sequence[str] | None = None) -> int:
    """Run as RELION does; return the exit code (RELION reads the marker files)."""
    import torch

    from ..adapters.relion_job import (
        acknowledge_abort,
        clear_exit_markers,
        detect_relion_version,
        write_exit_marker,
        write_output_nodes,
    )
    from .run import DEFAULTS, run_pipeline

    args = parse_relion_args(sys.argv[1:] if argv is None else argv)
    if "o" not in args or args["o"] is True:
        print(
            "deephemnma-relion: error: --o JOB_DIR is required (RELION gives it)", file=sys.stderr
        )
        return 2
    job_dir = Path(str(args["o"]))
    job_dir.mkdir(parents=True, exist_ok=True)
    clear_exit_markers(job_dir)
    stop, aborted = threading.Event(), threading.Event()
    watcher = threading.Thread(target=_watch_abort, args=(job_dir, stop, aborted), daemon=True)
    watcher.start()
    try:
        ignored = sorted(
            k
            for k in args
            if k not in DEFAULTS and k not in _RELION_FLAGS and k != "relion_version"
        )
        if ignored:
            print(f"ignoring unknown options: {', '.join('--' + k for k in ignored)}", flush=True)
        opts = dict(DEFAULTS)
        for key in DEFAULTS:
            if key in args:
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
            torch.set_num_threads(max(1, int(args["j"])))
        version = args.get("relion_version") or detect_relion_version(".")
        if version not in ("3.1", "4.0", "5.0"):
            raise InputError(f"relion_version must be 3.1, 4.0 or 5.0, got {version!r}")
        outputs = run_pipeline(opts, job_dir, log=lambda s: print(s, flush=True))
        analysis = outputs["analysis"]
        nodes = [(str(analysis / "particles.star"), "particles")]
        nodes += [(str(p), "particles") for p in sorted((analysis / "groups").glob("*.star"))]
        write_output_nodes(job_dir, nodes, relion_version=version)
        write_exit_marker(job_dir, "SUCCESS")
        print(
            f"deephemnma-relion: done; {len(nodes)} particle node(s) for RELION {version}",
            flush=True,
        )
        return 0
    except KeyboardInterrupt:
        if aborted.is_set():
            acknowledge_abort(job_dir)
            print(
                "deephemnma-relion: aborted on RELION's request; rerun to resume", file=sys.stderr
            )
            return 1
        write_exit_marker(job_dir, "FAILURE")
        print("deephemnma-relion: interrupted", file=sys.stderr)
        return 130
    except DeepHEMNMAError as err:
        print(f"deephemnma-relion: error: {err}", file=sys.stderr, flush=True)
        write_exit_marker(job_dir, "FAILURE")
        return 1
    except Exception:  # RELION must see FAILURE whatever went wrong
        traceback.print_exc()
        write_exit_marker(job_dir, "FAILURE")
        return 1
    finally:
        stop.set()


def entry_point() -> None:
    """Console script ``deephemnma-relion``."""
    sys.exit(main())
