"""Normal-mode speed and memory: 4AKE (Cα), 4YVS (3,405 nodes), 5 x 4YVS (17,025 nodes).

For each system: full ANM (sparse/dense as `compute_normal_modes` picks) and RTB (10 residues
per block), the lowest 20 modes at a 15 Å cutoff; each case runs in a fresh subprocess so
its peak RSS is its own. ProDy's ANM (not a dependency: ``pip install --target DIR prody``,
then ``--prody-dir DIR``, or have it importable) runs on the same nodes and cutoff for 4AKE
and 4YVS (its dense eigensolver would need ~20 GB at 17,025 nodes); the time ratio and the
overlaps |u_ours . u_prody| of modes 7-16 are printed.

    python benchmarks/bench_nma.py [--prody-dir /tmp/prody_pkgs] [--skip-big]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "structures"
CUTOFF = 15.0
N_MODES = 20


def nodes(system: str) -> tuple[np.ndarray, np.ndarray]:
    from deephemnma_bridge.adapters.structure import read_structure
    from deephemnma_bridge.coarse_grain import coarse_grain

    if system == "4ake":
        cg = coarse_grain(read_structure(SHARED / "4ake.pdb"), chains=["A"])
        return cg.coordinates_angstrom, cg.blocks(10)
    cg = coarse_grain(read_structure(SHARED / "4yvs.cif"))
    if system == "4yvs":
        return cg.coordinates_angstrom, cg.blocks(10)
    # five copies 80 Å apart along x: the closest nodes of neighbours are 7.5 Å apart, so the
    # 15 Å network stays connected (22 node pairs within 15 Å between neighbouring copies)
    shifts = [np.array([80.0 * k, 0.0, 0.0]) for k in range(5)]
    xyz = np.concatenate([cg.coordinates_angstrom + s for s in shifts])
    blocks = np.concatenate([cg.blocks(10) + 100_000 * k for k in range(5)])
    return xyz, blocks


def run_case(system: str, method: str, prody_dir: str | None) -> dict[str, object]:
    xyz, blocks = nodes(system)
    out: dict[str, object] = {"system": system, "method": method, "nodes": len(xyz)}
    if method == "prody":
        if prody_dir:
            sys.path.append(prody_dir)  # after the venv: its numpy/scipy stay in use
        import prody

        prody.confProDy(verbosity="none")
        t0 = time.perf_counter()
        anm = prody.ANM(system)
        anm.buildHessian(xyz, cutoff=CUTOFF, gamma=1.0)
        anm.calcModes(n_modes=N_MODES - 6, zeros=False)
        out["seconds"] = time.perf_counter() - t0
        vectors = anm.getEigvecs().T.reshape(N_MODES - 6, len(xyz), 3)
        np.save(f"/tmp/bench_nma_{system}_prody.npy", vectors)
    else:
        from deephemnma_bridge.nma import compute_normal_modes

        t0 = time.perf_counter()
        modes = compute_normal_modes(
            xyz,
            n_modes=N_MODES,
            cutoff_angstrom=CUTOFF,
            method="rtb" if method == "rtb" else "auto",
            blocks=blocks,
        )
        out["seconds"] = time.perf_counter() - t0
        out["solver"] = modes.settings["method"]
        out["springs"] = modes.settings["n_springs"]
        np.save(f"/tmp/bench_nma_{system}_{method}.npy", modes.vectors[6:])
    out["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    return out


def overlaps(system: str, a: str, b: str, n: int = 10) -> np.ndarray:
    va = np.load(f"/tmp/bench_nma_{system}_{a}.npy")[:n].reshape(n, -1)
    vb = np.load(f"/tmp/bench_nma_{system}_{b}.npy")[:n].reshape(n, -1)
    return np.abs(np.einsum("ij,ij->i", va, vb))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--prody-dir", default=None, help="folder where prody is installed")
    parser.add_argument("--skip-big", action="store_true", help="skip the 17,025-node system")
    parser.add_argument("--case", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        print(json.dumps(run_case(*args.case, args.prody_dir)))
        return

    def sub(system: str, method: str) -> dict[str, object] | None:
        cmd = [sys.executable, __file__, "--case", system, method]
        if args.prody_dir:
            cmd += ["--prody-dir", args.prody_dir]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            print(f"  {system} {method}: failed: {done.stderr.strip().splitlines()[-1]}")
            return None
        result: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
        return result

    systems = ["4ake", "4yvs"] + ([] if args.skip_big else ["5x4yvs"])
    print(f"lowest {N_MODES} modes, cutoff {CUTOFF} Å, RTB 10 residues per block")
    print(f"{'system':>8} {'nodes':>6} {'method':>6} {'solver':>7} {'seconds':>8} {'peak GB':>8}")
    for system in systems:
        times: dict[str, float] = {}
        for method in ("full", "rtb", "prody"):
            if method == "prody" and system == "5x4yvs":
                continue
            r = sub(system, method)
            if r is None:
                continue
            times[method] = float(r["seconds"])  # type: ignore[arg-type]
            print(
                f"{system:>8} {r['nodes']:>6} {method:>6} {r.get('solver', 'prody')!s:>7} "
                f"{r['seconds']:8.2f} {r['peak_rss_gb']:8.2f}"
            )
        o = overlaps(system, "full", "rtb")
        print(f"         RTB vs full, |overlap| modes 7-16: {np.array2string(o, precision=3)}")
        if "prody" in times:
            o = overlaps(system, "full", "prody")
            print(
                f"         ProDy / ours time ratio {times['prody'] / times['full']:.1f}x; "
                f"|overlap| modes 7-16: {np.array2string(o, precision=4)} (min {o.min():.4f})"
            )


if __name__ == "__main__":
    main()
