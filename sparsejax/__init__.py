"""sparsejax: sparse training for JAX and Flax NNX.

Weight-sparsity transforms follow optax's ``(init, update)`` plus ``forward``; see
``sparsejax.base``. Training lives in ``sparsejax.train``, models in
``sparsejax.models``, kernels in ``sparsejax.kernels``. The layers, the transform contract
and one training step's data flow are in docs/architecture.md.

Example:

    >>> import jax.numpy as jnp
    >>> import optax, sparsejax
    >>> tx = sparsejax.rigl(optax.adamw(3e-4), 0.9, distribution=sparsejax.erk(), end_step=7500)
    >>> state = tx.init({'dense': {'kernel': jnp.ones((32, 16)), 'bias': jnp.zeros(16)}})
    >>> sparsejax.mask_counts(state.masks)   # (nonzeros, size); the bias stays dense
    {'dense/kernel': (51, 512)}
"""

from sparsejax.activations import (k_from_density, realised_density, statistical_threshold,
                                   statistical_topk, topk)
from sparsejax import paths
from sparsejax.base import (SparseTransformation, as_sparse_transformation, count_unmasked,
                            dense, forward, is_sparsity_state, mask_params, materialize,
                            sparse_model, sparse_weights, sparsity_states, value_and_grad)
from sparsejax.distributions import (Distribution, er, erk, get_distribution, layer_counts,
                                     layer_densities, uniform)
from sparsejax.flops import (densities_from_masks, layer_flops, model_flops, sparse_flops,
                             training_flops_per_step)
from sparsejax.dst import (SparseState, gradual_magnitude, init_masks, one_shot_magnitude,
                           rigl, set_, sparse_layer_counts, static_sparse)
from sparsejax.nm import (NMCompressed, NMState, compress_nm, decompress_nm, export_nm,
                          import_nm, mdgf, nm_mask, nm_masks_from_params, nm_sparse,
                          nm_ste, sdgf, sr_ste)
from sparsejax.surgery import default_rules
from sparsejax.masks import (apply_masks, global_sparsity, global_topk_masks, layer_topk_masks,
                             mask_counts, pack_masks, resolve_rules, topk_mask, unpack_masks)

__version__ = "0.1.0"

__all__ = [
    "k_from_density", "realised_density", "statistical_threshold", "statistical_topk", "topk",
    "NMCompressed", "NMState", "compress_nm", "decompress_nm", "export_nm", "import_nm",
    "mdgf", "nm_mask", "nm_masks_from_params", "nm_sparse", "nm_ste", "sdgf",
    "sr_ste",
    "count_unmasked", "default_rules", "forward", "is_sparsity_state", "mask_params", "materialize", "paths", "sparse_model", "sparse_weights",
    "sparsity_states", "value_and_grad",
    "Distribution", "SparseState", "SparseTransformation", "apply_masks",
    "as_sparse_transformation", "densities_from_masks", "dense", "er", "erk", "get_distribution", "global_sparsity",
    "global_topk_masks", "gradual_magnitude", "init_masks", "layer_counts", "layer_densities",
    "layer_flops", "layer_topk_masks", "mask_counts", "model_flops", "one_shot_magnitude", "pack_masks", "resolve_rules", "rigl", "set_",
    "sparse_flops", "sparse_layer_counts", "static_sparse", "topk_mask",
    "training_flops_per_step", "uniform", "unpack_masks",
]
