"""N:M masks from in-group ranks (no sort, no ``lax.top_k``) equal the former top_k masks.

The reference below is the former implementation, kept verbatim: ``lax.top_k`` over each
group of ``|w|`` (ties to the lower index, NaN above every number) and, for
``compress_nm``, the kept offsets sorted within each group.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from sparsejax import nm


def topk_nm_mask(w, n: int, m: int, axis: int = -2):
    """The former ``nm_mask``."""
    axis = axis % w.ndim
    moved = jnp.moveaxis(jnp.abs(w), axis, -1)
    groups = moved.reshape(*moved.shape[:-1], moved.shape[-1] // m, m)
    _, idx = jax.lax.top_k(groups, n)  # lower index first among equal values
    keep = jnp.any(jax.nn.one_hot(idx, m, dtype=jnp.bool_), axis=-2)
    return jnp.moveaxis(keep.reshape(moved.shape), -1, axis)


def topk_compress_nm(w, n: int, m: int, axis: int = -2):
    """The former ``compress_nm``: ``(values, indices)`` as ``[G, N, *rest]``."""
    axis = axis % w.ndim
    moved = jnp.moveaxis(w, axis, 0)
    rest = moved.shape[1:]
    groups = moved.reshape(moved.shape[0] // m, m, -1)                   # [G, M, R]
    _, idx = jax.lax.top_k(jnp.abs(jnp.swapaxes(groups, 1, 2)), n)        # [G, R, N]
    idx = jnp.sort(idx, axis=-1)
    vals = jnp.take_along_axis(jnp.swapaxes(groups, 1, 2), idx, axis=-1)  # [G, R, N]
    to_gnr = lambda x: jnp.swapaxes(x, 1, 2).reshape(x.shape[0], n, *rest)  # noqa: E731
    return to_gnr(vals), to_gnr(idx).astype(jnp.uint8)


def _inputs(m: int, seed: int) -> np.ndarray:
    """``[5, 2·M, 6]`` float32, groups along axis 1: random normal; values from {0, ±1, ±2}
    (many ties); all equal; zeros (and -0.0); NaN, ±inf and ties among them."""
    rng = np.random.default_rng(seed)
    k = 2 * m
    normal = rng.standard_normal((k, 6))
    tied = rng.integers(0, 3, (k, 6)) * rng.choice([-1.0, 1.0], (k, 6))
    equal = np.full((k, 6), -1.5)
    zeros = np.where(rng.random((k, 6)) < 0.5, -0.0, 0.0)
    special = rng.choice(np.array([np.nan, np.inf, -np.inf, 1.0, -1.0, 0.0]), (k, 6))
    return np.stack([normal, tied, equal, zeros, special]).astype(np.float32)


def _layouts(w, m):
    """The ``[5, 2M, 6]`` inputs as a 3-D weight grouped along axis 1, a 2-D one along
    axis 0 and a 2-D one along axis -1."""
    flat = w.transpose(1, 0, 2).reshape(2 * m, -1)             # [2M, 30]
    return ((w, 1), (flat, 0), (flat.T, -1))


@pytest.mark.parametrize("m", [2, 4, 8, 16, 32])
def test_rank_mask_equals_top_k_for_every_n(m):
    """Every N in 1..M-1 (all three ways of computing the rank). ``nm_mask`` runs eagerly
    (its rank is jitted once per shape and M); the reference is one jit per M."""
    ns = range(1, m)
    reference = jax.jit(lambda w: [[topk_nm_mask(x, n, m, axis) for x, axis in _layouts(w, m)]
                                   for n in ns])
    w = jnp.asarray(_inputs(m, seed=m))
    for n, wants in zip(ns, reference(w)):
        for want, (x, axis) in zip(wants, _layouts(w, m)):
            np.testing.assert_array_equal(nm.nm_mask(x, n, m, axis), want,
                                          err_msg=f"{n}:{m} axis {axis}")
        got3d = np.asarray(nm.nm_mask(w, n, m, 1)).reshape(5, 2, m, 6)
        assert (got3d.sum(axis=2) == n).all()                # exactly N of every M


def test_rank_mask_ties_nan_and_dtypes():
    w = jnp.array([3.0, -7.0, 3.0, 0.0, np.nan, 1.0, np.inf, -np.nan])
    assert nm.nm_mask(w, 2, 4, axis=0).tolist() == [True, True, False, False,   # tie to index 0
                                                   True, False, False, True]   # |−NaN| = NaN
    np.testing.assert_array_equal(nm.nm_mask(w, 2, 4, axis=0), topk_nm_mask(w, 2, 4, 0))
    # NaN above inf, as top_k orders them; NaNs among themselves by payload
    payload = np.array([0x7FC00000, 0x7FC00001, 0x7F800000, 0x3F800000], np.uint32)
    w = jnp.asarray(payload.view(np.float32))
    for n in (1, 3):
        np.testing.assert_array_equal(nm.nm_mask(w, n, 4, axis=0), topk_nm_mask(w, n, 4, 0))
    x = jax.random.normal(jax.random.key(3), (32, 8))
    for dtype, patterns in ((jnp.bfloat16, ((2, 4), (1, 16), (15, 16))), (jnp.int32, ((2, 4),))):
        xd = (x * 4).astype(dtype)
        for n, m in patterns:
            np.testing.assert_array_equal(nm.nm_mask(xd, n, m), topk_nm_mask(xd, n, m))


@pytest.mark.parametrize("n,m", [(2, 4), (3, 8), (1, 32), (16, 32), (31, 32)])
def test_compress_roundtrip_equals_top_k(n, m):
    """Values and increasing offsets as before, for a 2-D weight along 0 and -1 and a 3-D
    one along its last axis; the dense weight back equals ``w`` where the mask keeps it."""
    def layouts(w):   # w [2M, 6]
        return ((w, 0), (w.T, -1), (w.reshape(2 * m, 2, 3).transpose(1, 2, 0), 2))

    @jax.jit
    def both(w):
        out = []
        for x, axis in layouts(w):
            c = nm.compress_nm(x, n, m, axis)
            out.append((c.values, c.indices, nm.decompress_nm(c), topk_compress_nm(x, n, m, axis),
                        jnp.where(topk_nm_mask(x, n, m, axis), x, 0)))
        return out

    for kind, w in enumerate(_inputs(m, seed=7 * m + n)):
        for (vals, idx, dense, (want_vals, want_idx), want_dense), (_, axis) in zip(
                both(jnp.asarray(w)), layouts(w)):
            where = f"kind {kind} axis {axis}"
            assert idx.dtype == jnp.uint8
            np.testing.assert_array_equal(idx, want_idx, err_msg=where)
            np.testing.assert_array_equal(vals, want_vals, err_msg=where)
            if kind != 4:   # NaN·0 is NaN: where NaNs are pruned the two differ
                np.testing.assert_array_equal(dense, want_dense, err_msg=where)


@pytest.mark.parametrize("n,m,axis", [(2, 4, 0), (1, 32, 0), (15, 16, 0), (6, 16, -1)])
def test_sharded_mask_equals_unsharded_without_all_gather(n, m, axis):
    devices = jax.devices()
    assert len(devices) == 8, "tests/conftest.py sets 8 host devices"
    mesh = Mesh(np.array(devices), ("x",))
    w = jax.random.normal(jax.random.key(1), (64, 64))
    spec = P(None, "x") if axis == 0 else P("x", None)     # shard the non-group axis
    ws = jax.device_put(w, NamedSharding(mesh, spec))
    fn = jax.jit(lambda w: nm.nm_mask(w, n, m, axis=axis))
    got = fn(ws)
    np.testing.assert_array_equal(got, nm.nm_mask(w, n, m, axis=axis))
    np.testing.assert_array_equal(got, topk_nm_mask(w, n, m, axis))
    hlo = fn.lower(ws).compile().as_text()
    assert "all-gather" not in hlo
    assert "sort" not in hlo and "topk" not in hlo.lower()
