"""Decoder-only LM on the Python standard library's sources, BPE-tokenised (no download).

    python -m experiments.train --config configs/lm_text.py --workdir runs/lm_text
    python -m experiments.train --config configs/lm_text.py:rigl,0.9 --workdir runs/lm_text_rigl
    python -m experiments.train --config configs/lm_text.py:tiny --workdir /tmp/lm_text

The first run prepares the data once (``sparsejax.train.tokens``: a byte-level BPE
tokenizer trained on the corpus, windows of ``seq_len + 1`` tokens in ArrayRecord
shards) under ``config.data.data_dir`` (default ``~/.cache/sparsejax/tokens``), in a
directory named by a hash of the settings and the corpus; later runs with the same
settings reuse it. On several hosts each process reads only its own shards, so
``num_shards`` should be a multiple of the process count. Any text works as the corpus:
``--config.data.corpus='docs/*.md,README.md'``.

``tiny`` trains a small model for a few steps on ``json``'s five modules with a
512-token vocabulary (seconds on a CPU).
"""

import ml_collections
from ml_collections.config_dict import placeholder

from configs import common


def get_config(arg=None):
    tiny = common.parse_arg(arg)["tiny"]
    if tiny:
        model = dict(d_model=64, num_heads=4, num_layers=2, d_ff=128)
        data = dict(corpus="stdlib/json/*.py", vocab_size=512, seq_len=32, num_shards=2)
    else:
        model = dict(d_model=256, num_heads=4, num_layers=4, d_ff=1024)
        data = dict(corpus="stdlib", vocab_size=4096, seq_len=128, num_shards=8)
    c = common.base(
        arg, model_name="lm",
        model=dict(model, activation="gelu", attention="dense",
                   attention_options=placeholder(object), ffn="dense",
                   ffn_options=placeholder(object)),
        method=dict(rules=((r"head/kernel", "dense"), (r"blocks/.*kernel", "sparse"))),
        data=ml_collections.ConfigDict(dict(name="tokens", eval_fraction=0.05, data_dir="",
                                            **data)))
    c.num_steps = 3000
    c.batch_size = 64
    c.optimizer.learning_rate = 1e-3
    return common.finalize(c, arg)
