"""`ParticleTable` <-> cryosparc-tools ``Dataset`` in memory, and the server version check.

The in-memory functions must give exactly what the ``.cs`` file reader and writer give (same
code path); a bad dataset is an error naming the source and the field; a server of another
version than cryosparc-tools is one error line with both versions and the ``pip install`` fix.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import warnings
from pathlib import Path
from typing import Any

import cryosparc
import httpx
import numpy as np
import pytest
from conftest import CRYOSPARC_FILES, shared
from cryosparc.dataset import Dataset
from numpy.lib.recfunctions import repack_fields

from deephemnma_bridge.adapters import (
    dataset_from_particles,
    particles_from_dataset,
    read_particles,
    write_particles,
)
from deephemnma_bridge.adapters.cryosparc import stable_uids
from deephemnma_bridge.adapters.cryosparc_online import connect, publish_results
from deephemnma_bridge.conventions import euler_to_matrix
from deephemnma_bridge.errors import InputError, ParticleFileError
from deephemnma_bridge.particles import ParticleTable

J2 = CRYOSPARC_FILES[0]
STAR = "relion/simplecryoem/relion_proj_batch.star"


def _same_records(a: np.ndarray, b: np.ndarray) -> None:
    assert a.dtype == b.dtype
    for name in a.dtype.names or ():
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def _same_tables(a: ParticleTable, b: ParticleTable) -> None:
    """Every field and extra column equal (not where they came from: path, search_dirs)."""
    assert len(a) == len(b)
    for f in dataclasses.fields(ParticleTable):
        if f.name in ("source", "search_dirs", "extra"):
            continue
        x, y = getattr(a, f.name), getattr(b, f.name)
        assert (x is None) == (y is None), f.name
        if x is not None:
            assert np.asarray(x).dtype == np.asarray(y).dtype, f.name
            np.testing.assert_array_equal(x, y, err_msg=f.name)
    assert list(a.extra) == list(b.extra)
    for key in a.extra:
        assert a.extra[key].dtype == b.extra[key].dtype, key
        np.testing.assert_array_equal(a.extra[key], b.extra[key], err_msg=key)
    assert a.source is not None and b.source is not None
    assert a.source.format == b.source.format == "cryosparc"
    _same_records(a.source.rows, b.source.rows)


def _posed_cs(tmp_path: Path) -> Path:
    """The real exported file with 3D poses, half sets, classes and our values added."""
    table = read_particles(shared(J2))
    rng = np.random.default_rng(5)
    n = len(table)
    eulers = np.stack(
        [rng.uniform(-180, 180, n), rng.uniform(0, 180, n), rng.uniform(-180, 180, n)], axis=1
    )
    posed = table.with_poses(euler_to_matrix(eulers), rng.uniform(-5, 5, (n, 2)))
    posed = posed.with_extra(
        dhnCost=np.linspace(0, 1, n), dhnGroup=np.arange(n) % 3, dhnLabel=np.array(["a"] * n)
    )
    write_particles(posed, tmp_path / "posed.cs")
    return tmp_path / "posed.cs"


@pytest.mark.parametrize("kind", ["exported", "posed"])
def test_dataset_gives_the_table_of_the_file(kind: str, tmp_path: Path) -> None:
    path = shared(J2) if kind == "exported" else _posed_cs(tmp_path)
    from_file = read_particles(path)
    from_dataset = particles_from_dataset(Dataset.load(path), source_name="P1 J2 particles")
    _same_tables(from_file, from_dataset)
    assert from_dataset.source is not None and from_dataset.source.path == ""
    assert from_dataset.search_dirs == (str(Path.cwd()),)
    there = particles_from_dataset(Dataset.load(path), search_dirs=[tmp_path])
    assert there.search_dirs == (str(tmp_path),)


@pytest.mark.parametrize("kind", ["exported", "posed"])
def test_table_to_dataset_is_what_the_writer_saves(kind: str, tmp_path: Path) -> None:
    table = read_particles(shared(J2) if kind == "exported" else _posed_cs(tmp_path))
    rng = np.random.default_rng(1)
    changed = table.with_extra(dhnAmplitude7=rng.normal(size=len(table)))
    if table.rotation_matrices is not None:  # a pose changed on some rows
        rot = table.rotation_matrices.copy()
        rot[::4] = rot[::4][:, :, [1, 2, 0]]
        changed = changed.with_poses(rot, table.shifts_angstrom + 1.0)
    before = table.source.rows.copy()  # type: ignore[union-attr]
    for t in (table, changed):
        ds = dataset_from_particles(t)
        assert isinstance(ds, Dataset)
        write_particles(t, tmp_path / "w.cs")
        _same_records(Dataset.load(tmp_path / "w.cs").to_records(fixed=True), ds.to_records(True))
        # and back: the same table as reading the written file
        _same_tables(read_particles(tmp_path / "w.cs"), particles_from_dataset(ds))
        # the dataset is a copy: changing it changes neither table nor a second dataset
        ds["ctf/df1_A"] = 0.0
        assert np.all(dataset_from_particles(t)["ctf/df1_A"] > 0)
    _same_records(before, table.source.rows)  # type: ignore[union-attr]
    # every field of the original rows is kept (alignments2D, ctf extras, uids)
    original = np.load(shared(J2))
    ds = dataset_from_particles(changed)
    for name in original.dtype.names or ():
        assert name in ds.fields(), name
    np.testing.assert_array_equal(ds["uid"], original["uid"])
    np.testing.assert_array_equal(ds["alignments2D/pose"], original["alignments2D/pose"])


def test_star_table_through_a_dataset_keeps_its_values(tmp_path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # its stack is not needed here
        table = read_particles(shared(STAR))
    assert table.rotation_matrices is not None
    ds = dataset_from_particles(table)
    write_particles(table, tmp_path / "s.cs")
    _same_records(Dataset.load(tmp_path / "s.cs").to_records(fixed=True), ds.to_records(True))
    back = particles_from_dataset(ds, source_name="converted")
    np.testing.assert_array_equal(back.uids, stable_uids(table))
    assert back.image_paths.tolist() == table.image_paths.tolist()
    np.testing.assert_array_equal(back.image_indices, table.image_indices)
    np.testing.assert_allclose(back.rotation_matrices, table.rotation_matrices, atol=1e-6)
    np.testing.assert_allclose(back.shifts_angstrom, table.shifts_angstrom, atol=1e-5)
    for name in (
        "defocus_u_angstrom",
        "defocus_v_angstrom",
        "defocus_angle_degrees",
        "voltage_kv",
        "spherical_aberration_mm",
        "amplitude_contrast",
        "pixel_size_angstrom",
    ):
        np.testing.assert_allclose(getattr(back, name), getattr(table, name), rtol=1e-6)
    np.testing.assert_array_equal(back.box_size_px, table.box_size_px)
    np.testing.assert_array_equal(back.optics_group, table.optics_group)
    # the STAR columns without a .cs field travel as rln/ fields, with their values
    rows = table.source.rows  # type: ignore[union-attr]
    for col in ("rlnImageOriginalName", "rlnMicrographName", "rlnCoordinateX"):
        assert f"rln/{col}" in ds.fields(), col
    assert [str(v) for v in rows["rlnMicrographName"]] == list(ds["rln/rlnMicrographName"])
    np.testing.assert_array_equal(ds["rln/rlnCoordinateX"], rows["rlnCoordinateX"])
    # and the STAR writer gets every column back from the table read from the dataset
    write_particles(back, tmp_path / "b.star")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        again = read_particles(tmp_path / "b.star")
    for col in rows.columns:
        assert col in again.source.rows.columns, col  # type: ignore[union-attr]
    np.testing.assert_allclose(again.rotation_matrices, table.rotation_matrices, atol=1e-6)


def _without(records: np.ndarray, field: str) -> Dataset:
    names = [n for n in records.dtype.names or () if n != field]
    return Dataset(repack_fields(records[names]))


def test_bad_dataset_names_the_source_and_the_field() -> None:
    raw = np.load(shared(J2))
    for field in ("blob/path", "blob/idx"):
        with pytest.raises(ParticleFileError, match=f"^P1 J2 particles: field {field} is missing"):
            particles_from_dataset(_without(raw, field), source_name="P1 J2 particles")
    with pytest.raises(ParticleFileError, match="^<dataset>: blob/psize_A is missing"):
        particles_from_dataset(_without(raw, "blob/psize_A"))
    ds = Dataset(raw)
    ds.add_fields([("alignments3D/pose", "<f4", (3,))])
    pose = np.zeros((len(ds), 3), dtype=np.float32)
    pose[2, 1] = np.nan
    ds["alignments3D/pose"] = pose
    uid = int(raw["uid"][2])
    with pytest.raises(
        ParticleFileError,
        match=rf"^P1 J2 particles: field alignments3D/pose of row 3 \(uid {uid}\) is not finite",
    ):
        particles_from_dataset(ds, source_name="P1 J2 particles")
    names = raw.dtype.names or ()
    neg = raw.astype([(n, "<i8" if n == "blob/idx" else raw.dtype[n]) for n in names])
    neg["blob/idx"][4] = -2
    with pytest.raises(ParticleFileError, match=r"^src: field blob/idx of row 5 .* negative"):
        particles_from_dataset(Dataset(neg), source_name="src")
    with pytest.raises(ParticleFileError, match="^empty: the dataset holds no particles"):
        particles_from_dataset(Dataset(raw[:0]), source_name="empty")
    with pytest.raises(TypeError, match="expected a cryosparc.dataset.Dataset"):
        particles_from_dataset(raw)


# ---- publishing: a table in memory gives the server the same rows as its file ----


class _Job:
    def __init__(self, calls: list[tuple[Any, ...]]) -> None:
        self.calls, self.uid = calls, "J99"
        self.slots: dict[str, list[Any]] = {}

    def connect(self, target: str, job: str, output: str) -> bool:
        return True

    def add_output(self, type: str, name: str, slots: list[Any], **kw: Any) -> str:
        self.slots[name] = slots
        return name

    def run(self) -> Any:
        return contextlib.nullcontext()

    def log(self, text: str) -> None:
        self.calls.append(("log", text))

    def alloc_output(self, name: str, uids: np.ndarray) -> Dataset:
        ds = Dataset({"uid": np.asarray(uids, dtype=np.uint64)})
        fields: list[Any] = [("alignments3D/pose", "<f4", (3,)), ("alignments3D/psize_A", "<f4")]
        for slot in self.slots[name][1:]:
            fields += [(f"{slot['name']}/component", "<u4"), (f"{slot['name']}/value", "<f4")]
        ds.add_fields(fields)
        return ds

    def save_output(self, name: str, dataset: Dataset) -> None:
        self.calls.append(("save_output", name, dataset.to_records(fixed=True)))


class _Server:
    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def find_project(self, uid: str) -> Any:
        outer = self

        class Project:
            def create_external_job(self, workspace: str, title: str = "") -> _Job:
                return _Job(outer.calls)

        return Project()


def test_publish_a_table_in_memory_like_its_file(tmp_path: Path) -> None:
    table = read_particles(_posed_cs(tmp_path))
    rng = np.random.default_rng(2)
    table = table.with_extra(dhnAmplitude7=rng.normal(size=len(table)))
    group = table.take(np.arange(0, len(table), 2))
    write_particles(table, tmp_path / "all.cs")
    write_particles(group, tmp_path / "g1.cs")
    saved = []
    for particles, groups in (
        (tmp_path / "all.cs", {"group_1": tmp_path / "g1.cs"}),
        (table, {"group_1": group}),
        (dataset_from_particles(table), {"group_1": dataset_from_particles(group)}),
    ):
        server = _Server()
        assert publish_results(server, "P1", "W1", ("J2", "particles"), particles, groups, [7])
        saved.append([c for c in server.calls if c[0] == "save_output"])
    for other in saved[1:]:
        assert [c[1] for c in other] == [c[1] for c in saved[0]] == ["particles", "group_1"]
        for a, b in zip(saved[0], other):
            _same_records(a[2], b[2])
    with pytest.raises(InputError, match="results 'particles': no amplitude of mode 8"):
        publish_results(_Server(), "P1", "W1", ("J2", "particles"), table, {}, [8])


# ---- server version ----


class _FakeAPI:
    """What cryosparc-tools 5.x's ``CryoSPARC()`` asks the server: the user, the version."""

    version = "v5.0.0"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.users = type("Users", (), {"me": staticmethod(lambda: {"email": "a@b.org"})})()
        self.config = type("Config", (), {"get_version": staticmethod(lambda: self.version)})()


TOOLS_MAJOR = int(cryosparc.__version__.split(".")[0])


def _connect() -> Any:
    env = {"CRYOSPARC_PASSWORD": "pw"}
    if TOOLS_MAJOR < 5:  # cryosparc-tools 4.x also needs a license id
        env["CRYOSPARC_LICENSE_ID"] = "00000000-0000-0000-0000-000000000000"
    return connect(url="http://cs.example:39000", email="a@b.org", environ=env)


@pytest.fixture
def fake_api(monkeypatch: pytest.MonkeyPatch) -> type[_FakeAPI]:
    """The real ``cryosparc.tools.CryoSPARC`` talking to a fake API client (no network)."""
    if TOOLS_MAJOR < 5:
        pytest.skip("cryosparc-tools 4.x has no APIClient (JSON-RPC command clients instead)")
    api = type("API", (_FakeAPI,), {})
    monkeypatch.setattr("cryosparc.tools.APIClient", api)
    return api


def test_server_of_another_version_is_one_clear_error(fake_api: type[_FakeAPI]) -> None:
    tools = cryosparc.__version__
    fake_api.version = "v4.6.2"
    with pytest.raises(InputError) as info:
        _connect()
    line = str(info.value)
    assert "\n" not in line
    assert line == (
        f"cryoSPARC at http://cs.example:39000 is version v4.6.2 but cryosparc-tools is {tools}; "
        "cryosparc-tools must match the server's major.minor version: "
        'pip install "cryosparc-tools~=4.6.0"'
    )
    fake_api.version = "v5.9.1"
    with pytest.raises(InputError, match=r'v5\.9\.1 .* pip install "cryosparc-tools~=5\.9\.0"$'):
        _connect()
    # the matching version connects, and no warning is left over (warnings are errors here)
    fake_api.version = "v" + ".".join(tools.split(".")[:2]) + ".7"
    cs = _connect()
    assert cs.base_url == "http://cs.example:39000"


def test_mismatch_warning_of_cryosparc_tools_4(monkeypatch: pytest.MonkeyPatch) -> None:
    """cryosparc-tools 4.7.1 words its warning a little differently (host:port, v<tools>)."""

    class Tools4:
        def __init__(self, **kwargs: Any) -> None:
            warnings.warn(
                "CryoSPARC instance cs.example:39000 with version v5.0.1 may not be compatible "
                "with current cryosparc-tools version v4.7.1.\n\nTo install a compatible "
                "version of cryosparc-tools:\n\n    pip install --force "
                "cryosparc-tools~=5.0.0\n",
                stacklevel=2,
            )

    monkeypatch.setattr("cryosparc.tools.CryoSPARC", Tools4)
    with pytest.raises(InputError) as info:
        _connect()
    assert str(info.value) == (
        "cryoSPARC at http://cs.example:39000 is version v5.0.1 but cryosparc-tools is 4.7.1; "
        "cryosparc-tools must match the server's major.minor version: "
        'pip install "cryosparc-tools~=5.0.0"'
    )


def test_other_warnings_of_the_client_still_show(monkeypatch: pytest.MonkeyPatch) -> None:
    class Client:
        def __init__(self, **kwargs: Any) -> None:
            warnings.warn("something else", UserWarning, stacklevel=2)

    monkeypatch.setattr("cryosparc.tools.CryoSPARC", Client)
    with pytest.warns(UserWarning, match="something else"):
        assert isinstance(_connect(), Client)


@pytest.mark.parametrize("answer", ["html", "404"])
def test_server_without_the_v5_api(monkeypatch: pytest.MonkeyPatch, answer: str) -> None:
    """A v4 server answers tools 5.x without the OpenAPI schema it needs."""
    if TOOLS_MAJOR < 5:
        pytest.skip("cryosparc-tools 4.x talks to a v4 server another way")

    def api(*args: Any, **kwargs: Any) -> Any:
        url = "http://cs.example:39000/api/cmd/openapi.json"
        if answer == "html":
            try:
                json.loads("<!DOCTYPE html>")
            except json.JSONDecodeError as err:
                raise ValueError("Error reading JSON response") from err
        response = httpx.Response(404, request=httpx.Request("GET", url))
        response.raise_for_status()

    monkeypatch.setattr("cryosparc.tools.APIClient", api)
    with pytest.raises(InputError) as info:
        _connect()
    line = str(info.value)
    assert "\n" not in line
    assert line.startswith("cryoSPARC at http://cs.example:39000 answered, but without the API")
    assert f"cryosparc-tools {cryosparc.__version__} needs" in line
    assert 'pip install "cryosparc-tools~=4.6.0"' in line
