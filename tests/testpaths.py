"""Where the repository and the shared test helpers are, for test modules at any depth of tests/."""

import os

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))  # conftest.py, the *_helpers modules, fault_child.py
REPO_ROOT = os.path.dirname(TESTS_DIR)
