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


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "campaign: a reliability campaign (counts from PLASMITE_* environment "
        "variables); CI runs these on the default python3 only")


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


@pytest.fixture(scope="session")
def pyz_path(tmp_path_factory):
    """Build pls.pyz once per test session (into a temporary directory) and return its path."""
    import subprocess
    output = str(tmp_path_factory.mktemp("pyz") / "pls.pyz")
    subprocess.run([sys.executable, os.path.join(ROOT, "build_pyz.py"), "--output", output],
                   check=True, capture_output=True)
    return output


class Pls:
    """Runs the built pls.pyz as a real process with --dir pointing at a temporary directory."""

    def __init__(self, pyz, directory):
        self.pyz = pyz
        self.directory = str(directory)

    def command(self, *args, use_dir=True):
        prefix = ["--dir", self.directory] if use_dir else []
        return [sys.executable, self.pyz] + prefix + [str(arg) for arg in args]

    def run(self, *args, input=None, timeout=30, use_dir=True, env=None):
        import subprocess
        return subprocess.run(self.command(*args, use_dir=use_dir), input=input,
                              capture_output=True, timeout=timeout, env=env,
                              stdin=None if input is not None else subprocess.DEVNULL)

    def popen(self, *args, **kwargs):
        import subprocess
        kwargs.setdefault("stdout", subprocess.PIPE)
        kwargs.setdefault("stderr", subprocess.PIPE)
        kwargs.setdefault("stdin", subprocess.DEVNULL)
        return subprocess.Popen(self.command(*args), **kwargs)

    def json(self, *args, **kwargs):
        """Run, assert success, and parse stdout as one JSON document."""
        result = self.run(*args, **kwargs)
        assert result.returncode == 0, result.stderr.decode()
        return json.loads(result.stdout)

    def error(self, *args, **kwargs):
        """Run, and return (exit code, the parsed JSON error object from stderr)."""
        result = self.run(*args, **kwargs)
        lines = result.stderr.decode().strip().splitlines()
        return result.returncode, json.loads(lines[-1])["error"]


@pytest.fixture
def pls(pyz_path, tmp_path):
    return Pls(pyz_path, tmp_path / "pools")
