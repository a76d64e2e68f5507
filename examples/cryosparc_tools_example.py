"""DeepHEMNMA on a cryoSPARC job's particles, from a cryosparc-tools script.

Needs a running cryoSPARC (credentials in CRYOSPARC_BASE_URL, CRYOSPARC_EMAIL,
CRYOSPARC_PASSWORD, or `python -m cryosparc.tools login --url URL`). The same in one command:

    deephemnma cryosparc --project P3 --job J42 --workspace W1 --model model.pdb --work dhn

Offline (exported .cs files, no server): deephemnma run --particles J42_particles.cs ...
"""

from __future__ import annotations

import argparse
from pathlib import Path

from cryosparc.tools import CryoSPARC

from deephemnma_bridge.cli.cryosparc import add_args, run_online


def main() -> None:
    cs = CryoSPARC()  # from the environment or a stored login
    parser = argparse.ArgumentParser()
    add_args(parser)
    args = parser.parse_args(
        [
            "--project",
            "P3",
            "--job",
            "J42",
            "--workspace",
            "W1",
            "--work",
            str(Path("dhn")),
            "--model",
            "model.pdb",
            "--n-train",
            "20000",
        ]
    )
    uid = run_online(args, cs)  # loads J42's particles, runs the pipeline, publishes
    project = cs.find_project("P3")
    job = project.find_job(uid)
    particles = job.load_output("particles")  # poses + components_mode_<m>/value per particle
    print(uid, len(particles), [f for f in particles.fields() if f.startswith("components")])


if __name__ == "__main__":
    main()
