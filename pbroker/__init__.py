"""
pbroker: a Perspective Broker for Twisted.

A drop-in for :mod:`twisted.spread` that speaks Twisted PB version 6 on the wire. Its modules
mirror Twisted's: :mod:`pbroker.pb` (the broker), :mod:`pbroker.flavors`, :mod:`pbroker.util`,
:mod:`pbroker.banana` (the s-expression codec) and :mod:`pbroker.jelly` (object serialisation).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["__version__"]

if TYPE_CHECKING:
    __version__: str
else:
    # (Hidden from type checkers, which would take any name as one of its.)

    def __getattr__(name: str) -> Any:
        # The version is read from the installed metadata on first use: importlib.metadata
        # is costly to import, and most programs never ask.
        if name != "__version__":
            raise AttributeError(f"module 'pbroker' has no attribute {name!r}")
        from importlib.metadata import PackageNotFoundError, version

        try:
            found = version("pbroker")  # pyproject.toml is its only source
        except PackageNotFoundError:  # imported from a checkout that was never installed
            found = "0+unknown"
        globals()["__version__"] = found
        return found
