"""Training: loop, state, sharding, orbax checkpoints, data and metrics.

Example:

    >>> from configs import quickstart
    >>> from sparsejax.train import TRANSFORMS, make_trainer, train_and_evaluate
    >>> sorted(TRANSFORMS)                       # config.method.name
    ['dense', 'gradual', 'mdgf', 'nm_ste', 'one_shot', 'rigl', 'sdgf', 'set', 'sr_ste', 'static']
    >>> config = quickstart.get_config('rigl,0.9,tiny')
    >>> trainer = make_trainer(config)      # what train_and_evaluate(config, workdir) runs
    >>> type(trainer).__name__, trainer.global_batch, config.num_steps
    ('Trainer', 32, 20)
"""

from sparsejax.train.build import build, build_model, sparse_ift_plan
from sparsejax.train.checkpoint import CheckpointError, Checkpointer
from sparsejax.train.data import BatchIterator, DataInfo, Dataset, get_dataset
from sparsejax.train.loop import (MaskDispatch, MaskViolation, NonFiniteError, Trainer,
                                  make_trainer, train_and_evaluate, weighted_cross_entropy)
from sparsejax.train.metrics import MetricsWriter, read_jsonl
from sparsejax.train.optim import TRANSFORMS, make_optimizer, make_transform
from sparsejax.train.sharding import make_mesh, param_shardings, shardings_like_params
from sparsejax.train.state import TrainState

__all__ = ["BatchIterator", "CheckpointError", "Checkpointer", "DataInfo", "Dataset",
           "MaskDispatch", "MaskViolation", "MetricsWriter", "NonFiniteError", "TRANSFORMS", "TrainState", "build", "build_model", "sparse_ift_plan", "Trainer", "get_dataset", "make_mesh", "make_optimizer",
           "make_trainer", "make_transform", "param_shardings", "read_jsonl",
           "shardings_like_params", "train_and_evaluate", "weighted_cross_entropy"]
