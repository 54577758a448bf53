"""Build dist/pls.pyz, the single-file zipapp of plasmite.py.

Usage: python3 build_pyz.py [--output PATH]

The archive holds plasmite.py, its bytecode compiled by the running
interpreter (so zipimport, which never writes .pyc files, does not recompile
the module on every run), and a two-line __main__.py.  zipimport tries
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
MAIN_SOURCE = "import plasmite\nraise SystemExit(plasmite.main())\n"


def compile_module(source_path: str) -> bytes:
    """Return the bytecode of a module, marked "unchecked hash" so no mtime is consulted."""
    with tempfile.TemporaryDirectory() as scratch:
        target = os.path.join(scratch, "plasmite.pyc")
        py_compile.compile(source_path, cfile=target, dfile="plasmite.py", doraise=True,
                           invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)
        with open(target, "rb") as handle:
            return handle.read()


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
            archive.writestr("__main__.py", MAIN_SOURCE)
            archive.writestr("plasmite.py", source)
            archive.writestr("plasmite.pyc", bytecode)
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
