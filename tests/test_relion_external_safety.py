"""deephemnma-relion keeps the user's data safe: --o checked, misspelt parameters refused, abort
honoured when RELION starts the job with SIGINT ignored (its ``system("... &")``)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from deephemnma_bridge.cli import main as cli_main
from deephemnma_bridge.cli.relion_external import main

MARKERS = ("RELION_JOB_EXIT_SUCCESS", "RELION_JOB_EXIT_FAILURE", "RELION_JOB_EXIT_ABORTED")


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny RELION-like project: Simulated/particles.star + modes.npz (40 particles)."""
    root = tmp_path_factory.mktemp("relion_project")
    argv = ["simulate", "--n", "40", "--box", "64", "--pixel-size", "1.3", "--seed", "3"]
    argv += ["--out", str(root / "Simulated"), "--device", "cpu"]
    with pytest.warns(UserWarning):
        assert cli_main(argv) == 0
    return root


def _one_line_error(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert lines[0].startswith("deephemnma-relion: error: ")
    return lines[0]


@pytest.mark.parametrize("kind", ["file", "outside", "project", "empty", "parent", "missing"])
def test_bad_job_folder_touches_nothing(
    kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    proj = tmp_path / "proj"
    proj.mkdir()
    precious = proj / "default_pipeline.star"
    precious.write_text("data_pipeline_general\n")
    outside = tmp_path / "elsewhere"
    monkeypatch.chdir(proj)
    o = {
        "file": ["--o", "default_pipeline.star"],
        "outside": ["--o", str(outside) + "/"],
        "project": ["--o", "./"],
        "empty": ["--o", ""],
        "parent": ["--o", "External/../../elsewhere/"],
        "missing": [],
    }[kind]
    before = sorted(p.name for p in proj.iterdir())
    code = main([*o, "--in_parts", "p.star", "--model", "m.pdb", "--j", "1"])
    line = _one_line_error(capsys.readouterr().err)
    assert code == 2
    assert "--o" in line
    assert precious.read_text() == "data_pipeline_general\n"
    assert sorted(p.name for p in proj.iterdir()) == before  # no marker, no folder
    assert not outside.exists()


def test_job_folder_rules(tmp_path: Path) -> None:
    from deephemnma_bridge.cli.relion_external import job_folder
    from deephemnma_bridge.errors import InputError

    (tmp_path / "External").mkdir()
    assert job_folder("External/job012/", tmp_path) == tmp_path.resolve() / "External/job012"
    assert job_folder("External", tmp_path) == tmp_path.resolve() / "External"
    (tmp_path / "link").symlink_to(tmp_path.parent)  # a link out of the project
    with pytest.raises(InputError, match="outside the project"):
        job_folder("link/job001/", tmp_path)


def test_misspelt_parameters_fail_the_job(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    job = tmp_path / "External" / "job003"
    job.mkdir(parents=True)
    argv = ["--o", "External/job003/", "--in_parts", "p.star", "--model", "m.pdb"]
    code = main([*argv, "--epoch", "2", "--ntrain", "48", "--j", "1"])
    line = _one_line_error(capsys.readouterr().err)
    assert code == 1
    assert "--epoch (did you mean --epochs?)" in line
    assert "--ntrain (did you mean --n_train?)" in line
    assert sorted(p.name for p in job.iterdir()) == ["RELION_JOB_EXIT_FAILURE"]  # nothing ran
    # no close match: named without a suggestion
    assert main([*argv, "--zzzqqq", "1"]) == 1
    line = _one_line_error(capsys.readouterr().err)
    assert "unknown parameter --zzzqqq;" in line and "did you mean" not in line
    # a value with spaces (RELION does not quote) is not silently cut
    assert main([*argv, "--groups", "bins", "extra"]) == 1
    assert "'extra'" in _one_line_error(capsys.readouterr().err)


def test_relion_flags_stay_accepted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    argv = ["--o", "External/job004/", "--in_movies", "a", "--in_mics", "b", "--in_parts"]
    argv += ["c.star", "--in_coords", "d", "--in_mask", "e", "--j", "2"]
    argv += ["--pipeline_control", "External/job004/", "--n-train", "30", "--relion_version", "5.0"]
    assert main(argv) == 1
    line = _one_line_error(capsys.readouterr().err)
    assert "no reference" in line and "unknown" not in line  # got past the parameter check
    assert (tmp_path / "External" / "job004" / "RELION_JOB_EXIT_FAILURE").exists()


def test_abort_with_sigint_ignored(project: Path) -> None:
    """As under RELION: SIGINT ignored in the job's process, RELION_JOB_ABORT_NOW touched."""
    jobdir = project / "External" / "job007"
    jobdir.mkdir(parents=True)
    exe = Path(sys.executable).parent / "deephemnma-relion"
    slow = ["--n_train", "30", "--epochs", "200", "--size", "32", "--workers", "0"]
    slow += ["--device", "cpu", "--align_working_size", "64", "--search_step", "8"]
    argv = ["--o", "External/job007/", "--in_parts", "Simulated/particles.star"]
    argv += ["--modes", "Simulated/modes.npz", *slow, "--j", "1"]
    proc = subprocess.Popen(
        [str(exe), *argv],
        cwd=project,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
    )
    try:
        deadline = time.time() + 60
        while not (jobdir / "subset").exists() and time.time() < deadline:  # it is working
            time.sleep(0.1)
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        time.sleep(0.5)
        (jobdir / "RELION_JOB_ABORT_NOW").touch()
        touched = time.time()
        while not (jobdir / "RELION_JOB_EXIT_ABORTED").exists() and time.time() < touched + 10:
            time.sleep(0.05)
        waited = time.time() - touched
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert (jobdir / "RELION_JOB_EXIT_ABORTED").exists(), err[-2000:]
    assert waited < 5.0, waited
    assert proc.returncode == 1, err[-2000:]
    assert "aborted on RELION's request" in err
    assert [m for m in MARKERS if (jobdir / m).exists()] == ["RELION_JOB_EXIT_ABORTED"]
    assert not (jobdir / "RELION_JOB_ABORT_NOW").exists()
