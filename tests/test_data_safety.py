"""A user's data is never lost or silently changed (issue: safe outputs, stale checkpoints,
one-line errors). Each test reproduces a way the tool used to lose data or crash."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from deephemnma_bridge.adapters import read_particles, write_particles
from deephemnma_bridge.adapters.images import portable_image_paths
from deephemnma_bridge.cli import main
from deephemnma_bridge.errors import InputError
from deephemnma_bridge.fileutils import OUTPUT_MARKER
from deephemnma_bridge.nma import NormalModes
from deephemnma_bridge.progress import LineProgress, progress

FAST = ["--working-size", "48", "--search-step", "30", "--iterations", "4,2", "--candidates", "1"]


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """16 simulated AdK particles (64 px, 1.3 Å) with their modes."""
    out = tmp_path_factory.mktemp("safety") / "sim"
    argv = ["simulate", "--n", "16", "--box", "64", "--pixel-size", "1.3", "--seed", "5"]
    with pytest.warns(UserWarning):
        assert main([*argv, "--out", str(out), "--device", "cpu"]) == 0
    return out


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A RELION project directory (the working directory) with an input job and other files."""
    root = tmp_path / "project"
    (root / "Extract" / "job001").mkdir(parents=True)
    (root / "Refine3D" / "job002").mkdir(parents=True)
    (root / "default_pipeline.star").write_text("data_pipeline_general\n")
    (root / "Extract" / "job001" / "particles.star").write_text("data_particles\n")
    (root / "Extract" / "job001" / "particles.mrcs").write_bytes(b"\0" * 64)
    (root / "Extract" / "job001" / "modes.npz").write_bytes(b"PK")
    (root / "Refine3D" / "job002" / "run_class001.mrc").write_bytes(b"\1" * 64)
    monkeypatch.chdir(root)
    return root


@pytest.mark.parametrize(
    ("out", "reason"),
    [
        (".", "working directory"),
        ("Extract", "holds the input"),
        ("Extract/job001", "holds the input"),
        ("Extract/job001/particles.mrcs", "existing file"),
        ("..", "working directory or a folder above it"),
    ],
)
@pytest.mark.parametrize("command", ["align", "analyze", "predict"])
def test_existing_folders_are_never_replaced(
    project: Path, capsys: pytest.CaptureFixture[str], out: str, reason: str, command: str
) -> None:
    before = _tree(project)
    argv = {
        "align": ["align", "Extract/job001/particles.star", "--modes", "Extract/job001/modes.npz"],
        "analyze": ["analyze", "Extract/job001/particles.star"],
        "predict": ["predict", "Extract/job001/particles.star", "--checkpoint", "net"],
    }[command]
    for extra in ([], ["--overwrite"]):
        assert main([*argv, "--out", out, *extra]) == 2
        err = capsys.readouterr().err
        assert reason in err and len(err.strip().splitlines()) == 1
    assert _tree(project) == before


def test_simulate_into_an_existing_file_or_project_is_refused(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = _tree(project)
    assert main(["simulate", "--n", "2", "--out", "Extract/job001/particles.mrcs"]) == 2
    assert "existing file" in capsys.readouterr().err
    other = project / "Refine3D"
    assert main(["simulate", "--n", "2", "--out", str(other)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert _tree(project) == before


def test_a_folder_of_another_command_needs_overwrite(
    sim: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "space"
    out.mkdir()
    (out / "my_notes.txt").write_text("keep me")
    argv = ["analyze", str(sim / "particles.star"), "--out", str(out), "--groups", "none"]
    assert main(argv) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "my_notes.txt").read_text() == "keep me"
    sim_only = tmp_path / "sim_copy"
    with pytest.warns(UserWarning):
        assert (
            main(
                [
                    "simulate",
                    "--n",
                    "4",
                    "--box",
                    "64",
                    "--pixel-size",
                    "1.3",
                    "--out",
                    str(sim_only),
                ]
            )
            == 0
        )
    assert json.loads((sim_only / OUTPUT_MARKER).read_text())["command"] == "simulate"
    # a folder simulate wrote is replaced by simulate, not by analyze
    assert main(["analyze", str(sim / "particles.star"), "--out", str(sim_only)]) == 2
    assert "output of deephemnma simulate" in capsys.readouterr().err


def test_outputs_are_readable_by_the_group(sim: Path) -> None:
    mode = os.stat(sim / "particles.star").st_mode & 0o777
    assert mode == 0o666 & ~_umask()
    assert os.stat(sim).st_mode & 0o777 == 0o777 & ~_umask()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# ------------------------------------------------------------------------ resume
def _align(sim: Path, particles: Path, out: Path, *extra: str) -> int:
    argv = ["align", str(particles), "--modes", str(sim / "modes.npz"), *FAST]
    return main(
        [*argv, "--batch-size", "4", "--checkpoint-every", "100", "--out", str(out), *extra]
    )


def test_resume_refuses_a_changed_input_and_restart_starts_afresh(
    sim: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    particles = tmp_path / "p.star"
    table = portable_image_paths(read_particles(sim / "particles.star"))
    write_particles(table, particles)
    import deephemnma_bridge.alignment.hemnma as hemnma

    real = hemnma.align_batch
    calls = {"n": 0}

    def interrupted_on_second_batch(*args: object, **kwargs: object) -> object:
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(hemnma, "align_batch", interrupted_on_second_batch)
    out = tmp_path / "aligned"
    assert _align(sim, particles, out) == 130
    # Ctrl-C keeps what finished since the last checkpoint (none was due: every 100)
    state = np.load(tmp_path / "aligned.partial" / "rank0_of_1.npz")
    assert state["done"].sum() == 4
    monkeypatch.setattr(hemnma, "align_batch", real)
    # the input is re-sorted in place: resuming would put results on the wrong particles
    particles.unlink()
    write_particles(table.take(np.arange(len(table))[::-1]), particles)
    assert _align(sim, particles, out) == 2
    err = capsys.readouterr().err
    assert "particles" in err and "--restart" in err and "wrong particles" in err
    assert not out.exists()
    assert _align(sim, particles, out, "--restart") == 0
    assert not (tmp_path / "aligned.partial").exists()
    # other options on top of a partial run: refused, with how to start afresh
    (tmp_path / "other.partial").mkdir()
    (tmp_path / "other.partial" / "settings.json").write_text('{"x": 1}')
    assert _align(sim, particles, tmp_path / "other") == 2
    assert "--restart" in capsys.readouterr().err


def test_a_failed_start_leaves_no_partial_folder(
    sim: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    table = portable_image_paths(read_particles(sim / "particles.star"))
    broken = tmp_path / "broken.star"
    write_particles(table, broken)
    text = broken.read_text().replace("particles.mrcs", "missing.mrcs")
    broken.write_text(text)
    assert _align(sim, broken, tmp_path / "out") == 2
    assert "missing.mrcs" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.star"]


# ------------------------------------------------------------------------ modes
def test_modes_of_another_model_are_refused(
    sim: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    aligned = tmp_path / "aligned"
    assert _align(sim, sim / "particles.star", aligned) == 0
    table = read_particles(aligned / "particles.star")
    modes = NormalModes.load(sim / "modes.npz")
    assert set(table.extra["dhnModes"]) == {modes.fingerprint()}
    other = tmp_path / "other_modes.npz"
    import dataclasses

    dataclasses.replace(modes, coordinates=modes.coordinates * 1.2).save(other)
    argv = ["analyze", str(aligned / "particles.star"), "--groups", "none"]
    assert main([*argv, "--modes", str(other), "--out", str(tmp_path / "a")]) == 2
    assert "is not the modes file" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()
    # moved (simulate centres its modes) but the same network: accepted
    shifted = tmp_path / "shifted.npz"
    dataclasses.replace(modes, coordinates=modes.coordinates + 10.0).save(shifted)
    assert main([*argv, "--modes", str(shifted), "--out", str(tmp_path / "b")]) == 0


# ------------------------------------------------------------------------ one-line errors
def _one_line(capsys: pytest.CaptureFixture[str], *needles: str) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, err
    return err


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ('seed = "abc"\n', "seed"),
        ("n_train = [1, 2]\n", "n_train"),
        ('use_modes = ["a"]\n', "use_modes"),
        ('model = "--epochs"\n', "not an option"),
        ("augment = 1\n", "true or false"),
        ('preset = "huge"\n', "paper, fast"),
    ],
)
def test_bad_config_values(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, needle: str
) -> None:
    config = tmp_path / "c.toml"
    config.write_text(text)
    assert main(["run", "--config", str(config), "--out", str(tmp_path / "o")]) == 2
    _one_line(capsys, needle, str(config))
    assert not (tmp_path / "o").exists()


def test_non_utf8_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "c.toml"
    config.write_bytes(b'model = "caf\xe9.pdb"\n')
    assert main(["run", "--config", str(config), "--out", str(tmp_path / "o")]) == 2
    _one_line(capsys, "UTF-8")


def test_bad_modes_files(tmp_path: Path) -> None:
    good = dict(
        coordinates=np.zeros((4, 3)),
        eigenvalues=np.zeros(1),
        vectors=np.zeros((1, 4, 3)),
        mode_numbers=np.ones(1, dtype=np.int64),
        collectivity=np.ones(1),
    )
    with open(tmp_path / "obj.npz", "wb") as f:
        np.savez(f, **{**good, "coordinates": np.array([object()] * 4)})
    with pytest.raises(InputError, match="obj.npz"):
        NormalModes.load(tmp_path / "obj.npz")
    with open(tmp_path / "json.npz", "wb") as f:
        np.savez(f, **good, settings=np.array("{not json"))
    with pytest.raises(InputError, match="json.npz"):
        NormalModes.load(tmp_path / "json.npz")


def test_checkpoint_with_bad_metadata(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from deephemnma_bridge.training.trainer import load_checkpoint

    for i, meta in enumerate(["{not json", json.dumps({"target": {"parts": 5}}), "{}"]):
        path = tmp_path / f"c{i}.pt"
        torch.save({"meta": meta, "model": {}}, path)
        with pytest.raises(InputError, match="damaged checkpoint"):
            load_checkpoint(path)


def test_simulate_bad_numbers_fail_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "s"
    assert main(["simulate", "--n", "4", "--pixel-size", "nan", "--out", str(out)]) == 2
    _one_line(capsys, "finite")
    assert main(["simulate", "--n", "1000000000", "--out", str(out)]) == 2
    _one_line(capsys, "--n 1000000000", "GB")
    assert list(tmp_path.iterdir()) == []


def test_os_errors_and_internal_errors_are_one_line(
    sim: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import deephemnma_bridge.adapters as adapters

    def read_only(*args: object, **kwargs: object) -> None:
        raise PermissionError(13, "Permission denied", str(tmp_path / "ro" / "x.star"))

    monkeypatch.setattr(adapters, "read_particles", read_only)
    argv = [
        "analyze",
        str(sim / "particles.star"),
        "--groups",
        "none",
        "--out",
        str(tmp_path / "ro"),
    ]
    assert main(argv) == 2
    _one_line(capsys, "Permission denied", "x.star", "permissions")

    def bug(*args: object, **kwargs: object) -> None:
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(adapters, "read_particles", bug)
    assert main(argv) == 1
    err = _one_line(capsys, "internal error", "ZeroDivisionError")
    trace = Path(err.split("traceback is in ")[1].split(":")[0])
    assert "ZeroDivisionError" in trace.read_text()
    trace.unlink()


# ------------------------------------------------------------------------ progress
def test_progress_prints_lines_off_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    log = io.StringIO()  # not a tty
    monkeypatch.setenv("DEEPHEMNMA_PROGRESS_SECONDS", "0")
    bar = progress(100, desc="align", file=log)
    assert isinstance(bar, LineProgress)
    for _ in range(4):
        bar.update(25)
    bar.close()
    lines = log.getvalue().splitlines()
    assert lines[0].startswith("align: 25/100 particles (25.0 %)") and "left" in lines[0]
    assert lines[-1].startswith("align: 100/100 particles (100.0 %)")
    quiet = io.StringIO()
    bar = progress(100, desc="align", file=quiet, interval_seconds=3600)
    bar.update(10)
    assert quiet.getvalue() == ""  # not before the interval
    bar.close()
    assert quiet.getvalue().count("\n") == 1


def test_run_restarts_an_interrupted_stage_whose_input_changed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import deephemnma_bridge.cli as cli
    from deephemnma_bridge.cli.run import _stage

    subset = tmp_path / "subset.star"
    subset.write_text("a")
    done = tmp_path / "out" / "hemnma" / "particles.star"
    calls: list[list[str]] = []
    results = iter([130, 0, 0])

    def fake_main(argv: list[str]) -> int:
        calls.append(argv)
        code = next(results)
        if code == 0:
            done.parent.mkdir(parents=True, exist_ok=True)
            done.write_text("x")
        return code

    monkeypatch.setattr(cli, "main", fake_main)
    argv = ["align", str(subset)]
    with pytest.raises(KeyboardInterrupt):
        _stage(tmp_path / "out", "hemnma", argv, print, done, [subset])
    os.utime(subset, ns=(1, 1))  # the training subset was rewritten since
    _stage(tmp_path / "out", "hemnma", argv, print, done, [subset])
    assert calls[1] == [*argv, "--restart"]  # not resumed onto other particles
    _stage(tmp_path / "out", "hemnma", argv, print, done, [subset])  # finished: skipped
    assert len(calls) == 2
    os.utime(subset, ns=(2, 2))
    _stage(tmp_path / "out", "hemnma", argv, print, done, [subset])  # finished, input changed
    assert len(calls) == 3


def test_file_outputs_are_not_replaced_without_overwrite(
    sim: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    mine = tmp_path / "mine.star"
    mine.write_text("my hand-made selection\n")
    for argv in (
        ["convert", str(sim / "particles.star"), str(mine)],
        [
            "subset",
            "--source",
            str(sim / "particles.star"),
            "--select",
            str(sim / "particles.star"),
            "--out",
            str(mine),
        ],
    ):
        assert main(argv) == 2
        _one_line(capsys, "already exists", "--overwrite")
        assert mine.read_text() == "my hand-made selection\n"
    assert main(["convert", str(sim / "particles.star"), str(mine), "--overwrite"]) == 0
    assert len(read_particles(mine)) == 16
    # a file of the user's where a side file would go is not replaced either
    notes = tmp_path / "fresh_dhn.csv"
    notes.write_text("my notes\n")
    assert main(["convert", str(sim / "particles.star"), str(tmp_path / "fresh.star")]) == 2
    _one_line(capsys, "fresh_dhn.csv", "side file", "--overwrite")
    assert notes.read_text() == "my notes\n" and not (tmp_path / "fresh.star").exists()
