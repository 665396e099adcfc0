"""Layer-wise densities: uniform, ER, ERK against their closed forms."""

import math

import pytest
from hypothesis import given, settings, strategies as st

from sparsejax import distributions as D

shapes_st = st.dictionaries(st.sampled_from("abcdefgh"),
                            st.one_of(st.tuples(st.integers(2, 300), st.integers(2, 300)),
                                      st.tuples(st.sampled_from([1, 3]), st.sampled_from([1, 3]),
                                                st.integers(1, 64), st.integers(1, 64))),
                            min_size=1, max_size=6)


@settings(max_examples=80, deadline=None)
@given(shapes_st, st.floats(0.0, 0.99), st.sampled_from(["uniform", "er", "erk"]),
       st.sampled_from([0.5, 1.0]))
def test_counts_hit_target_exactly_and_follow_closed_form(shapes, sparsity, name, power):
    dist = D.get_distribution(name, power)
    counts = D.layer_counts(dist, shapes, sparsity)
    size = {k: math.prod(s) for k, s in shapes.items()}
    assert sum(counts.values()) == round((1 - sparsity) * sum(size.values()))
    assert all(0 <= counts[k] <= size[k] for k in shapes)
    # independent re-derivation of the closed form on the layers that were not made dense
    raw = {k: (1.0 if name == "uniform" else
               (sum(s[-2:] if name == "er" else s) / math.prod(s[-2:] if name == "er" else s))
               ** power) for k, s in shapes.items()}
    dense = {k for k in shapes if counts[k] == size[k]}
    rest = [k for k in shapes if k not in dense]
    if rest:
        target = round((1 - sparsity) * sum(size.values())) - sum(size[k] for k in dense)
        eps = target / sum(raw[k] * size[k] for k in rest)
        for k in rest:
            assert abs(counts[k] - eps * raw[k] * size[k]) <= 1.0  # largest-remainder rounding
            assert eps * raw[k] <= 1.0 + 1e-9
        # a layer is dense only if the solve would have pushed it past density 1
        for k in dense:
            assert eps * raw[k] >= 1.0 - 1.0 / size[k] - 1e-9


def test_erk_hand_worked_example():
    # raw(a)=(10+10)/100=0.2, raw(b)=(100+100)/10^4=0.02; S=0.5: ε·(0.2·100+0.02·10^4)
    # = 0.5·10100 → ε=22.95; a would get 4.59 > 1 → dense (100); then
    # ε=(5050−100)/200=24.75 → b: 0.495·10^4 = 4950.
    counts = D.layer_counts(D.erk(), {"a": (10, 10), "b": (100, 100)}, 0.5)
    assert counts == {"a": 100, "b": 4950}


def test_er_ignores_spatial_dims_and_custom_is_left_out():
    assert D.raw_score(D.er(), (3, 3, 16, 32)) == D.raw_score(D.er(), (16, 32))
    assert D.raw_score(D.erk(), (3, 3, 16, 32)) == pytest.approx(54 / (9 * 16 * 32))
    shapes = {"a": (100, 100), "b": (50, 50), "c": (20, 20)}
    counts = D.layer_counts(D.uniform(), shapes, 0.9, custom={"c": 0.25})
    assert counts["c"] == 300
    assert counts["a"] + counts["b"] == round(0.1 * 12500)


def test_bad_input():
    with pytest.raises(ValueError, match="sparsity 1.0 is outside"):
        D.layer_counts(D.uniform(), {"a": (2, 2)}, 1.0)
    with pytest.raises(ValueError, match="sparsity -0.1 is outside"):
        D.layer_counts(D.uniform(), {"a": (2, 2)}, -0.1)
    with pytest.raises(ValueError, match="unknown distribution 'erk2'"):
        D.get_distribution("erk2")
