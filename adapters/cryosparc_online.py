"""A running cryoSPARC instance through cryosparc-tools: load a job's particles, publish results.

Every server call goes through the ``cs`` object (``cryosparc.tools.CryoSPARC``) handed in, so
tests use a fake that records the calls (INTEROP.md 4.7). API used (cryosparc-tools 5.x,
INTEROP.md 4.3-4.6): ``cs.find_project(P)``, ``project.find_job(J).load_output(name)``,
``project.dir``, ``project.create_external_job(W, title=...)``, ``job.connect``,
``job.add_output(..., passthrough="particles")``, ``with job.run():``, ``job.alloc_output``,
``job.save_output``, ``job.log``.

Results go back as one External job whose input is the source job's particles and whose
outputs are ``particles`` (every particle: new ``alignments3D`` poses and one
``components_mode_<m>`` slot per normal mode holding its amplitude, the cryoSPARC 3DVA /
3D Flex convention for per-particle continuous values) and one output per group with the
same slots, each carrying the other slots through from the input by uid.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from cryosparc.dataset import Dataset

from deephemnma_bridge.errors import InputError

__all__ = ["download_particles", "publish_results"]


def download_particles(
    cs: Any, project_uid: str, job_uid: str, output: str, dest: Path
) -> tuple[Path, Path]:
    """Save job ``job_uid``'s output ``output`` (all slots) as ``dest``; return (dest, project
    directory, against which the dataset's blob paths are relative)."""
    project = cs.find_project(project_uid)
    job = project.find_job(job_uid)
    try:
        dataset = job.load_output(output, slots="all")
    except Exception as exc:  # the server's own error type varies between versions
        raise InputError(
            f"cryoSPARC {project_uid} {job_uid}: cannot load output {output!r} ({exc})"
        ) from exc
    if len(dataset) == 0:
        raise InputError(f"cryoSPARC {project_uid} {job_uid} output {output!r} has no particles")
    dest.parent.mkdir(parents=True, exist_ok=True)
    dataset.save(dest)
    return dest, Path(str(project.dir))


def _fill(target: Dataset, source: Dataset, mode_numbers: list[int]) -> Dataset:
    """Copy the fields the server expects from our results (matched by uid)."""
    order = {int(u): k for k, u in enumerate(source["uid"])}
    rows = np.array([order[int(u)] for u in target["uid"]])
    for field in target.fields():
        if field == "uid":
            continue
        if field in source.fields():
            target[field] = source[field][rows]
        for m in mode_numbers:
            if field == f"components_mode_{m}/component":
                target[field] = m
            elif field == f"components_mode_{m}/value":
                target[field] = np.asarray(source[f"dhn/dhnAmplitude{m}"])[rows]
    return target


def publish_results(
    cs: Any,
    project_uid: str,
    workspace_uid: str,
    source: tuple[str, str],
    particles: Path,
    groups: dict[str, Path],
    mode_numbers: list[int],
    *,
    title: str = "DeepHEMNMA",
) -> str:
    """Create the External job with the results; return its uid."""
    results = Dataset.load(particles)
    for m in mode_numbers:
        if f"dhn/dhnAmplitude{m}" not in results.fields():
            raise InputError(f"{particles}: no amplitude of mode {m} to publish")
    project = cs.find_project(project_uid)
    job = project.create_external_job(workspace_uid, title=title)
    job.connect("particles", source[0], source[1])
    slots: list[Any] = ["alignments3D"]
    slots += [{"name": f"components_mode_{m}", "dtype": "components"} for m in mode_numbers]
    outputs = {"particles": results}
    outputs.update({name: Dataset.load(path) for name, path in groups.items()})
    for name in outputs:
        job.add_output(
            "particle",
            name=name,
            slots=slots,
            passthrough="particles",
            title="DeepHEMNMA " + name.replace("_", " "),
        )
    with job.run():
        job.log(
            f"DeepHEMNMA: {len(results)} particles, modes {mode_numbers}, {len(groups)} group(s)"
        )
        for name, ds in outputs.items():
            out = job.alloc_output(name, ds["uid"])
            job.save_output(name, _fill(out, results, mode_numbers))
    return str(job.uid)
