"""Multi-view evaluation of a finetuned VideoMAE classifier (Ray Data batch inference, MLflow).

    python jobs/evaluate.py                  # the demo finetune's model on the sample test split
    python jobs/evaluate.py --config eval_k400 --set model_uri=s3://bucket/runs/ft-k400 --set data.uri=...

Writes metrics.json, predictions.parquet and confusion_matrix.png to <storage_path>/<run_name>/.
"""

import os
import sys

JOBS_DIR = os.path.dirname(os.path.abspath(__file__))
# The repo first, and not jobs/ itself: Ray hands this path to its workers, where jobs/pipeline.py would
# shadow the `pipeline` package.
sys.path[:] = [os.path.dirname(JOBS_DIR)] + [p for p in sys.path if os.path.abspath(p or ".") != JOBS_DIR]

from pipeline.eval.evaluate import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
