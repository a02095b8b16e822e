"""Make ``tests/enum_oracle.py`` importable as ``enum_oracle`` from the diffusion unit tests."""

import sys
from pathlib import Path

_TESTS = str(Path(__file__).resolve().parents[2])
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)
