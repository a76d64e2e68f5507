"""RELION External-job protocol files: node types per version, markers, version detection."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import starfile
from conftest import shared

from deephemnma_bridge.adapters import relion_job as rj
from deephemnma_bridge.errors import InputError

PIPELINE_31 = "relion/starfile/default_pipeline.star"  # via shared(): skipped without the data


@pytest.mark.parametrize(
    ("version", "int_col", "label"),
    [
        ("3.1", True, None),
        ("4.0", True, "ParticlesData.star.relion"),
        ("5.0", True, "ParticleGroupMetadata.star.relion"),
    ],
)
def test_output_nodes_per_version(
    tmp_path: Path, version: rj.RelionVersion, int_col: bool, label: str | None
) -> None:
    path = rj.write_output_nodes(
        tmp_path,
        [("External/job007/particles.star", "particles"), ("External/job007/m.mrc", "map")],
        relion_version=version,
    )
    text = path.read_text()
    assert "\r" not in text and text.endswith("\n")
    table = starfile.read(path, always_dict=True)["output_nodes"]
    assert list(table["rlnPipeLineNodeName"]) == [
        "External/job007/particles.star",
        "External/job007/m.mrc",
    ]
    assert list(table["rlnPipeLineNodeType"]) == [3, 6]
    if label is None:
        assert "rlnPipeLineNodeTypeLabel" not in table
    else:
        assert list(table["rlnPipeLineNodeTypeLabel"]) == [label, "DensityMap.mrc"]


def test_output_nodes_rejects_unknown_kind_and_spaces(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="unknown RELION node kind"):
        rj.write_output_nodes(tmp_path, [("a.star", "volume")], relion_version="5.0")
    with pytest.raises(InputError, match="spaces"):
        rj.write_output_nodes(tmp_path, [("a b.star", "particles")], relion_version="5.0")
    assert not (tmp_path / rj.OUTPUT_NODES).exists()


def test_detect_version_from_real_31_pipeline(tmp_path: Path) -> None:
    shutil.copy(shared(PIPELINE_31), tmp_path / "default_pipeline.star")
    assert rj.detect_relion_version(tmp_path) == "3.1"


def test_detect_version_40_and_50(tmp_path: Path) -> None:
    text = shared(PIPELINE_31).read_text()
    v40 = text.replace("_rlnPipeLineNodeType #1", "_rlnPipeLineNodeTypeLabel #1")
    (tmp_path / "default_pipeline.star").write_text(v40)
    assert rj.detect_relion_version(tmp_path) == "4.0"
    v50 = v40.replace("# version 30001", "# version 50001")
    (tmp_path / "default_pipeline.star").write_text(v50)
    assert rj.detect_relion_version(tmp_path) == "5.0"


def test_detect_version_without_pipeline_warns(tmp_path: Path) -> None:
    with pytest.warns(UserWarning, match="assuming RELION 5.0"):
        assert rj.detect_relion_version(tmp_path) == "5.0"


def test_markers_and_abort(tmp_path: Path) -> None:
    rj.write_exit_marker(tmp_path, "FAILURE")
    rj.write_exit_marker(tmp_path, "SUCCESS")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["RELION_JOB_EXIT_SUCCESS"]
    assert not rj.abort_requested(tmp_path)
    (tmp_path / rj.ABORT_NOW).touch()
    assert rj.abort_requested(tmp_path)
    rj.acknowledge_abort(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["RELION_JOB_EXIT_ABORTED"]


def test_parameters_are_typed_with_clear_errors() -> None:
    from deephemnma_bridge.cli.relion_external import typed_options
    from deephemnma_bridge.errors import InputError

    opts = typed_options({"epochs": "30", "outliers": "3.2", "augment": "True", "size": None})
    assert opts == {"epochs": 30, "outliers": 3.2, "augment": True, "size": None}
    assert typed_options({"augment": "no"})["augment"] is False
    with pytest.raises(InputError, match="parameter augment"):
        typed_options({"augment": "maybe"})
    with pytest.raises(InputError, match="parameter epochs"):
        typed_options({"epochs": "many"})
    with pytest.raises(InputError, match="parameter outliers"):
        typed_options({"outliers": "high"})
