"""Schedules against their formulas at chosen steps."""

import math

import numpy as np
import pytest

from sparsejax import schedules as S


def test_cosine_drop_fraction():
    f = S.cosine_drop_fraction(0.3, 7500)
    for t in (0, 1000, 3750, 7500, 9000):
        want = 0.3 * 0.5 * (1 + math.cos(math.pi * min(t, 7500) / 7500))
        assert float(f(t)) == pytest.approx(want, abs=1e-7)
    assert float(f(3750)) == pytest.approx(0.15)
    assert float(S.constant_drop_fraction(0.3)(5000)) == pytest.approx(0.3)
    with pytest.raises(ValueError, match="unknown drop_fraction_anneal 'linear'"):
        S.drop_fraction_schedule(0.3, "linear", 10)


def test_gradual_sparsity_zhu_gupta():
    s = S.gradual_sparsity(0.9, begin_step=100, end_step=1100, initial=0.1)
    assert float(s(0)) == pytest.approx(0.1)
    assert float(s(100)) == pytest.approx(0.1)
    assert float(s(600)) == pytest.approx(0.9 + (0.1 - 0.9) * 0.5 ** 3)
    assert float(s(1100)) == pytest.approx(0.9) and float(s(5000)) == pytest.approx(0.9)
    assert float(S.gradual_sparsity(0.9, 0, 100)(50)) == pytest.approx(0.7875)


def test_is_update_step():
    got = [t for t in range(0, 700) if bool(S.is_update_step(t, 100, 50, 450))]
    assert got == [50, 150, 250, 350, 450]
    assert np.asarray(S.is_update_step(np.array([0, 100, 101]), 100, 0, 1000)).tolist() == [
        True, True, False]
