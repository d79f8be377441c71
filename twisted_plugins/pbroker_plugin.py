"""
The ``twistd pbroker`` plugin. Installed as ``twisted/plugins/pbroker_plugin.py`` (this folder
is mapped to the ``twisted.plugins`` package, and has no ``__init__.py`` on purpose).
"""

from twisted.application.service import ServiceMaker

pbroker = ServiceMaker(
    "pbroker",
    "pbroker.tap",
    "A Perspective Broker, compatible with Twisted PB (see pbroker's docs).",
    "pbroker",
)
