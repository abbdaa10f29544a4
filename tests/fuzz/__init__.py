"""Coverage-guided fuzzing (atheris) of every parser that reads attacker bytes.

``targets/`` holds one module per parser; ``run.py`` runs them under atheris
(``make fuzz``); ``crashes/TARGET/`` keeps every input that once crashed a
parser, replayed by ``tests/test_fuzz.py``. docs/FUZZING.md says more.
"""
