"""The ``sealstore`` command: a thin layer over the public API."""
