"""Time reading, converting and writing particle files of 1,000,000 rows (issue 2 targets).

Generates a RELION 3.1 STAR file and a cryoSPARC .cs of N particles (default 1,000,000) with the
usual columns, then measures, each in a fresh subprocess so that peak memory is per step:

* peer: ``starfile.read`` + ``starfile.write`` of the STAR file;
* ours: ``read_particles`` + ``write_particles`` of the same STAR file, and the ratio to the peer
  (target: within 2x);
* ``.cs`` read, and ``.cs -> STAR`` conversion (read + write; target: under 60 s);
* peak resident memory of each step (target: under 4 GB).

Usage: python benchmarks/bench_io.py [--n 1000000] [--dir DIR]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def make_star(path: Path, n: int, seed: int = 0) -> None:
    import pandas as pd

    from deephemnma_bridge.adapters.star import write_star_blocks

    rng = np.random.default_rng(seed)
    mic = rng.integers(0, 2000, n)
    optics = pd.DataFrame(
        {
            "rlnOpticsGroup": [1],
            "rlnOpticsGroupName": ["opticsGroup1"],
            "rlnAmplitudeContrast": [0.1],
            "rlnSphericalAberration": [2.7],
            "rlnVoltage": [300.0],
            "rlnImagePixelSize": [1.1],
            "rlnImageSize": [128],
            "rlnImageDimensionality": [2],
        }
    )
    idx = np.arange(n) % 500 + 1
    particles = pd.DataFrame(
        {
            "rlnImageName": [
                f"{i:06d}@Extract/job012/Movies/mic_{m:05d}.mrcs" for i, m in zip(idx, mic)
            ],
            "rlnMicrographName": [f"MotionCorr/job002/Movies/mic_{m:05d}.mrc" for m in mic],
            "rlnCoordinateX": np.round(rng.uniform(0, 4096, n), 1),
            "rlnCoordinateY": np.round(rng.uniform(0, 4096, n), 1),
            "rlnAngleRot": np.round(rng.uniform(-180, 180, n), 6),
            "rlnAngleTilt": np.round(rng.uniform(0, 180, n), 6),
            "rlnAnglePsi": np.round(rng.uniform(-180, 180, n), 6),
            "rlnOriginXAngst": np.round(rng.uniform(-5, 5, n), 6),
            "rlnOriginYAngst": np.round(rng.uniform(-5, 5, n), 6),
            "rlnDefocusU": np.round(rng.uniform(8000, 25000, n), 6),
            "rlnDefocusV": np.round(rng.uniform(8000, 25000, n), 6),
            "rlnDefocusAngle": np.round(rng.uniform(-180, 180, n), 6),
            "rlnPhaseShift": np.zeros(n),
            "rlnCtfBfactor": np.zeros(n),
            "rlnOpticsGroup": np.ones(n, dtype=np.int64),
            "rlnClassNumber": rng.integers(1, 5, n),
            "rlnRandomSubset": rng.integers(1, 3, n),
        }
    )
    write_star_blocks(path, {"optics": optics, "particles": particles})


STEPS = {
    "peer starfile read+write": (
        "import starfile; d = starfile.read(IN, always_dict=True); starfile.write(d, OUT)"
    ),
    "ours STAR read+write": (
        "from deephemnma_bridge.adapters import read_particles, write_particles;"
        "write_particles(read_particles(IN), OUT)"
    ),
    "ours .cs read": "from deephemnma_bridge.adapters import read_particles; read_particles(CS)",
    "ours .cs -> STAR": (
        "from deephemnma_bridge.adapters import read_particles, write_particles;"
        "write_particles(read_particles(CS), OUT)"
    ),
}


def run_step(code: str, star: Path, cs: Path, out: Path) -> tuple[float, float]:
    script = (
        "import time, resource, json\n"
        f"IN, CS, OUT = {str(star)!r}, {str(cs)!r}, {str(out)!r}\n"
        "t = time.perf_counter()\n"
        f"{code}\n"
        "dt = time.perf_counter() - t\n"
        "peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2\n"
        "print(json.dumps([dt, peak]))\n"
    )
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    dt, peak = json.loads(res.stdout.strip().splitlines()[-1])
    return float(dt), float(peak)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--dir", type=Path, default=None)
    args = parser.parse_args(argv)
    work = args.dir or Path(tempfile.mkdtemp(prefix="bench_io_"))
    work.mkdir(parents=True, exist_ok=True)
    star, cs, out = work / "particles.star", work / "particles.cs", work / "out.star"
    t = time.perf_counter()
    make_star(star, args.n)
    from deephemnma_bridge.adapters import read_particles, write_particles

    write_particles(read_particles(star), cs)
    print(f"generated {args.n:,} particles in {time.perf_counter() - t:.1f} s ({work})")
    results = {name: run_step(code, star, cs, out) for name, code in STEPS.items()}
    print(f"{'step':28s} {'time (s)':>9s} {'peak RSS (GB)':>14s}")
    for name, (dt, peak) in results.items():
        print(f"{name:28s} {dt:9.2f} {peak:14.2f}")
    ratio = results["ours STAR read+write"][0] / results["peer starfile read+write"][0]
    print(f"ratio ours / starfile (STAR read+write): {ratio:.2f}  (target <= 2)")
    print(f".cs -> STAR: {results['ours .cs -> STAR'][0]:.1f} s (target < 60 s)")
    peak = max(p for _, p in results.values())
    print(f"largest peak memory: {peak:.2f} GB (target < 4 GB)")
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    print(f"(generator process peak: {own:.2f} GB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
