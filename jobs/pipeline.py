"""pretrain -> finetune -> evaluate in one command: ``python jobs/pipeline.py [--config F] [--set k=v]``.

No arguments: configs/pipeline_tiny_demo.yaml, the whole chain on a generated sample dataset, locally.
Rerunning the same command skips the finished stages and resumes the unfinished one.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo's `pipeline`

from pipeline.chain import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
