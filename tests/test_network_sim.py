"""The network learns from the forward model: the SO(3) grid head (top-k orientations with a
confidence), synthetic batches matched to the data (SNR measured against fitted projections),
training from them, and prediction refined from the top-k."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from deephemnma_bridge.adapters import read_particles
from deephemnma_bridge.alignment.ctf import ctf_2d
from deephemnma_bridge.alignment.hemnma import AlignmentConfig, ReferenceModel, align_batch
from deephemnma_bridge.alignment.render import render_projections
from deephemnma_bridge.cli import main
from deephemnma_bridge.conventions import (
    angle_between_rotations_degrees,
    euler_to_matrix,
    matrix_to_quaternion,
)
from deephemnma_bridge.training.data import ctf_from_rows
from deephemnma_bridge.training.so3 import OrientationGrid, quaternion_to_matrix_t
from deephemnma_bridge.training.synthetic import SyntheticBatches, estimate_snr, render_working
from deephemnma_bridge.training.targets import TargetSpec, decode, encode, target_loss
from deephemnma_bridge.training.trainer import load_checkpoint

FAST_ALIGN = ["--working-size", "64", "--search-step", "20", "--iterations", "10,10"]
FAST_TRAIN = ["--preset", "fast", "--size", "32", "--workers", "0", "--batch-size", "8"]


def _reference(n: int = 60) -> ReferenceModel:
    rng = np.random.default_rng(0)
    xyz = rng.normal(size=(n, 3)) * np.array([12.0, 7.0, 4.0])  # no symmetry
    vec = rng.normal(size=(2, n, 3))
    vec /= np.linalg.norm(vec.reshape(2, -1), axis=1)[:, None, None]
    return ReferenceModel.from_modes(xyz, vec, [7, 8], template="nodes")


def _random_rotations(b: int, seed: int) -> np.ndarray:
    eul = np.random.default_rng(seed).uniform([0, 0, 0], [360, 180, 360], size=(b, 3))
    return euler_to_matrix(eul)


def test_grid_soft_targets_decode_the_truth_below_the_grid_step() -> None:
    grid = OrientationGrid.create(15.0)
    assert grid.size == 4416  # the HEMNMA search grid at 15°
    rot = _random_rotations(32, 1)
    q = torch.tensor(matrix_to_quaternion(rot), dtype=torch.float32)
    target = grid.soft_targets(q)
    assert torch.allclose(target.sum(1), torch.ones(32))
    out = grid.decode(torch.log(target + 1e-9), k=3)
    err = angle_between_rotations_degrees(out["rotations"].double().numpy(), rot)
    assert np.median(err) < 3.0  # the sub-bin mean: quantisation alone would be ~7.5°
    assert out["candidates"].shape == (32, 3, 3, 3) and torch.all(out["confidence"] > 0.5)
    # the k candidates are distinct: at least two steps apart
    c = out["candidates"].double().numpy()
    assert np.all(angle_between_rotations_degrees(c[:, 0], c[:, 1]) > 7.5)
    # a uniform score has no confidence; the loss is lowest at the truth
    flat = grid.decode(torch.zeros(2, grid.size), k=1)["confidence"]
    assert torch.all(flat < 0.01)
    assert float(grid.loss(torch.log(target + 1e-9), q)) < float(
        grid.loss(torch.zeros_like(target), q)
    )
    with pytest.raises(ValueError, match="step"):
        OrientationGrid.create(0.5)


def test_quaternion_to_matrix_matches_the_conventions() -> None:
    rot = _random_rotations(8, 2)
    q = torch.tensor(matrix_to_quaternion(rot))
    np.testing.assert_allclose(quaternion_to_matrix_t(q).numpy(), rot, atol=1e-12)
    np.testing.assert_allclose(quaternion_to_matrix_t(-q).numpy(), rot, atol=1e-12)


def test_grid_head_targets_round_trip() -> None:
    spec = TargetSpec.create("all", n_modes=2, orientation_head="grid", grid_step_degrees=20.0)
    spec = spec.fitted(np.zeros((4, 2)), np.zeros((4, 2)))
    assert spec.grid is not None and spec.n_outputs == 2 + spec.grid.size + 2
    assert spec.label_slices["orientation"] == slice(2, 6)  # labels stay quaternions
    rot = _random_rotations(4, 3)
    labels = encode(spec, np.zeros((4, 2)), rot, np.zeros((4, 2)))
    assert labels.shape == (4, 8)
    outputs = torch.zeros(4, spec.n_outputs)
    sl = spec.slices["orientation"]
    q = torch.tensor(matrix_to_quaternion(rot), dtype=torch.float32)
    outputs[:, sl] = torch.log(spec.grid.soft_targets(q) + 1e-9)
    loss, parts = target_loss(spec, outputs, torch.tensor(labels))
    assert torch.isfinite(loss) and set(parts) == {"amplitudes", "orientation", "shifts"}
    out = decode(spec, outputs, top_k=2)
    assert out["candidates"].shape == (4, 2, 3, 3) and out["confidence"].shape == (4,)
    assert np.all(angle_between_rotations_degrees(out["rotations"], rot) < 8.0)
    again = TargetSpec.from_dict(spec.to_dict())
    assert again.orientation_head == "grid" and again.n_outputs == spec.n_outputs
    old = TargetSpec.from_dict(
        {k: v for k, v in spec.to_dict().items() if "grid" not in k and k != "orientation_head"}
    )
    assert old.grid is None and old.sizes["orientation"] == 4  # checkpoints before the grid


def test_render_working_is_the_real_space_forward_model() -> None:
    ref = _reference()
    b = 3
    amps = torch.tensor([[5.0, -3.0], [0.0, 0.0], [-8.0, 2.0]])
    rot = torch.tensor(_random_rotations(b, 4), dtype=torch.float32)
    sh = torch.tensor([[1.5, -2.0], [0.0, 0.0], [-3.0, 0.7]])
    ctf = torch.tensor([[15000, 14000, 30, 300, 2.7, 0.1, 0, 0]] * b, dtype=torch.float32)
    fast = render_working(ref, amps, rot, sh, ctf, size_px=64, pixel_size_angstrom=1.5)
    real = render_projections(
        ref.coordinates, ref.modes, amps, rot, sh, box_size_px=64, pixel_size_angstrom=1.5,
        sigma_angstrom=2.0,
    )  # fmt: skip
    c = ctf_2d(ctf_from_rows(ctf, torch.device("cpu")), box_size_px=64, pixel_size_angstrom=1.5)
    spec = torch.fft.rfft2(torch.fft.ifftshift(real, dim=(-2, -1))) * c
    expected = torch.fft.fftshift(torch.fft.irfft2(spec, s=(64, 64)), dim=(-2, -1))
    assert float((fast - expected).abs().max() / expected.abs().max()) < 1e-3


@pytest.mark.parametrize("snr", [0.05, 0.5])
def test_estimate_snr_recovers_the_noise_level(snr: float) -> None:
    ref = _reference()
    b = 64
    gen = torch.Generator().manual_seed(5)
    amps = torch.randn(b, 2, generator=gen) * 4
    rot = quaternion_to_matrix_t(torch.randn(b, 4, generator=gen)).float()
    sh = torch.randn(b, 2, generator=gen)
    ctf = torch.tensor([[12000, 12000, 0, 300, 2.7, 0.1, 0, 0]] * b, dtype=torch.float32)
    clean = render_working(ref, amps, rot, sh, ctf, size_px=48, pixel_size_angstrom=2.0)
    noise = (
        torch.randn(clean.shape, generator=gen)
        * torch.sqrt(clean.var(dim=(-2, -1)) / snr)[:, None, None]
    )
    measured, each = estimate_snr(
        (clean + noise) * 7.0 + 3.0, ctf, ref, amps, rot, sh, pixel_size_angstrom=2.0, size_px=48
    )  # any scale and offset
    assert each.shape == (b,)
    assert abs(math.log(measured / snr)) < 0.2


def test_synthetic_batches_follow_the_labels() -> None:
    ref = _reference()
    rows = np.array([[10.0, -5.0], [12.0, -4.0], [11.0, -6.0]])
    shifts = np.array([[2.0, 1.0]])
    ctf = np.array([[15000, 15000, 0, 300, 2.7, 0.1, 0, 0]], dtype=float)
    syn = SyntheticBatches(ref, ctf, 0.2, 32, 2.6, amplitude_rows=rows, shift_rows=shifts)
    images, amps, rot, sh, _c = syn.batch(16, torch.Generator().manual_seed(0))
    assert images.shape == (16, 32, 32) and torch.isfinite(images).all()
    assert torch.all((amps[:, 0] > 8) & (amps[:, 0] < 14))  # labelled rows + a small jitter
    assert torch.allclose(sh, torch.tensor([[2.0, 1.0]]).expand(16, 2))
    det = torch.linalg.det(rot.double())
    assert torch.allclose(det, torch.ones(16, dtype=torch.float64), atol=1e-5)
    again = syn.batch(16, torch.Generator().manual_seed(0))[0]
    assert torch.equal(images, again)  # seeded: a resumed training sees the same data
    with pytest.raises(Exception, match="SNR"):
        SyntheticBatches(ref, ctf, 0.0, 32, 2.6)


def test_align_batch_refines_several_candidates_and_keeps_the_best() -> None:
    ref = _reference()
    b = 4
    rot = torch.tensor(_random_rotations(b, 6), dtype=torch.float32)
    amps = torch.zeros(b, 2)
    sh = torch.zeros(b, 2)
    ctf_rows = torch.tensor([[12000, 12000, 0, 300, 2.7, 0.1, 0, 0]] * b, dtype=torch.float32)
    images = render_working(ref, amps, rot, sh, ctf_rows, size_px=48, pixel_size_angstrom=2.0)
    far = torch.tensor(_random_rotations(b, 7), dtype=torch.float32)  # wrong starts
    config = AlignmentConfig(local_poses=True, iterations=(15, 5), max_rounds=1)
    ctf = ctf_from_rows(ctf_rows, torch.device("cpu"))
    kwargs = dict(pixel_size_angstrom=2.0, shifts_angstrom=sh, amplitudes=amps)
    wrong = align_batch(images, ctf, ref, config, rotations=far, **kwargs)  # type: ignore[arg-type]
    both = align_batch(
        images,
        ctf,
        ref,
        config,
        rotations=torch.stack([far, rot], 1),
        **kwargs,  # type: ignore[arg-type]
    )
    err = angle_between_rotations_degrees(both.rotations, rot.double().numpy())
    assert np.all(err < 3.0) and np.all(both.cost <= wrong.cost + 1e-6)


@pytest.fixture(scope="module")
def aligned(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("netsim")
    argv = ["simulate", "--n", "24", "--box", "64", "--pixel-size", "1.3", "--seed", "4"]
    with pytest.warns(UserWarning, match="may leave"):
        assert main([*argv, "--out", str(root / "sim"), "--device", "cpu"]) == 0
    star, modes = str(root / "sim" / "particles.star"), str(root / "sim" / "modes.npz")
    assert main(["align", star, "--modes", modes, *FAST_ALIGN, "--out", str(root / "al")]) == 0
    return root


def test_train_on_synthetic_images_then_predict_top_k(
    aligned: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    al, modes = str(aligned / "al" / "particles.star"), str(aligned / "sim" / "modes.npz")
    net = tmp_path / "net"
    argv = ["train", al, "--out", str(net), *FAST_TRAIN, "--epochs", "2", "--synthetic-epochs"]
    argv += ["1", "--synthetic-batches", "2", "--orientation-head", "grid", "--grid-step", "20"]
    assert main([*argv, "--modes", modes, "--backbone", "resnet18"]) == 0
    assert "synthetic training images: 32 px" in capsys.readouterr().out
    _model, meta = load_checkpoint(net)
    assert meta["target"]["orientation_head"] == "grid" and meta["synthetic_snr"] > 0
    assert meta["train"]["backbone"] == "resnet18"
    rows = (net / "training.csv").read_text().splitlines()
    assert rows[0].endswith("synthetic") and rows[1].endswith(",1.0") and rows[2].endswith(",0.0")
    out = tmp_path / "pred"
    argv = ["predict", str(aligned / "sim" / "particles.star"), "--checkpoint", str(net)]
    argv += ["--modes", modes, "--refine", "4", "--top-k", "3", "--fallback-confidence", "0.9"]
    assert main([*argv, "--out", str(out)]) == 0
    table = read_particles(out / "particles.star")
    conf = np.asarray(table.extra["dhnConfidence"], dtype=float)
    assert conf.shape == (24,) and np.all((conf >= 0) & (conf <= 1))
    # an untrained network is unsure: every particle went to HEMNMA's global search
    assert set(np.asarray(table.extra["dhnSource"]).tolist()) == {"hemnma"}
    # errors name the option
    bad = ["train", al, "--out", str(tmp_path / "x"), *FAST_TRAIN, "--synthetic-epochs", "1"]
    assert main(bad) == 2
    assert "--modes" in capsys.readouterr().err
    assert main([*bad[:-2], "--backbone", "no_such_net"]) == 2
    assert "timm" in capsys.readouterr().err


def test_trusted_poses_rule() -> None:
    import argparse

    from deephemnma_bridge.cli.analyze import trusted_poses
    from deephemnma_bridge.errors import InputError

    rng = np.random.default_rng(0)
    n = 40
    source = np.array(["hemnma"] * 30 + ["network"] * 10, dtype=object)
    cost = np.concatenate([rng.uniform(0.30, 0.40, 30), np.linspace(0.3, 0.5, 10)])
    cost[0] = np.nan  # a HEMNMA particle that failed
    conf = np.concatenate([np.full(30, np.nan), np.linspace(0.0, 0.9, 10)])
    extra = {"dhnSource": source, "dhnCost": cost, "dhnConfidence": conf}
    args = argparse.Namespace(min_confidence=0.5, max_cost="auto")
    trusted, rule = trusted_poses(extra, args)
    limit = np.percentile(cost[1:30], 99)
    # with a cost, the fit of the final pose decides (the confidence is not used)
    expected = np.concatenate([[False], np.ones(29, bool), cost[30:] <= limit])
    np.testing.assert_array_equal(trusted, expected)
    assert "cost <=" in rule and "confidence" not in rule
    # without a usable cost, the confidence decides
    no_cost = {"dhnSource": source, "dhnConfidence": conf}
    trusted, rule = trusted_poses(no_cost, args)
    np.testing.assert_array_equal(trusted[30:], conf[30:] >= 0.5)
    assert "confidence >= 0.5" in rule
    # nothing to judge a network pose by: not trusted; HEMNMA's are
    bare = {"dhnSource": source}
    trusted, rule = trusted_poses(bare, args)
    assert trusted[:30].all() and not trusted[30:].any() and "not trusted" in rule
    with pytest.raises(InputError, match="max-cost"):
        trusted_poses(extra, argparse.Namespace(min_confidence=0.5, max_cost="high"))
    assert n == len(trusted)


def test_analyze_subsets_hold_trusted_poses_only(aligned: Path, tmp_path: Path) -> None:
    from deephemnma_bridge.adapters import write_particles

    table = read_particles(aligned / "al" / "particles.star")
    n = len(table)
    source = np.array(["hemnma"] * (n // 2) + ["network"] * (n - n // 2), dtype=object)
    conf = np.full(n, np.nan)  # HEMNMA particles: no network confidence (nan in the file)
    conf[n // 2 :] = np.linspace(0, 1, n - n // 2)
    star = tmp_path / "mixed.star"
    write_particles(table.with_extra(dhnSource=source, dhnConfidence=conf), star)
    out = tmp_path / "space"
    assert (
        main(["analyze", str(star), "--groups", "kmeans", "--n-groups", "2", "--out", str(out)])
        == 0
    )
    result = read_particles(out / "particles.star")
    trusted = np.asarray(result.extra["dhnTrusted"]).astype(int)
    assert trusted.sum() < n and (out / "untrusted.star").is_file()
    in_groups = sum(len(read_particles(p)) for p in sorted((out / "groups").glob("group_*.star")))
    assert in_groups == trusted.sum()
    assert len(read_particles(out / "untrusted.star")) == n - trusted.sum()
    assert (out / "sources.png").is_file() and "trusted poses:" in (out / "report.md").read_text()
    every = tmp_path / "every"
    argv = ["analyze", str(star), "--groups", "kmeans", "--n-groups", "2", "--subset-poses", "all"]
    assert main([*argv, "--out", str(every)]) == 0
    assert sum(len(read_particles(p)) for p in (every / "groups").glob("group_*.star")) == n


def test_grid_scores_come_straight_from_the_backbone() -> None:
    from deephemnma_bridge.training.model import DeepHEMNMANet

    spec = TargetSpec.create("all", n_modes=3, orientation_head="grid", grid_step_degrees=30.0)
    assert spec.grid is not None and spec.grid_outputs == (3, 3 + spec.grid.size)
    net = DeepHEMNMANet(spec.n_outputs, backbone="resnet18", grid_slice=spec.grid_outputs)
    net.eval()
    x = torch.randn(2, 1, 32, 32)
    out = net(x)
    assert out.shape == (2, spec.n_outputs)
    with torch.no_grad():
        feats = net.backbone(x)
        assert net.grid_head is not None
        torch.testing.assert_close(out[:, 3 : 3 + spec.grid.size], net.grid_head(feats))
        mlp = net.head(feats)
        torch.testing.assert_close(out[:, :3], mlp[:, :3])
        torch.testing.assert_close(out[:, -2:], mlp[:, 3:])
    with pytest.raises(ValueError, match="outside"):
        DeepHEMNMANet(5, grid_slice=(3, 9))


def test_conditioned_head_reads_the_orientation_of_a_bin() -> None:
    from deephemnma_bridge.training.model import DeepHEMNMANet

    spec = TargetSpec.create("all", n_modes=3, orientation_head="grid", grid_step_degrees=30.0)
    assert spec.grid is not None and spec.grid_outputs is not None
    q = spec.grid.quaternions
    torch.manual_seed(0)
    net = DeepHEMNMANet(
        spec.n_outputs,
        backbone="resnet18",
        grid_slice=spec.grid_outputs,
        condition_quaternions=q,
    )
    net.eval()
    assert net.conditioned
    x = torch.randn(3, 1, 32, 32)
    far = torch.stack([q[0], q[0], q[0]])
    other = torch.stack([q[5], q[9], q[0]])
    with torch.no_grad():
        feats = net.backbone(x)
        # untrained, the conditioning leaves the features as they are
        torch.testing.assert_close(net(x, far)[:, :3], net.head(feats)[:, :3])
        assert net.condition is not None
        torch.nn.init.normal_(net.condition[-1].weight, std=0.1)
        a, b = net(x, far), net(x, other)
        assert not torch.allclose(a[:2, :3], b[:2, :3])  # other bins, other amplitudes
        torch.testing.assert_close(a[2], b[2])  # the same bin
        # a rotation 5° from a bin centre reads that bin; -q is the same rotation
        tilt = torch.tensor([math.cos(math.radians(2.5)), math.sin(math.radians(2.5)), 0.0, 0.0])
        near = torch.tensor(
            matrix_to_quaternion(
                quaternion_to_matrix_t(q[5:6]).numpy()
                @ (quaternion_to_matrix_t(tilt[None]).numpy())
            ),
            dtype=torch.float32,
        )
        torch.testing.assert_close(net(x[:1], -near)[0], b[0])
        # without orientations, the top-scored bin conditions the MLP
        top = net.grid_head(feats).argmax(1)  # type: ignore[misc]
        torch.testing.assert_close(net(x), net(x, q[top]))
    with pytest.raises(ValueError, match="grid head"):
        DeepHEMNMANet(9, backbone="resnet18", condition_quaternions=q)


def test_train_conditioned_on_the_orientation(
    aligned: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    al, modes = str(aligned / "al" / "particles.star"), str(aligned / "sim" / "modes.npz")
    net = tmp_path / "net"
    argv = ["train", al, "--out", str(net), *FAST_TRAIN, "--epochs", "2", "--synthetic-epochs"]
    argv += ["1", "--synthetic-batches", "2", "--orientation-head", "grid", "--grid-step", "30"]
    argv += ["--modes", modes, "--backbone", "resnet18", "--condition-on-orientation"]
    assert main(argv) == 0
    model, meta = load_checkpoint(net / "last.pt")
    assert meta["train"]["condition_on_orientation"] and model.conditioned
    assert model.condition is not None
    assert float(model.condition[-1].weight.detach().abs().sum()) > 0  # learned from 0
    out = tmp_path / "pred"
    argv = ["predict", str(aligned / "sim" / "particles.star"), "--checkpoint", str(net)]
    assert main([*argv, "--out", str(out)]) == 0
    extra = read_particles(out / "particles.star").extra
    amps = np.array([np.asarray(extra[f"dhnAmplitude{m}"], dtype=float) for m in (7, 8, 9)])
    assert amps.shape == (3, 24) and np.isfinite(amps).all()
    bad = ["train", al, "--out", str(tmp_path / "q"), *FAST_TRAIN, "--condition-on-orientation"]
    assert main(bad) == 2
    assert "--orientation-head grid" in capsys.readouterr().err
