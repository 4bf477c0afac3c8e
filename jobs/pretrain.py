"""VideoMAE pretraining: ``python jobs/pretrain.py [--config FILE] [--set key=value ...]``.

No arguments: the embedded default (configs/pretrain_tiny_demo.yaml): a tiny model on the generated
sample dataset, local Ray, local MLflow, checkpoints under ./runs. On a cluster:
``ray job submit --working-dir . -- python jobs/pretrain.py --config pretrain_vit_b_k400 --set ...``.
"""

import sys

from pipeline.train.pretrain import main

if __name__ == "__main__":
    sys.exit(main())
