"""
The optional C extension ``pbroker._speedups``, or ``None``.

``pip install`` builds it where a C compiler and the Python headers are at hand; without it,
and whenever the environment variable ``PBROKER_PURE_PYTHON`` is set (to anything but the empty
string) when pbroker is imported, the codec runs its pure-Python loops, which give the same
results.
"""

from __future__ import annotations

import os
from types import ModuleType


def load() -> ModuleType | None:
    """
    Import ``pbroker._speedups`` unless it is missing or ``PBROKER_PURE_PYTHON`` is set.
    """
    if os.environ.get("PBROKER_PURE_PYTHON"):
        return None
    try:
        from pbroker import _speedups
    except ImportError:
        return None
    return _speedups


speedups = load()
