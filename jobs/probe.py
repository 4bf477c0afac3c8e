"""Frozen-feature probes of an encoder: ``python jobs/probe.py [--config FILE] [--set key=value ...]``.

No arguments: the pretraining demo's encoder (runs/pretrain-tiny-demo) on the sample dataset, kNN and
linear-probe top-1 on its test split; ``--set model_uri=`` probes a random init (the baseline). On a
cluster: ``ray job submit --working-dir . -- python jobs/probe.py --set model_uri=s3://bucket/runs/x``.
"""

import sys

from pipeline.eval.probing import main

if __name__ == "__main__":
    sys.exit(main())
