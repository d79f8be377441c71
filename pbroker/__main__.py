"""
``python -m pbroker``: the command-line client (see :mod:`pbroker.cli`).
"""

import sys

from pbroker.cli import main

sys.exit(main())
