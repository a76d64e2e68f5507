"""Run the pipeline on a cryoSPARC job's particles and publish the results as an External job.

Connects with cryosparc-tools (credentials from CRYOSPARC_BASE_URL, CRYOSPARC_EMAIL,
CRYOSPARC_PASSWORD, or a stored `python -m cryosparc.tools login`), loads output --output of
job --job, runs `deephemnma run` in --work (with the project directory as working directory,
so the particles' blob paths resolve), and creates an External job in workspace --workspace
with the particles (new alignments3D poses, one components_mode_<m> slot per mode with its
amplitude) and one output per group, other slots passed through.

Offline, everything works on exported .cs files: `deephemnma run --particles J42_particles.cs`.

Example:
  deephemnma cryosparc --project P3 --job J42 --workspace W1 --model model.pdb --work dhn
"""

from __future__ import annotations

import argparse
import contextlib
import os
from pathlib import Path
from typing import Any

from ..errors import InputError


def add_args(parser: argparse.ArgumentParser) -> None:
    """Options of ``deephemnma cryosparc``."""
    p = parser.add_argument
    p("--project", required=True, help="project uid, e.g. P3")
    p("--job", required=True, help="job uid with the particles, e.g. J42")
    p("--output", default="particles", help="that job's particle output (particles)")
    p("--workspace", required=True, help="workspace for the new External job, e.g. W1")
    p("--work", type=Path, required=True, help="local folder for the pipeline's files")
    p("--config", type=Path, default=None, help="TOML with `deephemnma run` options")
    p("--model", default=None, help="PDB/mmCIF model or map")
    p("--modes", default=None, help="modes .npz instead of --model")
    p("--n-train", type=int, default=None)
    p("--epochs", type=int, default=None)
    p("--device", default=None)
    p("--title", default="DeepHEMNMA", help="title of the External job")


def connect() -> Any:  # pragma: no cover - needs a server
    """A `cryosparc.tools.CryoSPARC` from the environment or a stored login."""
    from cryosparc.tools import CryoSPARC

    try:
        return CryoSPARC()
    except (ValueError, RuntimeError) as exc:
        raise InputError(
            f"cannot connect to cryoSPARC ({exc}); set CRYOSPARC_BASE_URL, CRYOSPARC_EMAIL "
            "and CRYOSPARC_PASSWORD, or run `python -m cryosparc.tools login --url URL`"
        ) from exc


def run_online(args: argparse.Namespace, cs: Any) -> str:
    """Download, run, publish; return the new job's uid."""
    from ..adapters.cryosparc_online import download_particles, publish_results
    from .run import options_from, run_pipeline
    from .train import amplitude_columns

    work = args.work.resolve()
    source, project_dir = download_particles(
        cs, args.project, args.job, args.output, work / "input" / f"{args.job}_{args.output}.cs"
    )
    opts = options_from(args)
    opts["particles"] = str(source)
    for key in ("model", "modes", "config"):
        if opts.get(key):
            opts[key] = str(Path(opts[key]).resolve())
    previous = Path.cwd()
    with contextlib.ExitStack() as stack:
        if project_dir.is_dir():
            os.chdir(project_dir)
            stack.callback(os.chdir, previous)
        outputs = run_pipeline(opts, work / "pipeline", log=lambda s: print(s, flush=True))
    analysis = outputs["analysis"]
    from ..adapters import read_particles

    modes = amplitude_columns(read_particles(analysis / "particles.cs").extra)
    groups = {p.stem: p for p in sorted((analysis / "groups").glob("group_*.cs"))}
    return publish_results(
        cs,
        args.project,
        args.workspace,
        (args.job, args.output),
        analysis / "particles.cs",
        groups,
        modes,
        title=args.title,
    )


def main(args: argparse.Namespace) -> int:  # pragma: no cover - needs a server
    """Connect and run; return 0."""
    uid = run_online(args, connect())
    print(f"published the results as {args.project} {uid}")
    return 0
