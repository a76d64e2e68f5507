"""Benchmark the simulator and the forward model; prints figures (no thresholds).

1. Simulation of 10,000 particles at 128 px / 0.65 Å (all-atom rendering, CTF, noise before
   and after the CTF, SNR statistics; in memory, chunk by chunk, as ``deephemnma simulate``
   does before writing) on the CPU and, when present, the GPU. The reference is the bundled
   4AKE chain A (1,656 atoms rendered) with its ANM modes 7-9.
2. Forward-model throughput (projections/s, batch 64) for 214 and 20,000 nodes at 64 and
   128 px: real space (truncated Gaussians, 5 sigma), Fourier space over the whole band, and
   Fourier space over the band below 8 Å (the alignment case).

Run: ``.venv/bin/python benchmarks/bench_simulate.py [--n 10000] [--skip-sim]``
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from functools import partial

import torch

from deephemnma_bridge.alignment.render import FourierBand, render_fourier, render_real
from deephemnma_bridge.device import available_devices
from deephemnma_bridge.simulate import (
    SimulationConfig,
    SimulationModel,
    SimulationStats,
    draw_truth,
    simulate_images,
)


def _model() -> tuple[SimulationModel, str]:
    from deephemnma_bridge.adapters.structure import read_structure
    from deephemnma_bridge.coarse_grain import coarse_grain
    from deephemnma_bridge.data import default_model_path
    from deephemnma_bridge.nma import compute_normal_modes

    atoms = read_structure(default_model_path())
    cg = coarse_grain(atoms)
    modes = compute_normal_modes(cg.coordinates_angstrom, n_modes=20, cutoff_angstrom=15.0)
    model = SimulationModel.from_arrays(
        cg.coordinates_angstrom,
        modes.vectors,
        modes.mode_numbers,
        [7, 8, 9],
        atom_coordinates=atoms.coordinates_angstrom,
        atom_node=cg.atom_node,
    )
    return model, "bundled 4AKE chain A, ANM modes 7-9 (15 Å)"


def bench_simulation(n: int, device: str) -> None:
    model, what = _model()
    cfg = SimulationConfig(n_particles=n)
    truth = draw_truth(cfg, model)
    stats = SimulationStats()
    torch.set_grad_enabled(False)
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for chunk in simulate_images(cfg, model, truth, device=device):
        stats.add(chunk)
    dt = time.perf_counter() - t0
    snr = stats.summary()
    print(
        f"simulate {n} x 128 px ({what}, {len(model.render_coordinates)} atoms) on {device}: "
        f"{n / dt:.0f} particles/s ({dt:.1f} s); measured SNR whole {snr['snr_whole']:.3f}, "
        f"<10 Å {snr['snr_10A']:.2f}, <7 Å {snr['snr_7A']:.2f}"
    )


def _rate(fn: Callable[[], object], batch: int, device: str, repeat: int = 3) -> float:
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return batch * repeat / (time.perf_counter() - t0)


def bench_render(device: str) -> None:
    torch.set_grad_enabled(False)
    batch, sigma = 64, 2.0
    for n_nodes in (214, 20_000):
        for box in (64, 128):
            pix = 83.2 / box
            gen = torch.Generator().manual_seed(0)
            pos = (torch.randn(batch, n_nodes, 2, generator=gen) * 12).to(device)
            real = _rate(
                partial(
                    render_real, pos, box_size_px=box, pixel_size_angstrom=pix, sigma_angstrom=sigma
                ),
                batch,
                device,
            )
            rates = []
            for res in (None, 8.0):
                band = FourierBand.create(
                    box_size_px=box,
                    pixel_size_angstrom=pix,
                    resolution_angstrom=res,
                    device=device,
                )
                rates.append(
                    _rate(partial(render_fourier, pos, band, sigma_angstrom=sigma), batch, device)
                )
            print(
                f"render {n_nodes:>6} nodes {box:>3} px ({pix:.2f} Å/px) on {device}: real "
                f"{real:8.0f} proj/s | Fourier full band {rates[0]:8.0f} | Fourier <8 Å "
                f"{rates[1]:8.0f}"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--skip-sim", action="store_true")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    for device in available_devices():
        if not args.skip_sim:
            bench_simulation(args.n, device)
        bench_render(device)


if __name__ == "__main__":
    main()
