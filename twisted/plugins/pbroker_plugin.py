"""
The ``twistd pbroker`` plugin, installed as ``twisted/plugins/pbroker_plugin.py``. Neither
``twisted/`` nor ``twisted/plugins/`` in the checkout has an ``__init__.py``, on purpose: Twisted
itself is imported from where it is installed, and finds this plugin in any ``twisted/plugins``
folder on the path, so an editable install of the checkout serves ``twistd pbroker`` too.
"""

from twisted.application.service import ServiceMaker

pbroker = ServiceMaker(
    "pbroker",
    "pbroker.tap",
    "A Perspective Broker, compatible with Twisted PB (see pbroker's docs).",
    "pbroker",
)
