"""HEMNMA accuracy on particles that RELION made (``relion_project``), not our own simulator.

Accuracy measured only on ``deephemnma simulate``'s particles can hide a mistake that the
simulator and the aligner share (the hand, the CTF's sign, the origin's sign, the Euler
convention). Here the images come from RELION 3.1's own forward model:

1. **Map**: gemmi (``DensityCalculatorE``, electron scattering factors) renders the atoms of
   ``--pdb`` (first model, ``--chains``; no waters, ligands, hydrogens, alternative conformers)
   with their B-factors plus ``--blur`` Å² (default 40: the map is down to ~1e-3 at Nyquist),
   ``--box`` px at ``--pixel-size`` Å, with the model's rotation centre on voxel N/2 (RELION's
   centre). That centre is the one deephemnma's reference uses: the centroid of the network
   nodes of the modes file (``ReferenceModel.from_modes``), or the modes' ``map_centre_angstrom``
   when they have one (``build_reference``), so the true poses are those of the modes' frame.
   The MRC header has the voxel size and an origin that puts the map on the model's frame.
2. **Particles**: a RELION 3.1 STAR file (optics block) of ``--n`` particles: orientations
   uniform over SO(3), origins ``rlnOriginXAngst/YAngst`` uniform in ±``--shift`` Å, defocus
   U uniform in ``--defocus`` with V up to ``--astigmatism`` Å lower at a random angle, 300 kV,
   Cs 2.7 mm, amplitude contrast 0.1.
3. **Images**: ``relion_project --ctf`` once without noise, to measure the signal (variance of
   each CTF-modulated projection over its whole box, averaged over the particles), then with
   ``--add_noise --white_noise sigma`` for SNR ``--snr`` (signal variance / noise variance;
   0.1 by default). The STAR file it writes is read back with deephemnma's reader
   (``read_particles``): its poses and origins must be those that were asked for (checked).
4. **Alignment**: ``deephemnma modes PDB --chains ...`` and ``deephemnma align`` with its
   defaults (``--threads 1 --device cpu``), on a copy of relion_project's STAR file whose
   ``rlnAngle*`` / ``rlnOrigin*`` columns are replaced by ``_dhnTrue*`` ones (so nothing can
   leak into the search; ``ground_truth_errors`` then scores the output).
5. **Scores**: median / p90 angle to the true rotation and the fraction within 5°, median
   origin error (px), fitted amplitudes (per mode median; RMS node displacement they make),
   and the CPU seconds of ``align`` (``getrusage(RUSAGE_CHILDREN)``) per particle. Two
   diagnostics show a convention mismatch at a glance: the angle to the INVERSE true rotation
   and the origin error with the opposite sign (both large when the conventions agree).

Cases:

* rigid (default): particles of ``--pdb`` itself (4AKE chain A): the amplitudes should be ~0.
  Earlier (ad-hoc) measurements: 96 particles, SNR 0.1: median 1.0-1.4° (p90 ~2°), 0.2 px;
  this script (defaults, 2 busy cores): median 0.90°, p90 1.72°, all within 5°, 0.18 px,
  median fitted RMS displacement 0.24 Å, align 0.20-0.25 CPU-s per particle.
* ``--conformation 1ake.pdb``: the map is rendered from ANOTHER structure (closed 1AKE chain A,
  ``--conformation-chains``) superposed on the modes' nodes by Cα exactly as
  ``deephemnma simulate --conformation`` does (its ``_load_conformation``), and aligned with
  the modes of ``--pdb`` (``--use-modes 7-12`` and ``--conformation-args``, default
  ``--deformation nonlinear --population-search 2``, as bench_hemnma.py's large case): issue
  12's open -> closed check on RELION-made particles. The expected amplitudes are the
  projection of (1AKE - 4AKE) node displacement on the modes (as ``simulation.json`` gives it);
  the median fitted one is printed against it, with the fraction of particles of the same sign.
  Measured (96 particles, SNR 0.1): median 5.0-6.2°, p90 12.7-14.8° (78.6° in one run of
  three, 12 particles above 20°), fitted amplitudes within 7-9 % of the projection, align
  0.43-0.51 CPU-s per particle; ``deephemnma simulate``'s particles (bench_hemnma.py ``--cases
  large --n-large 96``): median 5.96°, p90 12.25°.
* ``--conformation 1ake.pdb --refit 3``: then the user's further rounds, as bench_hemnma.py's
  refit case does on our simulator's particles: ``relion_reconstruct --ctf`` of the last
  round's poses, ``deephemnma fit`` of ``--pdb`` into that map (``--keep-frame``, compared with
  the conformation; ``--fit-args``), ``modes`` of the fitted model and ``align`` again with its
  defaults (modes 7-9). Each round scored as found and modulo the frame
  (`evaluation.frame_offset`: the global rotation between the true poses and the found ones,
  which the fitted model's own error causes).

relion_project seeds its noise identically on every run, so a rerun with the same options
makes the same images; ``--seed`` draws other poses, origins and defocus.

Nothing is judged: the script prints a table and exits non-zero only when something fails to
run. Files stay in ``--work`` (a temporary folder by default); ``summary.json`` there.

    python benchmarks/bench_relion_project.py --work /tmp/brp_rigid
    python benchmarks/bench_relion_project.py --conformation ../shared/data/structures/1ake.pdb \\
        --work /tmp/brp_closed
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import gemmi
import mrcfile
import numpy as np
import pandas as pd
import starfile
from _refit import CLI, TRUE, refit_round, timed, true_rotations
from numpy.typing import NDArray
from scipy.spatial.transform import Rotation

from deephemnma_bridge.adapters import read_particles
from deephemnma_bridge.api._simulate import _load_conformation
from deephemnma_bridge.conventions import (
    angle_between_rotations_degrees,
    euler_to_matrix,
    matrix_to_euler,
)
from deephemnma_bridge.evaluation import ground_truth_errors
from deephemnma_bridge.nma import NormalModes
from deephemnma_bridge.nma.deform import linear_equivalent
from deephemnma_bridge.nma.modes import parse_mode_numbers
from deephemnma_bridge.simulate import project_displacement

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "structures"
#: align options of the --conformation case (bench_hemnma.py's large case)
CONFORMATION_ALIGN = "--deformation nonlinear --population-search 2"
CONFORMATION_MODES = "7-12"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def run(cmd: list[str], cwd: Path | None = None) -> tuple[float, float, str]:
    """(wall s, CPU s of the process and its children, stdout) of one command at 1 thread
    (`_refit.timed`); exits on failure."""
    return timed(cmd, ENV, cwd)


def read_model(path: Path, chains: list[str] | None) -> gemmi.Structure:
    """First model of ``path``, only ``chains``, no waters / ligands / hydrogens / altlocs."""
    st = gemmi.read_structure(str(path))
    while len(st) > 1:
        del st[len(st) - 1]
    st.setup_entities()
    st.remove_alternative_conformations()
    st.remove_hydrogens()
    st.remove_ligands_and_waters()
    if chains:
        for name in [ch.name for ch in st[0] if ch.name not in chains]:
            st[0].remove_chain(name)
    st.remove_empty_chains()
    if not sum(1 for _ in st[0].all()):
        raise SystemExit(f"{path}: no atoms left in chains {chains}")
    return st


def move(st: gemmi.Structure, rotation: NDArray[np.float64], shift: NDArray[np.float64]) -> None:
    """``x -> R x + t`` for every atom."""
    st[0].transform_pos_and_adp(gemmi.Transform(gemmi.Mat33(rotation.tolist()), gemmi.Vec3(*shift)))


def render_map(
    st: gemmi.Structure, centre: NDArray[np.float64], box: int, pixel: float, blur: float, out: Path
) -> None:
    """gemmi density of ``st`` on a ``box``^3 grid, ``centre`` (Å, model frame) on voxel box//2."""
    side = box * pixel
    moved = st.clone()
    move(moved, np.eye(3), np.full(3, (box // 2) * pixel) - centre)
    moved.cell = gemmi.UnitCell(side, side, side, 90, 90, 90)
    moved.spacegroup_hm = "P 1"
    dc = gemmi.DensityCalculatorE()
    dc.d_min = 2 * pixel
    dc.blur = blur
    dc.set_grid_cell_and_spacegroup(moved)
    dc.grid.set_size(box, box, box)
    dc.add_model_density_to_grid(moved[0])
    dc.grid.symmetrize_sum()
    # gemmi's array is [x, y, z], grid point i at i * pixel
    density = np.array(dc.grid.array, copy=True, dtype=np.float32)
    data = np.ascontiguousarray(density.transpose(2, 1, 0))  # MRC: [z, y, x]
    with mrcfile.new(out, overwrite=True) as mrc:
        mrc.set_data(data)
        mrc.voxel_size = pixel
        origin = centre - (box // 2) * pixel  # voxel 0 in the model's frame
        mrc.header.origin.x, mrc.header.origin.y, mrc.header.origin.z = (float(v) for v in origin)


def particles_star(args: argparse.Namespace, path: Path, centred: Path) -> pd.DataFrame:
    """Write the RELION 3.1 STAR file that relion_project reads (and a copy with zero
    origins, ``centred``); the particle rows."""
    rng = np.random.default_rng(args.seed)
    n = args.n
    angles = matrix_to_euler(Rotation.random(n, random_state=rng).as_matrix())
    lo, hi = (float(v) for v in args.defocus.split(","))
    du = rng.uniform(lo, hi, n)
    rows = pd.DataFrame(
        {
            "rlnImageName": [f"{i + 1:06d}@input.mrcs" for i in range(n)],
            "rlnAngleRot": angles[:, 0],
            "rlnAngleTilt": angles[:, 1],
            "rlnAnglePsi": angles[:, 2],
            "rlnOriginXAngst": rng.uniform(-args.shift, args.shift, n),
            "rlnOriginYAngst": rng.uniform(-args.shift, args.shift, n),
            "rlnDefocusU": du,
            "rlnDefocusV": du - rng.uniform(0, args.astigmatism, n),
            "rlnDefocusAngle": rng.uniform(0, 180, n),
            "rlnPhaseShift": np.zeros(n),
            "rlnCtfBfactor": np.zeros(n),
            "rlnOpticsGroup": np.ones(n, dtype=int),
        }
    )
    optics = pd.DataFrame(
        {
            "rlnOpticsGroupName": ["opticsGroup1"],
            "rlnOpticsGroup": [1],
            "rlnVoltage": [300.0],
            "rlnSphericalAberration": [2.7],
            "rlnAmplitudeContrast": [0.1],
            "rlnImagePixelSize": [args.pixel_size],
            "rlnImageSize": [args.box],
            "rlnImageDimensionality": [2],
        }
    )
    starfile.write({"optics": optics, "particles": rows}, path, overwrite=True)
    zero = rows.assign(rlnOriginXAngst=0.0, rlnOriginYAngst=0.0)
    starfile.write({"optics": optics, "particles": zero}, centred, overwrite=True)
    return rows


def project(
    work: Path, args: argparse.Namespace, name: str, sigma: float, ang: str = "particles_in.star"
) -> tuple[Path, float]:
    """relion_project of the poses in work/ang into work/name.mrcs + name.star; (STAR, CPU s)."""
    cmd = ["relion_project", "--i", "map.mrc", "--o", name, "--ang", ang]
    cmd += ["--ctf", "--angpix", f"{args.pixel_size:g}"]
    if sigma > 0:
        cmd += ["--add_noise", "--white_noise", f"{sigma:.8g}"]
    for old in (work / f"{name}.star", work / f"{name}.mrcs"):
        old.unlink(missing_ok=True)
    _, cpu, _ = run(cmd, cwd=work)
    print(f"  $ (cd {work} && {' '.join(cmd)})", flush=True)
    return work / f"{name}.star", cpu


def stack(path: Path) -> NDArray[np.float64]:
    with mrcfile.open(path, permissive=True) as mrc:
        return np.asarray(mrc.data, dtype=np.float64)


def strip_poses(projected: Path, wanted: pd.DataFrame, out: Path) -> None:
    """relion_project's STAR file with the poses and origins moved into _dhnTrue* columns."""
    blocks = starfile.read(projected, always_dict=True)
    rows = blocks["particles"].copy()
    if len(rows) != len(wanted):
        raise SystemExit(f"{projected}: {len(rows)} rows for {len(wanted)} particles")
    for label, true in zip(("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"), TRUE):
        rows[true] = wanted[label].to_numpy()
    rows["dhnTrueOriginXAngst"] = wanted["rlnOriginXAngst"].to_numpy()
    rows["dhnTrueOriginYAngst"] = wanted["rlnOriginYAngst"].to_numpy()
    gone = [c for c in rows.columns if c.startswith(("rlnAngle", "rlnOrigin"))]
    rows = rows.drop(columns=gone)
    starfile.write({**blocks, "particles": rows}, out, overwrite=True)


def check_written_truth(projected: Path, wanted: pd.DataFrame) -> str:
    """What relion_project's STAR file says about the poses, read with deephemnma's reader."""
    table = read_particles(projected)
    if table.rotation_matrices is None:
        return "relion_project's STAR file has no poses"
    asked = euler_to_matrix(wanted[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]].to_numpy())
    angle = float(angle_between_rotations_degrees(table.rotation_matrices, asked).max())
    origin = wanted[["rlnOriginXAngst", "rlnOriginYAngst"]].to_numpy()
    same = float(np.abs(table.shifts_angstrom - origin).max())
    opposite = float(np.abs(table.shifts_angstrom + origin).max())
    return (
        f"relion_project's STAR (read_particles): poses vs asked max {angle:.2e}°, origins "
        f"max |written - asked| {same:.3g} Å (|written + asked| {opposite:.3g} Å)"
    )


def origin_sign(
    clean: NDArray[np.float64], centred: NDArray[np.float64], pixel: float, wanted: pd.DataFrame
) -> str:
    """relion_project's origin sign, measured: the translation ``d`` (px, by phase
    correlation, parabolic sub-pixel peak) that takes each noiseless image projected with zero
    origin onto the same pose projected with the asked origin ``o``; INTEROP.md section 2.3
    says ``image(x) = P(x + o)``, i.e. ``d = -o``."""
    f = np.fft.fft2(clean) * np.conj(np.fft.fft2(centred))
    corr = np.fft.fftshift(np.real(np.fft.ifft2(f / np.maximum(np.abs(f), 1e-12))), axes=(1, 2))
    n, box = clean.shape[0], clean.shape[-1]
    d = np.zeros((n, 2))
    for i in range(n):
        y, x = np.unravel_index(int(np.argmax(corr[i])), corr[i].shape)
        sub = []
        for c, line in ((x, corr[i, y]), (y, corr[i, :, x])):
            lo, mid, hi = line[(c - 1) % box], line[c], line[(c + 1) % box]
            den = lo - 2 * mid + hi
            sub.append(c - box // 2 + (0.5 * (lo - hi) / den if den else 0.0))
        d[i] = sub
    o = wanted[["rlnOriginXAngst", "rlnOriginYAngst"]].to_numpy() / pixel
    minus = np.median(np.linalg.norm(d + o, axis=1))
    plus = np.median(np.linalg.norm(d - o, axis=1))
    return (
        f"origin sign (noiseless images, phase correlation): median |d + o| {minus:.2f} px, "
        f"|d - o| {plus:.2f} px (|o| median {np.median(np.linalg.norm(o, axis=1)):.2f} px) -> "
        + ("image(x) = P(x + o), as INTEROP.md says" if minus < plus else "image(x) = P(x - o)")
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pdb", type=Path, default=DATA / "4ake.pdb", help="modes' model")
    parser.add_argument("--chains", default="A", help="chains of --pdb (default A)")
    parser.add_argument("--conformation", type=Path, default=None, help="render this instead")
    parser.add_argument("--conformation-chains", default="A")
    parser.add_argument(
        "--conformation-args",
        default=CONFORMATION_ALIGN,
        help=f"align options with --conformation (default {CONFORMATION_ALIGN!r})",
    )
    parser.add_argument(
        "--conformation-modes",
        default=CONFORMATION_MODES,
        help=f"--use-modes with --conformation ({CONFORMATION_MODES})",
    )
    parser.add_argument("--align-args", default="", help="more align options (any case)")
    parser.add_argument("--n", type=int, default=96)
    parser.add_argument("--snr", type=float, default=0.1)
    parser.add_argument("--box", type=int, default=128)
    parser.add_argument("--pixel-size", type=float, default=0.65)
    parser.add_argument("--blur", type=float, default=40.0, help="Å², added to the B-factors")
    parser.add_argument("--shift", type=float, default=3.0, help="origins in ±this, Å")
    parser.add_argument("--defocus", default="5000,10000", help="defocus U range, Å")
    parser.add_argument("--astigmatism", type=float, default=500.0, help="max U - V, Å")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--work", type=Path, default=None, help="keep the files here")
    parser.add_argument(
        "--refit",
        type=int,
        default=1,
        metavar="ROUNDS",
        help="with --conformation: alignments in all (default 1); each after the first "
        "reconstructs, fits --pdb into the map and aligns again with the fitted model's modes",
    )
    parser.add_argument("--fit-args", default="", help="--refit: more `deephemnma fit` options")
    args = parser.parse_args()
    if args.refit > 1 and args.conformation is None:
        parser.error("--refit needs --conformation (the structure the particles show)")

    if shutil.which("relion_project") is None:
        raise SystemExit("relion_project is not on PATH (RELION 3.1)")
    work = args.work or Path(tempfile.mkdtemp(prefix="bench_relion_project_"))
    work.mkdir(parents=True, exist_ok=True)
    work = work.resolve()
    chains = [c for c in args.chains.split(",") if c]
    print(f"work folder {work}; load {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")

    # --- modes of --pdb and the rotation centre the reference uses
    modes_path = work / "modes.npz"
    cmd = ["modes", str(args.pdb), "--chains", args.chains, "--out", str(modes_path)]
    _, cpu_modes, _ = run([*CLI, *cmd, "--overwrite"])
    print(f"  $ deephemnma {' '.join(cmd)} --overwrite  ({cpu_modes:.1f} CPU-s)")
    modes = NormalModes.load(modes_path)
    centre = modes.rotation_centre
    info: dict[str, Any] = {"centre_angstrom": centre.tolist(), "args": vars(args)}

    # --- the structure rendered
    projection = None
    use_modes = None
    align_extra = args.align_args.split()
    if args.conformation is None:
        st = read_model(args.pdb, chains)
        what = f"{args.pdb.name} chains {args.chains} (rigid: amplitudes should be ~0)"
    else:
        conf = _load_conformation(
            args.conformation,
            modes,
            chains_text=args.conformation_chains,
            render="atoms",
            frame="superpose",
        )
        st = read_model(args.conformation, args.conformation_chains.split(","))
        move(st, conf.rotation, conf.translation)
        use_modes = parse_mode_numbers(args.conformation_modes)
        selected = modes.select(use_modes)
        displacement = conf.node_coordinates - np.asarray(modes.coordinates)
        projection, _, carried = project_displacement(selected.vectors, displacement)
        align_extra = [*args.conformation_args.split(), *align_extra]
        what = (
            f"{args.conformation.name} chains {args.conformation_chains} superposed on "
            f"{args.pdb.name} {args.chains} (Cα RMSD {conf.rmsd_angstrom:.2f} Å; modes "
            f"{args.conformation_modes} carry {100 * carried:.1f} % of the squared displacement)"
        )
        info["conformation"] = {
            "rmsd_angstrom": conf.rmsd_angstrom,
            "projection": {str(m): float(q) for m, q in zip(use_modes, projection)},
            "fraction_carried": carried,
        }
    st.write_pdb(str(work / "rendered.pdb"))
    render_map(st, centre, args.box, args.pixel_size, args.blur, work / "map.mrc")
    print(
        f"  rendered {what}: {sum(1 for _ in st[0].all())} atoms, {args.box} px at "
        f"{args.pixel_size:g} Å, blur {args.blur:g} Å², centre {np.round(centre, 2).tolist()} Å "
        f"on voxel {args.box // 2}"
    )

    # --- particles and images
    wanted = particles_star(args, work / "particles_in.star", work / "particles_centred.star")
    _, cpu_clean = project(work, args, "clean", 0.0)
    clean = stack(work / "clean.mrcs")
    _, cpu_centred = project(work, args, "centred", 0.0, "particles_centred.star")
    centred = stack(work / "centred.mrcs")
    signal = clean.reshape(len(clean), -1).var(axis=1)
    sigma = float(np.sqrt(signal.mean() / args.snr))
    noisy_star, cpu_project = project(work, args, "proj", sigma)
    noisy = stack(work / "proj.mrcs")
    noise = (noisy - clean).reshape(len(clean), -1).var(axis=1)
    print(
        f"  relion_project: {len(noisy)} images {noisy.shape[-1]} px; signal variance "
        f"{signal.mean():.4g} (per image {signal.min():.3g}-{signal.max():.3g}), white noise "
        f"sigma {sigma:.4g}: measured SNR {signal.mean() / noise.mean():.3f} "
        f"({cpu_clean + cpu_centred + cpu_project:.1f} CPU-s for the three runs)"
    )
    print(f"  {check_written_truth(noisy_star, wanted)}")
    print(f"  {origin_sign(clean, centred, args.pixel_size, wanted)}")
    star = work / "particles.star"
    strip_poses(noisy_star, wanted, star)

    # --- alignment
    out = work / "aligned"
    cmd = ["align", str(star), "--modes", str(modes_path), "--out", str(out)]
    if use_modes is not None:
        cmd += ["--use-modes", ",".join(map(str, use_modes))]
    cmd += [*align_extra, "--threads", "1", "--device", "cpu", "--overwrite"]
    wall, cpu, _ = run([*CLI, *cmd])
    print(f"  $ OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 deephemnma {' '.join(cmd)}")

    # --- scores
    table = read_particles(out / "particles.star")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        s = ground_truth_errors(table)["all"]
    truth = true_rotations(table)
    assert table.rotation_matrices is not None
    angle = angle_between_rotations_degrees(table.rotation_matrices, truth)
    inverse = angle_between_rotations_degrees(table.rotation_matrices, truth.transpose(0, 2, 1))
    origin = np.stack(
        [np.asarray(table.extra[k], float) for k in ("dhnTrueOriginXAngst", "dhnTrueOriginYAngst")],
        1,
    )
    pixel = float(table.pixel_size_angstrom[0])
    flipped = np.linalg.norm(table.shifts_angstrom + origin, axis=1) / pixel
    numbers = sorted(
        int(k[len("dhnAmplitude") :]) for k in table.extra if k.startswith("dhnAmplitude")
    )
    fitted = np.stack([np.asarray(table.extra[f"dhnAmplitude{m}"], float) for m in numbers], 1)
    root_n = float(np.sqrt(len(modes.coordinates)))  # q / sqrt(N): RMS node displacement, Å
    rms = np.linalg.norm(fitted, axis=1) / root_n
    n = len(table)
    print()
    heads = (
        "median",
        "p90",
        "<5°",
        "shift",
        "inverse",
        "-origin",
        "amp RMS",
        "CPU-s/p",
        "wall-s/p",
    )
    widths = (7, 7, 6, 8, 8, 8, 8, 8, 8)
    print(f"{'case':<10} {'n':>4} " + " ".join(f"{h:>{w}}" for h, w in zip(heads, widths)))
    name = "rigid" if args.conformation is None else "closed"
    print(
        f"{name:<10} {n:4d} {s['angle_median']:6.2f}° {s['angle_p90']:6.2f}° "
        f"{100 * np.mean(angle < 5):5.0f}% {s['shift_px']:5.2f} px {np.median(inverse):7.1f}° "
        f"{np.median(flipped):5.2f} px {np.median(rms):6.2f} Å {cpu / n:8.3f} {wall / n:8.3f}"
    )
    print(
        "  (median, p90, <5°: angle to the true rotation; shift: median origin error; inverse: "
        "median angle to the inverse true rotation; -origin: median error with the origin's "
        "sign flipped; amp RMS: median RMS node displacement of the fitted amplitudes)"
    )
    quant = np.percentile(angle, [25, 50, 75, 90, 100])
    print(
        "  angle to the truth, p25 / p50 / p75 / p90 / max: "
        + " / ".join(f"{v:.1f}°" for v in quant)
        + f"; {int(np.sum(angle > 20))} particles above 20°, {int(np.sum(angle > 150))} above 150°"
    )
    print(
        f"  amplitudes q (node i moves by q u_i Å; unit modes: RMS displacement q / {root_n:.1f} Å)"
    )
    print(f"  {'mode':>14} " + " ".join(f"{m:>8d}" for m in numbers))
    med = np.median(fitted, axis=0)
    print(f"  {'median fitted':>14} " + " ".join(f"{v:8.2f}" for v in med))
    print(f"  {'p90 |fitted|':>14} " + " ".join(f"{v:8.2f}" for v in np.percentile(
        np.abs(fitted), 90, axis=0))
    )  # fmt: skip
    result: dict[str, Any] = {
        **s,
        "within_5deg": float(np.mean(angle < 5)),
        "above_20deg": int(np.sum(angle > 20)),
        "inverse_median": float(np.median(inverse)),
        "flipped_origin_px": float(np.median(flipped)),
        "amplitude_rms_median_angstrom": float(np.median(rms)),
        "amplitude_median": {str(m): float(v) for m, v in zip(numbers, med)},
        "cpu_s": cpu,
        "wall_s": wall,
        "cpu_s_per_particle": cpu / n,
        "n": n,
        "snr": args.snr,
        "sigma": sigma,
    }
    if projection is not None and use_modes == numbers:
        print(f"  {'projection':>14} " + " ".join(f"{v:8.2f}" for v in projection))
        if "nonlinear" in align_extra:
            # a non-linear amplitude drives a screw motion: what it amounts to linearly (the
            # projection of its displacement on the modes) is what compares with the projection
            fitted = linear_equivalent(selected.coordinates, selected.vectors, fitted)
            med = np.median(fitted, axis=0)
            print(f"  {'as linear':>14} " + " ".join(f"{v:8.2f}" for v in med))
            print("  (as linear: `nma.deform.linear_equivalent`, the fitted deformation projected)")
            result["amplitude_median_as_linear"] = {str(m): float(v) for m, v in zip(numbers, med)}
        main = np.abs(projection) >= 0.1 * np.linalg.norm(projection)
        off = np.abs(med / projection - 1)
        print(
            "  main modes (|projection| >= 10 % of its norm): |median / projection - 1| "
            + " ".join(f"{m}: {v:.2f}" for m, v, k in zip(numbers, off, main) if k)
            + f"; worst {off[main].max():.2f} (issue 12: <= 0.25), median's sign differs for "
            f"{int(np.sum(main & (np.sign(med) != np.sign(projection))))}"
        )
        agree = (np.sign(fitted) == np.sign(projection)).mean(axis=0)
        print(f"  {'sign agrees':>14} " + " ".join(f"{100 * v:7.0f}%" for v in agree))
        vec = float(np.linalg.norm(med - projection) / np.linalg.norm(projection))
        print(f"  |median fitted - projection| / |projection|: {vec:.3f}")
        result["projection_error"] = vec
    if "dhnCost" in table.extra:
        ncc = 1 - np.asarray(table.extra["dhnCost"], float)
        print(
            f"  NCC of the fitted template (1 - _dhnCost): median {np.nanmedian(ncc):.3f}, "
            f"min {np.nanmin(ncc):.3f} (positive: the CTF / contrast sign agrees with RELION's)"
        )
        result["ncc_median"] = float(np.nanmedian(ncc))
    not_converged = int(np.sum(np.asarray(table.extra.get("dhnConverged", np.ones(n))) == 0))
    print(
        f"  align: {cpu:.1f} CPU-s ({cpu / n:.3f} per particle), {wall:.1f} wall-s; "
        f"{not_converged} not converged; load {os.getloadavg()[0]:.2f}"
    )
    info["result"] = result
    if args.refit > 1:
        info["refit"] = refit(work, args, out / "particles.star", cpu)
    (work / "summary.json").write_text(json.dumps(info, indent=1, default=str))


def refit(work: Path, args: argparse.Namespace, round1: Path, cpu1: float) -> dict[str, Any]:
    """Rounds 2.. (``--refit N``, `_refit.refit_round`): each a map of the last round's poses,
    --pdb fitted into it, aligned again with the fitted model's modes; scores of every round."""
    if shutil.which("relion_reconstruct") is None:
        raise SystemExit("--refit needs relion_reconstruct on PATH (RELION 3.1)")
    last, total, results = round1, cpu1, {}
    for r in range(2, args.refit + 1):
        print()
        done = refit_round(
            r, last, round1, work, pdb=args.pdb, chains=args.chains, compare=args.conformation,
            compare_chains=args.conformation_chains, fit_args=args.fit_args.split(),
            align_args=["--threads", "1", "--device", "cpu"], env=ENV,
        )  # fmt: skip
        last, n = done.star, len(done.table)
        total += done.cpu
        result = {**done.summary(), "cpu_s_per_particle_so_far": total / n}
        results[f"round{r}"] = result
        print(
            f"  round {r} (fitted model, align's defaults), n {n}: as found median "
            f"{result['angle_median']:.2f}°, p90 {result['angle_p90']:.2f}°; modulo the frame "
            f"(turned {done.frame_degrees:.2f}°) median {result['modulo_frame_median']:.2f}°, "
            f"p90 {result['modulo_frame_p90']:.2f}° (issue 12's targets: 2° / 4°)\n  CPU-s per "
            f"particle: map {done.cpu_map / n:.3f}, fit {done.cpu_fit / n:.3f}, modes "
            f"{done.cpu_modes / n:.3f}, align {done.cpu_align / n:.3f}; all rounds so far "
            f"{total / n:.3f} (round 1 {cpu1 / n:.3f})"
        )
    return results


if __name__ == "__main__":
    main()
