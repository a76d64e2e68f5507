"""Run the pipeline on a cryoSPARC job's particles and publish the results as an External job.

Connects with cryosparc-tools: the server's web address from --url or CRYOSPARC_BASE_URL (or
CRYOSPARC_MASTER_HOSTNAME + CRYOSPARC_BASE_PORT), the login from --email / CRYOSPARC_EMAIL and
CRYOSPARC_PASSWORD or a stored `python -m cryosparc.tools login --url URL` (cryosparc-tools 4.x
also needs CRYOSPARC_LICENSE_ID); what is missing is said before connecting. It loads output
--output of job --job, runs `deephemnma run` in --work (with the project directory as working
directory, so the particles' blob paths resolve), and creates an External job in workspace
--workspace with the particles (new alignments3D poses, one components_mode_<m> slot per mode
with its amplitude) and one output per group, other slots passed through.

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
    p(
        "--overwrite",
        action="store_true",
        help="use an existing --work folder that this command did not write",
    )
    p("--config", type=Path, default=None, help="TOML with `deephemnma run` options")
    p("--model", default=None, help="PDB/mmCIF model or map")
    p("--modes", default=None, help="modes .npz instead of --model")
    p("--n-train", type=int, default=None)
    p("--epochs", type=int, default=None)
    p("--device", default=None)
    p("--title", default="DeepHEMNMA", help="title of the External job")
    p("--url", default=None, help="cryoSPARC web address (default: $CRYOSPARC_BASE_URL)")
    p("--email", default=None, help="cryoSPARC login email (default: $CRYOSPARC_EMAIL)")


def connect(url: str | None = None, email: str | None = None) -> Any:
    """A `cryosparc.tools.CryoSPARC` from --url / --email, the environment or a stored login;
    `InputError` (one line) when something is missing or the server cannot be reached."""
    from ..adapters.cryosparc_online import connect as connect_server

    return connect_server(url=url, email=email)


def run_online(args: argparse.Namespace, cs: Any) -> str:
    """Download, run, publish; return the new job's uid."""
    from ..adapters.cryosparc_online import download_particles, publish_results
    from ..fileutils import claim_output_dir
    from .run import options_from, pipeline_from_options
    from .train import amplitude_columns

    work = args.work.resolve()
    overwrite = bool(getattr(args, "overwrite", False))
    claim_output_dir(work, command="cryosparc", overwrite=overwrite)  # before any download
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
        outputs = pipeline_from_options(opts, work / "pipeline", log=lambda s: print(s, flush=True))
    analysis = outputs.analysis
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


def main(args: argparse.Namespace) -> int:
    """Connect and run; return 0."""
    from ..adapters.cryosparc_online import one_line, server_errors

    cs = connect(getattr(args, "url", None), getattr(args, "email", None))
    try:
        uid = run_online(args, cs)
    except server_errors() as exc:
        raise InputError(
            f"cryoSPARC {args.project}: the server call failed ({one_line(exc)}); the local "
            f"files in {args.work} are kept, rerun the same command to resume"
        ) from exc
    print(f"published the results as {args.project} {uid}")
    return 0
