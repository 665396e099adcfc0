"""The transform contract and the dense identity transform."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sparsejax


def _params():
    k1, k2 = jax.random.split(jax.random.PRNGKey(0))
    return {"a": {"kernel": jax.random.normal(k1, (4, 3))}, "b": jax.random.normal(k2, (3,))}


def test_dense_matches_inner_optimizer_step_by_step():
    params, inner = _params(), optax.adamw(1e-2)
    tx = sparsejax.dense(inner)
    s_tx, s_in = tx.init(params), inner.init(params)
    p_tx = p_in = params
    for i in range(3):
        g = jax.tree.map(lambda x: jnp.sin(x * (i + 1)), p_tx)
        for a, b in zip(jax.tree.leaves(tx.forward(p_tx, s_tx)), jax.tree.leaves(p_tx)):
            assert a is b  # a plain optimizer's forward passes the arrays through
        u_tx, s_tx = tx.update(g, s_tx, p_tx)
        u_in, s_in = inner.update(g, s_in, p_in)
        p_tx, p_in = optax.apply_updates(p_tx, u_tx), optax.apply_updates(p_in, u_in)
    for a, b in zip(jax.tree.leaves(p_tx), jax.tree.leaves(p_in)):
        np.testing.assert_array_equal(a, b)


def test_dense_accepts_extra_args_and_chains():
    params = _params()
    tx = sparsejax.dense(optax.sgd(0.1))
    chained = optax.chain(optax.clip_by_global_norm(1.0), tx)
    state = chained.init(params)
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = chained.update(grads, state, params, loss=jnp.float32(1.0))
    norm = optax.tree.norm(grads)
    np.testing.assert_allclose(updates["b"], -0.1 * np.ones(3) / norm, rtol=1e-6)


def test_as_sparse_transformation():
    tx = sparsejax.dense(optax.sgd(0.1))
    assert sparsejax.as_sparse_transformation(tx) is tx
    wrapped = sparsejax.as_sparse_transformation(optax.sgd(0.1))
    assert isinstance(wrapped, sparsejax.SparseTransformation)
    with pytest.raises(TypeError, match="optax GradientTransformation"):
        sparsejax.as_sparse_transformation(object())
