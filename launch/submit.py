#!/usr/bin/env python
"""``align submit`` as a script, for checkouts without the ``align`` entry point installed.

    python launch/submit.py --fit_config configs/recipes/labse-multiway.yaml --nodes 2 --gpus_per_node 8 --dry_run

Same flags, same code: :func:`alignment.commands.submit.main`.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository, when alignment is not installed

from alignment.commands.submit import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
