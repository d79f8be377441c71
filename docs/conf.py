"""
Sphinx configuration for the pbroker documentation.

Build it from the repository root with warnings as errors::

    .venv/bin/python -m sphinx -W -b html docs docs/_build/html
"""

from __future__ import annotations

import sys
from pathlib import Path

# Let autodoc import pbroker from this checkout, installed or not.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

project = "pbroker"
author = "The pbroker developers"
copyright = "the pbroker developers"

extensions = ["sphinx.ext.autodoc", "repoze.sphinx.autointerface"]

root_doc = "index"
exclude_patterns = ["_build"]

html_theme = "alabaster"

# Every cross-reference to pbroker must resolve. Those to Twisted, zope.interface and the
# standard library cannot without their inventories (intersphinx would fetch them at each
# build), so they are let through as plain text.
nitpicky = True
nitpick_ignore_regex = [
    (r"py:.*", r"(twisted|zope|collections|types|typing|builtins)(\..*)?"),
    (r"py:.*", r".*<InterfaceClass .*"),
    (r"py:class", r"dict\[str"),
    (r"py:class", r"IStreamClientEndpoint"),  # (imported for type checking only)
    (r"py:class", r"Deferred|Handler"),  # (names in annotations, as older Sphinx shows them)
    (r"py:.*", r"pbroker\._.*"),  # private modules, named in signatures
]

autodoc_member_order = "bysource"
autodoc_typehints = "signature"
