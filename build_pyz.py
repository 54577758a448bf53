"""Build dist/pls.pyz, the single-file zipapp of plasmite.py.

Usage: python3 build_pyz.py [--output PATH]

The archive holds plasmite.py, its bytecode compiled by the running
interpreter (so zipimport, which never writes .pyc files, does not recompile
the module on every run), and a two-line __main__.py.  Bytecode is stored
uncompressed: inflating 700 KB took about 3 ms of every start, and the
archive stays under 4 MB.  zipimport tries
plasmite.pyc first and falls back to plasmite.py when the bytecode was made
by another Python version, so the archive runs on every supported version.
"""

import argparse
import importlib.util
import os
import py_compile
import stat
import sys
import tempfile
import zipfile

ROOT = os.path.dirname(os.path.abspath(__file__))
# zipimport finds only plasmite.pyc, made by the building Python.  For the
# other Pythons the archive carries bytecode/plasmite.<cache tag>.pyc, and
# __main__ loads the one matching the running interpreter (falling back to
# plasmite.pyc or the source through a plain import), so every supported
# version starts without compiling 10,000 lines.
MAIN_SOURCE = """\
import sys


def load_plasmite():
    import marshal
    from importlib.util import MAGIC_NUMBER

    try:
        data = __loader__.get_data("bytecode/plasmite.%s.pyc" % sys.implementation.cache_tag)
    except (OSError, AttributeError):
        return
    if data[:4] == MAGIC_NUMBER:
        module = type(sys)("plasmite")
        module.__file__ = __file__.rpartition("/")[0] + "/plasmite.py"
        sys.modules["plasmite"] = module
        exec(marshal.loads(data[16:]), module.__dict__)


load_plasmite()
import plasmite  # noqa: E402
plasmite.exit_process(plasmite.main())
"""
COMPILE_SCRIPT = (
    "import py_compile, sys; py_compile.compile(sys.argv[1], cfile=sys.argv[2], "
    "dfile='plasmite.py', doraise=True, "
    "invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH); "
    "print(sys.implementation.cache_tag)")


def compile_module(source_path: str) -> bytes:
    """Return the bytecode of a module, marked "unchecked hash" so no mtime is consulted."""
    with tempfile.TemporaryDirectory() as scratch:
        target = os.path.join(scratch, "plasmite.pyc")
        py_compile.compile(source_path, cfile=target, dfile="plasmite.py", doraise=True,
                           invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)
        with open(target, "rb") as handle:
            return handle.read()


def other_pythons() -> list:
    """Interpreters 3.8-3.13 found through pyenv, other than the one running."""
    import glob
    import subprocess

    try:
        root = subprocess.run(["pyenv", "root"], capture_output=True, text=True).stdout.strip()
    except OSError:
        root = os.path.expanduser("~/.pyenv")
    found = []
    for minor in range(8, 14):
        candidates = sorted(glob.glob(os.path.join(root or os.path.expanduser("~/.pyenv"),
                                                   "versions", "3.%d*" % minor, "bin",
                                                   "python3.%d" % minor)))
        if candidates and os.path.realpath(candidates[-1]) != os.path.realpath(sys.executable):
            found.append(candidates[-1])
    return found


def compile_with(python: str, source_path: str):
    """Compile with another interpreter; return (cache tag, bytecode) or None if it fails."""
    import subprocess

    with tempfile.TemporaryDirectory() as scratch:
        target = os.path.join(scratch, "plasmite.pyc")
        result = subprocess.run([python, "-c", COMPILE_SCRIPT, source_path, target],
                                capture_output=True, text=True)
        if result.returncode != 0:
            return None
        with open(target, "rb") as handle:
            return result.stdout.strip(), handle.read()


def build(output: str) -> str:
    """Write the zipapp to ``output`` and make it executable; return the path."""
    source_path = os.path.join(ROOT, "plasmite.py")
    with open(source_path, "rb") as handle:
        source = handle.read()
    bytecode = compile_module(source_path)
    os.makedirs(os.path.dirname(output) or ".", exist_ok=True)
    partial = output + ".partial"
    with open(partial, "wb") as raw:
        raw.write(b"#!/usr/bin/env python3\n")
        with zipfile.ZipFile(raw, "w", compression=zipfile.ZIP_DEFLATED) as archive:
            archive.writestr("__main__.py", MAIN_SOURCE, compress_type=zipfile.ZIP_STORED)
            archive.writestr("plasmite.py", source)
            archive.writestr("plasmite.pyc", bytecode, compress_type=zipfile.ZIP_STORED)
            for python in other_pythons():
                compiled = compile_with(python, source_path)
                if compiled is not None:
                    archive.writestr("bytecode/plasmite.%s.pyc" % compiled[0], compiled[1],
                                     compress_type=zipfile.ZIP_STORED)
    mode = os.stat(partial).st_mode
    os.chmod(partial, mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    os.replace(partial, output)
    return output


def main() -> int:
    parser = argparse.ArgumentParser(description="Build dist/pls.pyz from plasmite.py.")
    parser.add_argument("--output", default=os.path.join(ROOT, "dist", "pls.pyz"),
                        help="where to write the archive (default: dist/pls.pyz)")
    args = parser.parse_args()
    path = build(args.output)
    print("built %s (bytecode for Python %d.%d, magic %s)"
          % (os.path.relpath(path), sys.version_info[0], sys.version_info[1],
             importlib.util.MAGIC_NUMBER.hex()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
