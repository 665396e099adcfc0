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

Example::

    from sparsejax import analysis
    from sparsejax.train import make_trainer, train_and_evaluate

    trainer = make_trainer(config)
    masks, acts = analysis.MaskRecorder(every=100), analysis.ActivationSparsityRecorder(
        trainer, lambda m: m(x), every=100)
    train_and_evaluate(config, workdir, hooks=[masks, acts])
    analysis.read_metrics(workdir).where(split='eval', metric='accuracy')
    masks.turnover().where(layer=analysis.TOTAL)['turnover']
    analysis.load_checkpoint(workdir, analysis.checkpoint_steps(workdir)[-1], trainer).masks
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
