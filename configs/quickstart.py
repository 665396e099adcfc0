"""Quickstart: a 2-layer ReLU MLP on scikit-learn's embedded 8×8 digits, on CPU in seconds.

    python -m experiments.train --config configs/quickstart.py --workdir runs/quickstart
    python -m experiments.train --config configs/quickstart.py:tiny --workdir /tmp/qs
    python -m experiments.train --config configs/quickstart.py:rigl,0.9 --workdir runs/qs_rigl
    python -m experiments.train --config configs/quickstart.py:mdgf,1:8 --workdir runs/qs_mdgf
    python -m experiments.train --config configs/quickstart.py:doped,0.75 --workdir runs/qs_doped

Overrides: ``--config.num_steps=200 --config.model.hidden='(64,)'``
(``config.model`` holds ``MLP``'s constructor arguments).
"""

import ml_collections

from configs import common


def get_config(arg=None):
    c = common.base(
        arg, model_name="mlp", model=dict(hidden=(256, 256), activation="relu"),
        data=ml_collections.ConfigDict(dict(name="digits", eval_size=360, random_labels=False)),
        method=dict(rules=((r"head/kernel", "dense"), (r".*kernel", "sparse"))))
    c.num_steps = 1500
    c.eval_every = 250
    return common.finalize(c, arg)
