"""pretrain -> finetune -> evaluate in one command: ``python jobs/pipeline.py [--config F] [--set k=v]``.

No arguments: configs/pipeline_tiny_demo.yaml, the whole chain on a generated sample dataset, locally.
Rerunning the same command skips the finished stages and resumes the unfinished one.
"""

import os
import sys

JOBS_DIR = os.path.dirname(os.path.abspath(__file__))
# The repo first, and not jobs/ itself: Ray hands this path to its workers, where jobs/pipeline.py would
# shadow the `pipeline` package.
sys.path[:] = [os.path.dirname(JOBS_DIR)] + [p for p in sys.path if os.path.abspath(p or ".") != JOBS_DIR]

from pipeline.chain import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
