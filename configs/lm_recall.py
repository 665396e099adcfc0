"""Decoder-only LM on synthetic associative recall (embedded, no download).

    python -m experiments.train --config configs/lm_recall.py --workdir runs/lm_recall
    python -m experiments.train --config configs/lm_recall.py:rigl,0.8 --workdir runs/lm_rigl
    python -m experiments.train --config configs/lm_recall.py:sr_ste,2:4 --workdir runs/lm_srste
    python -m experiments.train --config configs/lm_recall.py:sdgf,1:8 --workdir runs/lm_sdgf

N:M applies to the attention projections and FFN kernels of every block.

At scale (docs/architecture.md, "Models at scale"): ``model.dtype='bfloat16'`` computes
in bfloat16 with float32 parameters (``model.param_dtype``), ``model.scan_layers=True``
stacks the blocks under ``nnx.scan`` with ``model.remat`` as each block's remat policy,
``model.attention='gqa'`` (``attention_options={'num_kv_heads': ...}``) is head-aligned
grouped-query attention, ``model.activation_sharding=('data', None, None)`` keeps the
residual stream batch-sharded under FSDP rules, and ``loss_chunk=512`` computes the logits 512 positions at a
time (0: all at once).

For byte-level LM on any text file:
    --config.data.name=text --config.data.path=README.md
"""

import ml_collections
from ml_collections.config_dict import placeholder

from configs import common


def get_config(arg=None):
    c = common.base(
        arg, model_name="lm",
        model=dict(d_model=128, num_heads=4, num_layers=2, d_ff=512, activation="gelu",
                   attention="dense", attention_options=placeholder(object), ffn="dense",
                   ffn_options=placeholder(object), dtype="float32", param_dtype="float32",
                   scan_layers=False, remat="none", activation_sharding=()),
        method=dict(rules=((r"head/kernel", "dense"), (r"blocks/.*kernel", "sparse"))),
        data=ml_collections.ConfigDict(dict(name="associative_recall", num_pairs=8,
                                            num_keys=16, num_values=16, train_size=20000,
                                            eval_size=1000, seed=0, path="", seq_len=128)))
    c.num_steps = 3000
    c.loss_chunk = 0  # train.loop.model_loss: > 0 computes the logits in chunks
    c.optimizer.learning_rate = 1e-3
    return common.finalize(c, arg)
