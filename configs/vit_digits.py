"""A small ViT (patch 2, ReLU FFN) on the embedded 8×8 digits; ':gelu' for a GELU FFN.

    python -m experiments.train --config configs/vit_digits.py --workdir runs/vit_digits
    python -m experiments.train --config configs/vit_digits.py:rigl,0.9 --workdir runs/vit_rigl
    python -m experiments.train --config configs/vit_digits.py:mdgf,1:8 --workdir runs/vit_mdgf
    python -m experiments.train --config configs/vit_digits.py:wide,0.75 --workdir runs/vit_wide

N:M and Sparse-IFT apply to the attention projections and FFN kernels of every block
(patch embedding and head stay dense).
"""

import ml_collections

from configs import common


def get_config(arg=None):
    act = "gelu" if "gelu" in common.parse_arg(arg, ("gelu",))["extra"] else "relu"
    c = common.base(
        model=ml_collections.ConfigDict(dict(name="vit", patch_size=2, d_model=64, num_heads=4,
                                             num_layers=2, d_ff=256, activation=act,
                                             attention="dense", ffn="dense", ffn_density=0.08,
                                             attn_k=256, attn_pattern="window", attn_block=16,
                                             attn_window=32, attn_sinks=4, attn_stride=32,
                                             attn_keep=2)),
        data=ml_collections.ConfigDict(dict(name="digits", eval_size=360, random_labels=False)))
    c.num_steps = 2000
    c.sparsity.rules = ((r"embed/kernel", "dense"), (r"head/kernel", "dense"),
                        (r".*kernel", "sparse"))
    return common.finalize(c, arg, extra=("gelu",))
