"""Measurements of emergent sparsity, for notebooks: runs, activations, masks, attention.

- ``runs``: read a ``train_and_evaluate`` workdir back (metrics as tidy rows, summary,
  config, checkpoints with their masks) and many runs as one table.
- ``activations``: the Lazy Neuron fraction of nonzero activations per layer (Li et al.
  2023), and a training hook that records it over training.
- ``essential``: one-shot magnitude-pruning sweeps and the sharp-drop point (essential
  sparsity, Jaiswal et al. 2023).
- ``dynamics``: DST mask turnover, N:M flip rate (Zhou et al. 2021), ITOP rate (Liu et
  al. 2021), and a training hook that snapshots masks.
- ``attention``: attention probabilities of a model's attention module and their top-k
  concentration.
- ``frontier``: the FLOPs–accuracy Pareto frontier and small plot helpers on an ``ax``.

Results are ``Table``s (a list of row dicts; ``to_pandas()`` if pandas is installed).

Example (a run records with ``train_and_evaluate(config, workdir, hooks=[masks, acts])``
and is read back with ``read_metrics(workdir)`` and ``load_checkpoint``; each module's
examples show those steps; here two mask snapshots are recorded by hand):

    >>> import numpy as np
    >>> from sparsejax import analysis
    >>> masks = analysis.MaskRecorder(every=100)
    >>> masks.record(0, {'dense': {'kernel': np.array([1, 1, 0, 0], bool)}})
    >>> masks.record(100, {'dense': {'kernel': np.array([0, 1, 1, 0], bool)}})
    >>> masks.turnover().where(layer=analysis.TOTAL)['turnover']
    [0.5]
    >>> runs = analysis.Table([{'flops': 1.0, 'accuracy': 0.90}, {'flops': 2.0, 'accuracy': 0.88},
    ...                        {'flops': 4.0, 'accuracy': 0.93}])
    >>> analysis.pareto_frontier(runs, x='flops', y='accuracy')['flops']
    [1.0, 4.0]
"""

from sparsejax.analysis.activations import ActivationSparsityRecorder, activation_sparsity_by_layer
from sparsejax.analysis.attention import attention_concentration, attention_probs
from sparsejax.analysis.dynamics import (TOTAL, InTimeOverParam, MaskRecorder, ever_active,
                                         find_masks, flip_rate, mask_dict, mask_turnover)
from sparsejax.analysis.essential import (SharpDrop, essential_sparsity_sweep, magnitude_masks,
                                          sharp_drop)
from sparsejax.analysis.frontier import (pareto_frontier, plot_activation_sparsity,
                                         plot_frontier, plot_mask_dynamics, plot_sweep)
from sparsejax.analysis.runs import (DEFAULT_RUN_KEYS, Checkpoint, checkpoint_steps,
                                     config_value, load_checkpoint, read_config, read_metrics,
                                     read_runs, read_summary)
from sparsejax.analysis.table import Table, as_table
from sparsejax.nm import nm_masks_from_params  # the N:M masks live with the transforms

__all__ = [
    "ActivationSparsityRecorder", "Checkpoint", "DEFAULT_RUN_KEYS", "InTimeOverParam",
    "MaskRecorder", "SharpDrop", "TOTAL", "Table", "activation_sparsity_by_layer", "as_table",
    "attention_concentration", "attention_probs", "checkpoint_steps", "config_value",
    "essential_sparsity_sweep", "ever_active", "find_masks", "flip_rate", "load_checkpoint",
    "magnitude_masks", "mask_dict", "mask_turnover", "nm_masks_from_params",
    "pareto_frontier", "plot_activation_sparsity", "plot_frontier", "plot_mask_dynamics",
    "plot_sweep", "read_config", "read_metrics", "read_runs", "read_summary", "sharp_drop",
]
