"""
pbroker: a Perspective Broker for Twisted.

A drop-in for :mod:`twisted.spread` that speaks Twisted PB version 6 on the wire. Its modules
mirror Twisted's: :mod:`pbroker.banana` (the s-expression codec), :mod:`pbroker.jelly` (object
serialisation). The broker itself (``pbroker.pb``, ``pbroker.flavors``, ``pbroker.util``) is
being built on top of them.
"""

from __future__ import annotations

__all__ = ["__version__"]

__version__ = "0.1.0.dev0"
