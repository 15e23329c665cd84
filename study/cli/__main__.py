"""``python -m study.cli``: the same as the ``study`` console script."""

import sys

from study.cli import main

sys.exit(main())
