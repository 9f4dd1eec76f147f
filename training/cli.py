"""What the training scripts share as commands: a featdeid error is one line on stderr and exit status 2."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable

from featdeid.errors import FeatdeidError


def reports_errors(main: Callable[..., int]) -> Callable[..., int]:
    """Wrap a script's ``main``: a :class:`FeatdeidError` prints ``error: ...`` and returns 2 (no traceback)."""

    @functools.wraps(main)
    def wrapped(*args, **kwargs) -> int:
        try:
            return main(*args, **kwargs)
        except FeatdeidError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2

    return wrapped
