"""VideoMAE finetuning: ``python jobs/finetune.py [--config FILE] [--set key=value ...]``.

No arguments: configs/finetune_tiny_demo.yaml, the pretraining demo's model (runs/pretrain-tiny-demo)
finetuned on the sample dataset's labels. On a cluster:
``ray job submit --working-dir . -- python jobs/finetune.py --config finetune_vit_b_k400 --set ...``.
"""

import sys

from pipeline.train.finetune import main

if __name__ == "__main__":
    sys.exit(main())
