"""Frozen-feature probes of an encoder: ``python jobs/probe.py [--config FILE] [--set key=value ...]``.

No arguments: the pretraining demo's encoder (runs/pretrain-tiny-demo) on the sample dataset, kNN and
linear-probe top-1 on its test split; ``--set model_uri=`` probes a random init (the baseline). On a
cluster: ``ray job submit --working-dir . -- python jobs/probe.py --set model_uri=s3://bucket/runs/x``.
"""

import os
import sys

JOBS_DIR = os.path.dirname(os.path.abspath(__file__))
# The repo first, and not jobs/ itself: Ray hands this path to its workers, where jobs/pipeline.py would
# shadow the `pipeline` package.
sys.path[:] = [os.path.dirname(JOBS_DIR)] + [p for p in sys.path if os.path.abspath(p or ".") != JOBS_DIR]

from pipeline.eval.probing import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
