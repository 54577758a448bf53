"""The zipapp: build dist/pls.pyz, run it, and use the module from inside it."""

import glob
import json
import os
import subprocess
import sys
import zipfile

import pytest


ROUND_TRIP = r"""
import sys
sys.path.insert(0, sys.argv[1])
import plasmite
assert plasmite.__file__.startswith(sys.argv[1]), plasmite.__file__
with plasmite.Client(sys.argv[2]) as client:
    pool = client.create_pool("zip", 64 * 1024)
    pool.append_json(b'{"via": "pyz"}', ["z"])
    print(pool.get_json(1).decode())
"""


@pytest.fixture
def pyz(pyz_path):
    return pyz_path


def test_archive_layout(pyz):
    with open(pyz, "rb") as handle:
        assert handle.readline() == b"#!/usr/bin/env python3\n"
    assert os.access(pyz, os.X_OK)
    with zipfile.ZipFile(pyz) as archive:
        names = archive.namelist()
        assert names[:3] == ["__main__.py", "plasmite.py", "plasmite.pyc"]
        # Bytecode for every other Python found at build time (3.8 and 3.13 at least).
        own_tag = sys.implementation.cache_tag
        tags = {"cpython-%d%d" % tuple(int(part) for part in os.path.basename(python)[6:].split("."))
                for python in other_pythons()} - {own_tag}
        assert {"bytecode/plasmite.%s.pyc" % tag for tag in tags} <= set(names[3:])
        assert all(name.startswith("bytecode/plasmite.cpython-") for name in names[3:])
        assert "bytecode/plasmite.%s.pyc" % own_tag not in names
        assert archive.read("__main__.py").endswith(b"plasmite.exit_process(plasmite.main())\n")


def test_version_commands(pyz):
    result = subprocess.run([sys.executable, pyz, "version"], capture_output=True, text=True)
    assert result.returncode == 0
    assert json.loads(result.stdout) == {"name": "plasmite", "version": "0.1.0"}
    result = subprocess.run([pyz, "--version"], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout == "plasmite 0.1.0\n"


def test_round_trip_through_the_archive(pyz, tmp_path):
    result = subprocess.run([sys.executable, "-c", ROUND_TRIP, pyz, str(tmp_path)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    message = json.loads(result.stdout)
    assert message["data"] == {"via": "pyz"} and message["meta"]["tags"] == ["z"]


def test_bytecode_is_used_and_startup_stays_lean(pyz):
    result = subprocess.run([sys.executable, "-S", "-X", "importtime", pyz, "version"],
                            capture_output=True, text=True)
    assert result.returncode == 0
    imported = [line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines()]
    for heavy in ("http.server", "http.client", "urllib.request", "ssl", "email.utils"):
        assert heavy not in imported
    # The bytecode is what runs: an archive whose source is poisoned still works.
    poisoned = pyz + ".poisoned"
    with zipfile.ZipFile(pyz) as original, open(poisoned, "wb") as raw:
        raw.write(b"#!/usr/bin/env python3\n")
        with zipfile.ZipFile(raw, "w") as archive:
            for name in original.namelist():
                content = original.read(name)
                if name == "plasmite.py":
                    content = b"raise SystemExit('the source was compiled instead')\n"
                archive.writestr(name, content)
    for python in [sys.executable] + other_pythons():
        result = subprocess.run([python, poisoned, "version"], capture_output=True, text=True)
        assert result.returncode == 0, (python, result.stderr)


def other_pythons():
    root = os.path.expanduser("~/.pyenv/versions")
    found = []
    for pattern in ("3.8*/bin/python3.8", "3.13*/bin/python3.13"):
        found.extend(sorted(glob.glob(os.path.join(root, pattern)))[-1:])
    return found


@pytest.mark.parametrize("python", other_pythons() or [pytest.param(None, marks=pytest.mark.skip(
    reason="no pyenv Pythons 3.8/3.13 on this machine"))])
def test_archive_runs_on_other_pythons(pyz, tmp_path, python):
    result = subprocess.run([python, pyz, "version"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    result = subprocess.run([python, "-c", ROUND_TRIP, pyz, str(tmp_path)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["data"] == {"via": "pyz"}
