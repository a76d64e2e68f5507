"""Real RELION in the test loop (Debian's relion 3.1.3): its programs read what we write.

* every STAR file our commands write (simulate, align, predict, analyze and its groups, subset,
  convert, the External job; 3.0 and 3.1 styles) is read back by ``relion_star_handler``: RELION
  knows every ``rln`` label we write, ignores-but-keeps our ``dhn`` labels in 3.1 files (its
  " + WARNING: will ignore (but maintain) values for the unknown label: dhn..." line), finds none
  in 3.0 files (they go to the ``_dhn.csv`` side file), and converts our 3.0 files to the same
  pixel size, origins (Å) and angles as our 3.1 files;
* ``relion_reconstruct --ctf`` on simulated particles with their true poses gives the model's
  hand (correlation with the model's density far above the mirror images');
* the group subsets ``analyze`` writes reconstruct with the command it writes next to them;
* the External job runs through ``relion_pipeliner`` (``--addJob External`` then ``--RunJobs``)
  and its output nodes are registered in ``default_pipeline.star``.

Skipped, naming the missing programs, where RELION is not installed (``apt-get install relion``;
``.ci/run`` installs it when run as root).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import mrcfile
import numpy as np
import pytest
import starfile

from deephemnma_bridge.cli import main

RELION_PROGRAMS = ("relion_star_handler", "relion_reconstruct", "relion_pipeliner")


def missing_programs(names: tuple[str, ...] = RELION_PROGRAMS) -> list[str]:
    """The programs of ``names`` not found on PATH."""
    return [name for name in names if shutil.which(name) is None]


def skip_reason(missing: list[str]) -> str:
    """Why the module is skipped when ``missing`` programs are absent."""
    return (
        f"RELION's command-line programs not found on PATH: {', '.join(missing)}; install "
        "RELION (Debian/Ubuntu: apt-get install relion; .ci/run does it when run as root)"
    )


_MISSING = missing_programs()
pytestmark = [pytest.mark.relion, pytest.mark.skipif(bool(_MISSING), reason=skip_reason(_MISSING))]

BOX, PIXEL = 48, 2.5  # 120 Å: adenylate kinase (radius 46 Å deformed) shifted by up to ±2 px
JOB = "External/job001"
JOB_PARAMS = {  # the cheapest full pipeline: 24 particles aligned, one epoch of training
    "modes": "Simulated/modes.npz",
    "n_train": "24",
    "epochs": "1",
    "synthetic_batches": "2",
    "size": "32",
    "align_iterations": "5,5",
    "search_step": "30",
    "min_count": "8",
    "workers": "0",
    "device": "cpu",
}
FAST_ALIGN = ["--use-modes", "7,8,9", "--search-step", "30", "--iterations", "5,5"]
FAST_ALIGN += ["--candidates", "1", "--elastic-range", "0", "--max-rounds", "1"]
FAST_ALIGN += ["--device", "cpu", "--threads", "1"]

# RELION 3.1's own messages when it reads a RELION 3.0 file (the same for a genuine 3.0 file,
# e.g. ../shared/data/relion/cryocat/relion_3.0.star): loadSafely's conversion notice, and its
# "discover" mode leaving the table name empty, which makes it call any 3.0 file "not a particle
# STAR file" (ObservationModel::loadSafely)
RELION_30_NOTES = (
    "seems to be from a previous version of Relion. Attempting conversion...",
    "You should make sure metadata in the optics group table after conversion is correct.",
    "WARNING: This is not a particle STAR file but contains rlnImagePixelSize column.",
    "Pixel size in rlnImagePixelSize will be copied to rlnMicrographPixelSize column. "
    "Please make sure this is correct!",
)
# what RELION 3.1's GUI writes in a new project (relion_pipeliner needs the file)
NEW_PIPELINE = "\n# version 30001\n\ndata_pipeline_general\n\n_rlnPipeLineJobCounter 1\n \n"
IGNORED = re.compile(
    r"^\+ WARNING: will ignore \(but maintain\) values for the unknown label: (\S+)$"
)


# ---------------------------------------------------------------------------- helpers
def _relion(argv: list[str], cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def _labels(path: Path) -> dict[str, list[str]]:
    """``{block: [labels]}`` of a STAR file, from its text (no parser in between)."""
    blocks: dict[str, list[str]] = {}
    name = None
    for line in path.read_text().splitlines():
        line = line.strip()
        if line.startswith("data_"):
            name = line[5:]
            blocks[name] = []
        elif line.startswith("_") and name is not None:
            blocks[name].append(line[1:].split()[0])
    return blocks


def _rows(path: Path, block: str) -> int:
    return len(starfile.read(path, always_dict=True)[block])


def relion_reads(path: Path, project: Path, out: Path, *, version: str) -> set[str]:
    """Read ``path`` with ``relion_star_handler --i path --o out`` from ``project``; return the
    labels RELION said it ignores (but keeps). Fails on a non-zero exit or on any line of its
    output that is not "Done!", an ignored-label line or (3.0) its conversion notes."""
    done = _relion(["relion_star_handler", "--i", str(path), "--o", str(out)], project)
    text = done.stdout + done.stderr
    assert done.returncode == 0, f"{path}: relion_star_handler failed:\n{text[-3000:]}"
    assert "Done!" in done.stdout, text[-3000:]
    ignored, notes = set(), []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line == "Done!":
            continue
        match = IGNORED.match(line)
        if match:
            ignored.add(match.group(1))
        elif version == "3.0" and any(note in line for note in RELION_30_NOTES):
            notes.append(line)
        else:
            pytest.fail(f"{path}: RELION complained: {line!r}\nfull output:\n{text[-3000:]}")
    if version == "3.0":
        assert notes, f"{path}: RELION did not take it for a 3.0 file:\n{text[-3000:]}"
    assert out.is_file(), text[-3000:]
    return ignored


def _density(atoms: np.ndarray, n: int, pixel: float, sigma: float = 2.0) -> np.ndarray:
    """Gaussian-blob density (z, y, x) of ``atoms`` (Å, about the rotation centre), voxel
    ``(n//2, n//2, n//2)`` at the centre as in RELION's maps."""
    g = (np.arange(n) - n // 2) * pixel
    ex, ey, ez = (
        np.exp(-((g[None, :] - atoms[:, k : k + 1]) ** 2) / (2 * sigma**2)) for k in range(3)
    )
    return np.einsum("az,ay,ax->zyx", ez, ey, ex)


def _cc(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))


def _check_map(path: Path, *, box: int = BOX, pixel: float = PIXEL) -> np.ndarray:
    with mrcfile.open(path, permissive=True) as mrc:
        data = np.asarray(mrc.data, dtype=np.float64)
        voxel = float(mrc.voxel_size.x)
    assert data.shape == (box, box, box), data.shape
    assert np.isfinite(data).all() and data.std() > 0
    assert voxel == pytest.approx(pixel, abs=1e-3)  # RELION took our pixel size
    return data


# ---------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A RELION project folder with Simulated/: 300 particles of adenylate kinase, 48 px at 2.5 Å,
    SNR 10, flexible along modes 7-9, true poses in _dhnTrue* columns."""
    root = tmp_path_factory.mktemp("relion_project")
    argv = ["simulate", "--n", "300", "--box", str(BOX), "--pixel-size", str(PIXEL)]
    argv += ["--snr", "10", "--shift-range", "2", "--seed", "5", "--device", "cpu"]
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        assert main([*argv, "--out", "Simulated"]) == 0
    yield root


@pytest.fixture(scope="module")
def pipeliner_run(project: Path) -> subprocess.CompletedProcess[str]:
    """The External job added and run by relion_pipeliner in ``project`` (as RELION 3.1's GUI
    does: a new project's default_pipeline.star, then --addJob External, then --RunJobs)."""
    exe = Path(sys.executable).parent / "deephemnma-relion"
    assert exe.is_file(), f"{exe} missing: install the package (pip install -e .)"
    (project / "default_pipeline.star").write_text(NEW_PIPELINE)
    env = {**os.environ, "PATH": f"{exe.parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    env["OMP_NUM_THREADS"] = "1"
    options = ["fn_exe == deephemnma-relion", "in_part == Simulated/particles.star"]
    for k, (label, value) in enumerate(JOB_PARAMS.items(), start=1):
        options += [f"param{k}_label == {label}", f"param{k}_value == {value}"]
    add = ["relion_pipeliner", "--addJob", "External", "--addJobOptions", ";".join(options)]
    done = subprocess.run(add, cwd=project, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert (project / JOB / "job.star").is_file(), done.stdout + done.stderr
    run = ["relion_pipeliner", "--RunJobs", f"{JOB}/", "--sec_wait_after", "1"]
    proc = subprocess.Popen(
        run,
        cwd=project,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # the job runs in the pipeliner's session: killed with it
    )
    try:
        out, err = proc.communicate(timeout=480)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        log = (
            (project / JOB / "run.err").read_text() if (project / JOB / "run.err").exists() else ""
        )
        pytest.fail(f"relion_pipeliner --RunJobs did not finish in 480 s:\n{out}\n{err}\n{log}")
    return subprocess.CompletedProcess(run, proc.returncode, out, err)


@pytest.fixture(scope="module")
def written(project: Path, pipeliner_run: subprocess.CompletedProcess[str]) -> Path:
    """The other STAR files our commands write, run from the project folder: a selection made by
    RELION (relion_star_handler --split) mapped back by `subset` (3.1 and 3.0), `align` and
    `predict` on it with --relion-version 3.0, `analyze` with --relion-version 3.0 (groups and a
    selection), `convert` of the job's HEMNMA output to 3.1 and 3.0."""
    job = project / JOB
    assert (job / "RELION_JOB_EXIT_SUCCESS").exists(), pipeliner_run.stderr[-3000:]
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(project)
        for folder in ("Subset", "Convert"):
            Path(folder).mkdir()
        split = [
            "relion_star_handler",
            "--i",
            f"{JOB}/predicted/particles.star",
            "--o",
            "Subset/relion.star",
            "--split",
            "--nr_split",
            "1",
            "--size_split",
            "4",
        ]
        done = _relion(split, project)
        assert done.returncode == 0, done.stderr[-3000:]
        assert _rows(project / "Subset/relion_split1.star", "particles") == 4
        source = f"{JOB}/predicted/particles.star"
        sub = ["subset", "--source", source, "--select", "Subset/relion_split1.star"]
        assert main([*sub, "--out", "Subset/four.star"]) == 0
        assert main([*sub, "--out", "Subset/four30.star", "--relion-version", "3.0"]) == 0
        align = ["align", "Subset/four.star", "--modes", "Simulated/modes.npz", *FAST_ALIGN]
        assert main([*align, "--relion-version", "3.0", "--out", "Align30"]) == 0
        predict = ["predict", "Subset/four.star", "--checkpoint", f"{JOB}/network"]
        predict += ["--workers", "0", "--device", "cpu", "--relion-version", "3.0"]
        assert main([*predict, "--out", "Predict30"]) == 0
        analyze = ["analyze", f"{JOB}/predicted/particles.star", "--min-count", "100"]
        analyze += ["--select", "PC1 > 0", "--relion-version", "3.0"]
        assert main([*analyze, "--out", "Analyze30"]) == 0
        hemnma = f"{JOB}/hemnma/particles.star"
        assert main(["convert", hemnma, "Convert/hemnma31.star"]) == 0
        assert main(["convert", hemnma, "Convert/hemnma30.star", "--relion-version", "3.0"]) == 0
    return project


# ---------------------------------------------------------------------------- tests
def test_external_job_through_relion_pipeliner(
    project: Path, pipeliner_run: subprocess.CompletedProcess[str]
) -> None:
    job = project / JOB
    log = (job / "run.out").read_text() + (job / "run.err").read_text()
    assert pipeliner_run.returncode == 0, pipeliner_run.stderr[-3000:] + log[-3000:]
    assert (job / "RELION_JOB_EXIT_SUCCESS").exists(), log[-3000:]
    assert not (job / "RELION_JOB_EXIT_FAILURE").exists(), log[-3000:]
    # RELION ran our program with the job's parameters, from the project folder
    note = (job / "note.txt").read_text()
    assert f"deephemnma-relion --o {JOB}/ --in_parts Simulated/particles.star" in note
    assert "--n_train 24" in note and "--j 1" in note
    assert "for RELION 3.1" in log  # version detected from default_pipeline.star
    pipeline = starfile.read(project / "default_pipeline.star", always_dict=True)
    processes = pipeline["pipeline_processes"]
    row = processes[processes["rlnPipeLineProcessName"] == f"{JOB}/"]
    assert len(row) == 1 and int(row["rlnPipeLineProcessStatus"].iloc[0]) == 2  # finished
    assert int(row["rlnPipeLineProcessType"].iloc[0]) == 99  # External
    ours = starfile.read(job / "RELION_OUTPUT_NODES.star", always_dict=True)["output_nodes"]
    names = ours["rlnPipeLineNodeName"].tolist()
    assert names[0] == f"{JOB}/analysis/particles.star"
    assert any(n.startswith(f"{JOB}/analysis/groups/group_") for n in names)
    nodes = pipeline["pipeline_nodes"]
    registered = dict(zip(nodes["rlnPipeLineNodeName"], nodes["rlnPipeLineNodeType"]))
    for name in names:
        assert registered.get(name) == 3, (name, registered)  # particles nodes
        assert (project / name).is_file()
    edges = pipeline["pipeline_output_edges"]
    out_edges = set(zip(edges["rlnPipeLineEdgeProcess"], edges["rlnPipeLineEdgeToNode"]))
    assert out_edges == {(f"{JOB}/", n) for n in names}
    inputs = pipeline["pipeline_input_edges"]
    assert (inputs["rlnPipeLineEdgeFromNode"] == "Simulated/particles.star").any()


# (name, path relative to the project, STAR flavour); "*" in a path: every match
OUR_STAR_FILES = [
    ("simulate", "Simulated/particles.star", "3.1"),
    ("job-subset", f"{JOB}/subset/train.star", "3.1"),
    ("align", f"{JOB}/hemnma/particles.star", "3.1"),
    ("align-inliers", f"{JOB}/hemnma/inliers.star", "3.1"),
    ("predict", f"{JOB}/predicted/particles.star", "3.1"),
    ("analyze", f"{JOB}/analysis/particles.star", "3.1"),
    ("analyze-groups", f"{JOB}/analysis/groups/*.star", "3.1"),
    ("subset", "Subset/four.star", "3.1"),
    ("subset-3.0", "Subset/four30.star", "3.0"),
    ("align-3.0", "Align30/particles.star", "3.0"),
    ("predict-3.0", "Predict30/particles.star", "3.0"),
    ("analyze-3.0", "Analyze30/particles.star", "3.0"),
    ("analyze-3.0-groups", "Analyze30/groups/*.star", "3.0"),
    ("analyze-3.0-selection", "Analyze30/selection.star", "3.0"),
    ("convert-3.1", "Convert/hemnma31.star", "3.1"),
    ("convert-3.0", "Convert/hemnma30.star", "3.0"),
]


@pytest.mark.parametrize(
    ("name", "pattern", "version"), OUR_STAR_FILES, ids=[f[0] for f in OUR_STAR_FILES]
)
def test_relion_star_handler_reads_what_we_write(
    written: Path, tmp_path: Path, name: str, pattern: str, version: str
) -> None:
    paths = sorted(written.glob(pattern))
    assert paths, f"{pattern}: not written"
    for path in paths:
        labels = _labels(path)
        ours = {label for block in labels.values() for label in block}
        ignored = relion_reads(
            path.relative_to(written), written, tmp_path / "o.star", version=version
        )
        # every rln label we write is one RELION knows; only our dhn labels are ignored (3.1) or
        # none at all (3.0: they are in the side file)
        assert all(label.startswith("dhn") for label in ignored), (path, ignored)
        if version == "3.1":
            assert ignored == {label for label in ours if label.startswith("dhn")}, path
            assert set(labels) == {"optics", "particles"}, path
            # ... and kept: RELION writes them back, every row
            back = _labels(tmp_path / "o.star")
            assert back["particles"] == labels["particles"], path
            assert _rows(tmp_path / "o.star", "particles") == _rows(path, "particles")
        else:
            assert ignored == set() and not any(label.startswith("dhn") for label in ours), path
            assert list(labels) == [""], path  # one unnamed block, as RELION 3.0 writes
            assert (path.parent / f"{path.stem}_dhn.csv").is_file()
            converted = starfile.read(tmp_path / "o.star", always_dict=True)
            optics = converted["optics"]
            assert optics["rlnImagePixelSize"].tolist() == pytest.approx([PIXEL])
            assert len(converted["particles"]) == _rows(path, "")


@pytest.mark.parametrize(
    ("style30", "style31"),
    [
        ("Convert/hemnma30.star", "Convert/hemnma31.star"),
        ("Subset/four30.star", "Subset/four.star"),
    ],
)
def test_relion_converts_our_30_files_to_our_31_values(
    written: Path, tmp_path: Path, style30: str, style31: str
) -> None:
    """RELION's own 3.0 -> 3.1 conversion of our 3.0 file (pixel size from rlnDetectorPixelSize
    and rlnMagnification, origins from px to Å) gives the values of our 3.1 file."""
    relion_reads(Path(style30), written, tmp_path / "c.star", version="3.0")
    got = starfile.read(tmp_path / "c.star", always_dict=True)["particles"]
    want = starfile.read(written / style31, always_dict=True)["particles"]
    assert got["rlnImageName"].tolist() == want["rlnImageName"].tolist()
    labels = ["rlnDefocusU", "rlnDefocusV"]
    if "rlnAngleRot" in want:
        labels += [
            "rlnAngleRot",
            "rlnAngleTilt",
            "rlnAnglePsi",
            "rlnOriginXAngst",
            "rlnOriginYAngst",
        ]
    for label in labels:
        np.testing.assert_allclose(got[label], want[label], atol=2e-3, err_msg=label)


@pytest.mark.parametrize("version", ["3.1", "3.0"])
def test_relion_reconstruct_true_poses_gives_the_right_hand(
    project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, version: str
) -> None:
    """Our simulator's poses, written by our STAR writer, reconstructed by RELION: the model,
    not its mirror image."""
    from deephemnma_bridge.adapters import read_particles, write_particles
    from deephemnma_bridge.adapters.images import portable_image_paths
    from deephemnma_bridge.conventions import euler_to_matrix

    monkeypatch.chdir(project)
    table = read_particles("Simulated/particles.star")
    true = {
        k: np.asarray(table.extra[f"dhnTrue{k}"], dtype=float)
        for k in ("AngleRot", "AngleTilt", "AnglePsi", "OriginXAngst", "OriginYAngst")
    }
    angles = np.stack([true["AngleRot"], true["AngleTilt"], true["AnglePsi"]], axis=1)
    shifts = np.stack([true["OriginXAngst"], true["OriginYAngst"]], axis=1)
    posed = portable_image_paths(table.with_poses(euler_to_matrix(angles), shifts))
    star = tmp_path / f"posed{version.replace('.', '')}.star"
    write_particles(posed, star, relion_version=version)
    done = _relion(
        ["relion_reconstruct", "--i", str(star), "--o", str(tmp_path / "map.mrc"), "--ctf"], project
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "ERROR" not in done.stdout + done.stderr, done.stderr[-3000:]
    volume = _check_map(tmp_path / "map.mrc")
    from deephemnma_bridge.adapters.maps import read_map  # RELION 3.1 leaves the space group 0

    np.testing.assert_array_equal(read_map(tmp_path / "map.mrc").data, volume)
    modes = np.load("Simulated/modes.npz")
    atoms = modes["atom_coordinates"][modes["atom_node"] >= 0]  # about the rotation centre
    model = _cc(volume, _density(atoms, BOX, PIXEL))
    mirrors = {
        axis: _cc(volume, _density(atoms * np.array(flip), BOX, PIXEL))
        for axis, flip in (("x", [-1, 1, 1]), ("y", [1, -1, 1]), ("z", [1, 1, -1]))
    }
    mirrors["x<->y"] = _cc(volume, _density(atoms[:, [1, 0, 2]], BOX, PIXEL))
    assert model > 0.8, (model, mirrors)
    assert model > max(mirrors.values()) + 0.25, (model, mirrors)


@pytest.mark.parametrize("analysis", [f"{JOB}/analysis", "Analyze30"])
def test_analyze_groups_reconstruct_with_the_written_command(written: Path, analysis: str) -> None:
    groups = sorted((written / analysis / "groups").glob("group_*_reconstruct.sh"))
    assert groups, "no group reconstruction command written"
    script = groups[0]
    name = script.name.removesuffix("_reconstruct.sh")
    command = script.read_text().splitlines()[-1]
    stem = f"{analysis}/groups/{name}"
    assert command == f"relion_reconstruct --i {stem}.star --o {stem}.mrc --ctf"
    assert f"`{command}`" in (written / analysis / "report.md").read_text()
    done = _relion(["sh", str(script.relative_to(written))], written)  # as the user would
    text = done.stdout + done.stderr
    assert done.returncode == 0, text[-3000:]
    assert "ERROR" not in text and "not found" not in text, text[-3000:]
    _check_map(written / analysis / "groups" / f"{name}.mrc")
