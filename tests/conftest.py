import os
import sys

# Run against this checkout even when an older copy is installed.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import pytest


@pytest.fixture(autouse=True)
def _scratch_cwd(tmp_path, monkeypatch):
    """trial's mktemp() and relative paths land in a per-test directory."""
    monkeypatch.chdir(tmp_path)
