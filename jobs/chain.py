"""pretrain -> finetune -> evaluate in one command: ``python jobs/chain.py [--config F] [--set k=v]``.

No arguments: configs/chain_tiny_demo.yaml, the whole chain on a generated sample dataset, locally.
Rerunning the same command skips the finished stages and resumes the unfinished one.
"""

import sys

from pipeline.chain import main

if __name__ == "__main__":
    sys.exit(main())
