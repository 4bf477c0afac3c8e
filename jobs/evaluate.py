"""Multi-view evaluation of a finetuned VideoMAE classifier (Ray Data batch inference, MLflow).

    python jobs/evaluate.py                  # the demo finetune's model on the sample test split
    python jobs/evaluate.py --config eval_k400 --set model_uri=s3://bucket/runs/ft-k400 --set data.uri=...

Writes metrics.json, predictions.parquet and confusion_matrix.png to <storage_path>/<run_name>/.
"""

import sys

from pipeline.eval.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
