"""--use-modes auto: the lowest collective modes (collectivity >= threshold), the table of
modes, warnings for explicit local modes, and auto as the default of align and run."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest

from deephemnma_bridge.cli import main
from deephemnma_bridge.errors import InputError
from deephemnma_bridge.nma import NormalModes, collectivity, compute_normal_modes
from deephemnma_bridge.nma.modes import (
    DEFAULT_MIN_COLLECTIVITY,
    DEFAULT_N_AUTO_MODES,
    select_collective_modes,
)


def test_lowest_flexible_modes_above_the_threshold() -> None:
    numbers = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]
    coll = [1.0, 1.0, 1.0, 0.8, 0.8, 0.8, 0.001, 0.43, 0.68, 0.002, 0.5, 0.6]
    assert select_collective_modes(numbers, coll) == [8, 9, 11]
    assert select_collective_modes(numbers, coll, n_modes=2) == [8, 9]
    assert select_collective_modes(numbers, coll, min_collectivity=0.0) == [7, 8, 9]
    assert select_collective_modes(numbers, coll, n_modes=2, min_collectivity=0.55) == [9, 12]
    # order of the input does not matter: ascending mode number (= ascending eigenvalue)
    order = np.random.default_rng(0).permutation(len(numbers))
    assert select_collective_modes(np.take(numbers, order), np.take(coll, order)) == [8, 9, 11]
    # the rigid-body modes are never chosen, whatever their collectivity
    assert 1 not in select_collective_modes(numbers, coll, n_modes=6, min_collectivity=0.0)


def test_too_few_collective_modes_is_a_clear_error() -> None:
    numbers, coll = [6, 7, 8, 9], [1.0, 0.3, 0.05, 0.02]
    with pytest.raises(InputError, match=r"only 1 of the 3 flexible modes \(7, 8, 9\)"):
        select_collective_modes(numbers, coll)
    with pytest.raises(InputError, match="collectivity threshold must be in"):
        select_collective_modes(numbers, coll, min_collectivity=1.5)
    with pytest.raises(InputError, match=">= 1"):
        select_collective_modes(numbers, coll, n_modes=0)
    with pytest.raises(ValueError, match="one collectivity per mode"):
        select_collective_modes(numbers, coll[:2])
    assert select_collective_modes([7, 8], [np.nan, 0.5], n_modes=1) == [8]


def test_a_mode_moving_one_loop_is_skipped() -> None:
    """Collectivity of a mode moving 5 of 200 nodes is ~0.025: auto passes over it."""
    rng = np.random.default_rng(1)
    n = 200
    vectors = rng.normal(size=(4, n, 3))
    vectors[1] = 0.0
    vectors[1, 100:105] = rng.normal(size=(5, 3))  # mode 8: one loop
    vectors /= np.linalg.norm(vectors.reshape(4, -1), axis=1)[:, None, None]
    coll = collectivity(vectors)
    assert coll[1] < 0.05 and np.all(np.delete(coll, 1) > 0.5)
    assert select_collective_modes([7, 8, 9, 10], coll) == [7, 9, 10]


def test_bundled_adk_auto_is_the_three_lowest() -> None:
    """4AKE chain A: modes 7-9 are collective (0.39-0.42), so auto = the old default 7,8,9."""
    from deephemnma_bridge.adapters.structure import read_structure
    from deephemnma_bridge.coarse_grain import coarse_grain
    from deephemnma_bridge.data import default_model_path

    cg = coarse_grain(read_structure(default_model_path()), nodes="ca")
    modes = compute_normal_modes(cg.coordinates_angstrom, n_modes=20, cutoff_angstrom=15.0)
    assert np.all(modes.collectivity[6:9] > DEFAULT_MIN_COLLECTIVITY)
    assert select_collective_modes(modes.mode_numbers, modes.collectivity) == [7, 8, 9]
    assert DEFAULT_N_AUTO_MODES == 3


def _fake_modes(coll: list[float]) -> NormalModes:
    n_modes, n = len(coll), 10
    return NormalModes(
        coordinates=np.arange(3 * n, dtype=np.float64).reshape(n, 3),
        eigenvalues=np.r_[np.zeros(6), np.arange(1, n_modes - 5)].astype(np.float64),
        vectors=np.full((n_modes, n, 3), 1.0 / np.sqrt(3 * n)),
        mode_numbers=np.arange(1, n_modes + 1, dtype=np.int64),
        collectivity=np.asarray(coll, dtype=np.float64),
    )


def test_align_chooses_modes_and_warns_about_explicit_local_ones(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from deephemnma_bridge.cli.align import _print_mode_table, choose_modes

    modes = _fake_modes([1.0] * 6 + [0.001, 0.43, 0.68, 0.5, 0.002, 0.6])
    chosen, table = choose_modes(modes, "auto")
    assert chosen == [8, 9, 10]
    assert [r["mode"] for r in table] == list(range(7, 13))
    assert [r["chosen"] for r in table] == [False, True, True, True, False, False]
    assert table[0]["collectivity"] == pytest.approx(0.001) and table[1]["eigenvalue"] == 2.0
    assert choose_modes(modes, "auto", n_auto_modes=2)[0] == [8, 9]
    assert choose_modes(modes, "auto", n_auto_modes=2, min_collectivity=0.55)[0] == [9, 12]
    with pytest.raises(InputError, match="--use-modes auto: only 2"):
        choose_modes(modes, "auto", min_collectivity=0.55)
    # an explicit list is kept, with a warning naming its local mode
    with pytest.warns(UserWarning, match=r"mode\(s\) 7 \(0.001\) have a collectivity below 0.2"):
        chosen, table = choose_modes(modes, [7, 8, 9])
    assert chosen == [7, 8, 9] and table[0]["chosen"]
    with pytest.warns(UserWarning, match=r"11 \(0.002\)"):
        choose_modes(modes, [8, 11], min_collectivity=0.1)
    with pytest.raises(InputError, match="given twice"):
        choose_modes(modes, [8, 8])
    with pytest.raises(InputError, match="auto only"):
        choose_modes(modes, [8, 9], n_auto_modes=2)
    with pytest.raises(InputError, match=r"\[0, 1\]"):
        choose_modes(modes, "auto", min_collectivity=-0.1)
    _print_mode_table(choose_modes(modes, "auto")[1], 0.2)
    lines = capsys.readouterr().out.splitlines()
    assert "chosen" in lines[0]
    assert lines[1].split()[0] == "7" and "local" in lines[1] and "*" not in lines[1]
    assert lines[2].split()[0] == "8" and lines[2].rstrip().endswith("*")


def test_align_and_run_default_to_auto(tmp_path: Path) -> None:
    from deephemnma_bridge.cli import align, run

    parser = argparse.ArgumentParser()
    align.add_args(parser)
    base = ["p.star", "--modes", "m.npz", "--out", "o"]
    assert parser.parse_args(base).use_modes == "auto"
    assert parser.parse_args([*base, "--use-modes", "AUTO"]).use_modes == "auto"
    assert parser.parse_args([*base, "--use-modes", "7,9,12"]).use_modes == [7, 9, 12]
    helps = {a.dest: a.help or "" for a in parser._actions}
    assert f"(default {DEFAULT_MIN_COLLECTIVITY:g})" in helps["min_collectivity"]
    assert f"({DEFAULT_N_AUTO_MODES})" in helps["n_auto_modes"]
    assert run.DEFAULTS["use_modes"] == "auto"
    config = tmp_path / "dhn.toml"
    config.write_text('use_modes = "auto"\n')
    rparser = argparse.ArgumentParser()
    run.add_args(rparser)
    opts = run.options_from(rparser.parse_args(["--out", "x", "--config", str(config)]))
    assert opts["use_modes"] == "auto"
    config.write_text("use_modes = [8, 9]\n")
    opts = run.options_from(rparser.parse_args(["--out", "x", "--config", str(config)]))
    assert opts["use_modes"] == "8,9"


def test_modes_table_marks_what_auto_takes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["modes", "--out", str(tmp_path / "adk.npz"), "--n-modes", "12"]) == 0
    out = capsys.readouterr().out
    rows = {int(line.split()[0]): line for line in out.splitlines() if line[:5].strip().isdigit()}
    assert all(rows[m].rstrip().endswith("auto") for m in (7, 8, 9))
    assert not any(rows[m].rstrip().endswith("auto") for m in (10, 11, 12))
    assert "align --use-modes auto (the default) takes modes 7,8,9" in out


def test_mode_numbers_take_ranges() -> None:
    import argparse

    from deephemnma_bridge.cli.align import _use_modes
    from deephemnma_bridge.nma.modes import parse_mode_numbers

    assert parse_mode_numbers("7-12") == [7, 8, 9, 10, 11, 12]
    assert parse_mode_numbers(" 7-9, 12 ") == [7, 8, 9, 12]
    assert parse_mode_numbers("8") == [8]
    for bad in ("9-7", "7,7", "0", "a-b", "", "7-8-9"):
        with pytest.raises(ValueError):
            parse_mode_numbers(bad)
    assert _use_modes("AUTO") == "auto" and _use_modes("7-9") == [7, 8, 9]
    with pytest.raises(argparse.ArgumentTypeError, match="7-12"):
        _use_modes("seven")
