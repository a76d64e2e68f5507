"""analyze, run (stages, config), the RELION External job and the cryoSPARC round trip."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import gemmi
import numpy as np
import pandas as pd
import pytest
import starfile
from conftest import shared
from cryosparc.dataset import Dataset

from deephemnma_bridge.adapters import read_particles, write_particles
from deephemnma_bridge.analysis import (
    ConformationalSpace,
    bins_along,
    clusters,
    select_box,
    select_expression,
    select_polygon,
)
from deephemnma_bridge.cli import main
from deephemnma_bridge.errors import InputError

PIPELINE_31 = "relion/starfile/default_pipeline.star"  # via shared(): skipped without the data
FAST = {
    "n_train": 24,
    "epochs": 1,
    "synthetic_batches": 2,  # the grid head's simulated images: 2 batches of 64 per epoch
    "size": 32,
    "align_working_size": 64,
    "align_iterations": "5,5",
    "search_step": 30.0,
    "min_count": 8,
    "workers": 0,
    "device": "cpu",
}


def _fast_argv() -> list[str]:
    return [x for k, v in FAST.items() for x in (f"--{k.replace('_', '-')}", str(v))]


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A RELION-like project: Simulated/particles.star (+ .cs, .mrcs, modes.npz), 48 particles."""
    root = tmp_path_factory.mktemp("project")
    argv = [
        "simulate",
        "--n",
        "48",
        "--box",
        "64",
        "--pixel-size",
        "1.3",
        "--seed",
        "6",
        "--out",
        str(root / "Simulated"),
        "--device",
        "cpu",
    ]
    with pytest.warns(UserWarning, match="may leave"):
        assert main(argv) == 0
    return root


def test_space_groups_and_selections() -> None:
    rng = np.random.default_rng(1)
    amps = rng.normal(size=(400, 3)) * [6.0, 3.0, 1.0]
    space = ConformationalSpace.fit(amps, [7, 8, 9], n_components=3)
    coords = space.transform(amps)
    assert np.all(np.diff(space.explained_variance_ratio) <= 0)
    # deterministic signs: largest loading positive, same result when refitted on -x
    assert np.all(space.components[np.arange(3), np.abs(space.components).argmax(1)] > 0)
    again = ConformationalSpace.fit(-amps, [7, 8, 9], n_components=3)
    np.testing.assert_allclose(np.abs(again.components), np.abs(space.components), atol=1e-8)
    np.testing.assert_allclose(space.amplitudes_at(coords), amps, atol=1e-8)
    labels = bins_along(coords[:, 0], min_count=90)
    counts = np.bincount(labels)[1:]
    assert counts.min() >= 90 and counts.sum() == 400
    firsts = [coords[labels == g, 0].min() for g in range(1, len(counts) + 1)]
    assert firsts == sorted(firsts)  # groups ordered along PC1
    tails = bins_along(coords[:, 0], min_count=90, exclude_tails=0.05)
    assert (tails == 0).sum() == pytest.approx(40, abs=2)
    with pytest.raises(InputError, match="lower --min-count"):
        bins_along(coords[:, 0], min_count=1000)
    km = clusters(coords, method="kmeans", k=3)
    assert set(km.tolist()) == {1, 2, 3}
    frame = pd.DataFrame({"PC1": coords[:, 0], "A7": amps[:, 0]})
    sel = select_expression(frame, "PC1 > 0 and A7 > 0")
    assert sel.sum() == np.sum((coords[:, 0] > 0) & (amps[:, 0] > 0))
    with pytest.raises(InputError, match="cannot evaluate"):
        select_expression(frame, "PC9 > 0")
    square = [(0.0, 0.0), (5.0, 0.0), (5.0, 5.0), (0.0, 5.0)]
    inside = select_polygon(coords, square)
    expected = (coords[:, 0] > 0) & (coords[:, 0] < 5) & (coords[:, 1] > 0) & (coords[:, 1] < 5)
    np.testing.assert_array_equal(inside, expected)
    box = select_box(pd.DataFrame({"PC1": coords[:, 0]}), {"PC1": (-1.0, 1.0)})
    np.testing.assert_array_equal(box, np.abs(coords[:, 0]) <= 1)


def test_analyze_writes_groups_models_report(project: Path, tmp_path: Path) -> None:
    sim = project / "Simulated"
    table = read_particles(sim / "particles.cs")
    rng = np.random.default_rng(0)
    fake = {
        f"dhnAmplitude{m}": np.asarray(table.extra[f"dhnTrueAmplitude{m}"], dtype=float)
        + rng.normal(size=len(table))
        for m in (7, 8, 9)
    }
    write_particles(table.with_extra(**fake), tmp_path / "in.cs")
    out = tmp_path / "space"
    argv = [
        "analyze",
        str(tmp_path / "in.cs"),
        "--modes",
        str(sim / "modes.npz"),
        "--out",
        str(out),
        "--min-count",
        "10",
        "--select",
        "PC1 > 0",
    ]
    assert main(argv) == 0
    result = read_particles(out / "particles.star")
    groups = np.asarray(result.extra["dhnGroup"], dtype=int)
    assert groups.min() >= 1 and np.isfinite(np.asarray(result.extra["dhnPC2"], dtype=float)).all()
    # each group as STAR and as .cs with the original cryoSPARC uids
    for g in np.unique(groups):
        cs = Dataset.load(out / "groups" / f"group_{g:02d}.cs")
        np.testing.assert_array_equal(np.sort(cs["uid"]), np.sort(table.uids[groups == g]))
        star = starfile.read(out / "groups" / f"group_{g:02d}.star", always_dict=True)
        assert len(star["particles"]) == int((groups == g).sum())
        assert (
            "relion_reconstruct --i"
            in (out / "groups" / f"group_{g:02d}_reconstruct.sh").read_text()
        )
    sel = read_particles(out / "selection.star")
    assert (np.asarray(sel.extra["dhnPC1"], dtype=float) > 0).all()
    st = gemmi.read_structure(str(out / "models" / "PC1_trajectory.pdb"))
    assert len(st) == 10 and st[0].count_atom_sites() == 1656  # all heavy atoms of 4AKE A
    assert (out / "models" / "group_01_centroid.cif").is_file()
    assert "coordsets true" in (out / "models" / "view.cxc").read_text()
    for name in ("pc_space.png", "amplitudes.png", "errors.png", "report.md", "pca.npz"):
        assert (out / name).is_file(), name
    # the report says how a far group gets its own reference (map, fit, modes, align)
    report = (out / "report.md").read_text()
    assert (
        "deephemnma fit " in report and "--keep-frame" in report and "relion_reconstruct" in report
    )
    # new particles project into the saved space
    again = [
        "analyze",
        str(tmp_path / "in.cs"),
        "--space",
        str(out / "pca.npz"),
        "--out",
        str(tmp_path / "again"),
        "--groups",
        "none",
    ]
    assert main(again) == 0
    np.testing.assert_allclose(
        np.asarray(read_particles(tmp_path / "again" / "particles.star").extra["dhnPC1"], float),
        np.asarray(result.extra["dhnPC1"], float),
        atol=1e-5,
    )
    assert main(["analyze", str(sim / "particles.star"), "--out", str(tmp_path / "x")]) == 2


def test_run_pipeline_skips_finished_stages_and_reads_config(
    project: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sim = project / "Simulated"
    config = tmp_path / "dhn.toml"
    config.write_text(
        f'particles = "{sim / "particles.star"}"\nmodes = "{sim / "modes.npz"}"\n'
        + "".join(f"{k} = {v!r}\n".replace("'", '"') for k, v in FAST.items())
    )
    out = tmp_path / "dhn"
    assert main(["run", "--config", str(config), "--out", str(out)]) == 0
    final = read_particles(out / "analysis" / "particles.star")
    assert len(final) == 48
    source = np.asarray(final.extra["dhnSource"]).astype(str)
    assert (source == "hemnma").sum() + (source == "network").sum() == 48
    assert (source == "hemnma").sum() >= 20  # the training subset (minus outliers)
    capsys.readouterr()
    assert main(["run", "--config", str(config), "--out", str(out)]) == 0
    assert capsys.readouterr().out.count("up to date, skipped") == 4
    # another training subset: every stage after it runs again, none is skipped
    assert main(["run", "--config", str(config), "--out", str(out), "--n-train", "30"]) == 0
    assert "up to date" not in capsys.readouterr().out
    again = read_particles(out / "analysis" / "particles.star")
    assert (np.asarray(again.extra["dhnSource"]).astype(str) == "hemnma").sum() >= 26
    assert len(read_particles(out / "subset" / "train.star")) == 30
    bad = tmp_path / "bad.toml"
    bad.write_text('particles = "x.star"\nepochz = 3\n')
    assert main(["run", "--config", str(bad), "--out", str(tmp_path / "b")]) == 2
    assert "unknown key(s) epochz" in capsys.readouterr().err
    assert (
        main(["run", "--particles", str(sim / "particles.star"), "--out", str(tmp_path / "c")]) == 2
    )
    assert "no reference" in capsys.readouterr().err


def _relion(project: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    exe = Path(sys.executable).parent / "deephemnma-relion"
    return subprocess.run(
        [str(exe), *argv], cwd=project, capture_output=True, text=True, timeout=600
    )


def test_relion_external_job_three_versions(project: Path) -> None:
    job = "External/job004/"
    (project / "External" / "job004").mkdir(parents=True, exist_ok=True)
    params = [x for k, v in FAST.items() for x in (f"--{k}", str(v))]
    argv = [
        "--o",
        job,
        "--in_parts",
        "Simulated/particles.star",
        "--modes",
        "Simulated/modes.npz",
        *params,
        "--j",
        "2",
        "--pipeline_control",
        job,
    ]
    text31 = shared(PIPELINE_31).read_text()
    text40 = text31.replace("_rlnPipeLineNodeType #1", "_rlnPipeLineNodeTypeLabel #1")
    text50 = text40.replace("# version 30001", "# version 50001")
    expected = {
        "3.1": (text31, None),
        "4.0": (text40, "ParticlesData.star.relion"),
        "5.0": (text50, "ParticleGroupMetadata.star.relion"),
    }
    for version, (pipeline, label) in expected.items():
        (project / "default_pipeline.star").write_text(pipeline)
        # relion_version as a job parameter names the calling RELION only (not the STAR flavour)
        extra = ["--relion_version", "5.0"] if version == "5.0" else []
        done = _relion(project, *argv, *extra)
        assert done.returncode == 0, done.stderr[-3000:]
        jobdir = project / "External" / "job004"
        assert (jobdir / "RELION_JOB_EXIT_SUCCESS").exists()
        assert not (jobdir / "RELION_JOB_EXIT_FAILURE").exists()
        nodes = starfile.read(jobdir / "RELION_OUTPUT_NODES.star", always_dict=True)
        table = nodes["output_nodes"]
        names = table["rlnPipeLineNodeName"].tolist()
        assert names[0] == "External/job004/analysis/particles.star"
        assert any("/groups/group_01.star" in n for n in names)
        for name in names:  # project-relative, existing files
            assert (project / name).is_file(), name
        assert (table["rlnPipeLineNodeType"] == 3).all()
        if label is None:
            assert "rlnPipeLineNodeTypeLabel" not in table.columns
        else:
            assert (table["rlnPipeLineNodeTypeLabel"] == label).all()
        assert "unknown" not in done.stdout + done.stderr  # --pipeline_control is RELION's
        assert f"for RELION {version}" in done.stdout


def test_relion_external_job_failure_and_abort(project: Path) -> None:
    (project / "External" / "job005").mkdir(parents=True, exist_ok=True)
    done = _relion(
        project, "--o", "External/job005/", "--in_parts", "Simulated/particles.star", "--j", "1"
    )
    assert done.returncode == 1
    assert "no reference" in done.stderr
    assert (project / "External" / "job005" / "RELION_JOB_EXIT_FAILURE").exists()
    assert not (project / "External" / "job005" / "RELION_JOB_EXIT_SUCCESS").exists()
    # abort: RELION touches RELION_JOB_ABORT_NOW while the job runs
    jobdir = project / "External" / "job006"
    jobdir.mkdir(parents=True, exist_ok=True)
    exe = Path(sys.executable).parent / "deephemnma-relion"
    slow = [
        "--n_train",
        "40",
        "--epochs",
        "50",
        "--size",
        "32",
        "--workers",
        "0",
        "--device",
        "cpu",
        "--align_working_size",
        "64",
        "--search_step",
        "30",
    ]
    proc = subprocess.Popen(
        [
            str(exe),
            "--o",
            "External/job006/",
            "--in_parts",
            "Simulated/particles.star",
            "--modes",
            "Simulated/modes.npz",
            *slow,
        ],
        cwd=project,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 120
    while not (jobdir / "stages").exists() and time.time() < deadline:  # a stage has finished
        time.sleep(0.2)
    (jobdir / "RELION_JOB_ABORT_NOW").touch()
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, err[-2000:]
    assert (jobdir / "RELION_JOB_EXIT_ABORTED").exists()
    assert not (jobdir / "RELION_JOB_ABORT_NOW").exists()
    assert not (jobdir / "RELION_JOB_EXIT_SUCCESS").exists()


class _FakeJob:
    def __init__(self, log: list[tuple[Any, ...]], uid: str, data: Dataset | None = None) -> None:
        self.calls, self.uid, self.data = log, uid, data
        self.outputs: dict[str, list[Any]] = {}

    def load_output(self, name: str, slots: str = "all") -> Dataset:
        self.calls.append(("load_output", self.uid, name, slots))
        assert self.data is not None
        return self.data

    def connect(self, target: str, job: str, output: str) -> bool:
        self.calls.append(("connect", target, job, output))
        return True

    def add_output(
        self, type: str, name: str, slots: list[Any], passthrough: str, title: str = ""
    ) -> str:
        self.calls.append(("add_output", type, name, passthrough))
        self.outputs[name] = slots
        return name

    def run(self) -> Any:
        import contextlib

        self.calls.append(("run",))
        return contextlib.nullcontext()

    def log(self, text: str) -> None:
        self.calls.append(("log", text))

    def alloc_output(self, name: str, uids: np.ndarray) -> Dataset:
        """What the server allocates: the uids and the fields of the declared slots."""
        ds = Dataset({"uid": np.asarray(uids, dtype=np.uint64)})
        fields: list[tuple[str, str] | tuple[str, str, tuple[int, ...]]] = [
            ("alignments3D/pose", "<f4", (3,)),
            ("alignments3D/shift", "<f4", (2,)),
            ("alignments3D/psize_A", "<f4"),
        ]
        for slot in self.outputs[name][1:]:
            fields += [(f"{slot['name']}/component", "<u4"), (f"{slot['name']}/value", "<f4")]
        ds.add_fields(fields)
        return ds

    def save_output(self, name: str, dataset: Dataset) -> None:
        self.calls.append(("save_output", name, dataset))


class _FakeCryoSPARC:
    def __init__(self, data: Dataset, project_dir: Path) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.data, self.dir = data, project_dir

    def find_project(self, uid: str) -> Any:
        self.calls.append(("find_project", uid))
        outer = self

        class Project:
            dir = outer.dir

            def find_job(self, juid: str) -> _FakeJob:
                return _FakeJob(outer.calls, juid, outer.data)

            def create_external_job(self, workspace: str, title: str = "") -> _FakeJob:
                outer.calls.append(("create_external_job", workspace, title))
                outer.external = _FakeJob(outer.calls, "J99")
                return outer.external

        return Project()


def test_cryosparc_online_round_trip_with_a_fake_server(project: Path, tmp_path: Path) -> None:
    from deephemnma_bridge.cli.cryosparc import add_args, run_online

    records = Dataset.load(project / "Simulated" / "particles.cs")
    fake = _FakeCryoSPARC(records, project / "Simulated")
    import argparse

    parser = argparse.ArgumentParser()
    add_args(parser)
    args = parser.parse_args(
        [
            "--project",
            "P1",
            "--job",
            "J42",
            "--workspace",
            "W1",
            "--work",
            str(tmp_path / "work"),
            "--modes",
            str(project / "Simulated" / "modes.npz"),
        ]
    )
    for key, value in FAST.items():
        setattr(args, key, value)
    uid = run_online(args, fake)
    assert uid == "J99"
    kinds = [c[0] for c in fake.calls]
    assert kinds[:2] == ["find_project", "load_output"]
    assert ("connect", "particles", "J42", "particles") in fake.calls
    saved = {c[1]: c[2] for c in fake.calls if c[0] == "save_output"}
    assert "particles" in saved and any(k.startswith("group_") for k in saved)
    every = saved["particles"]
    np.testing.assert_array_equal(np.sort(every["uid"]), np.sort(records["uid"]))
    assert np.all(every["components_mode_7/component"] == 7)
    result = read_particles(tmp_path / "work" / "pipeline" / "analysis" / "particles.cs")
    order = {int(u): k for k, u in enumerate(result.uids)}
    rows = [order[int(u)] for u in every["uid"]]
    np.testing.assert_allclose(
        every["components_mode_8/value"],
        np.asarray(result.extra["dhnAmplitude8"], float)[rows],
        rtol=1e-5,
    )
    assert np.abs(every["alignments3D/pose"]).sum() > 0
    group_uids = np.concatenate([saved[k]["uid"] for k in saved if k.startswith("group_")])
    assert set(group_uids.tolist()) <= set(records["uid"].tolist())
    assert kinds.index("run") < kinds.index("save_output")


def test_examples_parse() -> None:
    import argparse
    import py_compile

    from deephemnma_bridge.cli.run import DEFAULTS, options_from

    root = Path(__file__).resolve().parents[1] / "examples"
    args = argparse.Namespace(config=root / "pipeline.toml")
    opts = options_from(args)  # unknown keys would raise
    assert opts["n_train"] == 20000 and opts["augment"] is True and set(opts) == set(DEFAULTS)
    py_compile.compile(str(root / "cryosparc_tools_example.py"), doraise=True)
