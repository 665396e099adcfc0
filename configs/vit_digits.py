"""A small ViT (patch 2, ReLU FFN) on the embedded 8×8 digits; ':gelu' for a GELU FFN.

    python -m experiments.train --config configs/vit_digits.py --workdir runs/vit_digits
    python -m experiments.train --config configs/vit_digits.py:rigl,0.9 --workdir runs/vit_rigl
    python -m experiments.train --config configs/vit_digits.py:mdgf,1:8 --workdir runs/vit_mdgf
    python -m experiments.train --config configs/vit_digits.py:wide,0.75 --workdir runs/vit_wide

N:M and Sparse-IFT apply to the attention projections and FFN kernels of every block
(patch embedding and head stay dense).
"""

import ml_collections
from ml_collections.config_dict import placeholder

from configs import common


def get_config(arg=None):
    act = "gelu" if "gelu" in common.parse_arg(arg, ("gelu",))["extra"] else "relu"
    c = common.base(
        arg, model_name="vit", extra=("gelu",),
        model=dict(patch_size=2, d_model=64, num_heads=4, num_layers=2, d_ff=256,
                   activation=act, attention="dense", attention_options=placeholder(object),
                   ffn="dense", ffn_options=placeholder(object)),
        data=ml_collections.ConfigDict(dict(name="digits", eval_size=360, random_labels=False)),
        method=dict(rules=((r"embed/kernel", "dense"), (r"head/kernel", "dense"),
                             (r".*kernel", "sparse"))))
    c.num_steps = 2000
    return common.finalize(c, arg, extra=("gelu",))
