"""The chain's old name: ``python jobs/pipeline.py`` still runs ``jobs/chain.py`` until 0.2, which removes it.

It is a folder with this ``__main__.py``, not a ``pipeline.py`` file: Python runs the folder as a script,
and a folder named ``pipeline.py`` cannot shadow the ``pipeline`` package for the other scripts in jobs/
(a file of that name did, which is why the job scripts had to edit ``sys.path``).
"""

import sys

from pipeline.chain import main

if __name__ == "__main__":
    print("note: jobs/pipeline.py is now jobs/chain.py; the old name goes next release", file=sys.stderr)
    sys.exit(main())
