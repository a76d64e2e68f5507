"""The network: targets, splits, exact augmentation, train -> predict end to end, DDP."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import starfile
import torch
from conftest import torchrun
from scipy.spatial.transform import Rotation

from deephemnma_bridge.adapters import read_particles
from deephemnma_bridge.alignment.render import render_projections
from deephemnma_bridge.cli import main
from deephemnma_bridge.conventions import euler_to_matrix, matrix_to_quaternion
from deephemnma_bridge.errors import InputError
from deephemnma_bridge.preprocess import circular_mask
from deephemnma_bridge.training.data import rotate_inplane, split_particles
from deephemnma_bridge.training.model import DeepHEMNMANet
from deephemnma_bridge.training.targets import TargetSpec, decode, encode, target_loss
from deephemnma_bridge.training.trainer import (
    TrainConfig,
    config_from_preset,
    load_checkpoint,
    working_size,
)

FAST_ALIGN = [
    "--working-size",
    "64",
    "--search-step",
    "20",
    "--iterations",
    "10,10",
    "--candidates",
    "1",
]
FAST_TRAIN = ["--preset", "fast", "--size", "32", "--workers", "0", "--batch-size", "8"]


@pytest.fixture(scope="module")
def aligned(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """32 simulated AdK particles (64 px, 1.3 Å) aligned with HEMNMA."""
    root = tmp_path_factory.mktemp("net")
    argv = ["simulate", "--n", "32", "--box", "64", "--pixel-size", "1.3", "--seed", "4"]
    with pytest.warns(UserWarning, match="may leave"):
        assert main([*argv, "--out", str(root / "sim"), "--device", "cpu"]) == 0
    star, modes = str(root / "sim" / "particles.star"), str(root / "sim" / "modes.npz")
    assert main(["align", star, "--modes", modes, *FAST_ALIGN, "--out", str(root / "al")]) == 0
    return root


def test_model_outputs_and_no_download() -> None:
    net = DeepHEMNMANet(n_outputs=9)
    assert net(torch.zeros(3, 1, 32, 32)).shape == (3, 9)
    sizes = [m.out_features for m in net.head if isinstance(m, torch.nn.Linear)]
    assert sizes == [1000, 512, 128, 9]
    assert net.backbone.conv1.in_channels == 1


@pytest.mark.parametrize("backbone", ["resnet18", "mobilenetv3_small_100", "efficientnet_b0"])
def test_other_timm_backbones(backbone: str) -> None:
    # mobilenetv3's pooled output (1024) is wider than its num_features (576): the head must
    # be sized from what the backbone returns
    net = DeepHEMNMANet(n_outputs=9, backbone=backbone).eval()
    with torch.no_grad():
        assert net(torch.zeros(2, 1, 32, 32)).shape == (2, 9)


def test_targets_round_trip_and_sign_free_quaternion_loss() -> None:
    rng = np.random.default_rng(0)
    amps = rng.normal(size=(20, 3)) * [10, 5, 2]
    rots = Rotation.random(20, random_state=1).as_matrix()
    shifts = rng.normal(size=(20, 2)) * 3
    spec = TargetSpec.create("all", n_modes=3).fitted(amps, shifts)
    y = encode(spec, amps, rots, shifts)
    assert y.shape == (20, 9) and np.allclose(y[:, :3].mean(0), 0, atol=1e-6)
    back = decode(spec, torch.tensor(y))
    np.testing.assert_allclose(back["amplitudes"], amps, atol=1e-4)
    np.testing.assert_allclose(back["rotations"], rots, atol=1e-5)
    np.testing.assert_allclose(back["shifts"], shifts, atol=1e-5)
    # q and -q are the same rotation: same loss; an unnormalised output is renormalised
    flipped = torch.tensor(y).clone()
    flipped[:, 3:7] *= -2.5
    loss, parts = target_loss(spec, flipped, torch.tensor(y))
    assert float(parts["orientation"]) < 1e-6 and float(loss) < 1e-5
    again = decode(spec, flipped)
    np.testing.assert_allclose(again["rotations"], rots, atol=1e-5)
    assert TargetSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    with pytest.raises(InputError, match="--target"):
        TargetSpec.create("pose", n_modes=3)


def test_splits_are_disjoint_seeded_and_per_particle() -> None:
    a = split_particles(100, 0.1, 0.2, seed=3)
    assert [len(a[k]) for k in ("train", "val", "test")] == [70, 10, 20]
    every = np.concatenate(list(a.values()))
    assert sorted(every.tolist()) == list(range(100))
    b = split_particles(100, 0.1, 0.2, seed=3)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["val"], split_particles(100, 0.1, 0.2, seed=4)["val"])


@pytest.mark.parametrize("box", [48, 49])
def test_rotation_augmentation_transforms_labels_exactly(box: int) -> None:
    """The rotated image is the projection at the rotated labels: exactly for multiples of
    90° (even and odd boxes), to interpolation accuracy for any other angle."""
    rng = np.random.default_rng(0)
    xyz = torch.tensor(rng.normal(size=(30, 3)) * 5)
    a = euler_to_matrix([[30.0, 50.0, 70.0]])
    o = np.array([[3.0, -5.0]])
    none = (torch.zeros(0, 30, 3, dtype=torch.float64), torch.zeros(1, 0, dtype=torch.float64))
    kw = {"box_size_px": box, "pixel_size_angstrom": 1.0, "sigma_angstrom": 2.0}
    image = render_projections(xyz, *none, torch.tensor(a), torch.tensor(o), **kw)
    spec = TargetSpec.create("all", n_modes=1).fitted(np.zeros((2, 1)), np.array([[0, 0], [2, 4]]))
    labels = torch.tensor(encode(spec, np.zeros((1, 1)), a, o), dtype=torch.float64)
    inner = circular_mask(box, radius_px=0.85 * box / 2, dtype=torch.float64) > 0
    for degrees, tolerance in ((90, 1e-6), (180, 1e-6), (270, 1e-6), (37, 0.02), (-123, 0.02)):
        angle = torch.tensor([np.radians(degrees)], dtype=torch.float64)
        turned, lab = rotate_inplane(
            image, labels, angle, spec.slices, spec.shift_mean, spec.shift_std
        )
        out = decode(spec, lab)
        expected = render_projections(
            xyz, *none, torch.tensor(out["rotations"]), torch.tensor(out["shifts"]), **kw
        )
        err = (turned - expected)[:, inner].abs().max() / expected.abs().max()
        assert float(err) < tolerance, (box, degrees, float(err))
        rz = Rotation.from_euler("z", np.radians(degrees)).as_matrix()
        np.testing.assert_allclose(
            matrix_to_quaternion(out["rotations"]), matrix_to_quaternion(rz @ a), atol=1e-6
        )
        np.testing.assert_allclose(out["shifts"][0], rz[:2, :2] @ o[0], atol=1e-6)
        np.testing.assert_allclose(out["amplitudes"], 0, atol=1e-6)


def test_augmentation_needs_the_mask() -> None:
    with pytest.raises(InputError, match="mask"):
        TrainConfig(augment=True, soft_mask=False)
    assert config_from_preset("fast", augment=True).soft_mask


def test_working_size_follows_the_lowpass() -> None:
    auto = TrainConfig(size_px=0, lowpass_angstrom=8.0)
    assert working_size(auto, 128, 0.65) == 32  # 83 Å box: 2.6 Å pixels <= 8 / 2.5
    assert working_size(auto, 360, 1.3) == 148
    assert working_size(TrainConfig(size_px=0, lowpass_angstrom=2.0), 64, 1.0) == 64
    assert working_size(TrainConfig(size_px=96), 64, 1.0) == 64
    with pytest.raises(InputError, match="--lowpass"):
        TrainConfig(size_px=0)
    with pytest.raises(InputError, match="--dropout"):
        TrainConfig(dropout=1.0)


def test_train_then_predict_end_to_end(
    aligned: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    net = tmp_path / "net"
    al = str(aligned / "al" / "particles.star")
    assert (
        main(
            [
                "train",
                al,
                "--out",
                str(net),
                *FAST_TRAIN,
                "--epochs",
                "2",
                "--loss-weights",
                "amplitudes=1,orientation=2,shifts=0.5",
            ]
        )
        == 0
    )
    for name in ("best.pt", "last.pt", "training.csv", "training.png", "splits.npz"):
        assert (net / name).is_file(), name
    _, meta = load_checkpoint(net)
    assert meta["mode_numbers"] == [7, 8, 9] and meta["preprocess"]["output_size_px"] == 32
    payload = torch.load(net / "last.pt", weights_only=True)  # no arbitrary unpickling
    assert int(payload["epoch"]) == 1
    # rerun with more epochs: resumes after epoch 2
    assert (
        main(
            [
                "train",
                al,
                "--out",
                str(net),
                *FAST_TRAIN,
                "--epochs",
                "3",
                "--loss-weights",
                "amplitudes=1,orientation=2,shifts=0.5",
            ]
        )
        == 0
    )
    rows = (net / "training.csv").read_text().splitlines()
    assert len(rows) == 4 and rows[0].startswith("epoch,train_loss,val_loss")
    # other data in the same folder: refused
    assert main(["train", al, "--out", str(net), *FAST_TRAIN, "--epochs", "3", "--seed", "9"]) == 2
    assert (
        main(["train", al, "--out", str(tmp_path / "w"), *FAST_TRAIN, "--loss-weights", "pose=2"])
        == 2
    )
    # predict: every particle, HEMNMA values kept for the aligned ones given
    sim = aligned / "sim"
    half = tmp_path / "half.star"
    blocks = starfile.read(al, always_dict=True)
    blocks["particles"] = blocks["particles"].iloc[:10]
    starfile.write(blocks, half)
    out = tmp_path / "pred"
    argv = [
        "predict",
        str(sim / "particles.star"),
        "--checkpoint",
        str(net),
        "--out",
        str(out),
        "--hemnma",
        str(half),
        "--modes",
        str(sim / "modes.npz"),
        "--refine",
        "3",
        "--workers",
        "0",
        "--batch-size",
        "7",
    ]
    assert main(argv) == 0
    result = read_particles(out / "particles.star")
    assert len(result) == 32 and result.rotation_matrices is not None
    src = np.asarray(result.extra["dhnSource"]).astype(str)
    assert (src[:10] == "hemnma").all() and (src[10:] == "network").all()
    assert np.isfinite(np.asarray(result.extra["dhnCost"], dtype=float)).all()
    hem = read_particles(al)
    np.testing.assert_allclose(result.rotation_matrices[:10], hem.rotation_matrices[:10], atol=1e-5)
    assert "dhnTrueAmplitude7" in result.extra  # every input column kept
    assert read_particles(out / "particles.cs").rotation_matrices is not None
    # the cost is HEMNMA's measure: the refinement from the prediction lowers it
    costs = {}
    for steps in (0, 6):
        folder = tmp_path / f"refine{steps}"
        assert main([*argv[:5], str(folder), *argv[8:11], str(steps), *argv[12:]]) == 0
        costs[steps] = np.asarray(read_particles(folder / "particles.star").extra["dhnCost"], float)
    assert np.isfinite(costs[0]).all() and costs[6].mean() < costs[0].mean() - 1e-3
    # fallback: every particle whose cost stays above the threshold (here all) is re-aligned
    # by HEMNMA's global search, exactly as `deephemnma align` aligns it
    fb = tmp_path / "fallback"
    assert main([*argv[:5], str(fb), *argv[8:12], "--fallback-cost", "0", *argv[12:]]) == 0
    fell = read_particles(fb / "particles.star")
    assert (np.asarray(fell.extra["dhnSource"]).astype(str) == "hemnma").all()
    ref = tmp_path / "aligned_default"
    assert main(["align", str(sim / "particles.star"), *argv[8:10], "--out", str(ref)]) == 0
    direct = read_particles(ref / "particles.star")
    assert fell.rotation_matrices is not None and direct.rotation_matrices is not None
    np.testing.assert_allclose(fell.rotation_matrices, direct.rotation_matrices, atol=1e-4)
    for column in ("dhnAmplitude7", "dhnCost"):
        np.testing.assert_allclose(
            np.asarray(fell.extra[column], float),
            np.asarray(direct.extra[column], float),
            atol=1e-4,
        )
    for bad, message in ((["abc"], "number or auto"), (["auto"], "needs --hemnma")):
        folder = str(tmp_path / "bad")
        code = main([*argv[:5], folder, *argv[8:12], "--fallback-cost", *bad, *argv[12:]])
        assert code == 2 and message in capsys.readouterr().err
        assert not (tmp_path / "bad").exists()


def test_ddp_two_processes(aligned: Path, tmp_path: Path) -> None:
    al = str(aligned / "al" / "particles.star")
    torchrun(["train", al, "--out", str(tmp_path / "ddp"), *FAST_TRAIN, "--epochs", "1"], tmp_path)
    _, meta = load_checkpoint(tmp_path / "ddp")
    assert meta["train"]["epochs"] == 1
    # sharded prediction equals the single-process one
    sim = aligned / "sim"
    base = [
        "predict",
        str(sim / "particles.star"),
        "--checkpoint",
        str(tmp_path / "ddp"),
        "--workers",
        "0",
        "--batch-size",
        "5",
        "--device",
        "cpu",
    ]
    assert main([*base, "--out", str(tmp_path / "one")]) == 0
    torchrun([*base, "--out", str(tmp_path / "two")], tmp_path)
    a = read_particles(tmp_path / "one" / "particles.star")
    b = read_particles(tmp_path / "two" / "particles.star")
    np.testing.assert_allclose(b.rotation_matrices, a.rotation_matrices, atol=1e-4)
    np.testing.assert_allclose(
        b.extra["dhnAmplitude7"].astype(float), a.extra["dhnAmplitude7"].astype(float), atol=1e-3
    )


def test_training_bad_input(
    aligned: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sim = aligned / "sim"
    assert (
        main(["train", str(sim / "particles.star"), "--out", str(tmp_path / "n"), *FAST_TRAIN]) == 2
    )
    assert "no _dhnAmplitude" in capsys.readouterr().err
    assert (
        main(
            [
                "predict",
                str(sim / "particles.star"),
                "--checkpoint",
                str(tmp_path / "none"),
                "--out",
                str(tmp_path / "p"),
            ]
        )
        == 2
    )
    assert "no checkpoint" in capsys.readouterr().err
    evil = tmp_path / "evil.pt"
    torch.save({"meta": object(), "model": {}}, evil)
    assert (
        main(
            [
                "predict",
                str(sim / "particles.star"),
                "--checkpoint",
                str(evil),
                "--out",
                str(tmp_path / "p"),
            ]
        )
        == 2
    )
    assert "not a deephemnma checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "p").exists()


def test_training_on_the_cpu_flushes_denormals() -> None:
    """`denormals_flushed`: on the CPU, floats below 1.2e-38 become zero inside the block (1.4x
    faster training once weights and gradients drift there), and the earlier setting comes
    back after it (an eigensolver run later in the same process crashed with it left on);
    nothing changes for a CUDA device."""
    from deephemnma_bridge.device import denormals_flushed

    def product() -> float:
        return float(torch.tensor([1e-39], dtype=torch.float32) * 1.0)

    try:
        torch.set_flush_denormal(False)
        assert product() != 0.0
        with denormals_flushed(torch.device("cuda")):  # not the CPU: left as it was
            assert product() != 0.0
        with denormals_flushed(torch.device("cpu")):
            assert product() == 0.0
        assert product() != 0.0  # restored
        torch.set_flush_denormal(True)
        with denormals_flushed(torch.device("cpu")):
            assert product() == 0.0
        assert product() == 0.0  # restored: it was on
    finally:
        torch.set_flush_denormal(False)


def test_cosine_schedule_ends_at_a_hundredth_of_the_lr(aligned: Path, tmp_path: Path) -> None:
    """``--lr-schedule cosine``: lr after each epoch follows the half cosine from --lr to
    --lr / 100 over --epochs (the step schedule keeps --lr until --lr-step)."""
    import csv

    al = str(aligned / "al" / "particles.star")
    argv = ["train", al, *FAST_TRAIN, "--epochs", "3", "--lr", "1e-3"]
    for schedule in ("cosine", "step"):
        out = tmp_path / schedule
        extra = ["--lr-schedule", schedule, "--out", str(out)]
        assert main([*argv, *extra]) == 0
        with open(out / "training.csv") as f:
            lrs = [float(row["lr"]) for row in csv.DictReader(f)]
        if schedule == "cosine":
            expected = [1e-5 + (1e-3 - 1e-5) * (1 + np.cos(np.pi * e / 3)) / 2 for e in (1, 2, 3)]
            np.testing.assert_allclose(lrs, expected, rtol=1e-6)
        else:
            assert lrs == [1e-3, 1e-3, 1e-3]  # fast preset: / 10 after 30 epochs
    from deephemnma_bridge.training.trainer import config_from_preset

    with pytest.raises(InputError, match="--lr-schedule"):
        config_from_preset("fast", lr_schedule="linear")
