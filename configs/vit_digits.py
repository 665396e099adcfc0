"""A small ViT (patch 2, ReLU FFN) on the embedded 8×8 digits; 'vit_digits.py:gelu' too.

    python -m experiments.train --config configs/vit_digits.py --workdir runs/vit_digits
"""

import ml_collections

from configs import common


def get_config(arg=None):
    act = "gelu" if arg and "gelu" in arg else "relu"
    c = common.base(
        model=ml_collections.ConfigDict(dict(name="vit", patch_size=2, d_model=64, num_heads=4,
                                             num_layers=2, d_ff=256, activation=act,
                                             attention="dense", ffn="dense")),
        data=ml_collections.ConfigDict(dict(name="digits", eval_size=360)))
    c.num_steps = 2000
    return common.finalize(c, (arg or "").replace("gelu", "").strip(","))
