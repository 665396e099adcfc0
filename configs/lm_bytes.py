"""A small byte-level decoder LM on a pinned corpus that ships with CPython 3.11.7 (the
standard library's top-level modules, ``data.stdlib_bytes``; no download), sized to
underfit on a 2-core CPU: 1000 steps see each training byte at most once, so validation loss is
still falling at the end and train ≈ validation, and capacity and sparsity show in the
loss (bits per byte = loss / ln 2).

    python -m experiments.train --config configs/lm_bytes.py --workdir runs/lm_bytes
    python -m experiments.train --config configs/lm_bytes.py:rigl,0.9 --workdir runs/lm_bytes_rigl
    python -m experiments.train --config configs/lm_bytes.py:tiny --workdir /tmp/lm_bytes

ReLU FFNs (so FFN activation density is measurable, Lazy Neuron); the embedding and
the output head stay dense (rules), every block kernel is sparse.
"""

import ml_collections

from configs import common


def get_config(arg=None):
    c = common.base(
        arg, model_name="lm",
        model=dict(d_model=128, num_heads=4, num_layers=2, d_ff=512, activation="relu"),
        method=dict(rules=((r"head/kernel", "dense"), (r"blocks/.*kernel", "sparse"))),
        data=ml_collections.ConfigDict(dict(name="stdlib_bytes", seq_len=128)))
    c.num_steps = 1000
    c.batch_size = 32
    c.eval_every = 250
    c.optimizer.learning_rate = 3e-3
    return common.finalize(c, arg)
