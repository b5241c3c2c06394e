"""The sidecar bounds benchmark's estimators: order-0 entropy and the context-model estimate,
on residuals whose entropy is known."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

SPEC = importlib.util.spec_from_file_location(
    "sidecar_bounds", Path(__file__).resolve().parents[2] / "benchmarks" / "sidecar_bounds.py"
)
bounds = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(bounds)


def test_order0_entropy_of_a_fair_coin_and_of_a_constant():
    coin = np.array([0, 1] * 500)
    assert bounds.entropy_bits(coin) == pytest.approx(1000.0)
    assert bounds.entropy_bits(np.zeros(100, dtype=int)) == 0.0
    # Conditioning on the symbol itself leaves nothing.
    assert bounds.entropy_bits(coin, coin) == pytest.approx(0.0, abs=1e-9)


def test_context_model_finds_structure_that_order0_misses():
    rng = np.random.default_rng(0)
    noise = rng.integers(-2, 3, size=(40, 3, 16, 16))
    bits_iid, coded = bounds.context_model_bits(noise)
    order0 = bounds.entropy_bits(noise[20:]) / coded
    # Independent symbols: no model does much better than order 0 (a little, from fitting).
    assert bits_iid / coded == pytest.approx(order0, abs=0.25)
    # The second and third channels repeat the first: they cost almost nothing given it.
    copied = np.repeat(noise[:, :1], 3, axis=1)
    bits_copied, _ = bounds.context_model_bits(copied)
    assert bits_copied / coded < 0.5 * order0
