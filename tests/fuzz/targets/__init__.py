"""One module per parser that reads attacker bytes (see ``tests/fuzz/harness.py``)."""
