"""Counts and statistics that never overflow or wrap (the scale issue, item 1).

Sizes beyond 2**31 are checked with abstract shapes only (``jax.eval_shape``: nothing is
allocated); the block path that makes them possible is checked on small masks against
numpy by lowering the int32 limit.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sparsejax
from sparsejax import masks
from sparsejax.train.loop import sparsity_stats

BIG = jax.ShapeDtypeStruct((40_000, 40_000), jnp.float32)  # 1.6e9 entries per kernel


@pytest.mark.parametrize("shape", [(7, 5), (3, 4, 6), (35,), (2, 35), ()])
def test_block_counts_equal_numpy_past_a_lowered_limit(monkeypatch, shape):
    """With the int32 limit lowered to 6, every shape takes the block path (rows split
    into equal blocks of at most 6 where they are longer); counts equal numpy's."""
    monkeypatch.setattr(masks, "_INT32_MAX", 6)
    m = jax.random.bernoulli(jax.random.PRNGKey(len(shape)), 0.4, shape)
    want = int(np.sum(np.asarray(m)))
    blocks = np.asarray(masks.row_counts(m))
    assert blocks.sum() == want and (blocks <= 7).all()
    if m.size > 6:
        with pytest.raises(OverflowError, match=f"a mask of {m.size} entries .* int32 holds"):
            masks.count_true(m)
    assert float(masks.count_true(m, jnp.float32)) == want
    assert masks.mask_counts({"w": m})["w"] == (want, max(m.size, 1))


def test_counts_past_int32_need_no_memory_and_never_wrap():
    """Abstract masks of 3 × 1.6e9 entries: the statistics trace (float32), while an
    int32 count of one 2**31-entry mask is refused rather than wrapped."""
    params = {f"l{i}": {"kernel": BIG} for i in range(3)}
    tx = sparsejax.rigl(optax.sgd(0.1), 0.9, end_step=10, selection="threshold")
    state = jax.eval_shape(tx.init, params)
    stats = jax.eval_shape(sparsity_stats, state)
    assert stats["sparsity"].dtype == jnp.float32
    n = jax.eval_shape(sparsejax.count_unmasked, params, state)
    assert n.dtype == jnp.float32
    huge = jax.ShapeDtypeStruct((2**31 + 1,), jnp.bool_)
    assert jax.eval_shape(lambda m: masks.count_true(m, jnp.float32), huge).dtype == jnp.float32
    with pytest.raises(OverflowError, match="a mask of 2147483649 entries"):
        jax.eval_shape(masks.count_true, huge)
    with pytest.raises(OverflowError, match="selection over 2147483649 entries"):
        jax.eval_shape(lambda s: masks.topk_mask(s, 10, method="threshold"),
                       jax.ShapeDtypeStruct((2**31 + 1,), jnp.float32))


def test_nm_diagnostics_past_int32_trace():
    """The N:M flip rate and pruned-gradient statistics over 4.8e9 entries (abstract)."""
    params = {f"l{i}": {"kernel": BIG} for i in range(3)}
    tx = sparsejax.sr_ste(optax.sgd(0.1), [(r".*kernel", "2:4")], diagnostics_every=1)
    state = jax.eval_shape(tx.init, params)
    _, new = jax.eval_shape(tx.update, params, state, params)
    assert all(v.dtype == jnp.float32 for v in new.diagnostics.values())


def test_float_counts_equal_int_counts_where_both_exact():
    """Below 2**24 the float32 statistics are the exact counts (a hand-made mask)."""
    m = jnp.zeros((300, 7), bool).at[::3, 2].set(True).at[5, :].set(True)
    want = 100 + 7  # rows 0, 3, …, 297 at column 2, plus all of row 5 (no overlap: 5 % 3)
    assert int(masks.count_true(m)) == want
    assert float(masks.count_true(m, jnp.float32)) == want
