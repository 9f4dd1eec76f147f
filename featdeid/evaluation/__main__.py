"""``python -m featdeid.evaluation ...`` is ``featdeid eval ...``."""

import sys

from .cli import main

sys.exit(main())
