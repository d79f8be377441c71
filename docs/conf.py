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

extensions = ["sphinx.ext.autodoc"]

root_doc = "index"
exclude_patterns = ["_build"]

html_theme = "alabaster"

nitpicky = False

autodoc_member_order = "bysource"
autodoc_typehints = "signature"
