"""VideoMAE finetuning: ``python jobs/finetune.py [--config FILE] [--set key=value ...]``.

No arguments: configs/finetune_tiny_demo.yaml, the pretraining demo's model (runs/pretrain-tiny-demo)
finetuned on the sample dataset's labels. On a cluster:
``ray job submit --working-dir . -- python jobs/finetune.py --config finetune_vit_b_k400 --set ...``.
"""

import os
import sys

JOBS_DIR = os.path.dirname(os.path.abspath(__file__))
# The repo first, and not jobs/ itself: Ray hands this path to its workers, where jobs/pipeline.py would
# shadow the `pipeline` package.
sys.path[:] = [os.path.dirname(JOBS_DIR)] + [p for p in sys.path if os.path.abspath(p or ".") != JOBS_DIR]

from pipeline.train.finetune import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
