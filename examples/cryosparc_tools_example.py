"""DeepHEMNMA on a cryoSPARC job's particles, from a cryosparc-tools script, with the Python API.

Loads a job's particles with cryosparc-tools, runs the whole pipeline on them
(`deephemnma_bridge.run_pipeline`) and saves the results as an External job: the particles
with their new poses and one ``components_mode_<m>`` slot per mode, and one output per group.

Needs a running cryoSPARC (credentials in CRYOSPARC_BASE_URL, CRYOSPARC_EMAIL,
CRYOSPARC_PASSWORD, or `python -m cryosparc.tools login --url URL`). The same in one command:

    deephemnma cryosparc --project P3 --job J42 --workspace W1 --model model.pdb --work dhn

Offline (exported .cs files, no server): deephemnma run --particles J42_particles.cs ...
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

from deephemnma_bridge import run_pipeline
from deephemnma_bridge.adapters import particles_from_dataset
from deephemnma_bridge.adapters.cryosparc_online import publish_results


def deephemnma_on_job(
    cs: Any,
    project_uid: str,
    job_uid: str,
    workspace_uid: str,
    *,
    work: str | os.PathLike[str],
    output: str = "particles",
    title: str = "DeepHEMNMA",
    **options: Any,
) -> str:
    """Run DeepHEMNMA on ``job_uid``'s ``output`` and publish an External job; its uid.

    ``options`` go to `deephemnma_bridge.run_pipeline` (``model=`` or ``modes=``,
    ``n_train=``, ``epochs=``, ``device=`` ...); ``work`` is the pipeline's local folder (call
    again with the same options to resume it). The pipeline runs in the project directory, as
    cryoSPARC's relative ``blob/path`` values need."""
    project = cs.find_project(project_uid)
    dataset = project.find_job(job_uid).load_output(output)  # every slot, passthrough merged
    particles = particles_from_dataset(
        dataset,
        source_name=f"{project_uid} {job_uid} {output}",
        search_dirs=[Path(str(project.dir))],  # blob paths are relative to the project
    )
    work = Path(work).resolve()
    with contextlib.chdir(str(project.dir)):  # where cryoSPARC's relative blob paths resolve
        result = run_pipeline(particles, out=work, **options)
    modes = result.trained_network().mode_numbers
    return publish_results(
        cs,
        project_uid,
        workspace_uid,
        (job_uid, output),
        result.particles,  # ParticleTables and Datasets are published alike
        result.groups,
        modes,
        title=title,
    )


def main() -> None:
    from cryosparc.tools import CryoSPARC

    cs = CryoSPARC()  # from the environment or a stored login
    uid = deephemnma_on_job(cs, "P3", "J42", "W1", work="dhn", model="model.pdb", n_train=20000)
    job = cs.find_project("P3").find_job(uid)
    particles = job.load_output("particles")  # poses + components_mode_<m>/value per particle
    print(uid, len(particles), [f for f in particles.fields() if f.startswith("components")])


if __name__ == "__main__":
    main()
