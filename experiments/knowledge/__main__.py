"""`python -m experiments.knowledge ...`: see `experiments/knowledge/cli.py`."""

import sys

from experiments.knowledge.cli import main

sys.exit(main())
