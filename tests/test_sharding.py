"""Meshes and path-rule shardings."""

import jax
import jax.numpy as jnp
import optax
import pytest
from jax.sharding import PartitionSpec as P

from sparsejax.train.sharding import (make_mesh, named_leaves, param_shardings, path_str,
                                      shardings_like_params)

PARAMS = {"layers": {0: {"kernel": jnp.ones((8, 16)), "bias": jnp.ones(16)}},
          "head": {"kernel": jnp.ones((16, 10)), "bias": jnp.ones(10)}}


def test_make_mesh_fills_and_validates():
    assert dict(make_mesh((-1, 2), ("data", "model")).shape) == {"data": 4, "model": 2}
    with pytest.raises(ValueError, match="needs 6 devices, but 8 are available"):
        make_mesh((3, 2), ("data", "model"))
    with pytest.raises(ValueError, match="not divisible by 3"):
        make_mesh((-1, 3), ("data", "model"))
    with pytest.raises(ValueError, match="differ in length"):
        make_mesh((8,), ("data", "model"))


def test_rules_first_match_wins_and_default_replicates():
    mesh = make_mesh((4, 2), ("data", "model"))
    rules = [(r"layers/.*/kernel", (None, "model")), (r".*kernel", ("model", None))]
    sh = param_shardings(PARAMS, rules, mesh)
    assert sh["layers"][0]["kernel"].spec == P(None, "model")
    assert sh["head"]["kernel"].spec == P("model", None)
    assert sh["head"]["bias"].spec == P()
    assert [n for n, _ in named_leaves(PARAMS)] == ["head/bias", "head/kernel",
                                                     "layers/0/bias", "layers/0/kernel"]


def test_rule_errors_name_the_problem():
    mesh = make_mesh((4, 2), ("data", "model"))
    with pytest.raises(ValueError, match=r"match no parameter: \['encoder/.*'\]"):
        param_shardings(PARAMS, [("encoder/.*", ("model",))], mesh)
    with pytest.raises(ValueError, match="'head/bias' dimension 10 is not divisible by mesh "
                                         "axis 'data' of size 4"):
        param_shardings(PARAMS, [("head/bias", ("data",))], mesh)
    with pytest.raises(ValueError, match="mesh has no axis 'tensor'"):
        param_shardings(PARAMS, [(".*kernel", ("tensor",))], mesh)


def test_optimizer_state_is_sharded_like_params():
    mesh = make_mesh((4, 2), ("data", "model"))
    sh = param_shardings(PARAMS, [(r".*kernel", (None, "model"))], mesh)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3))
    opt_sh = shardings_like_params(jax.eval_shape(tx.init, PARAMS), PARAMS, sh, mesh)
    leaves = dict(named_leaves(opt_sh))
    assert leaves["1/0/mu/layers/0/kernel"].spec == P(None, "model")
    assert leaves["1/0/nu/head/kernel"].spec == P(None, "model")
    assert leaves["1/0/mu/head/bias"].spec == P()
    assert leaves["1/0/count"].spec == P()
    # the sharded init really places moments that way
    state = jax.jit(tx.init, out_shardings=opt_sh)(
        jax.tree.map(lambda x, s: jax.device_put(x, s), PARAMS, sh))
    assert state[1][0].mu["layers"][0]["kernel"].sharding.spec == P(None, "model")


def test_path_str():
    flat = jax.tree_util.tree_flatten_with_path({"a": [{"b": 1}]})[0]
    assert path_str(flat[0][0]) == "a/0/b"
