"""The whole DeepHEMNMA pipeline: modes -> HEMNMA on a training subset -> outliers ->
training -> prediction on every particle -> conformational space.

Each stage writes into its own subfolder of DIR (modes/, subset/, hemnma/, network/,
predicted/, analysis/), is skipped when it already finished with the same options (a record
in DIR/stages/), and resumes after an interruption (rerun the same command). Every option can
also come from a TOML file (--config; keys are the option names with underscores, e.g.
n_train = 2000); command-line options win.

Examples:
  deephemnma run --particles Refine3D/job025/run_data.star --model model.pdb --out dhn
  deephemnma run --particles particles.cs --modes modes.npz --n-train 5000 --out dhn
  deephemnma run --config dhn.toml --out dhn
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import tomllib

from ..api._pipeline import PipelineResult, run_stage
from ..errors import InputError
from ..nma.modes import parse_mode_numbers

#: Every option of the pipeline with its default (None: required or computed).
DEFAULTS: dict[str, Any] = {
    "particles": None,
    "model": None,
    "modes": None,
    "use_modes": "auto",
    "n_modes": 20,
    "n_train": None,
    "seed": 0,
    "outliers": 3.2,
    "align_working_size": 128,
    "align_iterations": "40,25",
    "search_step": 10.0,
    "deformation": "linear",
    "population_search": 0,
    "preset": "fast",
    "epochs": None,
    "size": None,
    "augment": False,
    "batch_size": None,
    "groups": "bins",
    "min_count": None,
    "n_groups": 4,
    "refine": 20,
    "orientation_head": "grid",
    "synthetic_batches": 100,
    "device": "auto",
    "workers": -1,
    "relion_version": "3.1",
}


def add_args(parser: argparse.ArgumentParser) -> None:
    """Options of ``deephemnma run`` (each also a --config key)."""
    p = parser.add_argument
    p("--out", type=Path, required=True, help="output folder (a rerun resumes in it)")
    p(
        "--overwrite",
        action="store_true",
        help="use an existing --out folder that this command did not write",
    )
    p("--config", type=Path, default=None, help="TOML file with any of the options below")
    p("--particles", default=None, help="RELION .star or cryoSPARC .cs")
    p("--model", default=None, help="PDB/mmCIF model or MRC map (modes are computed)")
    p("--modes", default=None, help="modes .npz instead of --model")
    p(
        "--use-modes",
        default=None,
        help="mode numbers (e.g. 7,8,9) or auto (default: the 3 lowest collective modes)",
    )
    p("--n-modes", type=int, default=None, help="modes computed from --model (20)")
    p(
        "--n-train",
        type=int,
        default=None,
        help="particles aligned by HEMNMA to train the network (default: a third, 200..20000)",
    )
    p("--seed", type=int, default=None, help="training-subset and split seed (0)")
    p("--outliers", type=float, default=None, help="Mahalanobis threshold (3.2; 0: off)")
    p("--align-working-size", type=int, default=None, help="HEMNMA image size (128)")
    p("--align-iterations", default=None, help="HEMNMA refinement steps (40,25)")
    p("--search-step", type=float, default=None, help="HEMNMA SO(3) grid step (10)")
    p(
        "--deformation",
        choices=["linear", "nonlinear"],
        default=None,
        help="HEMNMA deformation model (linear; nonlinear for large hinge motions)",
    )
    p(
        "--population-search",
        type=int,
        default=None,
        help="HEMNMA second search at K centres of the batch's amplitudes (0: off)",
    )
    p("--preset", choices=["paper", "fast"], default=None, help="training preset (fast)")
    p("--epochs", type=int, default=None)
    p("--size", type=int, default=None, help="network input size, px (the preset's)")
    p(
        "--augment",
        action="store_true",
        default=None,
        help="train with random in-plane rotations (labels rotated exactly)",
    )
    p("--batch-size", type=int, default=None)
    p("--groups", choices=["bins", "kmeans", "gmm", "none"], default=None)
    p("--min-count", type=int, default=None)
    p("--n-groups", type=int, default=None)
    p(
        "--refine",
        type=int,
        default=None,
        help="HEMNMA steps after prediction (20; 0: off; with the grid head from its top 4)",
    )
    p(
        "--orientation-head",
        choices=["grid", "quaternion"],
        default=None,
        help="grid (default): trained on fresh simulated images with the SO(3) grid head; "
        "quaternion: the paper's network, on the HEMNMA labels only (see README)",
    )
    p("--synthetic-batches", type=int, default=None, help="batches per synthetic epoch (100)")
    p("--device", default=None, help="auto, cpu or cuda")
    p(
        "--workers",
        type=int,
        default=None,
        help="DataLoader workers (-1: auto, 0 on a CPU, up to 4 with a GPU)",
    )
    p("--relion-version", choices=["3.0", "3.1"], default=None)


_INT_KEYS = frozenset(
    {"n_modes", "n_train", "seed", "align_working_size", "epochs", "size", "batch_size"}
    | {"min_count", "n_groups", "refine", "workers", "population_search", "synthetic_batches"}
)
_FLOAT_KEYS = frozenset({"outliers", "search_step"})
_BOOL_KEYS = frozenset({"augment"})
_CHOICES = {
    "preset": ("paper", "fast"),
    "deformation": ("linear", "nonlinear"),
    "orientation_head": ("grid", "quaternion"),
    "groups": ("bins", "kmeans", "gmm", "none"),
    "relion_version": ("3.0", "3.1"),
}


def checked_config(loaded: dict[str, Any], path: Path) -> dict[str, Any]:
    """The values of a --config file, each checked against its option's type: one line naming
    the key and what it should be, instead of a failure deep in a stage."""
    out: dict[str, Any] = {}
    for key, value in loaded.items():

        def bad(what: str, key: str = key, value: Any = value) -> InputError:
            return InputError(f"--config {path}: {key} = {value!r}: expected {what}")

        if key in _INT_KEYS:
            if isinstance(value, bool) or not isinstance(value, int):
                raise bad("an integer")
        elif key in _FLOAT_KEYS:
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise bad("a number")
            value = float(value)
        elif key in _BOOL_KEYS:
            if not isinstance(value, bool):
                raise bad("true or false")
        elif key == "use_modes" and isinstance(value, list):
            if not value or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
                raise bad("a list of mode numbers, e.g. [7, 8, 9], or a string '7,8,9' or 'auto'")
        elif key == "relion_version" and isinstance(value, float):
            value = f"{value:.1f}"
        elif not isinstance(value, str):
            raise bad("a string (in quotes)")
        if isinstance(value, str):
            if value.startswith("-"):
                raise bad("a value, not an option (it starts with '-')")
            if key in _CHOICES and value not in _CHOICES[key]:
                raise bad(f"one of {', '.join(_CHOICES[key])}")
        out[key] = value
    return out


def options_from(args: argparse.Namespace) -> dict[str, Any]:
    """Defaults, then the --config file, then the command line."""
    opts = dict(DEFAULTS)
    if args.config is not None:
        if not args.config.is_file():
            raise InputError(f"--config {args.config}: no such file")
        try:
            loaded = tomllib.loads(args.config.read_text(encoding="utf-8"))
        except UnicodeDecodeError as exc:
            raise InputError(
                f"--config {args.config}: not UTF-8 text (byte {exc.start}); save it as UTF-8"
            ) from None
        except tomllib.TOMLDecodeError as exc:
            raise InputError(f"--config {args.config}: not valid TOML ({exc})") from exc
        unknown = sorted(set(loaded) - set(DEFAULTS))
        if unknown:
            raise InputError(
                f"--config {args.config}: unknown key(s) {', '.join(unknown)}; known: "
                f"{', '.join(DEFAULTS)}"
            )
        opts.update(checked_config(loaded, args.config))
    for key in DEFAULTS:
        value = getattr(args, key, None)
        if value is not None:
            opts[key] = value
    if isinstance(opts["use_modes"], list):
        opts["use_modes"] = ",".join(str(m) for m in opts["use_modes"])
    return opts


def _stage(
    out: Path,
    name: str,
    argv: list[str],
    log: Callable[[str], None],
    done: Path,
    inputs: list[Path],
) -> None:
    """`run_stage` of the command ``deephemnma argv`` (``--restart`` added for align/predict
    when their settings or inputs changed since an interrupted run)."""
    from . import main as cli_main

    def call(restart: bool) -> None:
        extra = ["--restart"] if restart and argv[0] in ("align", "predict") else []
        code = cli_main(argv + extra)
        if code == 130:
            raise KeyboardInterrupt
        if code != 0:
            raise InputError(f"stage {name} failed (exit code {code}); see the message above")

    run_stage(out, name, {"argv": argv}, call, log, done, inputs)


def _numbers(key: str, text: str) -> list[int]:
    try:
        return [int(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise InputError(
            f"--{key.replace('_', '-')} {text!r}: expected numbers like 7,8,9"
        ) from None


def _mode_numbers(text: str) -> list[int]:
    try:
        return parse_mode_numbers(text)
    except ValueError as exc:
        raise InputError(f"--use-modes: {exc}") from None


def pipeline_from_options(
    opts: dict[str, Any],
    out: Path,
    log: Callable[[str], None] = print,
    *,
    claim: bool = False,
    overwrite: bool = False,
) -> PipelineResult:
    """`deephemnma_bridge.api.run_pipeline` with the options of ``deephemnma run`` (`DEFAULTS`,
    a --config file, the command line: `options_from`)."""
    from ..api import run_pipeline

    use_modes = str(opts["use_modes"])
    return run_pipeline(
        opts.get("particles") or "",
        out=out,
        model=opts.get("model") or None,
        modes=opts.get("modes") or None,
        use_modes="auto" if use_modes.strip().lower() == "auto" else _mode_numbers(use_modes),
        n_modes=int(opts["n_modes"]),
        n_train=opts["n_train"],
        seed=int(opts["seed"]),
        outliers=opts["outliers"],
        align_working_size_px=int(opts["align_working_size"]),
        align_iterations=_numbers("align_iterations", opts["align_iterations"]),
        search_step_degrees=float(opts["search_step"]),
        deformation=str(opts["deformation"]),
        population_search=int(opts["population_search"]),
        preset=str(opts["preset"]),
        epochs=opts["epochs"],
        size_px=opts["size"],
        augment=bool(opts["augment"]),
        batch_size=opts["batch_size"],
        groups=str(opts["groups"]),
        min_count=opts["min_count"],
        n_groups=int(opts["n_groups"]),
        refine_steps=int(opts["refine"]),
        orientation_head=str(opts["orientation_head"]),
        synthetic_batches=int(opts["synthetic_batches"]),
        device=str(opts["device"]),
        workers=int(opts["workers"]),
        relion_version=str(opts["relion_version"]),
        overwrite=overwrite,
        claim=claim,
        log=log,
    )


def main(args: argparse.Namespace) -> int:
    """Run the pipeline (`deephemnma_bridge.api.run_pipeline`); return 0."""
    from ..fileutils import claim_output_dir

    opts = options_from(args)
    inputs = [opts[k] for k in ("particles", "model", "modes") if opts.get(k)]
    if args.config is not None:
        inputs.append(args.config)
    claim_output_dir(args.out, command="run", inputs=inputs, overwrite=args.overwrite)
    outputs = pipeline_from_options(opts, args.out, log=lambda s: print(s, flush=True))
    print(
        f"done: particles with poses, amplitudes, PCs and groups in "
        f"{outputs.analysis / 'particles.star'}; report {outputs.analysis / 'report.md'}",
        file=sys.stdout,
    )
    return 0
