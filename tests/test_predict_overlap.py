"""`predict` reads, preprocesses and decodes in a background thread while the network runs
(`overlapped`), or, on the CPU, takes batches through every step in parallel lanes of one
thread each (`in_lanes`): the results are those of the steps run one after another, and an
interrupted run (Ctrl-C in the forward pass, an error in a background thread) keeps the
particles it finished and resumes to the same results."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import deephemnma_bridge.preprocess as preprocess
from deephemnma_bridge import api
from deephemnma_bridge.api import _predict
from deephemnma_bridge.api._predict import overlapped
from deephemnma_bridge.api._sharded import in_lanes, lane_batches
from deephemnma_bridge.conventions import euler_to_matrix
from deephemnma_bridge.errors import InputError
from deephemnma_bridge.particles import ParticleTable

THREAD = "deephemnma-predict"
LANE = "deephemnma-lane"


def _background_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith((THREAD, LANE))]


def _steps(
    n: int, log: list[tuple[str, int, str]], fail: tuple[str, int] | None = None
) -> tuple[Any, Any, Any, Any]:
    """prepare / forward / decode / finish over batches 0..n-1 that log (step, batch, thread)
    and raise at ``fail`` (step, batch): ValueError in prepare, KeyboardInterrupt in forward."""
    batches = iter(range(n))

    def record(step: str, b: int) -> None:
        log.append((step, b, threading.current_thread().name))
        if fail == (step, b):
            raise KeyboardInterrupt if step == "forward" else ValueError(f"{step} {b}")

    def prepare() -> int | None:
        b = next(batches, None)
        if b is not None:
            record("prepare", b)
            assert not torch.is_grad_enabled()  # the background thread takes no gradients
        return b

    def forward(b: int) -> int:
        record("forward", b)
        return 10 * b

    def decode(y: int) -> int:
        record("decode", y // 10)
        return y + 1

    def finish(b: int, d: int) -> None:
        assert d == 10 * b + 1
        record("finish", b)

    return prepare, forward, decode, finish


@pytest.mark.parametrize("overlap", [True, False])
def test_overlapped_runs_every_step_in_order(overlap: bool) -> None:
    log: list[tuple[str, int, str]] = []
    with torch.no_grad():
        overlapped(*_steps(7, log), overlap=overlap)
    main = threading.current_thread().name
    for step in ("prepare", "forward", "decode", "finish"):
        assert [b for s, b, _ in log if s == step] == list(range(7)), step
    where = {s: {t for s2, _, t in log if s2 == s} for s in ("prepare", "decode")}
    assert where["prepare"] == where["decode"] == {main if not overlap else f"{THREAD}_0"}
    assert {t for s, _, t in log if s in ("forward", "finish")} == {main}
    steps = [(s, b) for s, b, _ in log]
    for b in range(1, 7):  # batch n-1 is finished after batch n's forward
        assert steps.index(("forward", b)) < steps.index(("finish", b - 1))
    assert not _background_threads()
    overlapped(*_steps(0, log), overlap=overlap)  # no batch at all: nothing to finish
    assert not _background_threads()


@pytest.mark.parametrize("overlap", [True, False])
@pytest.mark.parametrize(
    ("fail", "error"), [(("forward", 3), KeyboardInterrupt), (("prepare", 4), ValueError)]
)
def test_overlapped_stops_at_once_on_an_error(
    overlap: bool, fail: tuple[str, int], error: type[BaseException]
) -> None:
    log: list[tuple[str, int, str]] = []
    with pytest.raises(error), torch.no_grad():
        overlapped(*_steps(9, log, fail), overlap=overlap)
    finished = [b for s, b, _ in log if s == "finish"]
    # Ctrl-C in batch 3's forward: 0-1 finished (2 waits for batch 3's forward); an error
    # reading batch 4: raised when the loop asks for it, after batch 3's forward
    assert finished == ([0, 1] if fail[0] == "forward" else [0, 1, 2])
    assert max(b for s, b, _ in log if s == "prepare") <= fail[1] + 1  # nothing read past
    assert not _background_threads()  # the thread ended with the loop


def _lane_steps(
    n: int, log: list[tuple[str, int, str]], fail: tuple[str, int] | None = None
) -> tuple[Any, Any, Any, Any]:
    """`_steps` for `in_lanes`: ``prepare`` and ``finish`` take a lock (as `predict`'s do),
    each step waits a little so that both lanes get batches."""
    prepare, forward, decode, finish = _steps(n, log, fail)
    lock = threading.Lock()

    def locked_prepare() -> int | None:
        with lock:
            b = prepare()
        assert torch.get_num_threads() == 1 and not torch.is_grad_enabled()
        return b

    def slow_forward(b: int) -> int:
        threading.Event().wait(0.01)
        return int(forward(b))

    def locked_finish(b: int, d: int) -> None:
        with lock:
            finish(b, d)

    return locked_prepare, slow_forward, decode, locked_finish


def test_lanes_take_every_batch_once_through_every_step() -> None:
    log: list[tuple[str, int, str]] = []
    threads = torch.get_num_threads()
    with torch.no_grad():
        in_lanes(*_lane_steps(12, log), lanes=2)
    assert torch.get_num_threads() == threads  # the caller's threads restored
    for step in ("prepare", "forward", "decode", "finish"):
        assert sorted(b for s, b, _ in log if s == step) == list(range(12)), step
    lanes = {b: {t for _, b2, t in log if b2 == b} for b in range(12)}
    assert all(len(where) == 1 for where in lanes.values())  # one lane takes a batch through
    assert set().union(*lanes.values()) == {threading.current_thread().name, f"{LANE}_0"}
    assert not _background_threads()
    in_lanes(*_lane_steps(0, log), lanes=2)  # no batch at all
    assert not _background_threads()


@pytest.mark.parametrize(
    ("n", "batch", "lanes", "sizes"),
    [
        (23, 5, 1, [5, 5, 5, 5, 3]),
        (23, 5, 2, [4, 4, 4, 4, 4, 3]),
        (12000, 256, 2, [250] * 48),
        (7, 5, 2, [4, 3]),
        (10, 5, 3, [4, 3, 3]),
        (0, 5, 2, []),
    ],
)
def test_lane_batches_end_together(n: int, batch: int, lanes: int, sizes: list[int]) -> None:
    """`lane_batches`: every position once, in order, in batches of at most ``batch``; with
    several lanes a multiple of ``lanes`` batches (or fewer when fewer positions), sizes
    within one of each other."""
    got = lane_batches(n, batch, lanes)
    assert [len(b) for b in got] == sizes
    assert np.array_equal(np.concatenate([np.arange(0), *got]), np.arange(n))


@pytest.mark.parametrize(
    ("fail", "error"), [(("forward", 5), KeyboardInterrupt), (("prepare", 4), ValueError)]
)
def test_lanes_stop_on_an_error_in_any_lane(
    fail: tuple[str, int], error: type[BaseException]
) -> None:
    """A failing batch stops both lanes after the batch each is in; the error is raised in the
    caller whichever lane met it (a KeyboardInterrupt from a background lane too)."""
    log: list[tuple[str, int, str]] = []
    with pytest.raises(error), torch.no_grad():
        in_lanes(*_lane_steps(40, log, fail), lanes=2)
    prepared = [b for s, b, _ in log if s == "prepare"]
    assert max(prepared) <= fail[1] + 2  # each lane stopped after its batch
    assert fail[1] not in [b for s, b, _ in log if s == "finish"]
    assert not _background_threads()


@pytest.fixture(scope="module")
def network(tmp_path_factory: pytest.TempPathFactory) -> tuple[ParticleTable, api.TrainedNetwork]:
    """23 simulated particles (48 px) and a small grid-head network (one epoch on the truth)."""
    root = tmp_path_factory.mktemp("overlap")
    sim = api.simulate(
        out=root / "sim",
        n_particles=23,
        box_px=48,
        pixel_size_angstrom=3.0,
        seed=5,
        device="cpu",
        progress=False,
        log=None,
    )
    truth = sim.particles.extra
    angles = np.stack([truth[f"dhnTrueAngle{a}"] for a in ("Rot", "Tilt", "Psi")], 1)
    labelled = sim.particles.with_poses(euler_to_matrix(angles), np.zeros((23, 2))).with_extra(
        **{f"dhnAmplitude{m}": truth[f"dhnTrueAmplitude{m}"] for m in (7, 8, 9)}
    )
    net = api.train(
        labelled,
        out=root / "net",
        preset="fast",
        epochs=1,
        size_px=32,
        batch_size=8,
        orientation_head="grid",
        grid_step_degrees=30.0,
        backbone="resnet18",
        workers=0,
        device="cpu",
        log=None,
    )
    return sim.particles, net


def _predict_to(
    particles: ParticleTable, net: api.TrainedNetwork, out: Path, **options: Any
) -> ParticleTable:
    return api.predict(
        particles,
        net,
        out=out,
        batch_size=5,
        checkpoint_every=5,
        workers=0,
        device="cpu",
        progress=False,
        log=None,
        **options,
    )


def _assert_same(a: ParticleTable, b: ParticleTable) -> None:
    """Bit for bit: poses, amplitudes and confidence."""
    assert a.rotation_matrices is not None and b.rotation_matrices is not None
    np.testing.assert_array_equal(a.rotation_matrices, b.rotation_matrices)
    np.testing.assert_array_equal(a.shifts_angstrom, b.shifts_angstrom)
    columns = [f"dhnAmplitude{m}" for m in (7, 8, 9)] + ["dhnConfidence"]
    for column in columns:
        np.testing.assert_array_equal(
            np.asarray(a.extra[column], float), np.asarray(b.extra[column], float), column
        )


def test_overlap_gives_the_results_of_the_serial_loop(
    network: tuple[ParticleTable, api.TrainedNetwork],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    particles, net = network
    threads: list[str] = []
    real = preprocess.preprocess_images

    def noted(*args: Any, **kwargs: Any) -> torch.Tensor:
        threads.append(threading.current_thread().name)
        return real(*args, **kwargs)

    monkeypatch.setattr(preprocess, "preprocess_images", noted)
    both = {}
    monkeypatch.setattr(_predict, "LANES", 1)
    for overlap in (True, False):
        monkeypatch.setattr(_predict, "OVERLAP", overlap)
        threads.clear()
        both[overlap] = _predict_to(particles, net, tmp_path / str(overlap))
        # 5 batches (the last of 3), each preprocessed once, in the background thread or not
        main = threading.current_thread().name
        assert threads == [f"{THREAD}_0" if overlap else main] * 5
    _assert_same(both[True], both[False])
    confidence = np.asarray(both[True].extra["dhnConfidence"], float)
    assert len(both[True]) == 23 and np.isfinite(confidence).all()
    assert not _background_threads()


def test_interrupted_prediction_resumes_to_the_same_results(
    network: tuple[ParticleTable, api.TrainedNetwork],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    particles, net = network
    monkeypatch.setattr(_predict, "LANES", 1)
    whole = _predict_to(particles, net, tmp_path / "whole")
    out = tmp_path / "resumed"
    state = out.with_name("resumed.partial") / "rank0_of_1.npz"
    real_prep, real_forward = preprocess.preprocess_images, net.model.forward
    calls = {"prep": 0, "forward": 0}

    def unreadable(*args: Any, **kwargs: Any) -> torch.Tensor:
        calls["prep"] += 1
        if calls["prep"] == 3:  # batch 3 (background thread): a read error, say
            raise OSError("disk gone")
        return real_prep(*args, **kwargs)

    def interrupted(x: torch.Tensor) -> torch.Tensor:
        calls["forward"] += 1
        if calls["forward"] == 3:  # Ctrl-C during batch 3's forward pass
            raise KeyboardInterrupt
        return real_forward(x)

    with monkeypatch.context() as patch:
        patch.setattr(preprocess, "preprocess_images", unreadable)
        with pytest.raises(OSError, match="disk gone"):
            _predict_to(particles, net, out)
    # the first batch stored; the second ran but waited for the third, which failed to read
    assert np.load(state)["done"].sum() == 5
    with monkeypatch.context() as patch:
        patch.setattr(net.model, "forward", interrupted)
        with pytest.raises(KeyboardInterrupt):
            _predict_to(particles, net, out)  # resumes: one more batch stored
    assert np.load(state)["done"].sum() == 10
    assert not out.exists() and not _background_threads()
    _assert_same(_predict_to(particles, net, out), whole)
    assert not state.parent.exists()


def test_lanes_give_the_results_of_one_lane_and_resume(
    network: tuple[ParticleTable, api.TrainedNetwork],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Two lanes of one thread: the results of one lane, each batch preprocessed once in one
    of the two threads; a read error in one lane stops both, and the rerun resumes to the
    same results."""
    particles, net = network
    threads: list[str] = []
    real = preprocess.preprocess_images
    failing = {"third call": False}

    def noted(*args: Any, **kwargs: Any) -> torch.Tensor:
        threads.append(threading.current_thread().name)
        if len(threads) == 3 and failing["third call"]:
            raise OSError("disk gone")
        return real(*args, **kwargs)

    monkeypatch.setattr(preprocess, "preprocess_images", noted)
    monkeypatch.setattr(_predict, "LANES", 1)
    one = _predict_to(particles, net, tmp_path / "one")
    monkeypatch.setattr(_predict, "LANES", 2)
    threads.clear()
    two = _predict_to(particles, net, tmp_path / "two")
    assert len(threads) == 6  # 6 batches (5 of 4, one of 3: `lane_batches`), each preprocessed once
    assert set(threads) == {threading.current_thread().name, f"{LANE}_0"}
    _assert_same(one, two)
    out = tmp_path / "resumed"
    state = out.with_name("resumed.partial") / "rank0_of_1.npz"
    threads.clear()
    failing["third call"] = True
    with pytest.raises(OSError, match="disk gone"):
        _predict_to(particles, net, out)
    # kept: the batches (of 4) of the first two preprocessing calls, and one that the other
    # lane may have begun before the failing third call stopped it
    assert np.load(state)["done"].sum() in (4, 8, 12)
    failing["third call"] = False
    assert not _background_threads()
    _assert_same(_predict_to(particles, net, out), one)
    assert not state.parent.exists()


@pytest.mark.parametrize("views", [4, 6])
def test_tta_averages_the_amplitudes_of_inplane_turns(
    network: tuple[ParticleTable, api.TrainedNetwork], tmp_path: Path, views: int
) -> None:
    """``tta``: amplitudes = mean of the network's on the image turned by 360° k / views
    (quarter-turns exact, 60° steps interpolated); orientations and shifts those of the image
    as it is."""
    from deephemnma_bridge.adapters import ParticleImages
    from deephemnma_bridge.preprocess import (
        PreprocessConfig,
        preprocess_images,
        quarter_turn,
        rotate_images,
    )
    from deephemnma_bridge.training.data import CTF_FIELDS, ctf_from_rows
    from deephemnma_bridge.training.targets import TargetSpec, decode

    particles, net = network
    plain = _predict_to(particles, net, tmp_path / "plain")
    tta = _predict_to(particles, net, tmp_path / "tta", tta=views)
    assert plain.rotation_matrices is not None and tta.rotation_matrices is not None
    np.testing.assert_array_equal(plain.rotation_matrices, tta.rotation_matrices)
    np.testing.assert_array_equal(plain.shifts_angstrom, tta.shifts_angstrom)
    # by hand: the model on the four turns of the preprocessed images
    model, meta = net.model.eval(), net.meta
    spec = TargetSpec.from_dict(meta["target"])
    prep = PreprocessConfig.from_dict(meta["preprocess"])
    ctf = np.stack([np.asarray(getattr(particles, f), dtype=float) for f in CTF_FIELDS], 1)
    with torch.no_grad():
        x = preprocess_images(
            torch.as_tensor(ParticleImages(particles).read(np.arange(len(particles)))),
            pixel_size_angstrom=float(particles.pixel_size_angstrom[0]),
            config=prep,
            ctf=ctf_from_rows(ctf, torch.device("cpu")),
        )
        each = []
        for k in range(views):
            degrees = 360 * k / views
            if degrees % 90 == 0:
                turned = quarter_turn(x, int(degrees // 90))
            else:
                turned = rotate_images(x, torch.full((len(x),), np.radians(degrees)))
            each.append(decode(spec, model(turned[:, None]))["amplitudes"])
    got = np.stack([np.asarray(tta.extra[f"dhnAmplitude{m}"], float) for m in (7, 8, 9)], 1)
    np.testing.assert_allclose(got, np.mean(each, axis=0), rtol=1e-4, atol=1e-4)
    alone = np.stack([np.asarray(plain.extra[f"dhnAmplitude{m}"], float) for m in (7, 8, 9)], 1)
    np.testing.assert_allclose(alone, each[0], rtol=1e-4, atol=1e-4)
    assert not np.allclose(got, alone, atol=1e-3)  # the turns do change the estimate


def test_quarter_turn_keeps_the_centre_pixel() -> None:
    """Exact turns about pixel N // 2 (even and odd N); four make the identity."""
    from deephemnma_bridge.preprocess import quarter_turn

    for n in (6, 7, 32):
        c = n // 2
        image = torch.zeros(2, n, n)
        image[:, c, c] = 1.0
        image[:, c, c + 2] = 2.0  # two pixels along +x
        seen = []
        for k in range(4):
            turned = quarter_turn(image, k)
            assert turned[0, c, c] == 1.0 and turned.sum() == image.sum()
            seen.append(tuple(int(v) for v in torch.nonzero(turned[0] == 2.0)[0]))
        # the off-centre pixel visits the four points two pixels from the centre
        assert sorted(seen) == sorted([(c, c + 2), (c - 2, c), (c, c - 2), (c + 2, c)])
        torch.testing.assert_close(quarter_turn(quarter_turn(image, 3), 1), image)


def test_inplane_views_stack_the_turns_view_by_view() -> None:
    from deephemnma_bridge.preprocess import inplane_views, quarter_turn, rotate_images

    x = torch.randn(3, 16, 16)
    views = inplane_views(x, 8)
    assert views.shape == (24, 16, 16)
    torch.testing.assert_close(views[:3], x)
    torch.testing.assert_close(views[6:9], quarter_turn(x, 1))  # 90°: exact
    torch.testing.assert_close(views[3:6], rotate_images(x, torch.full((3,), np.pi / 4)))
    with pytest.raises(ValueError, match="n_views"):
        inplane_views(x, 0)


def test_default_batch_is_larger_for_the_network_alone(
    network: tuple[ParticleTable, api.TrainedNetwork],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Without ``batch_size``, `predict` batches `BATCH_SIZE`["network"] particles for the
    networks alone and ["hemnma"] when modes bring HEMNMA's cost in; a batch size below 1 is
    refused, naming the option."""
    particles, net = network
    sizes: list[int] = []
    real = preprocess.preprocess_images

    def noted(images: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        if kwargs["config"].output_size_px == 32:  # the network's input, not HEMNMA's
            sizes.append(len(images))
        return real(images, **kwargs)

    monkeypatch.setattr(preprocess, "preprocess_images", noted)
    monkeypatch.setattr(_predict, "BATCH_SIZE", {"network": 7, "hemnma": 4})
    monkeypatch.setattr(_predict, "LANES", 1)  # one lane: full batches, then the rest
    options: dict[str, Any] = {"workers": 0, "device": "cpu", "progress": False, "log": None}
    api.predict(particles, net, out=tmp_path / "alone", **options)
    assert sorted(sizes) == [2, 7, 7, 7]
    sizes.clear()
    modes = net.path.parent / "sim" / "modes.npz"  # the fixture's simulation
    api.predict(particles, net, out=tmp_path / "cost", modes=modes, **options)
    assert sorted(sizes) == [3, 4, 4, 4, 4, 4]
    with pytest.raises(InputError, match="--batch-size must be >= 1"):
        api.predict(particles, net, out=tmp_path / "none", batch_size=0, **options)
    assert not (tmp_path / "none").exists()


def test_decoding_one_candidate_without_refinement_keeps_the_pose_and_confidence(
    network: tuple[ParticleTable, api.TrainedNetwork],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The grid head's later candidates only seed refinement: without ``refine_steps``
    `predict` decodes the first alone, whose pose and confidence are those of decoding
    ``top_k``; with refinement it decodes ``top_k``."""
    from deephemnma_bridge.training import targets

    particles, net = network
    spec = targets.TargetSpec.from_dict(net.meta["target"])
    torch.manual_seed(0)
    scores = torch.randn(23, spec.n_outputs) * 3
    four, one = targets.decode(spec, scores, top_k=4), targets.decode(spec, scores, top_k=1)
    for key in ("rotations", "confidence", "amplitudes", "shifts"):
        if key in four:
            np.testing.assert_array_equal(one[key], four[key], key)
    assert one["candidates"].shape[1] == 1 and four["candidates"].shape[1] == 4
    asked: list[int] = []
    real = targets.decode

    def noted(spec: Any, outputs: torch.Tensor, *, top_k: int) -> dict[str, np.ndarray]:
        asked.append(top_k)
        return real(spec, outputs, top_k=top_k)

    monkeypatch.setattr(targets, "decode", noted)
    _predict_to(particles, net, tmp_path / "alone", top_k=4)
    assert set(asked) == {1}
    asked.clear()
    modes = net.path.parent / "sim" / "modes.npz"
    _predict_to(particles, net, tmp_path / "refined", top_k=3, modes=modes, refine_steps=2)
    assert set(asked) == {3}
