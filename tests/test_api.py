"""The Python API (`deephemnma_bridge.api`): objects in, objects out, docstring examples, errors,
and the cryoSPARC example script on the API against a fake server."""

from __future__ import annotations

import doctest
import importlib
import importlib.util
import tempfile
from pathlib import Path

import numpy as np
import pytest
from cryosparc.dataset import Dataset

import deephemnma_bridge
from deephemnma_bridge import api
from deephemnma_bridge.errors import InputError

FAST_ALIGN = {
    "working_size_px": 32,
    "search_step_degrees": 30.0,
    "n_candidates": 1,
    "device": "cpu",
    "threads": 1,
    "progress": False,
    "log": None,
}
FAST_PIPELINE = {
    "n_train": 12,
    "epochs": 1,
    "synthetic_batches": 2,
    "size_px": 32,
    "align_working_size_px": 32,
    "align_iterations": (4, 2),
    "search_step_degrees": 30.0,
    "min_count": 6,
    "workers": 0,
    "device": "cpu",
}


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> api.SimulationResult:
    """24 particles of 48 px (the bundled adenylate kinase), as a cryoSPARC-like project."""
    root = tmp_path_factory.mktemp("api")
    return api.simulate(
        out=root / "Simulated",
        n_particles=24,
        box_px=48,
        pixel_size_angstrom=3.0,
        seed=3,
        device="cpu",
        progress=False,
        log=None,
    )


@pytest.mark.parametrize(
    "module",
    [
        "",
        "._modes",
        "._fit",
        "._simulate",
        "._align",
        "._train",
        "._predict",
        "._analyze",
        "._pipeline",
    ],
)
def test_docstring_examples(module: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the examples' mkdtemp() here
    mod = importlib.import_module(f"deephemnma_bridge.api{module}")
    result = doctest.testmod(mod, optionflags=doctest.ELLIPSIS, raise_on_error=False)
    assert result.failed == 0, f"{result.failed} docstring example(s) failed in {mod.__name__}"


def test_top_level_exports_are_the_api() -> None:
    for name in ("compute_modes", "fit_model", "align", "train", "predict", "analyze"):
        assert getattr(deephemnma_bridge, name) is getattr(api, name)
    assert deephemnma_bridge.run_pipeline is api.run_pipeline
    assert deephemnma_bridge.TrainedNetwork is api.TrainedNetwork
    with pytest.raises(AttributeError):
        deephemnma_bridge.no_such_thing  # noqa: B018


def test_stages_objects_in_objects_out(sim: api.SimulationResult, tmp_path: Path) -> None:
    seen: list[tuple[int, int]] = []
    lines: list[str] = []
    aligned = api.align(
        sim.particles,
        sim.modes,
        out=tmp_path / "aligned",
        use_modes=[7, 8, 9],
        outliers=3.2,
        **{**FAST_ALIGN, "progress": lambda done, total: seen.append((done, total))},
    )
    assert len(aligned) == 24 and aligned.has_poses
    assert {f"dhnAmplitude{m}" for m in (7, 8, 9)} <= set(aligned.extra)
    assert seen[-1] == (24, 24)
    network = api.train(
        aligned,
        out=tmp_path / "net",
        preset="fast",
        epochs=1,
        size_px=32,
        batch_size=4,
        workers=0,
        device="cpu",
        log=lines.append,
    )
    assert isinstance(network, api.TrainedNetwork) and network.mode_numbers == [7, 8, 9]
    assert network.summary is not None and any("trained 1 epoch" in s for s in lines)
    again = api.TrainedNetwork.load(tmp_path / "net")
    assert again.meta["mode_numbers"] == [7, 8, 9] and again.summary is None
    predicted = api.predict(
        sim.particles,
        network,
        out=tmp_path / "predicted",
        modes=sim.modes,
        hemnma=aligned,
        workers=0,
        device="cpu",
        progress=False,
        log=None,
    )
    source = np.asarray(predicted.extra["dhnSource"]).astype(str)
    assert len(predicted) == 24 and (source == "hemnma").all()  # all aligned: kept
    space = api.analyze(predicted, out=tmp_path / "space", modes=sim.modes, min_count=6, log=None)
    assert isinstance(space, api.AnalysisResult)
    assert len(space.groups) == 24 and space.groups.min() >= 1
    assert sum(len(t) for t in space.subsets.values()) == int(space.trusted.sum())
    assert (tmp_path / "space" / "models" / "view.cxc").is_file() and space.report.is_file()
    # the fitted space projects the same particles onto the same coordinates
    again_space = api.analyze(
        predicted, out=tmp_path / "space2", space=space.space, groups="none", log=None
    )
    np.testing.assert_allclose(
        np.asarray(again_space.particles.extra["dhnPC1"], float),
        np.asarray(space.particles.extra["dhnPC1"], float),
    )


def test_modes_in_memory_model(tmp_path: Path) -> None:
    from deephemnma_bridge.adapters.structure import read_structure
    from deephemnma_bridge.data import default_model_path

    model = read_structure(default_model_path())
    modes = api.compute_modes(model, n_modes=10, log=None)
    assert modes.n_nodes == 214 and len(modes) == 10 and modes.atom_coordinates is not None
    saved = api.compute_modes(out=tmp_path / "m.npz", n_modes=10, log=None)
    assert (tmp_path / "m.npz").is_file()
    np.testing.assert_allclose(saved.eigenvalues, modes.eigenvalues, rtol=1e-6)


def test_bad_options_name_the_option(sim: api.SimulationResult, tmp_path: Path) -> None:
    with pytest.raises(InputError, match="--batch-size must be >= 1"):
        api.align(sim.particles, sim.modes, out=tmp_path / "a", batch_size=0, **FAST_ALIGN)
    with pytest.raises(InputError, match="--template 'blobs': choose from residues"):
        api.align(sim.particles, sim.modes, out=tmp_path / "b", template="blobs", **FAST_ALIGN)
    with pytest.raises(InputError, match="--use-modes 'seven'"):
        api.align(sim.particles, sim.modes, out=tmp_path / "c", use_modes="seven", **FAST_ALIGN)
    with pytest.raises(InputError, match="no _dhnAmplitude"):
        api.analyze(sim.particles, out=tmp_path / "d", log=None)
    with pytest.raises(InputError, match="--groups 'tree'"):
        api.analyze(sim.particles, out=tmp_path / "e", groups="tree", log=None)
    with pytest.raises(InputError, match="no reference"):
        api.run_pipeline(sim.particles, out=tmp_path / "f", log=None)
    with pytest.raises(InputError, match="progress must be"):
        api.simulate(
            out=tmp_path / "g", n_particles=2, box_px=48, pixel_size_angstrom=3.0, progress=3
        )  # type: ignore[arg-type]
    # a folder this package did not write is never replaced without overwrite
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="--overwrite"):
        api.align(sim.particles, sim.modes, out=mine, **FAST_ALIGN)
    assert (mine / "notes.txt").read_text() == "mine"


def _example() -> object:
    path = Path(__file__).resolve().parents[1] / "examples" / "cryosparc_tools_example.py"
    spec = importlib.util.spec_from_file_location("cryosparc_tools_example", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cryosparc_example_on_the_api_with_a_fake_server(
    sim: api.SimulationResult, tmp_path: Path
) -> None:
    from test_pipeline import _FakeCryoSPARC

    records = Dataset.load(sim.out / "particles.cs")
    fake = _FakeCryoSPARC(records, sim.out)
    example = _example()
    lines: list[str] = []
    uid = example.deephemnma_on_job(  # type: ignore[attr-defined]
        fake, "P1", "J42", "W1", work=tmp_path / "dhn", modes=sim.modes, log=lines.append,
        **FAST_PIPELINE,
    )  # fmt: skip
    assert uid == "J99"
    kinds = [c[0] for c in fake.calls]
    assert kinds[:2] == ["find_project", "load_output"]
    assert ("connect", "particles", "J42", "particles") in fake.calls
    saved = {c[1]: c[2] for c in fake.calls if c[0] == "save_output"}
    assert "particles" in saved and any(k.startswith("group_") for k in saved)
    np.testing.assert_array_equal(np.sort(saved["particles"]["uid"]), np.sort(records["uid"]))
    assert np.all(saved["particles"]["components_mode_7/component"] == 7)
    assert kinds.index("run") < kinds.index("save_output")
    # a second call with the same options resumes: every stage is up to date
    lines.clear()
    example.deephemnma_on_job(  # type: ignore[attr-defined]
        fake, "P1", "J42", "W1", work=tmp_path / "dhn", modes=sim.modes, log=lines.append,
        **FAST_PIPELINE,
    )  # fmt: skip
    assert sum("up to date, skipped" in s for s in lines) == 4, lines


def test_pipeline_with_the_grid_head_trained_on_simulated_images(
    sim: api.SimulationResult, tmp_path: Path
) -> None:
    """The default path (the demo's): the network learns from images rendered from the
    reference (a couple of tiny synthetic batches here), predict refines its top 4 and writes
    _dhnConfidence."""
    result = api.run_pipeline(
        sim.particles,
        modes=sim.modes,
        out=tmp_path / "grid",
        batch_size=8,
        refine_steps=2,
        log=None,
        **FAST_PIPELINE,
    )
    net = result.trained_network()
    assert net.meta["target"]["orientation_head"] == "grid"
    assert net.meta["train"]["synthetic_epochs"] == 1 and net.meta["synthetic_snr"] > 0
    extra = result.particles.extra
    assert "dhnConfidence" in extra and "dhnTrusted" in extra
    with pytest.raises(InputError, match="orientation-head"):
        api.run_pipeline(
            sim.particles, modes=sim.modes, out=tmp_path / "bad", orientation_head="euler",
            log=None, **FAST_PIPELINE,
        )  # fmt: skip
