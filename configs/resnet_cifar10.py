"""ResNet-20 on CIFAR-10 from tensorflow-datasets (SGD + Nesterov, cosine).

Prepare the data once (network needed):
    tfds build cifar10 --data_dir=$HOME/tensorflow_datasets --file_format=array_record
Then:
    python -m experiments.train --config configs/resnet_cifar10.py --workdir runs/resnet20 \
        --config.data.data_dir=$HOME/tensorflow_datasets
RigL at 90% (ERK, the default distribution): add ``:rigl,0.9`` to the config path;
Sparse-IFT (RigL, uniform): ``:wide,0.9`` or ``:parallel,0.75``; N:M: ``:sr_ste,2:4``.
"""

import ml_collections

from configs import common


def get_config(arg=None):
    c = common.base(
        arg, model_name="resnet", model=dict(depth=20, width=1, activation="relu"),
        # RigL's recipe keeps the first layer dense; Sparse-IFT also keeps the head dense.
        method=dict(rules=((r"stem/kernel", "dense"), (r"head/kernel", "dense"),
                             (r".*kernel", "sparse"))),
        data=ml_collections.ConfigDict(dict(name="tfds", tfds_name="cifar10", data_dir="",
                                            train_split="train", eval_split="test",
                                            image_key="image", label_key="label")))
    c.optimizer.update(name="sgd", learning_rate=0.1, momentum=0.9, nesterov=True,
                       weight_decay=5e-4, warmup_steps=500)
    c.batch_size = 128
    c.num_steps = 64000
    c.eval_every = 2000
    c.checkpoint_every = 2000
    return common.finalize(c, arg)
