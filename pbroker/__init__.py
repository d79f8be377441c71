"""
pbroker: a Perspective Broker for Twisted.

A drop-in for :mod:`twisted.spread` that speaks Twisted PB version 6 on the wire. Its modules
mirror Twisted's: :mod:`pbroker.banana` (the s-expression codec), :mod:`pbroker.jelly` (object
serialisation). The broker itself (``pbroker.pb``, ``pbroker.flavors``, ``pbroker.util``) is
being built on top of them.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

__all__ = ["__version__"]

try:
    #: The installed version; pyproject.toml is its only source.
    __version__ = version("pbroker")
except PackageNotFoundError:  # imported from a checkout that was never installed
    __version__ = "0+unknown"
