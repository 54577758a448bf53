"""Shared test helpers: import plasmite from the project root, locate fixtures."""

import json
import os
import shutil
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures")
POOL_FIXTURES = os.path.join(FIXTURES, "pools")
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def pool_fixture_names():
    """Names (without extension) of every fixture pool."""
    return sorted(name[:-len(".plasmite")] for name in os.listdir(POOL_FIXTURES)
                  if name.endswith(".plasmite"))


def load_expected(name):
    with open(os.path.join(POOL_FIXTURES, name + ".expected.json"), encoding="utf-8") as handle:
        return json.load(handle)


@pytest.fixture
def fixture_pool(tmp_path):
    """Copy a fixture pool into a temporary directory and return its path (fixtures stay pristine)."""
    def copy(name):
        target = tmp_path / (name + ".plasmite")
        shutil.copyfile(os.path.join(POOL_FIXTURES, name + ".plasmite"), target)
        os.chmod(target, 0o644)
        return str(target)
    return copy
