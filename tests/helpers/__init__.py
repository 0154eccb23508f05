"""Shared builders for the test suite: tiny models, checkpoints in each layout, reference
implementations and input cases.  Test modules import them as ``from helpers.<module> import ...``
(pytest puts ``tests/`` on ``sys.path`` for ``tests/conftest.py``); pytest fixtures live in the
``conftest.py`` files, not here.  No test module imports another test module."""
