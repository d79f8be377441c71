"""
The jelly interfaces, also under the module name Twisted gives them
(``twisted.spread.interfaces``), so that code importing them from there ports by changing
the import. They are defined in :mod:`pbroker.jelly`.
"""

from __future__ import annotations

from pbroker.jelly import IJellyable, IUnjellyable

__all__ = ["IJellyable", "IUnjellyable"]
