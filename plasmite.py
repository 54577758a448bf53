"""plasmite.py: persistent JSON message pools backed by plain files.

A pool is one file, ``NAME.plasmite``, holding a ring buffer of JSON messages that
any number of processes append to and read from at once.  This module is the
whole program: the pool format (byte-compatible with the Rust ``plasmite``
v0.1.0, format version 3, Lite3 payloads), the Python API and the ``pls``
command line.  It uses the standard library only and runs on Python 3.8-3.13.

Run it as ``python3 plasmite.py --help``, or build the zipapp with
``python3 build_pyz.py`` and run ``dist/pls.pyz``.  Import it as a library::

    from plasmite import Client, Durability
    with Client("./pools") as client:
        pool = client.create_pool("events", 1024 * 1024)
        pool.append_json(b'{"x": 1}', ["tag"], Durability.FAST)

Glossary (each word means one thing everywhere in this file):

pool
    One ``.plasmite`` file: a 4096-byte header, an index region and a ring.
message
    What users append and read: ``{"data": {...}, "meta": {"tags": [...]},
    "seq": N, "time": "RFC 3339"}``.
frame
    A message as stored in the ring: 64-byte frame header, Lite3 payload,
    ``PLSMCMIT`` commit marker, padding to 8 bytes.
payload
    The Lite3 document ``{"data": ..., "meta": {"tags": [...]}}`` of a frame.
seq
    A message's sequence number: 1, 2, 3 ... per pool, never reused.
offset
    A byte offset.  "Ring offset" counts from the start of the ring region,
    "file offset" from the start of the file.
tag
    A string in ``meta.tags``; readers can filter on tags.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = [
    "Client",
    "Durability",
    "ErrorKind",
    "Lite3Frame",
    "Lite3Stream",
    "Pool",
    "PlasmiteError",
    "Stream",
    "main",
    "parse_message",
]

import _thread
import binascii
import bisect
import enum
import errno
import functools
import itertools
import json
import math
import mmap
import operator
import os
import re
import struct
import sys
import time
from collections import namedtuple
from collections.abc import Callable, Iterator

# =============================================================================
# 1. Platform
# =============================================================================
# The only place that touches fcntl, mmap flags, page sizes and TTY checks.
# Everything else asks for intent: lock the pool file, map it, flush a range.
# Pools need POSIX flock and shared mappings (Linux and macOS).

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows has no flock; pools need it
    fcntl = None

PAGE_SIZE = mmap.PAGESIZE

# Pools are little-endian.  On a little-endian host, struct's native "Q"
# packs with one 8-byte memcpy, which compilers emit as a single aligned
# store (atomic on x86-64 and arm64), while "<Q" stores byte by byte, so a
# crash or a concurrent reader could see half a field.  Header fields are
# therefore written and read with native records.
IS_HOST_LITTLE_ENDIAN = sys.byteorder == "little"


def lock_pool_file(fd: int) -> None:
    """Take the exclusive writer lock on a pool file, blocking until granted.

    Upstream writers use BSD ``flock(LOCK_EX)`` on the pool file itself, so we
    must too: POSIX record locks (``lockf``) are independent of flock locks on
    Linux and would not exclude a Rust writer (spec/pool-format.md section 9).
    """
    if fcntl is None:
        raise OSError(errno.ENOSYS, "file locking is not available on this platform")
    fcntl.flock(fd, fcntl.LOCK_EX)


def unlock_pool_file(fd: int) -> None:
    """Release the writer lock taken by :func:`lock_pool_file`."""
    fcntl.flock(fd, fcntl.LOCK_UN)


def map_pool_file(fd: int, size: int, writable: bool) -> mmap.mmap:
    """Map a whole pool file shared, read/write or read-only."""
    if writable:
        return mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    return mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ)


def flush_mapped_range(mapping: mmap.mmap, offset: int, length: int) -> None:
    """msync(MS_SYNC) a byte range of a mapping; the start is rounded down to a page.

    Python's ``mmap.flush`` demands a page-aligned offset, and upstream rounds
    the same way, growing the length by the amount rounded off.
    """
    start = offset - offset % PAGE_SIZE
    mapping.flush(start, length + (offset - start))


def reserve_file_space(fd: int, size: int) -> None:
    """Allocate a file's blocks now, so a full disk shows up here and not later.

    A pool is written through a shared mapping; a page of a sparse file that
    the filesystem cannot back when it is first written kills the process
    with SIGBUS.  Reserving every block at create time turns that into an
    OSError (ENOSPC, EFBIG, EDQUOT) the caller reports.  The file's bytes
    stay zero, so pools remain byte-identical to upstream's.
    """
    if hasattr(os, "posix_fallocate"):
        os.posix_fallocate(fd, 0, size)
        return
    zeros = bytes(1 << 20)  # macOS has no posix_fallocate: write the zeros
    for offset in range(0, size, len(zeros)):
        os.pwrite(fd, zeros[:min(len(zeros), size - offset)], offset)


def is_terminal(stream) -> bool:
    """Return True when a file object is attached to a terminal."""
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


# =============================================================================
# 2. Constants and errors
# =============================================================================
# Limits shared by the format and the commands, the one error class every
# failure goes through, and the kind-to-exit-code table (the upstream contract).

FORMAT_VERSION = 3
MAX_PAYLOAD_BYTES = 256 * 1024 * 1024  # upstream caps payloads and Lite3 buffers here
MAX_FILE_SIZE = 2 ** 63 - 1  # the largest file offset (off_t) the OS can be asked for
DEFAULT_POOL_SIZE = 1024 * 1024
POOL_SUFFIX = ".plasmite"

EXIT_CODES = {"Internal": 1, "Usage": 2, "NotFound": 3, "AlreadyExists": 4, "Busy": 5,
              "Permission": 6, "Corrupt": 7, "Io": 8}
EXIT_TIMEOUT = 124  # peek --timeout elapsed
EXIT_INTERRUPTED = 130  # Ctrl-C

# Used when an error carries no message of its own (spec/cli.md section 3.2).
FALLBACK_MESSAGES = {"Internal": "internal error", "Usage": "usage error",
                     "NotFound": "not found", "AlreadyExists": "already exists",
                     "Busy": "resource is busy", "Permission": "permission denied",
                     "Corrupt": "corrupt data", "Io": "i/o error"}

CORRUPT_HINT = "Pool appears corrupt. Recreate it or investigate with validation tooling."

# Added to an error that reaches the user without a hint (spec/cli.md 3.4).
AUTOMATIC_HINTS = {
    "Corrupt": CORRUPT_HINT,
    "Permission": "Permission denied. Check directory permissions or use --dir to a writable location.",
    "Busy": "Pool is busy (another writer holds the lock). Retry with backoff.",
    "Io": "I/O error. Check the path, filesystem, and disk space.",
}

class ErrorKind(str, enum.Enum):
    """The kind of a :class:`PlasmiteError`; each maps to one exit code."""

    INTERNAL = "Internal"
    USAGE = "Usage"
    NOT_FOUND = "NotFound"
    ALREADY_EXISTS = "AlreadyExists"
    BUSY = "Busy"
    PERMISSION = "Permission"
    CORRUPT = "Corrupt"
    IO = "Io"

    def __str__(self) -> str:
        return self.value


class PlasmiteError(Exception):
    """The one error type of plasmite: a kind, a message and optional context.

    ``kind`` is an :class:`ErrorKind` (it compares equal to its string, e.g.
    ``"NotFound"``).  ``hint`` tells the user what to do; ``path``, ``seq`` and
    ``offset`` locate the problem; ``causes`` lists underlying error texts,
    outermost first.  ``exit_code`` is the process status the CLI uses.
    """

    def __init__(self, kind, message=None, *, hint=None, path=None, seq=None,
                 offset=None, causes=None):
        self.kind = ErrorKind(kind)
        self.message = message or FALLBACK_MESSAGES[self.kind.value]
        self.hint = hint
        self.path = None if path is None else os.fspath(path)
        self.seq = seq
        self.offset = offset
        self.causes = list(causes or ())
        super().__init__(self.message)

    @property
    def exit_code(self) -> int:
        """The process exit status for this error (2 Usage, 3 NotFound, ...)."""
        return EXIT_CODES[self.kind.value]

    def to_dict(self) -> dict:
        """Return the error as the inner object of upstream's JSON envelope."""
        fields = {"kind": self.kind.value, "message": self.message}
        for name in ("hint", "path", "seq", "offset"):
            value = getattr(self, name)
            if value is not None:
                fields[name] = value
        if self.causes:
            fields["causes"] = self.causes
        return fields


def with_automatic_hint(err: PlasmiteError) -> PlasmiteError:
    """Give an error without a hint the generic hint for its kind; return it."""
    if err.hint is None:
        err.hint = AUTOMATIC_HINTS.get(err.kind.value)
    return err

def describe_os_error(err: OSError) -> str:
    """Render an OS error the way upstream (Rust) does: ``<strerror> (os error N)``."""
    if err.errno is None:
        return str(err)
    return "%s (os error %d)" % (os.strerror(err.errno), err.errno)


def error_from_os(err: OSError, message=None, *, path=None, hint=None) -> PlasmiteError:
    """Translate an OSError into a PlasmiteError whose kind matches its errno."""
    if err.errno == errno.ENOENT:
        kind = "NotFound"
    elif err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        kind = "Permission"
    elif err.errno == errno.EEXIST:
        kind = "AlreadyExists"
    elif err.errno in (errno.EAGAIN, errno.EWOULDBLOCK):
        kind = "Busy"
    else:
        kind = "Io"
    return PlasmiteError(kind, message, path=path, hint=hint, causes=[describe_os_error(err)])


# =============================================================================
# 3. Utilities
# =============================================================================
# Small pure helpers with no pool knowledge: timestamps in RFC 3339, JSON
# text that matches upstream's serde_json output byte for byte (plain or
# coloured), and the CLI's value syntaxes: sizes, durations, --since times.

class LazyPattern:
    """A regular expression compiled on first use, used like the compiled pattern.

    The module's 26 patterns cost about 2 ms to compile, a tenth of a poke's
    start-up, and most runs use few of them. The first lookup of a method compiles
    (re caches the pattern) and stores the bound method on the instance, so later
    calls cost what a compiled pattern's do.
    """

    def __init__(self, pattern, flags=0):
        self.pattern = pattern
        self.flags = flags

    def __getattr__(self, name):
        method = getattr(re.compile(self.pattern, self.flags), name)
        setattr(self, name, method)
        return method


def format_timestamp(timestamp_ns: int) -> str:
    """Format Unix-epoch nanoseconds as RFC 3339 UTC the way upstream prints ``time``.

    Seconds always; then ``.`` and the nanoseconds with trailing zeros removed,
    only when they are not zero; then ``Z``.  Raises ValueError for years
    outside 0001-9999.
    """
    seconds, nanos = divmod(timestamp_ns, 1_000_000_000)
    text = _last_formatted_second.get(seconds)
    if text is None:
        try:
            fields = time.gmtime(seconds)
        except (OverflowError, OSError) as err:
            raise ValueError("timestamp out of range: %d" % timestamp_ns) from err
        if not 1 <= fields.tm_year <= 9999:
            raise ValueError("timestamp out of range: %d" % timestamp_ns)
        text = "%04d-%02d-%02dT%02d:%02d:%02d" % fields[:6]
        _last_formatted_second.clear()
        _last_formatted_second[seconds] = text
    if nanos:
        return "%s.%sZ" % (text, ("%09d" % nanos).rstrip("0"))
    return text + "Z"


# Messages stream in within the same second, so format_timestamp keeps the text of the
# last second it formatted (a third of its cost was gmtime and the date fields).
_last_formatted_second: dict = {}


def format_json_float(number: float) -> str:
    """Format a finite float the way serde_json (ryu) prints it.

    The digits are Python's shortest round-trip digits (``repr``); only the
    layout differs: positional for 1e-5 <= |x| < 1e16 (``0.00001``,
    ``100.0``), otherwise ``d.ddde-N`` / ``d.dddeN`` with no ``+`` and no zero
    padding (spec/cli.md section 2.2).
    """
    text = repr(number)
    if "e" not in text and "n" not in text:
        return text  # repr is already positional with a ".0" or a fraction
    if not math.isfinite(number):
        raise ValueError("JSON cannot represent %s" % text)
    mantissa, _, exponent_text = text.partition("e")
    exponent = int(exponent_text)
    sign = "-" if mantissa.startswith("-") else ""
    digits = mantissa.lstrip("-").replace(".", "")
    # repr's mantissa is d.ddd: the value is 0.dddd x 10^(exponent + 1).
    point = exponent + 1
    if 0 < point <= 16:
        if len(digits) <= point:
            return sign + digits + "0" * (point - len(digits)) + ".0"
        return sign + digits[:point] + "." + digits[point:]
    if -5 < point <= 0:
        return sign + "0." + "0" * -point + digits
    rest = digits[1:]
    return "%s%s%se%d" % (sign, digits[0], "." + rest if rest else "", exponent)


_encode_json_string = json.encoder.encode_basestring  # UTF-8 out, \u00xx for C0 controls
_FLOAT_EXPONENT = LazyPattern(r"\de[-+]\d")


def _write_json_slow(value, indent, depth, out) -> None:
    """Serialise like serde_json: sorted keys, serde float layout (see dump_json)."""
    if isinstance(value, str):
        out.append(_encode_json_string(value))
    elif value is None:
        out.append("null")
    elif value is True:
        out.append("true")
    elif value is False:
        out.append("false")
    elif isinstance(value, int):
        out.append(int.__repr__(value))
    elif isinstance(value, float):
        out.append(format_json_float(value))
    elif isinstance(value, (dict, list)):
        is_dict = isinstance(value, dict)
        if not value:
            out.append("{}" if is_dict else "[]")
            return
        out.append("{" if is_dict else "[")
        inner = "\n" + " " * (indent * (depth + 1)) if indent else ""
        first = True
        items = sorted(value.items()) if is_dict else value
        for item in items:
            out.append(inner if first else "," + inner)
            first = False
            if is_dict:
                out.append(_encode_json_string(item[0]))
                out.append(": " if indent else ":")
                item = item[1]
            _write_json_slow(item, indent, depth + 1, out)
        out.append("\n" + " " * (indent * depth) if indent else "")
        out.append("}" if is_dict else "]")
    else:
        raise TypeError("cannot serialise %r as JSON" % type(value).__name__)


# Made once: json.dumps with options builds a new encoder per call (3 us of a 6 us receipt).
_COMPACT_JSON_ENCODER = json.JSONEncoder(ensure_ascii=False, sort_keys=True,
                                         separators=(",", ":"), allow_nan=False)
_PRETTY_JSON_ENCODER = json.JSONEncoder(ensure_ascii=False, sort_keys=True, indent=2,
                                        allow_nan=False)


def dump_json(value, pretty: bool = False) -> str:
    """Serialise a JSON value exactly as upstream's serde_json does.

    Keys sorted at every depth, UTF-8 text (no ``\\uXXXX`` for non-ASCII),
    compact ``,``/``:`` or 2-space pretty layout, and serde's float layout.
    The C encoder does the work unless its text holds a float in exponent
    form (the only place Python's ``repr`` and serde differ); then a small
    pure-Python writer redoes it.
    """
    text = (_PRETTY_JSON_ENCODER if pretty else _COMPACT_JSON_ENCODER).encode(value)
    # The substring tests are 20 times faster than the pattern, which is rarely needed.
    if ("e-" not in text and "e+" not in text) or _FLOAT_EXPONENT.search(text) is None:
        return text
    out = []
    _write_json_slow(value, 2 if pretty else 0, 0, out)
    return "".join(out)


def _write_json_colored(value, depth, out) -> None:
    """Pretty JSON with upstream's ANSI colours (spec/cli.md 2.3)."""
    punctuation = "\x1b[90m%s\x1b[0m"
    if isinstance(value, str):
        out.append("\x1b[32m%s\x1b[0m" % _encode_json_string(value))
    elif value is None:
        out.append("\x1b[90mnull\x1b[0m")
    elif value is True or value is False:
        out.append("\x1b[35m%s\x1b[0m" % ("true" if value else "false"))
    elif isinstance(value, int):
        out.append("\x1b[33m%s\x1b[0m" % int.__repr__(value))
    elif isinstance(value, float):
        out.append("\x1b[33m%s\x1b[0m" % format_json_float(value))
    else:
        is_dict = isinstance(value, dict)
        if not value:
            out.append(punctuation % ("{}" if is_dict else "[]"))
            return
        out.append(punctuation % ("{" if is_dict else "["))
        inner = "\n" + "  " * (depth + 1)
        first = True
        for item in (sorted(value.items()) if is_dict else value):
            if not first:
                out.append(punctuation % ",")
            out.append(inner)
            first = False
            if is_dict:
                out.append("\x1b[36m%s\x1b[0m" % _encode_json_string(item[0]))
                out.append(punctuation % ":" + " ")
                item = item[1]
            _write_json_colored(item, depth + 1, out)
        out.append("\n" + "  " * depth)
        out.append(punctuation % ("}" if is_dict else "]"))


def render_json(value, pretty: bool, color: bool = False) -> str:
    """Render a JSON value as upstream prints it: compact, pretty, or pretty and coloured."""
    if pretty and color:
        out = []
        _write_json_colored(value, 0, out)
        return "".join(out)
    return dump_json(value, pretty=pretty)


SIZE_UNITS = {"": 1, "k": 1024, "m": 1024 ** 2, "g": 1024 ** 3}
_SIZE_TEXT = LazyPattern(r"([0-9]*)\s*(.*)", re.S)


def parse_size(text: str) -> int:
    """Parse a pool size: digits then an optional K/M/G suffix (1024-based), spaces allowed.

    Raises PlasmiteError Usage "invalid size", "invalid size suffix" or
    "size overflow" (spec/cli.md 5.1).
    """
    digits, suffix = _SIZE_TEXT.fullmatch(text.strip()).groups()
    suffix = suffix.strip()
    if not digits or int(digits) >= 1 << 64:
        causes = ["number too large to fit in target type"] if digits else [
            "cannot parse integer from empty string"]
        raise PlasmiteError("Usage", "invalid size", hint="Use bytes or K/M/G (e.g. 64M).",
                            causes=causes)
    if suffix.lower() not in SIZE_UNITS or len(suffix) > 1:
        raise PlasmiteError("Usage", "invalid size suffix", hint="Use K/M/G (e.g. 64M).")
    size = int(digits) * SIZE_UNITS[suffix.lower()]
    if size >= 1 << 64:
        raise PlasmiteError("Usage", "size overflow", hint="Use a smaller size value.")
    return size


DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
_DURATION_TEXT = LazyPattern(r"([0-9]+)(ms|s|m|h)")


def parse_duration(text: str) -> float:
    """Parse a duration such as ``50ms``, ``10s``, ``5m``, ``2h`` into seconds.

    Raises PlasmiteError Usage "invalid duration" (spec/cli.md 5.2).
    """
    match = _DURATION_TEXT.fullmatch(text.strip())
    if match is None or int(match.group(1)) >= 1 << 64:
        raise PlasmiteError("Usage", "invalid duration",
                            hint="Use a number plus ms|s|m|h (e.g. 10s).")
    return int(match.group(1)) * DURATION_UNITS[match.group(2)]


SINCE_UNITS_NS = {"s": 10 ** 9, "m": 60 * 10 ** 9, "h": 3600 * 10 ** 9, "d": 86400 * 10 ** 9}
_RELATIVE_SINCE = LazyPattern(r"([0-9]+)([sSmMhHdD])")
_RFC3339 = LazyPattern(
    r"(\d{4})-(\d{2})-(\d{2}).(\d{2}):(\d{2}):(\d{2})(?:\.(\d+))?([Zz]|[+-]\d{2}:\d{2})",
    re.S)


def parse_since(text: str, now_ns: int) -> int:
    """Parse ``--since``: relative (``5m``, ``2h``, ``1d``) or RFC 3339; return epoch ns.

    Relative times count back from ``now_ns`` (not before the epoch).  A
    time before 1970 is clamped to 0.  Raises PlasmiteError Usage
    "invalid --since value" (spec/cli.md 5.3).
    """
    import calendar

    stripped = text.strip()
    match = _RELATIVE_SINCE.fullmatch(stripped)
    if match:
        return max(now_ns - int(match.group(1)) * SINCE_UNITS_NS[match.group(2).lower()], 0)
    match = _RFC3339.fullmatch(stripped)
    problem = "input is not RFC 3339 (e.g. 2026-02-02T23:45:00Z)"
    if match:
        year, month, day, hour, minute, second = (int(part) for part in match.groups()[:6])
        fraction, zone = match.group(7) or "", match.group(8)
        zone_minutes = 0
        if zone not in ("Z", "z"):
            zone_hours, zone_mins = int(zone[1:3]), int(zone[4:6])
            zone_minutes = (zone_hours * 60 + zone_mins) * (1 if zone[0] == "+" else -1)
            if zone_hours > 23 or zone_mins > 59:
                match = None
        if match and 1 <= month <= 12 and 1 <= day <= calendar.monthrange(year, month)[1] \
                and hour <= 23 and minute <= 59 and second <= 60:
            seconds = calendar.timegm((year, month, day, hour, minute, min(second, 59), 0, 0, 0))
            nanos = int((fraction + "000000000")[:9])
            return max((seconds - zone_minutes * 60) * 10 ** 9 + nanos, 0)
        problem = "input is out of range"
    raise PlasmiteError("Usage", "invalid --since value",
                        hint="Use RFC 3339 (2026-02-02T23:45:00Z) or relative like 5m.",
                        causes=[problem, problem])


# =============================================================================
# 4. Lite3
# =============================================================================
# The Lite3 buffer format (§1-§6), its JSON parsers (yyjson §7, serde_json §10.2), the
# decoder (§8.1) and the plasmite message envelope (§10). Relies on PlasmiteError only.
# Encoding reproduces the C library's insertion algorithm step by step, so that the
# bytes match; decoding follows the C iterator so damaged buffers fail the same way.

# Node layout (96 bytes, little-endian, §2). A container's first node is also its value:
# byte 0 doubles as the value's type tag.
# | off | size | field          | meaning                                                 |
# |   0 |    4 | gen_type       | bits 0-7 type (6 object, 7 array); bits 8-31 generation |
# |   4 |   28 | hashes[7]      | key hashes (arrays: element index), ascending           |
# |  32 |    4 | size_count     | bits 0-2 key count; bits 6-31 element count (first node)|
# |  36 |   28 | entry_ofs[7]   | offset of each entry: its key tag, or an array value    |
# |  64 |   32 | child_ofs[8]   | child node offsets; child_ofs[0] == 0 means leaf         |
LITE3_NODE = struct.Struct("<24I")
# The first 36 + 4n bytes of a node holding n <= 7 entries: gen_type, n hashes, zero
# slots, size_count, n entry offsets. Writing a fresh node needs no more, since the rest
# is already zero (and 24-argument packs cost ~450 ns here, twice a prefix's).
LITE3_NODE_PREFIXES = [struct.Struct("<I%dI%dxI%dI" % (count, 4 * (7 - count), count))
                       for count in range(8)]
# Field positions in the 24-tuple that LITE3_NODE unpacks to.
_GEN_TYPE, _HASHES, _SIZE_COUNT, _ENTRY_OFFSETS, _CHILDREN = 0, 1, 8, 9, 16
# Values (§3.2): a type byte, then the payload. A string's u32 is its byte length + 1,
# because a NUL follows the bytes; a bytes value's u32 is its length.
LITE3_I64_VALUE = struct.Struct("<Bq")
LITE3_F64_VALUE = struct.Struct("<Bd")
LITE3_STRING_HEADER = struct.Struct("<BI")
LITE3_U32 = struct.Struct("<I")
LITE3_U16 = struct.Struct("<H")

LITE3_NULL, LITE3_BOOL, LITE3_I64, LITE3_F64, LITE3_BYTES, LITE3_STRING = 0, 1, 2, 3, 4, 5
LITE3_OBJECT, LITE3_ARRAY = 6, 7
LITE3_NODE_KEYS = 7             # entries per node; a full node is split before inserting
LITE3_MAX_NESTING = 32          # containers on a path, the root counts (§7.4, §8.2)
LITE3_MAX_TREE_DEPTH = 9        # descents below a container's first node (§6 2.4, §8.1)
LITE3_PROBE_ATTEMPTS = 128      # quadratic probes per key (§4)
LITE3_MAX_BUFFER = 256 * 1024 * 1024   # plasmite's cap on one encoded buffer (§7.7)
SERDE_RECURSION_LIMIT = 128     # serde_json rejects the 128th nested container

# Fresh nodes by type; type 0 is a blank allocation filled in later.
_EMPTY_NODES = {LITE3_NULL: bytes(96), LITE3_OBJECT: bytes([LITE3_OBJECT]) + bytes(95),
                LITE3_ARRAY: bytes([LITE3_ARRAY]) + bytes(95)}
_NO_CHILDREN = (0,) * 8
_EMPTY_KEYS = (b"",) * LITE3_NODE_KEYS
_ZERO_PAD = (b"", b"\0", b"\0\0", b"\0\0\0")
_VALUE_SIZES = (1, 2, 9, 9, 5, 5, 96, 96)    # fixed part of each type, type byte included
_NULL_BYTES, _TRUE_BYTES, _FALSE_BYTES = b"\0", b"\x01\x01", b"\x01\x00"
_I64_MIN, _I64_MAX, _U64_MAX = -(1 << 63), (1 << 63) - 1, (1 << 64) - 1
_ENCODE_FAILED = "failed to encode json as lite3"
_JSON_HINT = "Provide a single JSON value (e.g. '{\"x\":1}')."


class ObjectPairs(list):
    """A JSON object kept as its ``(key, value)`` pairs in document order.

    Unlike a dict it can hold duplicate keys, which Lite3 stores by overwriting (the
    last value wins, but the bytes differ from a document without the duplicate).
    ``encode_lite3`` accepts it wherever it accepts a dict.
    """


class _JsonValueError(ValueError):
    """Raised inside json hooks; carries the offending literal so it can be located."""

    def __init__(self, detail, literal):
        super().__init__(detail)
        self.detail = detail
        self.literal = literal


# The two errors of this section: bad input to encode, and a buffer that is not Lite3.
def _encode_error(hint):
    return PlasmiteError("Usage", _ENCODE_FAILED, hint=hint)


def _corrupt(message, offset=None):
    return PlasmiteError("Corrupt", message, offset=offset)


# -- keys and hashing ---------------------------------------------------------

def _djb2(data: bytes) -> int:
    """Return the DJB2 hash of ``data`` modulo 2^32 (§4)."""
    value = 5381
    for byte in data:
        value = (value * 33 + byte) & 0xFFFFFFFF
    return value


# Messages reuse a handful of keys, so their hash and tagged bytes are worth keeping.
# The caches keep only keys with 1-byte tags (under 63 bytes) and are cleared when full,
# so a stream of distinct or huge keys cannot grow them beyond a few hundred KiB.
_key_cache: dict = {}
_KEY_CACHE_LIMIT = 4096


def _key_info(key) -> tuple:
    """Return ``(key_entry, hash)`` for an object key: tag + key + NUL as stored, and DJB2.

    The key is UTF-8 cut at its first NUL (the C library treats keys as C strings,
    §3.1). Two keys are equal exactly when their entries are. Raises PlasmiteError Usage
    for a non-string key and UnicodeEncodeError for a lone surrogate.
    """
    info = _key_cache.get(key)
    if info is None:
        if not isinstance(key, str):
            raise _encode_error("object keys must be strings, got %s" % type(key).__name__)
        key_bytes = key.encode("utf-8")
        cut = key_bytes.find(b"\0")
        if cut >= 0:
            key_bytes = key_bytes[:cut]
        key_size = len(key_bytes) + 1
        if key_size < 64:
            tag = bytes((key_size << 2,))
        elif key_size < 16384:
            tag = LITE3_U16.pack((key_size << 2) | 1)
        elif key_size < 1 << 30:
            tag = LITE3_U32.pack((key_size << 2) | 3)
        else:
            raise _encode_error("object key longer than 2^30 bytes")
        info = (tag + key_bytes + b"\0", _djb2(key_bytes))
        if key_size < 64:
            if len(_key_cache) >= _KEY_CACHE_LIMIT:
                _key_cache.clear()
            _key_cache[key] = info
    return info


# -- encoding: values ---------------------------------------------------------

def _scalar_bytes(value):
    """Return the stored bytes (type byte + payload) of a scalar, or None for a container.

    Raises PlasmiteError Usage for NaN/infinity and unsupported types; UnicodeEncodeError
    (lone surrogate) and OverflowError (int beyond double range) are translated by the
    caller of the encoder.
    """
    value_type = type(value)
    if value_type is str:
        encoded = value.encode("utf-8")
        return LITE3_STRING_HEADER.pack(LITE3_STRING, len(encoded) + 1) + encoded + b"\0"
    if value_type is int:
        if _I64_MIN <= value <= _I64_MAX:
            return LITE3_I64_VALUE.pack(LITE3_I64, value)
        return LITE3_F64_VALUE.pack(LITE3_F64, float(value))   # nearest double (§7.5)
    if value_type is float:
        if value - value != 0.0:
            raise _encode_error("NaN and infinity are not valid JSON numbers")
        return LITE3_F64_VALUE.pack(LITE3_F64, value)
    if value_type is bool:
        return _TRUE_BYTES if value else _FALSE_BYTES
    if value is None:
        return _NULL_BYTES
    if isinstance(value, (dict, list, tuple)):
        return None
    # Subclasses (IntEnum, str enums, ...) are stored as their base value.
    for base in (bool, int, float, str):
        if isinstance(value, base):
            return _scalar_bytes(base(value))
    raise _encode_error("cannot encode a value of type %s" % value_type.__name__)


# -- encoding: the C library's insertion (§6) ---------------------------------

# A container that splits keeps its nodes as 24-item lists (the LITE3_NODE fields) in a
# dict by offset while it is filled, and writes them once at the end: packing and
# unpacking a node on every step made the general path twice as slow (measured: 107 ->
# 52 us for a 20-key message). The buffer holds the other bytes as the C library would.

def _value_size(out, value_offset: int) -> int:
    """Return the total size (type byte included) of the value stored at ``value_offset``."""
    value_type = out[value_offset]
    if value_type == LITE3_STRING or value_type == LITE3_BYTES:
        return 5 + LITE3_U32.unpack_from(out, value_offset + 1)[0]
    return _VALUE_SIZES[value_type]


def _shift_in(fields, start, slot_count, index, value):
    """Insert ``value`` at slot ``index`` of the slot array at ``start``, dropping its last slot.

    The dropped slot is always free: nodes are split before they fill up.
    """
    fields.insert(start + index, value)
    del fields[start + slot_count]


def _append_entry(out, key_entry: bytes, stored: bytes) -> int:
    """Append an entry (key entry then value bytes) at the end; return the entry offset.

    A 95-byte value (val_len, the type byte excluded) is first padded so that it starts on
    a 4-byte boundary. The test is on the length only, so a 90-byte string is padded like
    a node (§5 quirk).
    """
    if len(stored) == 96:
        out += _ZERO_PAD[-(len(out) + len(key_entry)) & 3]
    entry_offset = len(out)
    out += key_entry
    out += stored
    return entry_offset


def _split_node(out, nodes, container, node, parent, parent_index):
    """Split the full node at ``node`` into ``parent`` at ``parent_index`` (§6 step 2.1).

    A full first node is first copied out (the container must keep its offset) and becomes
    the only child of an emptied first node. Returns ``(parent, parent_index, node,
    sibling)``: the left half stays at ``node``, the right half goes to the new ``sibling``,
    and the middle entry moves up to ``parent`` at ``parent_index``.
    """
    fields = nodes[node]
    out += _ZERO_PAD[-len(out) & 3]     # align4 before allocating; the gap stays zero
    if parent is None:
        copy = len(out)
        out += _EMPTY_NODES[0]
        nodes[copy] = fields
        nodes[container] = [fields[_GEN_TYPE]] + [0] * 7 + [fields[_SIZE_COUNT] & ~0x3F] \
            + [0] * 7 + [copy] + [0] * 7
        parent, parent_index, node = container, 0, copy
    sibling = len(out)
    out += _EMPTY_NODES[0]
    parent_fields = nodes[parent]
    _shift_in(parent_fields, _HASHES, 7, parent_index, fields[_HASHES + 3])
    _shift_in(parent_fields, _ENTRY_OFFSETS, 7, parent_index, fields[_ENTRY_OFFSETS + 3])
    _shift_in(parent_fields, _CHILDREN, 8, parent_index + 1, sibling)
    parent_fields[_SIZE_COUNT] += 1
    nodes[sibling] = [fields[_GEN_TYPE] & 0xFF] + fields[5:8] + [0] * 4 + [3] \
        + fields[13:16] + [0] * 4 + fields[20:24] + [0] * 4
    nodes[node] = [fields[_GEN_TYPE]] + fields[1:4] + [0] * 4 + [3] \
        + fields[9:12] + [0] * 4 + fields[16:20] + [0] * 4
    return parent, parent_index, node, sibling


def _member_value_offset(buffer, entry_offset, key_entry):
    """Compare the key stored at ``entry_offset`` with ``key_entry`` the C library's way (§4).

    Returns the member's value offset when the keys match, -1 when another key is stored
    there, and None when the stored key tag has another size class (the C library fails
    with EINVAL instead of probing further) or runs past the end. Keys are compared with
    their NULs over the shorter size.
    """
    if buffer.startswith(key_entry, entry_offset):
        return entry_offset + len(key_entry)
    tag_length = (key_entry[0] & 3) + 1
    if entry_offset + tag_length > len(buffer) or (buffer[entry_offset] & 3) + 1 != tag_length:
        return None
    stored_size = int.from_bytes(buffer[entry_offset:entry_offset + tag_length], "little") >> 2
    key_start = entry_offset + tag_length
    compared = min(stored_size, len(key_entry) - tag_length)
    if buffer[key_start:key_start + compared] != key_entry[tag_length:tag_length + compared]:
        return -1
    return key_start + stored_size


def _overwrite(out, fields, index, key_entry, stored):
    """Overwrite entry ``index`` of the node ``fields`` if it holds ``key_entry`` (§6 step 2.3).

    Returns the value offset, or None when another key holds the entry (the caller probes
    further). A value that does not fit the old one's place is appended with its key and
    the old entry zeroed; otherwise it replaces the zeroed old value in place. Raises
    PlasmiteError Usage on the tag-size-class collision quirk.
    """
    entry_offset = fields[_ENTRY_OFFSETS + index]
    value_offset = entry_offset
    if key_entry:
        value_offset = _member_value_offset(out, entry_offset, key_entry)
        if value_offset is None:
            raise _encode_error("keys with equal hashes but different key tag sizes (EINVAL)")
        if value_offset < 0:
            return None
    old_size = _value_size(out, value_offset)
    if len(stored) - 1 >= old_size:     # val_len >= old size: the C library's test
        out[entry_offset:value_offset + old_size] = bytes(value_offset + old_size - entry_offset)
        entry_offset = _append_entry(out, key_entry, stored)
        fields[_ENTRY_OFFSETS + index] = entry_offset
        return entry_offset + len(key_entry)
    out[value_offset:value_offset + old_size] = bytes(old_size)
    out[value_offset:value_offset + len(stored)] = stored
    return value_offset


def _insert_attempt(out, nodes, container, key_entry, probe, stored):
    """Run one probe attempt of the set operation (§6 step 2), splitting full nodes on the way.

    Returns the value offset, or None when an entry with another key holds ``probe``.
    """
    node, parent, parent_index = container, None, 0
    for _ in range(LITE3_MAX_TREE_DEPTH + 1):
        if nodes[node][_SIZE_COUNT] & 7 == LITE3_NODE_KEYS:
            promoted = nodes[node][_HASHES + 3]
            parent, parent_index, node, sibling = _split_node(out, nodes, container, node,
                                                              parent, parent_index)
            if probe == promoted:
                return _overwrite(out, nodes[parent], parent_index, key_entry, stored)
            if probe > promoted:
                node = sibling
        fields = nodes[node]
        key_count = fields[_SIZE_COUNT] & 7
        index = bisect.bisect_left(fields, probe, _HASHES, _HASHES + key_count) - _HASHES
        if index < key_count and fields[_HASHES + index] == probe:
            return _overwrite(out, fields, index, key_entry, stored)
        if fields[_CHILDREN] == 0:
            # Insert in the leaf (§6 step 2.5); the element count lives in the first node.
            entry_offset = _append_entry(out, key_entry, stored)
            _shift_in(fields, _HASHES, 7, index, probe)
            _shift_in(fields, _ENTRY_OFFSETS, 7, index, entry_offset)
            fields[_SIZE_COUNT] += 1
            nodes[container][_SIZE_COUNT] += 1 << 6
            return entry_offset + len(key_entry)
        parent, parent_index = node, index
        node = fields[_CHILDREN + index]
    raise _encode_error("lite3 tree deeper than %d levels" % LITE3_MAX_TREE_DEPTH)


def _insert(out, nodes, container, key_entry, hash_value, stored):
    """Store one member (value bytes ``stored``) in the container at ``container`` (§6).

    ``key_entry`` is b"" for arrays, where ``hash_value`` is the index. Every call bumps
    the container's generation first, as the C library does. Returns the value offset.
    """
    nodes[container][_GEN_TYPE] = (nodes[container][_GEN_TYPE] + 0x100) & 0xFFFFFFFF
    for attempt in range(LITE3_PROBE_ATTEMPTS if key_entry else 1):
        value_offset = _insert_attempt(out, nodes, container, key_entry,
                                       (hash_value + attempt * attempt) & 0xFFFFFFFF, stored)
        if value_offset is not None:
            return value_offset
    raise _encode_error("%d keys probed without a free hash slot" % LITE3_PROBE_ATTEMPTS)


def _fill_by_insertion(out, container, keys, members, depth, should_sort_keys):
    """Insert members one by one with the C library's set operation (splits, duplicates).

    ``keys`` is None for arrays. Members that are containers are filled right after their
    insertion, before the next member, as ``lite3_json_dec`` does.
    """
    nodes = {container: list(LITE3_NODE.unpack_from(out, container))}
    for index, member in enumerate(members):
        stored = _scalar_bytes(member)
        is_container = stored is None
        if is_container:
            stored = _EMPTY_NODES[_container_type(member)]
        if keys is None:
            value_offset = _insert(out, nodes, container, b"", index, stored)
        else:
            key_entry, hash_value = _key_info(keys[index])
            value_offset = _insert(out, nodes, container, key_entry, hash_value, stored)
        if is_container:
            _fill_container(out, value_offset, member, depth + 1, should_sort_keys)
    for offset, fields in nodes.items():
        LITE3_NODE.pack_into(out, offset, *fields)


# -- encoding: containers -----------------------------------------------------

def _container_type(value) -> int:
    """Return the Lite3 type of a container value (_scalar_bytes returned None for it)."""
    return LITE3_OBJECT if isinstance(value, (dict, ObjectPairs)) else LITE3_ARRAY


def _append_members(out, key_entries, members, depth, should_sort_keys) -> list:
    """Append members to a container that will never split; return their entry offsets.

    Equivalent to §6 step 2.5 on a node with room: padding, key entry, value, each at the
    end of the buffer. Strings, i64 ints and finite floats are inlined here because this
    loop encodes nearly every message (measured: 18 us -> 9 us per example message).
    """
    offsets = []
    for key_entry, member in zip(key_entries, members):    # hot loop
        member_type = type(member)
        if member_type is str:
            encoded = member.encode("utf-8")
            if len(encoded) == 90:      # val_len 95: padded like a node (§5 quirk)
                out += _ZERO_PAD[-(len(out) + len(key_entry)) & 3]
            offsets.append(len(out))
            out += key_entry
            out += LITE3_STRING_HEADER.pack(LITE3_STRING, len(encoded) + 1)
            out += encoded
            out += b"\0"
        elif member_type is int and _I64_MIN <= member <= _I64_MAX:
            offsets.append(len(out))
            out += key_entry
            out += LITE3_I64_VALUE.pack(LITE3_I64, member)
        elif member_type is float and member - member == 0.0:
            offsets.append(len(out))
            out += key_entry
            out += LITE3_F64_VALUE.pack(LITE3_F64, member)
        else:
            stored = _scalar_bytes(member)
            if stored is None:
                entry_offset = _append_entry(out, key_entry, _EMPTY_NODES[_container_type(member)])
                _fill_container(out, entry_offset + len(key_entry), member, depth + 1,
                                should_sort_keys)
            else:
                entry_offset = _append_entry(out, key_entry, stored)
            offsets.append(entry_offset)
    return offsets


def _probe_small_object(infos):
    """Resolve the stored hashes of up to 7 keys whose DJB2 hashes collide (§4).

    Returns the list of stored hashes, or None when two keys are equal (after the NUL cut),
    which needs the overwrite logic of the general path.
    """
    stored = {}
    for key_entry, hash_value in infos:
        for attempt in range(LITE3_PROBE_ATTEMPTS):
            probe = (hash_value + attempt * attempt) & 0xFFFFFFFF
            existing = stored.get(probe)
            if existing is None:
                break
            if existing[0] & 3 != key_entry[0] & 3:
                raise _encode_error("keys with equal hashes but different key tag sizes (EINVAL)")
            if existing == key_entry:
                return None
        else:
            raise _encode_error("%d keys probed without a free hash slot" % LITE3_PROBE_ATTEMPTS)
        stored[probe] = key_entry
    return list(stored)


# Messages of one stream share their key sets, so the layout of a small object is cached
# per tuple of keys; bounded like _key_cache.
_layout_cache: dict = {}


def _small_object_layout(keys: tuple):
    """Return ``(key_entries, sorted_hashes, reorder)`` for an object of up to 7 keys.

    ``key_entries`` are in insertion order; ``reorder(offsets)`` puts entry offsets in
    ascending hash order, as the node stores them. Returns None when two keys are equal
    after the NUL cut (the general path handles the overwrite).
    """
    layout = _layout_cache.get(keys)
    if layout is None:
        infos = [_key_info(key) for key in keys]
        hashes = [info[1] for info in infos]
        if len(set(hashes)) < len(hashes):
            hashes = _probe_small_object(infos)
            if hashes is None:
                return None
        order = sorted(range(len(keys)), key=hashes.__getitem__)
        reorder = operator.itemgetter(*order) if len(order) > 1 else tuple
        layout = ([info[0] for info in infos], [hashes[index] for index in order], reorder)
        if all(len(info[0]) <= 64 for info in infos):
            if len(_layout_cache) >= _KEY_CACHE_LIMIT:
                _layout_cache.clear()
            _layout_cache[keys] = layout
    return layout


def _fill_container(out, node, value, depth, should_sort_keys):
    """Insert the members of ``value`` into the fresh container node at ``node``.

    ``depth`` counts containers from the root (1). Containers of up to 7 distinct members
    never split, so their members are appended and their node written once, with gen and
    size equal to the count; larger ones (and duplicate keys) run the C library's
    insertion member by member.
    """
    if depth > LITE3_MAX_NESTING:
        raise _encode_error("nesting deeper than %d containers" % LITE3_MAX_NESTING)
    if should_sort_keys and isinstance(value, ObjectPairs):
        value = dict(value)         # serde_json semantics: the last duplicate wins
    if isinstance(value, dict):
        keys = sorted(value) if should_sort_keys else list(value)
        members = list(map(value.__getitem__, keys))
    elif isinstance(value, ObjectPairs):
        keys = [key for key, _ in value]
        members = [member for _, member in value]
    else:
        count = len(value)
        if count <= LITE3_NODE_KEYS:
            offsets = _append_members(out, _EMPTY_KEYS, value, depth, should_sort_keys)
            LITE3_NODE_PREFIXES[count].pack_into(out, node, LITE3_ARRAY | count << 8,
                                                 *range(count), count << 6 | count, *offsets)
        else:
            _fill_by_insertion(out, node, None, value, depth, should_sort_keys)
        return
    count = len(keys)
    if count <= LITE3_NODE_KEYS:
        layout = _small_object_layout(tuple(keys))
        if layout is not None:
            key_entries, hashes, reorder = layout
            offsets = _append_members(out, key_entries, members, depth, should_sort_keys)
            LITE3_NODE_PREFIXES[count].pack_into(out, node, LITE3_OBJECT | count << 8, *hashes,
                                                 count << 6 | count, *reorder(offsets))
            return
    _fill_by_insertion(out, node, keys, members, depth, should_sort_keys)


def _encode_failure(error) -> PlasmiteError:
    """Translate an exception raised while encoding values into PlasmiteError Usage."""
    if isinstance(error, UnicodeEncodeError):
        return _encode_error("string is not valid Unicode (lone surrogate)")
    if isinstance(error, OverflowError):
        return _encode_error("integer too large for a double")
    return _encode_error("cannot encode value: %s" % error)


def _finish_buffer(out) -> bytes:
    """Return the encoded buffer as bytes, refusing what plasmite's retry loop would (§7.7)."""
    if len(out) > LITE3_MAX_BUFFER:
        raise PlasmiteError("Usage", "lite3 buffer exceeded max size",
                            hint="Lite3 buffers are limited to 256 MiB.")
    return bytes(out)


def _encode_document(document, should_sort_keys: bool) -> bytes:
    """Encode ``document`` as ``lite3_json_dec`` would; translate every failure to Usage."""
    try:
        if _scalar_bytes(document) is not None:
            return b""      # §7.2 quirk: a scalar root "succeeds" with an empty buffer
        out = bytearray(_EMPTY_NODES[_container_type(document)])
        _fill_container(out, 0, document, 1, should_sort_keys)
    except (TypeError, ValueError, LookupError, OverflowError, struct.error) as error:
        raise _encode_failure(error) from error
    return _finish_buffer(out)


def encode_lite3(document) -> bytes:
    """Encode a JSON-like Python value as a Lite3 buffer.

    Members are inserted in the order the dicts (or ObjectPairs) hold them, so the result
    is byte-identical to the C library's ``lite3_json_dec`` on JSON text with the same
    members in the same order. Accepts None, bool, int, float, str, dict, ObjectPairs,
    list/tuple; ints outside i64 become the nearest double; keys are cut at U+0000. A
    scalar root gives ``b""`` (the C quirk). Raises PlasmiteError Usage ("failed to encode
    json as lite3", with a hint) for NaN/infinity, lone surrogates, nesting deeper than
    32, exhausted hash probing and other values the C library rejects. Pure and
    thread-safe.
    """
    return _encode_document(document, False)


# -- JSON text: yyjson (§7) and serde_json (§10.2) rules ---------------------

# In valid JSON text, scanning from the start for strings finds exactly the string tokens.
_JSON_STRING = r'"[^"\\]*(?:\\.[^"\\]*)*"'
_JSON_TOKEN = LazyPattern(_JSON_STRING + r'|[^\s\[\]{},:"]+', re.DOTALL)
_JSON_STRING_OR_BRACKET = LazyPattern(_JSON_STRING + r'|[\[\]{}]', re.DOTALL)
_SURROGATE_ESCAPE = LazyPattern(r"\\u[dD][89a-fA-F]")
_NUMBER_PARTS = LazyPattern(r"(-?)([0-9]+)(?:\.([0-9]+))?(?:[eE]([-+]?)([0-9]+))?\Z")
# serde_json multiplies or divides by the double nearest to 10^e, one step (§10.2).
_POWERS_OF_TEN = [float("1e%d" % exponent) for exponent in range(309)]
_I32_MAX = (1 << 31) - 1
# Python's messages for the common mistakes, in serde_json's words.
_SERDE_WORDING = {
    "Expecting value": "expected value",
    "Extra data": "trailing characters",
    "Expecting ':' delimiter": "expected `:`",
    "Expecting property name enclosed in double quotes": "key must be a string",
    "Unterminated string starting at": "EOF while parsing a string",
    "Invalid control character at": "control character (\\u0000-\\u001F) found while parsing a string",
    "Unexpected UTF-8 BOM (decode using utf-8-sig)": "expected value",
}


def _reject_constant(name):
    """Refuse NaN, Infinity and -Infinity, which json accepts and RFC 8259 does not."""
    raise _JsonValueError("expected value", name)


def _yyjson_float(literal: str) -> float:
    """Convert a real literal the way yyjson does: correctly rounded, overflow is an error."""
    value = float(literal)
    if value - value != 0.0:
        raise _JsonValueError("number out of range", literal)
    return value


def _yyjson_int(literal: str):
    """Convert an integer literal the way yyjson does (§7.5): i64, else a double."""
    if len(literal) < 19:
        return int(literal)
    if len(literal.lstrip("-")) <= 20:
        value = int(literal)
        if _I64_MIN <= value <= _I64_MAX:
            return value
        if value <= _U64_MAX:
            return float(value)
    return _yyjson_float(literal)


def _serde_significand(integer_digits: str, fraction_digits: str) -> tuple:
    """Accumulate digits into a u64 the way serde_json does; return (significand, exponent).

    Integer digits that no longer fit each add 1 to the exponent; fraction digits are
    appended while they fit and ignored after the first that does not.
    """
    kept = len(integer_digits)
    if kept > 19:
        kept = 20 if int(integer_digits[:20]) <= _U64_MAX else 19
    significand = int(integer_digits[:kept])
    exponent = len(integer_digits) - kept
    if significand == 0:
        stripped = fraction_digits.lstrip("0")
        exponent -= len(fraction_digits) - len(stripped)
        fraction_digits = stripped
    # At most 20 digits fit in a u64, so this loop ends after ~20 steps.
    for digit in fraction_digits:
        candidate = significand * 10 + ord(digit) - 48
        if candidate > _U64_MAX:
            break
        significand = candidate
        exponent -= 1
    return significand, exponent


def _serde_float(literal: str) -> float:
    """Convert a number literal to a double with serde_json's default (not correctly
    rounded) algorithm: u64 significand, then one multiply/divide by a power of ten.

    Raises _JsonValueError("number out of range") where serde_json would overflow.
    """
    if len(literal) <= 16 and "e" not in literal and "E" not in literal:
        # At most 15 digits: the significand and 10^k (k <= 14) are exact doubles, so
        # serde's one division rounds once, exactly like Python's correctly rounded float.
        return float(literal)
    sign, integer_digits, fraction_digits, exponent_sign, exponent_digits = \
        _NUMBER_PARTS.match(literal).groups()
    fraction_digits = fraction_digits or ""
    if len(integer_digits) + len(fraction_digits) <= 19:
        significand = int(integer_digits + fraction_digits)
        exponent = -len(fraction_digits)
    else:
        significand, exponent = _serde_significand(integer_digits, fraction_digits)
    if exponent_digits is not None:
        exponent_digits = exponent_digits.lstrip("0") or "0"
        if len(exponent_digits) > 10 or int(exponent_digits) > _I32_MAX:
            # An i32 exponent overflow: an error upwards, a signed zero downwards.
            if significand and exponent_sign != "-":
                raise _JsonValueError("number out of range", literal)
            return -0.0 if sign else 0.0
        if exponent_sign == "-":
            exponent = max(exponent - int(exponent_digits), -_I32_MAX - 1)
        else:
            exponent = min(exponent + int(exponent_digits), _I32_MAX)
    value = float(significand)
    # Beyond 10^308 serde divides by 1e308 first; a u64 reaches 0.0 after two such steps.
    while abs(exponent) > 308:
        if value == 0.0:
            return -value if sign else value
        if exponent > 0:
            raise _JsonValueError("number out of range", literal)
        value /= 1e308
        exponent += 308
    if exponent >= 0:
        value *= _POWERS_OF_TEN[exponent]
        if value - value != 0.0:
            raise _JsonValueError("number out of range", literal)
    else:
        value /= _POWERS_OF_TEN[-exponent]
    return -value if sign else value


def _serde_int(literal: str):
    """Convert an integer literal as serde_json does: u64/i64 stay ints, ``-0`` is -0.0,
    negatives below -2^63 are doubles, longer ones go through _serde_float."""
    if len(literal) < 19:
        value = int(literal)
        return -0.0 if value == 0 and literal[0] == "-" else value
    if len(literal.lstrip("-")) <= 20:
        value = int(literal)
        if _I64_MIN <= value <= _U64_MAX:
            return value
        if -_U64_MAX <= value < 0:
            return float(value)
    return _serde_float(literal)


def _sorted_object(pairs) -> dict:
    """Build an object as serde_json's BTreeMap does: last duplicate wins, keys sorted."""
    mapping = dict(pairs)
    return {key: mapping[key] for key in sorted(mapping)}


_YYJSON_DECODER = json.JSONDecoder(object_pairs_hook=ObjectPairs, parse_float=_yyjson_float,
                                   parse_int=_yyjson_int, parse_constant=_reject_constant)
_SERDE_DECODER = json.JSONDecoder(object_pairs_hook=_sorted_object, parse_float=_serde_float,
                                  parse_int=_serde_int, parse_constant=_reject_constant)
# The same without sorting (json keeps each key's first position and its last value): for
# data that is sorted on the way out anyway, by encode_message and dump_json (saves 1.2 us).
_SERDE_UNSORTED_DECODER = json.JSONDecoder(parse_float=_serde_float, parse_int=_serde_int,
                                           parse_constant=_reject_constant)


def _position(text, index) -> str:
    """Describe ``index`` of ``text`` (str or bytes) as serde_json does: 1-based line and column."""
    newline = "\n" if isinstance(text, str) else b"\n"
    line = text.count(newline, 0, index) + 1
    return "line %d column %d" % (line, index - text.rfind(newline, 0, index))


def _lone_surrogate_offset(text: str):
    """Return the offset of the first string holding a lone surrogate escape, else None.

    json accepts ``"\\ud800"``; yyjson and serde_json reject it. Only strings that contain
    a surrogate escape are re-parsed, so ordinary text costs one regex search.
    """
    if "\\u" not in text or _SURROGATE_ESCAPE.search(text) is None:
        return None
    for match in _JSON_TOKEN.finditer(text):
        token = match.group()
        if token[0] == '"' and _SURROGATE_ESCAPE.search(token):
            try:
                json.loads(token).encode("utf-8")
            except UnicodeEncodeError:
                return match.start()
    return None


def _check_serde_depth(text: str) -> None:
    """Reject the 128th nested array/object, where serde_json stops (recursion limit)."""
    if text.count("[") + text.count("{") < SERDE_RECURSION_LIMIT:
        return
    depth = 0
    for match in _JSON_STRING_OR_BRACKET.finditer(text):
        bracket = match.group()
        if bracket == "[" or bracket == "{":
            depth += 1
            if depth >= SERDE_RECURSION_LIMIT:
                raise _JsonValueError("recursion limit exceeded at " + _position(text, match.start()), None)
        elif bracket == "]" or bracket == "}":
            depth -= 1


def _load_json(text, decoder, should_check_depth: bool):
    """Parse JSON text strictly with ``decoder``; raise _JsonValueError with a positioned detail.

    Accepts str or bytes-like (which must be UTF-8). Rejects what RFC 8259 rejects plus
    what json tolerates but yyjson/serde_json do not: NaN/Infinity, lone surrogates.
    """
    if isinstance(text, str):
        if not text.isascii():
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as error:
                raise _JsonValueError("invalid unicode code point at " + _position(text, error.start), None) from error
    else:
        try:
            raw = memoryview(text).tobytes()
        except (TypeError, ValueError) as error:
            raise _JsonValueError("json text must be str or bytes", None) from error
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as error:
            raise _JsonValueError("invalid UTF-8 at " + _position(raw, error.start), None) from error
    if should_check_depth:
        _check_serde_depth(text)
    try:
        value = decoder.decode(text)
    except json.JSONDecodeError as error:
        detail = _SERDE_WORDING.get(error.msg, error.msg[:1].lower() + error.msg[1:])
        raise _JsonValueError("%s at %s" % (detail, _position(text, error.pos)), None) from error
    except RecursionError as error:
        raise _JsonValueError("recursion limit exceeded", None) from error
    except _JsonValueError as error:
        # The hooks know the literal but not where it is: find its first occurrence.
        for match in _JSON_TOKEN.finditer(text):
            if match.group() == error.literal:
                is_number = error.detail == "number out of range"
                index = match.end() - 1 if is_number else match.start()
                raise _JsonValueError("%s at %s" % (error.detail, _position(text, index)), None) from error
        raise
    offset = _lone_surrogate_offset(text)
    if offset is not None:
        raise _JsonValueError("lone surrogate in hex escape at " + _position(text, offset), None)
    return value


def encode_lite3_json_text(text) -> bytes:
    """Encode JSON text exactly as the C library's ``lite3_json_dec`` does.

    ``text`` is str or UTF-8 bytes. Parsing follows yyjson's strict mode (§7): RFC 8259
    only, no BOM, valid UTF-8, no lone surrogate escapes, nothing after the value;
    integers in i64 stay i64 (``-0`` is 0), larger ones become doubles, 1e400 is an error.
    Members are inserted in document order and duplicate keys overwrite (last wins, with
    the C library's byte layout). A scalar root returns ``b""`` (the C quirk). Raises
    PlasmiteError Usage "failed to encode json as lite3" with a hint on any failure.
    """
    try:
        document = _load_json(text, _YYJSON_DECODER, False)
    except _JsonValueError as error:
        raise _encode_error("invalid JSON: %s" % error.detail) from error
    return _encode_document(document, False)


def parse_json_value(text, should_sort_keys: bool = True):
    """Parse message data as plasmite v0.1.0 does through serde_json (§10.2).

    Strict JSON (str or UTF-8 bytes); duplicate keys keep the last value; object keys
    come back sorted by code point at every level; integers up to 2^64-1 stay ints, ``-0``
    is -0.0, negatives below -2^63 and all other numbers are doubles computed with
    serde_json's non-correctly-rounded algorithm (``1.5e-300`` -> 1.4999999999999998e-300);
    at most 127 nested containers. With ``should_sort_keys`` false, objects keep their
    keys in document order instead (for data that is encoded or printed next, which
    sorts it anyway). Raises PlasmiteError Usage "invalid json: <detail at
    line L column C>" on any failure.
    """
    try:
        return _load_json(text, _SERDE_DECODER if should_sort_keys else _SERDE_UNSORTED_DECODER,
                          True)
    except _JsonValueError as error:
        raise PlasmiteError("Usage", "invalid json: %s" % error.detail, hint=_JSON_HINT) from error


# -- decoding (§8.1) -----------------------------------------------------------

def _as_bytes(buffer) -> bytes:
    """Return ``buffer`` (any bytes-like object) as bytes, copying once if needed."""
    if type(buffer) is bytes:
        return buffer
    try:
        return memoryview(buffer).tobytes()
    except (TypeError, ValueError) as error:     # not a buffer, or a released memoryview
        raise _corrupt("lite3 buffer must be bytes-like, not %s" % type(buffer).__name__) from error


def _walk_entries(payload, fields, budget):
    """Return the entry offsets of a split container in the C iterator's order (§8.1).

    ``fields`` is the container's first node. Out-of-bounds children, descents beyond 9
    levels, non-container nodes and slot indexes past 7 raise PlasmiteError Corrupt; the
    walk ends at the latest when ``budget[0]`` entries have been emitted.
    """
    limit = len(payload) - LITE3_NODE.size
    stack = [[fields, 0]]
    entries = []

    def descend(child):
        """Push ``child`` and its leftmost descendants (index 0 each) onto the stack."""
        while child:
            if len(stack) > LITE3_MAX_TREE_DEPTH:
                raise _corrupt("lite3 tree deeper than %d levels" % LITE3_MAX_TREE_DEPTH, child)
            if child > limit:
                raise _corrupt("lite3 child node out of bounds", child)
            child_fields = LITE3_NODE.unpack_from(payload, child)
            stack.append([child_fields, 0])
            child = child_fields[_CHILDREN]

    descend(fields[_CHILDREN])
    while True:     # each pass emits an entry or ends; entries are capped by the budget
        top = stack[-1]
        node_fields, index = top
        if node_fields[_GEN_TYPE] & 0xFF not in (LITE3_OBJECT, LITE3_ARRAY):
            raise _corrupt("invalid lite3 node type %d" % (node_fields[_GEN_TYPE] & 0xFF))
        if len(stack) == 1 and index == node_fields[_SIZE_COUNT] & 7:
            return entries
        if index >= LITE3_NODE_KEYS or len(entries) >= budget[0]:
            raise _corrupt("lite3 node key counts are inconsistent")
        entries.append(node_fields[_ENTRY_OFFSETS + index])
        top[1] = index + 1
        descend(node_fields[_CHILDREN + index + 1])
        while len(stack) > 1 and stack[-1][1] == stack[-1][0][_SIZE_COUNT] & 7:
            stack.pop()


# Decoded keys by their stored entry (tag + key + NUL); bounded like _key_cache.
_decoded_keys: dict = {}


def _decode_key(payload, entry, value_offset) -> str:
    """Decode and cache the key of the entry at ``entry`` whose value starts at ``value_offset``.

    Keys are C strings: they end at the first NUL, which must lie inside the key (this
    also rejects a key running past the end). Raises PlasmiteError Corrupt.
    """
    key_start = entry + (payload[entry] & 3) + 1
    key_end = payload.find(b"\0", key_start, value_offset)
    if key_end < 0 or value_offset > len(payload):
        raise _corrupt("lite3 key out of bounds or not NUL-terminated", entry)
    key = payload[key_start:key_end].decode("utf-8")
    if value_offset - entry <= 64:
        if len(_decoded_keys) >= _KEY_CACHE_LIMIT:
            _decoded_keys.clear()
        _decoded_keys[payload[entry:value_offset]] = key
    return key


# Strings from this size on are decoded through a memoryview: a slice would be one more
# whole copy, and reading a 100 MB message then peaked at three copies instead of two.
_BIG_STRING = 1 << 20


def _decode_big_string(payload, start: int, end: int) -> str:
    with memoryview(payload) as view:
        return str(view[start:end], "utf-8")


def _decode_container(payload, offset, depth, budget):
    """Decode the container whose first node is at ``offset`` (the caller checked it fits).

    ``budget`` is a one-item list with the number of entries still allowed: a valid buffer
    holds fewer entries than bytes, so a damaged tree that revisits nodes cannot make the
    walk run away. Bounds are checked by the IndexError/struct.error that reading past
    the end raises, except for slices, which are checked explicitly.
    """
    if depth > LITE3_MAX_NESTING:
        raise _corrupt("lite3 nesting deeper than %d containers" % LITE3_MAX_NESTING, offset)
    fields = LITE3_NODE.unpack_from(payload, offset)
    node_type = fields[_GEN_TYPE] & 0xFF
    if node_type != LITE3_OBJECT and node_type != LITE3_ARRAY:
        raise _corrupt("invalid lite3 node type %d" % node_type, offset)
    if fields[_CHILDREN:] == _NO_CHILDREN:
        entries = fields[_ENTRY_OFFSETS:_ENTRY_OFFSETS + (fields[_SIZE_COUNT] & 7)]
    else:
        entries = _walk_entries(payload, fields, budget)
    budget[0] -= len(entries)
    if budget[0] < 0:
        raise _corrupt("lite3 tree holds more entries than the buffer has bytes", offset)
    if node_type == LITE3_ARRAY:
        return [_decode_value(payload, entry, depth, budget) for entry in entries]
    size = len(payload)
    result = {}
    try:
        for entry in entries:       # hot loop: keys are cached, strings and i64 inlined
            tag = payload[entry]
            if tag & 3:
                key_start = entry + (tag & 3) + 1
                value_offset = key_start + (int.from_bytes(payload[entry:key_start], "little") >> 2)
            else:
                value_offset = entry + 1 + (tag >> 2)
            # The tag fixes the entry's length, so a cached entry was fully checked before.
            key = _decoded_keys.get(payload[entry:value_offset])
            if key is None:
                key = _decode_key(payload, entry, value_offset)
            value_type = payload[value_offset]
            if value_type == LITE3_STRING:
                start = value_offset + 5
                end = start + LITE3_U32.unpack_from(payload, value_offset + 1)[0] - 1
                if not start <= end < size:
                    raise _corrupt("lite3 string out of bounds", value_offset)
                result[key] = (payload[start:end].decode("utf-8") if end - start < _BIG_STRING
                               else _decode_big_string(payload, start, end))
            elif value_type == LITE3_I64:
                result[key] = LITE3_I64_VALUE.unpack_from(payload, value_offset)[1]
            else:
                result[key] = _decode_value(payload, value_offset, depth, budget)
    except (IndexError, struct.error) as error:
        raise _corrupt("lite3 entry out of bounds", offset) from error
    except UnicodeDecodeError as error:
        raise _corrupt("lite3 key or string is not valid UTF-8", offset) from error
    return result


def _decode_value(payload, offset, depth, budget):
    """Decode the value at ``offset`` of a container at nesting ``depth``; Corrupt if it
    does not fit, has an invalid type, or cannot be rendered as JSON (NaN, bad UTF-8)."""
    try:
        value_type = payload[offset]
        if value_type == LITE3_STRING:
            start = offset + 5
            end = start + LITE3_U32.unpack_from(payload, offset + 1)[0] - 1
            if start <= end < len(payload):
                return (payload[start:end].decode("utf-8") if end - start < _BIG_STRING
                        else _decode_big_string(payload, start, end))
        elif value_type == LITE3_I64:
            return LITE3_I64_VALUE.unpack_from(payload, offset)[1]
        elif value_type == LITE3_F64:
            value = LITE3_F64_VALUE.unpack_from(payload, offset)[1]
            if value - value != 0.0:
                raise _corrupt("lite3 double is NaN or infinite", offset)
            return value
        elif value_type == LITE3_OBJECT or value_type == LITE3_ARRAY:
            if offset + LITE3_NODE.size <= len(payload):
                return _decode_container(payload, offset, depth + 1, budget)
        elif value_type == LITE3_BOOL:
            return payload[offset + 1] != 0      # release builds read any non-zero as true
        elif value_type == LITE3_NULL:
            return None
        elif value_type == LITE3_BYTES:
            end = offset + 5 + LITE3_U32.unpack_from(payload, offset + 1)[0]
            if end <= len(payload):
                return binascii.b2a_base64(payload[offset + 5:end], newline=False).decode("ascii")
        else:
            raise _corrupt("invalid lite3 value type %d" % value_type, offset)
    except (IndexError, struct.error) as error:
        raise _corrupt("lite3 value out of bounds", offset) from error
    except UnicodeDecodeError as error:
        raise _corrupt("lite3 string is not valid UTF-8", offset) from error
    raise _corrupt("lite3 value out of bounds", offset)


def decode_lite3(buffer):
    """Decode a Lite3 buffer (bytes, bytearray, memoryview, mmap slice) to Python values.

    Objects become dicts in stored order (ascending key hash, as the C library renders
    them), arrays lists, i64 ints, f64 floats, strings str, bytes values base64 str.
    Follows the C iterator (§8.1), so damaged buffers are rejected where the C library
    rejects them; tolerates unaligned nodes like release builds. Raises PlasmiteError
    Corrupt naming the problem (short buffer, bad type, out-of-bounds offset, tree too
    deep, NaN/infinity, invalid UTF-8, ...). Pure and thread-safe; never hangs.
    """
    payload = _as_bytes(buffer)
    if len(payload) < LITE3_NODE.size:
        raise _corrupt("lite3 buffer shorter than one node (%d bytes)" % len(payload))
    return _decode_container(payload, 0, 1, [len(payload)])


# -- lookups (§11) --------------------------------------------------------------

def _value_fits(payload, offset) -> bool:
    """Tell whether a valid value type with all its bytes is stored at ``offset``."""
    try:
        return payload[offset] <= LITE3_ARRAY and offset + _value_size(payload, offset) <= len(payload)
    except (IndexError, struct.error):
        return False


def _find_entry(payload, node, key_entry, hash_value):
    """Return the value offset of a member or element of the container at ``node``, or None.

    For an object member pass its ``key_entry`` (tag + key + NUL, see _key_info) and key
    hash; for an array element pass None and the index. None covers a missing member and
    every problem met on the way (offsets out of bounds, a tree deeper than 9 levels, the
    tag-size-class quirk, a value that does not fit): callers only need to know that the
    member is unusable.
    """
    size = len(payload)
    if node + LITE3_NODE.size > size:
        return None
    if payload[node] != (LITE3_ARRAY if key_entry is None else LITE3_OBJECT):
        return None
    for attempt in range(1 if key_entry is None else LITE3_PROBE_ATTEMPTS):
        probe = (hash_value + attempt * attempt) & 0xFFFFFFFF
        current = node
        for _ in range(LITE3_MAX_TREE_DEPTH + 1):
            fields = LITE3_NODE.unpack_from(payload, current)
            key_count = fields[_SIZE_COUNT] & 7
            index = bisect.bisect_left(fields, probe, _HASHES, _HASHES + key_count) - _HASHES
            if index < key_count and fields[_HASHES + index] == probe:
                value_offset = fields[_ENTRY_OFFSETS + index]
                if key_entry is not None:
                    value_offset = _member_value_offset(payload, value_offset, key_entry)
                    if value_offset is None:
                        return None
                    if value_offset < 0:
                        break       # another key holds this hash: next probe attempt
                return value_offset if _value_fits(payload, value_offset) else None
            if fields[_CHILDREN] == 0:
                return None
            current = fields[_CHILDREN + index]
            if current + LITE3_NODE.size > size:
                return None
        else:
            return None         # deeper than the C library allows
    return None


# -- the plasmite message envelope (§10) ---------------------------------------

# Key entries (tag + key + NUL) and hashes of the envelope's members.
_META_KEY, _DATA_KEY, _TAGS_KEY = b"\x14meta\0", b"\x14data\0", b"\x14tags\0"
_META_HASH, _DATA_HASH, _TAGS_HASH = _djb2(b"meta"), _djb2(b"data"), _djb2(b"tags")


def encode_message(tags, data) -> bytes:
    """Encode a message payload exactly as plasmite v0.1.0 stores it.

    The payload is the Lite3 of ``{"data": data, "meta": {"tags": tags}}`` with root
    members in that order and the keys of ``data`` inserted in sorted code-point order at
    every level (serde_json's BTreeMap), whatever order the dicts hold. Ints above 2^63-1
    become doubles. Raises PlasmiteError Usage "data must be object" when ``data`` is not
    a dict, and Usage "failed to encode json as lite3" for values JSON cannot hold. Pure
    and thread-safe.
    """
    if not isinstance(data, dict):
        raise PlasmiteError("Usage", "data must be object")
    if not isinstance(tags, (list, tuple)) or not all(isinstance(tag, str) for tag in tags):
        raise PlasmiteError("Usage", "tags must be a list of strings")
    return _encode_envelope(tags, data)


def _encode_envelope(tags, data) -> bytes:
    """encode_message for arguments already checked: ``data`` a dict, ``tags`` strings.

    What _encode_document does for the envelope, with its fixed parts laid out once:
    the root's two keys and meta's one never change (measured: 10.5 -> 7 us a message).
    """
    try:
        out = bytearray(_ENVELOPE_START)
        _fill_container(out, _ENVELOPE_DATA_NODE, data, 2, True)
        meta_entry = _append_entry(out, _META_KEY, _EMPTY_NODES[LITE3_OBJECT])
        tags_entry = _append_entry(out, _TAGS_KEY, _EMPTY_NODES[LITE3_ARRAY])
        _fill_container(out, tags_entry + len(_TAGS_KEY), tags, 3, True)
    except (TypeError, ValueError, LookupError, OverflowError, struct.error) as error:
        raise _encode_failure(error) from error
    LITE3_NODE_PREFIXES[1].pack_into(out, meta_entry + len(_META_KEY),
                                     LITE3_OBJECT | 1 << 8, _TAGS_HASH, 1 << 6 | 1, tags_entry)
    LITE3_NODE_PREFIXES[2].pack_into(out, 0, LITE3_OBJECT | 2 << 8, _DATA_HASH, _META_HASH,
                                     2 << 6 | 2, _ENVELOPE_DATA_ENTRY, meta_entry)
    return _finish_buffer(out)


# The buffer up to data's node: the root node, 2 bytes that align the node (§5), the
# "data" key entry and an empty object node. ("data" hashes below "meta", so it comes
# first in the root node.)
_ENVELOPE_DATA_ENTRY = LITE3_NODE.size + 2
_ENVELOPE_START = bytes(_ENVELOPE_DATA_ENTRY) + _DATA_KEY + _EMPTY_NODES[LITE3_OBJECT]
_ENVELOPE_DATA_NODE = _ENVELOPE_DATA_ENTRY + len(_DATA_KEY)


def validate_lite3_message(buffer) -> None:
    """Check that ``buffer`` is a plasmite message payload, as plasmite's ``validate()`` does.

    Checks, in order: the root is an object, ``meta`` is an object, ``data`` is an object,
    ``meta.tags`` is an array, and every element of it is a string (by lookups, so other
    members are not inspected). Raises PlasmiteError Corrupt "root is not object", "meta is
    not object", "data is not object", "meta.tags must be array" or "meta.tags must be
    string array"; nothing else. Pure and thread-safe.
    """
    payload = _as_bytes(buffer)
    if len(payload) < LITE3_NODE.size or payload[0] != LITE3_OBJECT:
        raise _corrupt("root is not object")
    meta = _find_entry(payload, 0, _META_KEY, _META_HASH)
    if meta is None or payload[meta] != LITE3_OBJECT:
        raise _corrupt("meta is not object")
    data = _find_entry(payload, 0, _DATA_KEY, _DATA_HASH)
    if data is None or payload[data] != LITE3_OBJECT:
        raise _corrupt("data is not object")
    tags = _find_entry(payload, meta, _TAGS_KEY, _TAGS_HASH)
    if tags is None or payload[tags] != LITE3_ARRAY:
        raise _corrupt("meta.tags must be array")
    count = LITE3_U32.unpack_from(payload, tags + 32)[0] >> 6
    # A valid array has fewer elements than the buffer has bytes; a damaged count must
    # not make this loop run for 2^26 lookups.
    if count > len(payload):
        raise _corrupt("meta.tags must be string array")
    for index in range(count):
        element = _find_entry(payload, tags, None, index)
        if element is None or payload[element] != LITE3_STRING:
            raise _corrupt("meta.tags must be string array")


def decode_message(buffer) -> tuple:
    """Return ``(tags, data)`` of a stored message payload.

    ``meta`` must be an object holding a ``tags`` array of strings and ``data`` must be
    present (of any type). Dicts in ``data`` come in stored order, not sorted. Raises
    PlasmiteError Corrupt "missing meta" (absent, not an object, or the root is not an
    object), "missing meta.tags", "meta.tags must be string array", "missing data", or
    the decode_lite3 message for a damaged value. Pure and thread-safe.
    """
    payload = _as_bytes(buffer)
    offsets = _envelope_offsets(payload)
    if offsets is None:
        meta = _find_entry(payload, 0, _META_KEY, _META_HASH)
        if meta is None or payload[meta] != LITE3_OBJECT:
            raise _corrupt("missing meta")
        tags_offset = _find_entry(payload, meta, _TAGS_KEY, _TAGS_HASH)
        if tags_offset is None:
            raise _corrupt("missing meta.tags")
    else:
        data, tags_offset = offsets
    budget = [len(payload)]
    tags = _decode_value(payload, tags_offset, 2, budget)
    if type(tags) is not list or not all(type(tag) is str for tag in tags):
        raise _corrupt("meta.tags must be string array")
    if offsets is None:
        data = _find_entry(payload, 0, _DATA_KEY, _DATA_HASH)
        if data is None:
            raise _corrupt("missing data")
    return tags, _decode_value(payload, data, 1, budget)


def _envelope_offsets(payload):
    """Return the value offsets ``(data, tags)`` of a payload laid out as encode_message
    lays it out (a root node holding exactly data and meta, a meta node holding exactly
    tags), else None.

    Where it answers, _find_entry would find the same offsets (in the first node it
    looks at); its three searches cost a third of decoding a small message (measured),
    this check a tenth.
    """
    size = len(payload)
    try:
        root_type, first_hash, second_hash, size_count, data_entry, meta_entry = (
            LITE3_NODE_PREFIXES[2].unpack_from(payload, 0))
        if (root_type & 0xFF != LITE3_OBJECT or size_count & 7 != 2 or first_hash != _DATA_HASH
                or second_hash != _META_HASH or size < LITE3_NODE.size
                or not payload.startswith(_DATA_KEY, data_entry)
                or not payload.startswith(_META_KEY, meta_entry)):
            return None
        meta = meta_entry + len(_META_KEY)
        meta_type, tags_hash, size_count, tags_entry = LITE3_NODE_PREFIXES[1].unpack_from(payload, meta)
        if (meta_type & 0xFF != LITE3_OBJECT or size_count & 7 != 1 or tags_hash != _TAGS_HASH
                or meta + LITE3_NODE.size > size or not payload.startswith(_TAGS_KEY, tags_entry)):
            return None
    except struct.error:
        return None
    data, tags = data_entry + len(_DATA_KEY), tags_entry + len(_TAGS_KEY)
    if _value_fits(payload, data) and _value_fits(payload, tags):
        return data, tags
    return None


def flat_message_json(payload):
    """Return ``(data, tags)`` as serde_json text for a payload of the common shape, else None.

    The common shape: the envelope encode_message writes, ``data`` one leaf node of
    scalars with keys of under 63 bytes already seen, ``meta.tags`` one leaf node of
    strings. The text equals dump_json of what decode_message returns, built straight
    from the buffer (measured: a 6-key message's JSON line in 9.6 us instead of 11.4).
    None sends the caller the general way, which also reports any damage as
    decode_message would.
    """
    offsets = _envelope_offsets(payload)
    if offsets is None:
        return None
    data = _flat_container_json(payload, offsets[0], LITE3_OBJECT)
    if data is None:
        return None
    tags = _flat_container_json(payload, offsets[1], LITE3_ARRAY)
    if tags is None or tags[1]:
        return None
    return data[0], tags[0]


def _flat_container_json(payload, offset, kind):
    """Return ``(json text, has non-strings)`` of a leaf container of scalars, else None."""
    if payload[offset] != kind:     # else its node fits: _envelope_offsets checked
        return None
    fields = LITE3_NODE.unpack_from(payload, offset)
    if fields[_GEN_TYPE] & 0xFF != kind or fields[_CHILDREN:] != _NO_CHILDREN:
        return None
    size = len(payload)
    keys, texts = [], []
    has_non_strings = False
    try:
        for entry in fields[_ENTRY_OFFSETS:_ENTRY_OFFSETS + (fields[_SIZE_COUNT] & 7)]:
            if kind == LITE3_OBJECT:
                tag = payload[entry]
                value_offset = entry + 1 + (tag >> 2)
                key = None if tag & 3 else _decoded_keys.get(payload[entry:value_offset])
                if key is None:
                    return None
                keys.append(key)
            else:
                value_offset = entry
            value_type = payload[value_offset]
            if value_type == LITE3_STRING:
                start = value_offset + 5
                end = start + LITE3_U32.unpack_from(payload, value_offset + 1)[0] - 1
                if not start <= end < size or end - start >= _BIG_STRING:
                    return None
                texts.append(_encode_json_string(payload[start:end].decode("utf-8")))
                continue
            has_non_strings = True
            if value_type == LITE3_I64:
                texts.append(int.__repr__(LITE3_I64_VALUE.unpack_from(payload, value_offset)[1]))
            elif value_type == LITE3_F64:
                texts.append(format_json_float(LITE3_F64_VALUE.unpack_from(payload, value_offset)[1]))
            elif value_type == LITE3_BOOL:
                texts.append("true" if payload[value_offset + 1] else "false")
            elif value_type == LITE3_NULL:
                texts.append("null")
            else:
                return None
    except (IndexError, struct.error, UnicodeDecodeError, ValueError):
        return None
    if kind == LITE3_ARRAY:
        return "[" + ",".join(texts) + "]", has_non_strings
    if len(set(keys)) != len(keys):
        return None
    pairs = sorted(zip(keys, texts))
    return "{" + ",".join(_encode_json_string(key) + ":" + text for key, text in pairs) + "}", True


# =============================================================================
# 5. Storage format
# =============================================================================
# The on-disk layout of a format-3 pool (spec/pool-format.md), as struct
# records and the arithmetic that places them.  No I/O here: functions take a
# buffer (the mapping) and offsets.  Everything is little-endian.
#
#   file offset 0        4096                4096 + 16*index_capacity   file_size
#               | header | index (16 B/slot) | ring (ring_size bytes)         |

POOL_MAGIC = b"PLSM"
FRAME_MAGIC = b"FRM1"
COMMIT_MARKER = b"PLSMCMIT"
HEADER_SIZE = 4096
INDEX_OFFSET = 4096

# Pool header (bytes 0..103 of the file; the rest of the 4096 bytes is zero):
#   off size field           meaning
#     0    4 magic           b"PLSM"
#     4    4 version         3
#     8    1 endianness      1 = little-endian (the only accepted value)
#     9    7 (reserved)      zero
#    16    8 file_size       must equal the real file length
#    24    8 index_offset    always 4096
#    32    4 index_capacity  16-byte index slots (0 = no index)
#    36    4 (padding)       zero
#    40    8 ring_offset     4096 + 16 * index_capacity
#    48    8 ring_size       file_size - ring_offset
#    56    8 flags           always 0
#    64    8 head_off        ring offset where the next frame goes
#    72    8 tail_off        ring offset of the oldest live frame
#    80    8 tail_next_off   offset of the frame after the tail, 0 = unknown
#    88    8 oldest_seq      seq of the oldest live message, 0 = empty pool
#    96    8 newest_seq      seq of the newest message ever appended
POOL_HEADER = struct.Struct("<4sIB7xQQI4xQQQQQQQQ")
# Magic, version and endianness, re-checked before each append.
POOL_IDENTITY = struct.Struct("<4sIB")
# The five ring-state fields (bytes 64..103), native so that each field is
# one aligned 8-byte access (see IS_HOST_LITTLE_ENDIAN in section 1).  Writes
# go through store_field: ``Struct.pack_into`` zeroes its target before
# filling it, so a concurrent reader (or a crash) could see a field as 0.
RING_STATE = struct.Struct("@5Q")
RING_FIELD = struct.Struct("@Q")
RING_STATE_OFFSET = 64
HEAD_FIELD, TAIL_FIELD, TAIL_NEXT_FIELD, OLDEST_FIELD, NEWEST_FIELD = 64, 72, 80, 88, 96

# Index slot k at file offset 4096 + 16*k: (seq, ring offset of its frame);
# all zero = empty.  Message seq s uses slot s % index_capacity.
INDEX_SLOT = struct.Struct("<QQ")

# Frame header (64 bytes at an 8-aligned ring offset), then the payload, then
# the 8-byte commit marker, then 0-7 bytes of untouched slack:
#   off size field            meaning
#     0    4 magic            b"FRM1"
#     4    4 state            0 empty, 1 writing, 2 committed, 3 wrap marker
#     8    4 flags            0
#    12    4 header_len       64
#    16    8 seq              0 in wrap markers
#    24    8 timestamp_ns     append time, ns since the Unix epoch
#    32    4 payload_len      payload bytes
#    36    4 payload_len_xor  payload_len ^ 0xFFFFFFFF (torn-header guard)
#    40    4 crc32c           always 0 in format 3
#    44   20 (reserved)       zero
FRAME_HEADER = struct.Struct("<4sIIIQQIII20x")
FRAME_STATE_OFFSET = 4
# The magic, state and seq fields alone, for quick checks of a frame's identity.
FRAME_IDENTITY = struct.Struct("<4sI8xQ")
FRAME_OVERHEAD = FRAME_HEADER.size + len(COMMIT_MARKER)  # 72

STATE_EMPTY, STATE_WRITING, STATE_COMMITTED, STATE_WRAP = 0, 1, 2, 3
COMMITTED_STATE_BYTES = struct.pack("<I", STATE_COMMITTED)


def store_field(mapping, offset: int, value: int) -> None:
    """Store one 8-byte ring-state field with a single copy (see RING_STATE)."""
    mapping[offset:offset + 8] = RING_FIELD.pack(value)


def frame_length(payload_length: int) -> int:
    """Return the ring bytes one frame takes: header, payload, marker, padding."""
    return (payload_length + FRAME_OVERHEAD + 7) & ~7


def max_payload_length(ring_size: int) -> int:
    """Return the largest payload a ring of this size accepts."""
    return min(ring_size - FRAME_OVERHEAD, MAX_PAYLOAD_BYTES)


def auto_index_capacity(file_size: int) -> int:
    """Choose the index capacity upstream picks when none is given (pool spec 3.1)."""
    candidate = min(file_size // 256, 65536)
    if candidate == 0:
        return 0
    return min(candidate, max(file_size - (HEADER_SIZE + 1024), 0) // 16)


def ring_offset_for(index_capacity: int) -> int:
    """Return the file offset of the ring for an index of this many slots."""
    return INDEX_OFFSET + 16 * index_capacity


def wrap_marker_header() -> bytes:
    """Return the 64-byte header of a wrap marker frame."""
    return FRAME_HEADER.pack(FRAME_MAGIC, STATE_WRAP, 0, FRAME_HEADER.size, 0, 0, 0,
                             0xFFFFFFFF, 0)


WRAP_MARKER = wrap_marker_header()

PoolLayout = namedtuple("PoolLayout", "file_size index_capacity ring_offset ring_size")
PoolLayout.__doc__ = "The fixed geometry of a pool, read from its header."


def decode_pool_header(header: bytes, actual_size: int) -> PoolLayout:
    """Check a pool header the way upstream's open does and return its layout.

    Checks run in upstream's order and the first failure wins (pool spec
    section 6): magic, version (a Usage error: the file is a pool, just not
    one we understand), endianness, sizes and offsets, ring-state ranges.
    Raises PlasmiteError Corrupt or Usage.
    """
    (magic, version, endianness, file_size, index_offset, index_capacity, ring_offset,
     ring_size, _flags, head, tail, tail_next, oldest, newest) = POOL_HEADER.unpack_from(header, 0)
    if magic != POOL_MAGIC:
        raise PlasmiteError("Corrupt", "bad magic")
    if version != FORMAT_VERSION:
        raise PlasmiteError(
            "Usage", "unsupported pool format version %d (supported: %d)" % (version, FORMAT_VERSION),
            hint="Upgrade plasmite or migrate the pool (export/import). "
                 "Run `plasmite doctor <pool>` for guidance.")
    if endianness != 1:
        raise PlasmiteError("Corrupt", "unsupported endianness")
    if file_size == 0 or file_size != actual_size:
        raise PlasmiteError("Corrupt", "invalid file size")
    if index_offset != INDEX_OFFSET:
        raise PlasmiteError("Corrupt", "invalid index offset")
    if ring_offset < INDEX_OFFSET:
        raise PlasmiteError("Corrupt", "invalid ring offset")
    if ring_offset != ring_offset_for(index_capacity):
        raise PlasmiteError("Corrupt", "ring offset mismatch")
    if ring_offset + ring_size != file_size:
        raise PlasmiteError("Corrupt", "ring bounds mismatch")
    if ring_size == 0:
        raise PlasmiteError("Corrupt", "ring size is zero")
    if head >= ring_size or tail >= ring_size or tail_next >= ring_size:
        raise PlasmiteError("Corrupt", "header offset out of range")
    if head % 8 or tail % 8 or tail_next % 8:
        raise PlasmiteError("Corrupt", "header offset not aligned")
    if oldest != 0 and oldest > newest:
        raise PlasmiteError("Corrupt", "seq bounds inverted")
    if oldest == 0 and not head == tail == tail_next:
        raise PlasmiteError("Corrupt", "empty header offsets mismatch")
    return PoolLayout(file_size, index_capacity, ring_offset, ring_size)


def encode_pool_header(layout: PoolLayout) -> bytes:
    """Return the 4096-byte header of a new, empty pool with this layout."""
    header = bytearray(HEADER_SIZE)
    POOL_HEADER.pack_into(header, 0, POOL_MAGIC, FORMAT_VERSION, 1, layout.file_size,
                          INDEX_OFFSET, layout.index_capacity, layout.ring_offset,
                          layout.ring_size, 0, 0, 0, 0, 0, 0)
    return bytes(header)


def used_bytes(head: int, tail: int, oldest: int, ring_size: int) -> int:
    """Return the ring bytes held by live frames (head == tail means empty or full)."""
    if head == tail:
        return 0 if oldest == 0 else ring_size
    if head > tail:
        return head - tail
    return ring_size - (tail - head)


# =============================================================================
# 6. Pool
# =============================================================================
# LocalPool owns one mapped pool file: create/open, the locked append with
# upstream's placement, eviction and commit order, reads that validate every
# frame, the Cursor that follows the ring, and the doctor-style validation.
# Uses sections 1-5 only.

Frame = namedtuple("Frame", "seq timestamp_ns payload")
Frame.__doc__ = "One committed message as stored: seq, append time (ns) and Lite3 payload bytes."

# What inspecting the ring at an offset found (first field of FrameView).
FOUND_MESSAGE, FOUND_WRAP, FOUND_PENDING, FOUND_INVALID = "message", "wrap", "pending", "invalid"
FrameView = namedtuple("FrameView", "found seq timestamp_ns payload_length next_offset problem")

# How long a reader waits for a writer to publish when the ring disagrees with
# the header before it calls the file corrupt.  An append takes microseconds;
# a Rust writer overwrites the tail before it publishes the eviction, so a
# reader can briefly see a frame being rewritten (spec/pool-format.md 8).
SETTLE_SECONDS = 0.05


def resolve_pool_path(directory, name: str) -> str:
    """Map a pool reference to a file path (spec/cli.md section 6.1).

    A name containing ``/`` is a path used as is; a name ending in
    ``.plasmite`` lives in ``directory`` as is; any other name gets the suffix.
    """
    if "/" in name:
        return name
    if name.endswith(POOL_SUFFIX):
        return os.path.join(os.fspath(directory), name)
    return os.path.join(os.fspath(directory), name + POOL_SUFFIX)


def _check_host() -> None:
    if not IS_HOST_LITTLE_ENDIAN:
        raise PlasmiteError("Usage", "pools need a little-endian machine",
                            hint="Format version 3 is little-endian only, as upstream.")


def _open_pool_fd(path: str):
    """Open a pool file read/write, or read-only when we may not write; return (fd, writable)."""
    try:
        return os.open(path, os.O_RDWR | getattr(os, "O_CLOEXEC", 0)), True
    except OSError as err:
        if err.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise
    return os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0)), False


class LocalPool:
    """A pool file opened in this process: append, read, follow and validate.

    Safe to share between threads (appends serialise on a thread lock, then
    on the file lock shared with other processes, Rust writers included).
    Readers take no lock; every frame they read is validated.  Create one
    with :meth:`create` or :meth:`open`; close it with :meth:`close`.
    """

    def __init__(self, path: str, fd: int, mapping: mmap.mmap, layout: PoolLayout,
                 is_writable: bool):
        self.path = path
        self.layout = layout
        self.ring_offset = layout.ring_offset
        self.ring_size = layout.ring_size
        self.index_capacity = layout.index_capacity
        self.max_payload_length = max_payload_length(layout.ring_size)
        self.is_writable = is_writable
        self._fd = fd
        self._mapping = mapping
        self._append_lock = _thread.allocate_lock()   # threading's Lock, without importing threading
        self._is_closed = False
        self._last_arrival = time.monotonic()   # when wait_for_seq last saw a new message

    # -- opening and closing ------------------------------------------------

    @classmethod
    def create(cls, path, file_size: int, index_capacity=None) -> "LocalPool":
        """Create a new empty pool file and return it opened.

        ``index_capacity`` None picks upstream's automatic size; 0 disables the
        index.  Parent directories are created and the file's blocks are
        reserved, so a full disk is reported now (Io) instead of killing a
        later append with SIGBUS.  An existing file is never
        touched: AlreadyExists.  The layout is checked before anything is
        written, so a bad size leaves no stub file (upstream leaves one).
        Raises PlasmiteError Usage, AlreadyExists, Permission or Io.
        """
        path = os.fspath(path)
        _check_host()
        if isinstance(file_size, bool) or not isinstance(file_size, int) or file_size <= 0:
            raise PlasmiteError("Usage", "pool size must be a positive number of bytes",
                                hint="Use bytes or K/M/G (e.g. 1M).")
        if index_capacity is None:
            index_capacity = auto_index_capacity(file_size)
        elif (isinstance(index_capacity, bool) or not isinstance(index_capacity, int)
              or not 0 <= index_capacity <= 0xFFFFFFFF):
            raise PlasmiteError("Usage", "index capacity must be an integer from 0 to 4294967295")
        ring_offset = ring_offset_for(index_capacity)
        if file_size <= ring_offset:
            raise PlasmiteError("Usage", "file_size must exceed header and index size",
                                hint="Choose a file size greater than %d bytes." % ring_offset)
        if file_size > MAX_FILE_SIZE:
            # ftruncate cannot even be asked (OverflowError, and a stub file
            # left behind); answer as it does for a size the disk cannot hold.
            raise PlasmiteError("Io", "not enough disk space for the pool", path=path,
                                hint="Free some space or create a smaller pool (--size).",
                                causes=[describe_os_error(OSError(errno.EFBIG, ""))])
        layout = PoolLayout(file_size, index_capacity, ring_offset, file_size - ring_offset)
        if os.path.lexists(path):
            raise _pool_exists(path, FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST)))
        parent, name = os.path.split(path)
        # Made whole under a hidden name, then linked into place: a reader or a second
        # creator never sees a half-made pool (a `poke --create` racing another one
        # read "bad magic" before), and the link fails if the name was taken meanwhile.
        scratch = os.path.join(parent, ".%s.%s.creating" % (name, os.urandom(4).hex()))
        fd = _create_exclusively(scratch, path)
        try:
            mapping = _initialise_pool_file(fd, layout, path)
            try:
                os.link(scratch, path)
            except FileExistsError as err:
                mapping.close()
                raise _pool_exists(path, err) from err
            except OSError:
                # A file system without hard links: create in place, as upstream does.
                mapping.close()
                os.close(fd)
                fd = None
                fd = _create_exclusively(path, path)
                try:
                    mapping = _initialise_pool_file(fd, layout, path)
                except BaseException:
                    _remove_quietly(path)
                    raise
        except BaseException:
            if fd is not None:
                os.close(fd)
            raise
        finally:
            _remove_quietly(scratch)
        return cls(path, fd, mapping, layout, True)

    @classmethod
    def open(cls, path) -> "LocalPool":
        """Open an existing pool file after checking its header.

        Opens read/write when permitted, else read-only (appends then raise
        Permission).  Raises PlasmiteError NotFound, Permission, Io, Corrupt
        (not a pool, truncated, inconsistent header) or Usage (another format
        version).
        """
        path = os.fspath(path)
        _check_host()
        try:
            fd, is_writable = _open_pool_fd(path)
        except OSError as err:
            if err.errno == errno.ENOENT:
                raise PlasmiteError("NotFound", "not found", path=path,
                                    hint="Check the pool name and directory, or create the pool first.",
                                    causes=[describe_os_error(err)]) from err
            raise with_automatic_hint(error_from_os(err, path=path)) from err
        try:
            actual_size = os.fstat(fd).st_size
            header = os.pread(fd, HEADER_SIZE, 0)
            if len(header) < HEADER_SIZE:
                raise PlasmiteError("Corrupt", "corrupt data", path=path, hint=CORRUPT_HINT,
                                    causes=["failed to fill whole buffer"])
            try:
                layout = decode_pool_header(header, actual_size)
            except PlasmiteError as err:
                err.path = path
                raise with_automatic_hint(err)
            mapping = map_pool_file(fd, actual_size, is_writable)
        except OSError as err:
            os.close(fd)
            raise error_from_os(err, path=path) from err
        except BaseException:
            os.close(fd)
            raise
        return cls(path, fd, mapping, layout, is_writable)

    def close(self) -> None:
        """Unmap and close the pool file; later calls raise PlasmiteError. Idempotent."""
        if self._is_closed:
            return
        self._is_closed = True
        try:
            self._mapping.close()
        except BufferError:
            # A caller still holds a view of the mapping; it is released
            # when that view is, and the descriptor is closed regardless.
            pass
        os.close(self._fd)

    @property
    def is_closed(self) -> bool:
        """True after :meth:`close`."""
        return self._is_closed

    def __enter__(self) -> "LocalPool":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _check_open(self) -> mmap.mmap:
        if self._is_closed:
            raise PlasmiteError("Usage", "pool is closed", path=self.path,
                                hint="Open the pool again.")
        return self._mapping

    # -- header -------------------------------------------------------------

    def read_state(self) -> tuple:
        """Return the published (head, tail, tail_next, oldest, newest) fields.

        A reader may see a mixture of two publications (they are separate
        8-byte stores); every use below tolerates that by validating frames.
        """
        return RING_STATE.unpack_from(self._check_open(), RING_STATE_OFFSET)

    def _check_identity(self) -> None:
        """Re-check magic, version and endianness, as upstream does on each re-read."""
        magic, version, endianness = POOL_IDENTITY.unpack_from(self._mapping, 0)
        if magic != POOL_MAGIC:
            raise PlasmiteError("Corrupt", "bad magic", path=self.path)
        if version != FORMAT_VERSION:
            raise PlasmiteError("Usage", "unsupported pool format version %d (supported: %d)"
                                % (version, FORMAT_VERSION), path=self.path)
        if endianness != 1:
            raise PlasmiteError("Corrupt", "unsupported endianness", path=self.path)

    def bounds(self):
        """Return (oldest_seq, newest_seq) of the live messages, or None when empty."""
        _head, _tail, _tail_next, oldest, newest = self.read_state()
        return None if oldest == 0 else (oldest, newest)

    # -- appending ----------------------------------------------------------

    def append(self, payload, timestamp_ns=None, should_flush: bool = False) -> tuple:
        """Append one payload as a committed frame; return (seq, timestamp_ns).

        Blocks on the pool's writer lock.  ``timestamp_ns`` defaults to the
        wall clock now.  With ``should_flush`` the frame, index slot and header
        are msync'ed before returning (durability "flush").  The payload is
        stored as given (callers produce or validate Lite3).  Raises
        PlasmiteError Usage (too large for the ring), Permission (read-only),
        Corrupt (inconsistent header), Io.
        """
        mapping = self._check_open()
        payload_length = len(payload)
        if payload_length > self.max_payload_length:
            raise PlasmiteError(
                "Usage", "payload exceeds ring capacity", path=self.path,
                hint="The message needs %d bytes but this pool holds at most %d per message; "
                     "create a larger pool (pool create --size)."
                     % (payload_length, self.max_payload_length))
        length = frame_length(payload_length)
        if length > self.ring_size:
            raise PlasmiteError("Usage", "frame larger than ring", path=self.path,
                                hint="Create a larger pool (pool create --size).")
        if not self.is_writable:
            raise PlasmiteError("Permission", "pool file is read-only", path=self.path,
                                hint="Check the file permissions of the pool.")
        if timestamp_ns is None:
            timestamp_ns = time.time_ns()
        with self._append_lock:
            try:
                lock_pool_file(self._fd)
            except OSError as err:
                raise error_from_os(err, "failed to lock pool file", path=self.path) from err
            try:
                self._check_identity()
                return self._append_locked(mapping, payload, payload_length, length,
                                           timestamp_ns, should_flush)
            finally:
                unlock_pool_file(self._fd)

    def _append_locked(self, mapping, payload, payload_length, length, timestamp_ns,
                       should_flush):
        """Plan, write and publish one frame; the caller holds both locks.

        The plan is upstream's (pool spec section 7) so files stay
        byte-identical.  One addition: when the plan evicts messages, the new
        tail is published *before* their bytes are overwritten.  Upstream
        publishes only at the end, so a writer killed mid-overwrite leaves a
        header that still lists a destroyed frame, and a reader cannot tell a
        torn copy from a good one.  Publishing first keeps every state a crash
        can leave consistent, and a reader that re-checks ``oldest_seq`` after
        copying a payload knows the copy is whole.
        """
        ring_size = self.ring_size
        ring_offset = self.ring_offset
        head, tail, tail_next, oldest, newest = RING_STATE.unpack_from(mapping, RING_STATE_OFFSET)
        if head >= ring_size or tail >= ring_size:
            raise PlasmiteError("Corrupt", "head/tail out of range", path=self.path)
        if oldest == 0 and head != tail:
            raise PlasmiteError("Corrupt", "empty pool head/tail mismatch", path=self.path)
        head, tail, tail_next, oldest = self._finish_interrupted_append(
            mapping, head, tail, tail_next, oldest, newest)
        original_tail, original_tail_next = tail, tail_next
        if oldest == 0:
            tail_next = tail
        is_wrap_needed = ring_size - head < length
        has_evicted = False
        # Each eviction removes a frame or a wrap gap, so a consistent ring
        # needs at most one pass over it; the bound turns a damaged one into
        # an error instead of a loop.
        for _ in range(ring_size // 64 + 4):
            if oldest == 0:
                required = length
            elif ring_size - head >= length:
                required = length
            elif ring_size - head >= FRAME_HEADER.size:
                required = length + FRAME_HEADER.size
            else:
                required = length + (ring_size - head)
            free = ring_size - used_bytes(head, tail, oldest, ring_size)
            if free >= required and not (is_wrap_needed and oldest != 0 and tail < length):
                break
            tail, oldest = self._evict_one(mapping, head, tail, tail_next, oldest)
            has_evicted = True
            tail_next = 0
            if tail == head:
                oldest = 0
                tail_next = tail
        else:
            raise PlasmiteError("Corrupt", "unable to make space", path=self.path)
        if has_evicted:
            # tail_next first (0 sends any writer down the slow path), then
            # oldest, then tail: a reader walking from the old tail skips the
            # frames older than oldest, so every prefix of these stores is a
            # pool that reads correctly.
            # When the ring emptied, oldest = 0 must come last (an empty
            # header needs head == tail == tail_next); until then the header
            # briefly reads as a full ring, which _is_interrupted_emptying
            # recognises.
            store = store_field
            if oldest == 0:
                store(mapping, TAIL_NEXT_FIELD, tail_next)
                store(mapping, TAIL_FIELD, tail)
                store(mapping, OLDEST_FIELD, 0)
            else:
                store(mapping, TAIL_NEXT_FIELD, 0)
                store(mapping, OLDEST_FIELD, oldest)
                store(mapping, TAIL_FIELD, tail)
        wrap_at = None
        if ring_size - head < length:
            if ring_size - head >= FRAME_HEADER.size:
                wrap_at = head
            head = 0
        is_into_empty = oldest == 0
        if is_into_empty:
            tail = head
        seq = 1 if newest == 0 else newest + 1
        if is_into_empty:
            oldest = seq
        new_head = head + length
        if new_head == ring_size:
            new_head = 0
        if is_into_empty:
            new_tail_next = new_head
        elif tail == original_tail:
            new_tail_next = original_tail_next
        else:
            new_tail_next = self._successor(mapping, tail)
        # Write order (pool spec section 8): wrap marker, header "writing",
        # payload, commit marker, header "committed", index slot, publish.
        if wrap_at is not None:
            mapping[ring_offset + wrap_at:ring_offset + wrap_at + FRAME_HEADER.size] = WRAP_MARKER
        frame_offset = ring_offset + head
        # Every store is a slice assignment of packed bytes (one memcpy),
        # never pack_into, which zeroes its target first.
        payload_start = frame_offset + FRAME_HEADER.size
        mapping[frame_offset:payload_start] = FRAME_HEADER.pack(
            FRAME_MAGIC, STATE_WRITING, 0, FRAME_HEADER.size, seq, timestamp_ns, payload_length,
            payload_length ^ 0xFFFFFFFF, 0)
        mapping[payload_start:payload_start + payload_length] = payload
        marker_start = payload_start + payload_length
        mapping[marker_start:marker_start + 8] = COMMIT_MARKER
        state_start = frame_offset + FRAME_STATE_OFFSET
        mapping[state_start:state_start + 4] = COMMITTED_STATE_BYTES
        if self.index_capacity:
            slot_start = INDEX_OFFSET + 16 * (seq % self.index_capacity)
            mapping[slot_start:slot_start + 16] = INDEX_SLOT.pack(seq, head)
        self._publish(mapping, new_head, tail, new_tail_next, oldest, seq, is_into_empty)
        if should_flush:
            self._flush_append(mapping, frame_offset, length, wrap_at, seq)
        return seq, timestamp_ns

    def _publish(self, mapping, head, tail, tail_next, oldest, newest, is_into_empty) -> None:
        """Store the new ring state field by field, newest first.

        No single store can publish five fields, so the order is chosen so
        that a crash between any two stores leaves a pool that opens, reads
        correctly, and that :meth:`_finish_interrupted_append` completes:
        ``newest`` first (the frame is committed, so readers may already take
        it), ``oldest`` next when the ring was empty (it then reads as one
        full ring holding that frame), the ``tail_next`` cache cleared, and
        ``tail`` and ``head`` last.
        """
        store = store_field
        store(mapping, NEWEST_FIELD, newest)
        if is_into_empty:
            store(mapping, OLDEST_FIELD, oldest)
            store(mapping, TAIL_NEXT_FIELD, 0)
            store(mapping, TAIL_FIELD, tail)
        store(mapping, HEAD_FIELD, head)
        store(mapping, TAIL_NEXT_FIELD, tail_next)

    def _finish_interrupted_append(self, mapping, head, tail, tail_next, oldest, newest) -> tuple:
        """Complete the publication a killed writer of ours left half done.

        Three states need it, none reachable from a finished append:
        ``oldest`` was raised but ``tail`` still points at frames older than
        it (an eviction's stores), ``newest`` names a frame that does not end
        at ``head`` (a publication's stores; see :meth:`_unpublished_frame`),
        or head == tail with a stale frame there (an eviction that emptied
        the ring).  In a finished append the frame at the tail has seq
        ``oldest`` and frame ``newest`` ends at ``head``.  Returns the
        repaired (head, tail, tail_next, oldest), already stored.
        """
        if self._is_settled(mapping, head, tail, oldest, newest):
            return head, tail, tail_next, oldest
        store = store_field
        if self._is_interrupted_emptying((head, tail, tail_next, oldest, newest)):
            oldest = 0
            store(mapping, OLDEST_FIELD, 0)
        for _ in range(self._max_steps()):
            if oldest == 0:
                break
            view = self._view_after_wrap(tail)
            if view[0].found != FOUND_MESSAGE or view[0].seq >= oldest:
                break
            tail_next = 0
            store(mapping, TAIL_NEXT_FIELD, 0)
            tail = view[0].next_offset
            store(mapping, TAIL_FIELD, tail)
        found = self._unpublished_frame(head, tail, oldest, newest)
        if found is not None:
            view, offset = found
            tail_next = 0
            store(mapping, TAIL_NEXT_FIELD, 0)
            if oldest in (0, newest):  # an append into an empty ring: its frame is the tail
                oldest = newest
                store(mapping, OLDEST_FIELD, oldest)
                tail = offset
                store(mapping, TAIL_FIELD, tail)
            head = view.next_offset
            store(mapping, HEAD_FIELD, head)
        return head, tail, tail_next, oldest

    def _unpublished_frame(self, head: int, tail: int, oldest: int, newest: int):
        """Find message ``newest`` if a killed writer left its publication half done.

        Returns (view, offset) or None.  The frame starts at ``head``, after
        a wrap marker there, or at 0: an append into a ring it emptied puts
        its frame at 0 when it wraps, and a frame longer than the old head
        offset covers the wrap marker it has just written there.  A
        published frame ends at the head and, when it is the only message,
        starts at the tail (the ring was empty before it).
        """
        if not newest:
            return None
        view, offset = self._view_after_wrap(head)
        if not (view.found == FOUND_MESSAGE and view.seq == newest):
            view, offset = self.inspect_frame(0), 0
        if not (view.found == FOUND_MESSAGE and view.seq == newest):
            return None
        if view.next_offset == head and oldest != 0 and (oldest != newest or tail == offset):
            return None
        return view, offset

    def _is_settled(self, mapping, head, tail, oldest, newest) -> bool:
        """Cheaply confirm the common case: the last append finished.

        True when the tail frame is message ``oldest`` (and, when it is the
        only message, ends at the head) and the frame at the head is not
        message ``newest``.  Anything unusual (a wrap at either end, a full
        ring, an empty ring that has had messages) answers False and gets
        the full check, so this only saves time (two small reads instead of
        two frame inspections).
        """
        ring_size = self.ring_size
        if oldest:
            if head == tail or ring_size - tail < FRAME_HEADER.size:
                return False
            magic, state, seq = FRAME_IDENTITY.unpack_from(mapping, self.ring_offset + tail)
            if magic != FRAME_MAGIC or state != STATE_COMMITTED or seq != oldest:
                return False
            if oldest == newest and self.inspect_frame(tail).next_offset != head:
                return False  # its frame may cover the head (see _unpublished_frame)
        elif newest:
            return False  # only an interrupted append leaves a ring empty after its first
        if not newest:
            return True
        if ring_size - head < FRAME_HEADER.size:
            return False
        magic, state, seq = FRAME_IDENTITY.unpack_from(mapping, self.ring_offset + head)
        return magic != FRAME_MAGIC or (state != STATE_WRAP and not (
            state == STATE_COMMITTED and seq == newest))

    def _is_interrupted_emptying(self, state: tuple) -> bool:
        """True if ``state`` is an eviction that emptied the ring, killed before its last store.

        Such a header reads as a full ring (head == tail, oldest != 0) but
        message ``oldest`` is not at the tail, nor after the older messages
        found there: those are what an eviction from a ring that was really
        full leaves when it is killed between its ``oldest`` and ``tail``
        stores, and its surviving messages must stay.
        """
        head, tail, _tail_next, oldest, _newest = state
        if oldest == 0 or head != tail:
            return False
        for _ in range(self._max_steps()):
            view, tail = self._view_after_wrap(tail)
            if view.found != FOUND_MESSAGE or view.seq > oldest:
                return True
            if view.seq == oldest:
                return False
            tail = view.next_offset
        return True

    def _view_after_wrap(self, offset: int) -> tuple:
        """Inspect the frame at ``offset``, following one wrap; return (view, its offset)."""
        view = self.inspect_frame(offset)
        if view.found == FOUND_WRAP:
            offset = 0
            view = self.inspect_frame(0)
        return view, offset

    def _flush_append(self, mapping, frame_offset, length, wrap_at, seq) -> None:
        """msync what one append wrote, in upstream's order (pool spec section 10)."""
        ranges = [(frame_offset, length, "failed to flush frame")]
        if wrap_at is not None:
            ranges.append((self.ring_offset + wrap_at, FRAME_HEADER.size,
                           "failed to flush wrap marker"))
        if self.index_capacity:
            ranges.append((INDEX_OFFSET + 16 * (seq % self.index_capacity), INDEX_SLOT.size,
                           "failed to flush index slot"))
        ranges.append((0, HEADER_SIZE, "failed to flush header"))
        for offset, size, message in ranges:
            try:
                flush_mapped_range(mapping, offset, size)
            except OSError as err:
                raise error_from_os(err, message, path=self.path) from err

    def _evict_one(self, mapping, head, tail, tail_next, oldest) -> tuple:
        """Drop the frame at the tail; return the new (tail, oldest) (pool spec 7)."""
        ring_size = self.ring_size
        if oldest == 0:
            raise PlasmiteError("Busy", "unable to make space", path=self.path)
        if (tail_next != 0 and tail_next < ring_size and tail_next % 8 == 0
                and ring_size - tail_next >= FRAME_HEADER.size):
            # Fast path: the header remembers where the next frame starts.
            if tail_next == tail:
                if head == tail:
                    return tail, 0
            elif tail_next > tail and (tail_next - tail) % 8 == 0 and tail_next - tail >= 64:
                return tail_next, (0 if tail_next == head else oldest + 1)
        if ring_size - tail < FRAME_HEADER.size:
            return 0, (0 if head == 0 else oldest)  # the gap of an implicit wrap
        state, seq, payload_length = self._checked_frame_header(mapping, tail)
        if state == STATE_WRAP:
            return 0, oldest
        if state == STATE_COMMITTED:
            next_offset = tail + frame_length(payload_length)
            return (0 if next_offset == ring_size else next_offset), seq + 1
        raise PlasmiteError("Corrupt", "invalid tail frame state", path=self.path, offset=tail)

    def _successor(self, mapping, offset) -> int:
        """Return the ring offset after the frame at ``offset`` (0 after a wrap)."""
        if self.ring_size - offset < FRAME_HEADER.size:
            return 0
        state, _seq, payload_length = self._checked_frame_header(mapping, offset)
        if state == STATE_WRAP:
            return 0
        if state != STATE_COMMITTED:
            raise PlasmiteError("Corrupt", "invalid tail frame state", path=self.path,
                                offset=offset)
        next_offset = offset + frame_length(payload_length)
        return 0 if next_offset == self.ring_size else next_offset

    def _checked_frame_header(self, mapping, offset) -> tuple:
        """Decode the frame header at a ring offset for the writer; Corrupt if malformed."""
        magic, state, _flags, header_length, seq, _timestamp, payload_length, length_xor, _crc = (
            FRAME_HEADER.unpack_from(mapping, self.ring_offset + offset))
        problem = None
        if magic != FRAME_MAGIC:
            problem = "bad frame magic"
        elif state > STATE_WRAP:
            problem = "invalid frame state"
        elif header_length != FRAME_HEADER.size:
            problem = "unexpected header length"
        elif payload_length ^ length_xor != 0xFFFFFFFF:
            problem = "payload length xor mismatch"
        elif payload_length > self.max_payload_length:
            problem = "payload length exceeds max"
        if problem:
            raise PlasmiteError("Corrupt", problem, path=self.path, offset=offset)
        return state, seq, payload_length

    # -- reading ------------------------------------------------------------

    def inspect_frame(self, offset: int) -> FrameView:
        """Look at the ring at ``offset`` without copying: what frame is there?

        Returns a FrameView whose ``found`` is FOUND_MESSAGE (a committed,
        complete frame; ``next_offset`` is where the next one starts),
        FOUND_WRAP (continue at offset 0: a wrap marker, or fewer than 64
        bytes left, the writer's implicit wrap, which upstream readers loop on
        forever), FOUND_PENDING (being written, or never written;
        ``next_offset`` is None unless its header is whole) or FOUND_INVALID
        (``problem`` says why: overwritten or damaged).
        """
        ring_size = self.ring_size
        if ring_size - offset < FRAME_HEADER.size:
            return FrameView(FOUND_WRAP, 0, 0, 0, 0, None)
        magic, state, _flags, header_length, seq, timestamp_ns, payload_length, length_xor, _crc = (
            FRAME_HEADER.unpack_from(self._mapping, self.ring_offset + offset))
        if magic != FRAME_MAGIC:
            return FrameView(FOUND_INVALID, 0, 0, 0, 0, "bad frame magic")
        if state == STATE_WRAP:
            return FrameView(FOUND_WRAP, 0, 0, 0, 0, None)
        if state > STATE_WRAP:
            return FrameView(FOUND_INVALID, 0, 0, 0, 0, "invalid frame state")
        next_offset = offset + ((payload_length + FRAME_OVERHEAD + 7) & ~7)
        if header_length != FRAME_HEADER.size:
            problem = "unexpected header length"
        elif payload_length ^ length_xor != 0xFFFFFFFF:
            problem = "payload length xor mismatch"
        elif payload_length > self.max_payload_length:
            problem = "payload length exceeds max"
        elif next_offset > ring_size:
            problem = "frame extends past ring end"
        else:
            problem = None
        if next_offset == ring_size:
            next_offset = 0
        if state != STATE_COMMITTED:
            # A pending frame's length is usable only when its header is whole.
            return FrameView(FOUND_PENDING, seq, timestamp_ns, payload_length,
                             None if problem else next_offset, None)
        if problem is None:
            marker_start = self.ring_offset + offset + FRAME_HEADER.size + payload_length
            if self._mapping[marker_start:marker_start + 8] == COMMIT_MARKER:
                return FrameView(FOUND_MESSAGE, seq, timestamp_ns, payload_length, next_offset,
                                 None)
            problem = "missing commit marker"
        return FrameView(FOUND_INVALID, seq, timestamp_ns, payload_length, None, problem)

    def _copy_payload(self, offset: int, payload_length: int) -> bytes:
        start = self.ring_offset + offset + FRAME_HEADER.size
        return self._mapping[start:start + payload_length]

    def _max_steps(self) -> int:
        """Bound a walk over the ring: every frame it can hold once, plus wrap hops.

        Not just the live frames: an eviction killed between its ``oldest``
        and ``tail`` stores leaves the tail on the frames it evicted, and a
        large frame can evict many small ones.
        """
        return self.ring_size // FRAME_OVERHEAD + 4

    def locate(self, seq: int, state: tuple):
        """Find the ring offset of message ``seq`` given a header ``state``.

        Probes the index slot first, then walks from the tail.  Returns the
        offset, or None when the walk met a frame that does not fit the header
        (the caller re-reads the header and decides: overwritten or corrupt).
        """
        oldest = state[3]
        if self.index_capacity and seq > oldest:
            slot_seq, slot_offset = INDEX_SLOT.unpack_from(
                self._mapping, INDEX_OFFSET + 16 * (seq % self.index_capacity))
            if slot_seq == seq and slot_offset < self.ring_size and slot_offset % 8 == 0:
                view = self.inspect_frame(slot_offset)
                if view.found == FOUND_MESSAGE and view.seq == seq:
                    return slot_offset
        offset, is_in_order = self._walk_from_tail(seq, state)
        if not is_in_order:
            return None
        view = self.inspect_frame(offset)
        return offset if view.found == FOUND_MESSAGE and view.seq == seq else None

    def _walk_from_tail(self, seq: int, state: tuple) -> tuple:
        """Walk from the tail past older frames; return (where the walk stops, is_in_order).

        It stops at frame ``seq``, at the first frame that is neither older
        nor skippable (a damaged frame, a newer seq), or at a frame out of
        order: the first frame may hold any seq up to oldest (a killed
        eviction leaves older ones at the tail), each later one the seq after
        the frame before it.  ``is_in_order`` is False only in that last case,
        so that a frame whose seq field was damaged into the seq sought is not
        taken for it (one flipped bit made an index-less ``get 10`` return
        message 2).  Bounded.
        """
        offset = state[1]
        expected = None
        for _ in range(self._max_steps()):
            view = self.inspect_frame(offset)
            if view.found == FOUND_WRAP:
                offset = 0
                continue
            if view.found != FOUND_INVALID and (
                    view.seq > state[3] if expected is None else view.seq != expected):
                return offset, False
            if view.seq < seq and view.next_offset is not None and view.found != FOUND_INVALID:
                offset = view.next_offset  # an older message, or a stuck pending frame
                expected = view.seq + 1
            else:
                return offset, True
        return offset, True

    def _settled_state(self, state: tuple) -> tuple:
        """Wait briefly for the header to move on from ``state``; return the latest.

        Called when the ring disagrees with a header: a writer may be between
        overwriting frames and publishing.  If nothing changes within
        SETTLE_SECONDS the disagreement is real (damage, or a crashed Rust
        writer) and the caller reports Corrupt.
        """
        deadline = time.monotonic() + SETTLE_SECONDS
        while True:
            latest = self.read_state()
            if latest != state or time.monotonic() >= deadline:
                return latest
            time.sleep(0.001)

    def _corrupt_at(self, offset: int, seq: int, problem) -> PlasmiteError:
        return PlasmiteError("Corrupt", "unreadable frame at ring offset %d: %s"
                             % (offset, problem or "does not match the pool header"),
                             path=self.path, seq=seq, offset=offset, hint=CORRUPT_HINT)

    def get(self, seq: int) -> Frame:
        """Return message ``seq`` as a Frame (payload copied out of the ring).

        Raises PlasmiteError NotFound (outside the live range, or overwritten
        while we looked) or Corrupt (the ring holds no valid frame for a seq
        the header lists).  Never blocks for long and never loops forever.
        """
        self._check_open()
        state = self.read_state()
        for _ in range(8):
            oldest, newest = state[3], state[4]
            if oldest == 0 or not oldest <= seq <= newest:
                raise PlasmiteError("NotFound", "message not found", seq=seq, path=self.path)
            offset = self.locate(seq, state)
            if offset is not None:
                view = self.inspect_frame(offset)
                if view.found == FOUND_MESSAGE and view.seq == seq:
                    payload = self._copy_payload(offset, view.payload_length)
                    if self._is_still_live(seq):
                        return Frame(seq, view.timestamp_ns, payload)
            latest = self._settled_state(state)
            if latest == state:
                offset = offset if offset is not None else self._walk_from_tail(seq, state)[0]
                view = self.inspect_frame(offset)
                if (view.found == FOUND_PENDING and view.seq == seq) or self._is_interrupted_emptying(
                        state):
                    # Published but never committed (a damaged file; upstream
                    # treats it as not there yet), or evicted by a writer that
                    # was killed before it finished saying so.
                    raise PlasmiteError("NotFound", "message not found", seq=seq,
                                        path=self.path)
                raise self._corrupt_at(offset, seq, view.problem)
            state = latest
        raise PlasmiteError("Busy", "pool changed too quickly to read message", seq=seq,
                            path=self.path, hint="Retry; writers are lapping this reader.")

    def _is_still_live(self, seq: int) -> bool:
        """True if ``seq`` was not evicted: checked after copying its payload.

        Our writers publish an eviction before overwriting the evicted bytes,
        so a payload copied while its seq is still live is whole.
        """
        oldest = RING_STATE.unpack_from(self._mapping, RING_STATE_OFFSET)[3]
        return oldest != 0 and seq >= oldest

    def frame_timestamp(self, seq: int):
        """Return the append time (ns) of message ``seq``, or None if it cannot be read."""
        try:
            return self.get(seq).timestamp_ns
        except PlasmiteError:
            return None

    def cursor(self, next_seq: int) -> "Cursor":
        """Return a Cursor that yields messages from ``next_seq`` on."""
        return Cursor(self, next_seq)

    def wait_for_seq(self, seq: int, timeout, stop_event=None) -> bool:
        """Block until the pool's newest seq reaches ``seq``; True if it did.

        ``timeout`` in seconds (None waits forever).  Polls the header with an
        adaptive sleep instead of spinning: 50 us doubling up to a cap that follows
        the pool's pace, 1/50 of the time since a message last arrived, between 1 ms
        and 20 ms.  A busy pool is seen within about a millisecond (another process's
        append: p50 0.7 ms, p99 1.3 ms at 200 messages/s); an idle follower wakes 50
        times a second, 0.2-0.3% of a core (tests/bench/run.py, rows 5).  ``stop_event`` (a threading.Event) ends the wait early and returns
        False; so does KeyboardInterrupt, which propagates.
        """
        mapping = self._check_open()
        unpack_newest = RING_FIELD.unpack_from
        monotonic = time.monotonic
        now = monotonic()
        deadline = None if timeout is None else now + timeout
        delay = 0.00005
        while True:
            if unpack_newest(mapping, NEWEST_FIELD)[0] >= seq:
                self._last_arrival = monotonic()
                return True
            if stop_event is not None and stop_event.is_set():
                return False
            sleep_for = min(delay, max((now - self._last_arrival) / 50, 0.001), 0.02)
            if deadline is not None:
                remaining = deadline - now
                if remaining <= 0:
                    return False
                sleep_for = min(sleep_for, remaining)
            if stop_event is not None:
                if stop_event.wait(sleep_for):
                    return False
            else:
                time.sleep(sleep_for)
            delay = min(delay * 2, 0.02)
            now = monotonic()

    # -- information --------------------------------------------------------

    def info(self, now_ns=None) -> dict:
        """Return ``pool info --json`` fields except name/path: layout, bounds, metrics.

        Oldest/newest times come from the frames; a frame that cannot be read
        gives null times (use :func:`validate_pool` to find out why).
        """
        head, tail, _tail_next, oldest, newest = self.read_state()
        now_ns = time.time_ns() if now_ns is None else now_ns
        used = used_bytes(head, tail, oldest, self.ring_size)
        count = newest - oldest + 1 if oldest else 0
        ages = {}
        for label, seq in (("oldest", oldest), ("newest", newest)):
            timestamp_ns = self.frame_timestamp(seq) if oldest else None
            if timestamp_ns is None:
                ages[label + "_time"] = None
                ages[label + "_age_ms"] = None
            else:
                ages[label + "_time"] = format_timestamp(timestamp_ns)
                ages[label + "_age_ms"] = max(now_ns - timestamp_ns, 0) // 1_000_000
        return {
            "bounds": {"oldest": oldest, "newest": newest} if oldest else {},
            "file_size": self.layout.file_size,
            "index_capacity": self.index_capacity,
            "index_offset": INDEX_OFFSET,
            "index_size_bytes": 16 * self.index_capacity,
            "metrics": {
                "age": ages,
                "message_count": count,
                "seq_span": count,
                "utilization": {"free_bytes": self.ring_size - used, "used_bytes": used,
                                "used_percent": (used * 10000 // self.ring_size) / 100},
            },
            "ring_offset": self.ring_offset,
            "ring_size": self.ring_size,
        }


def _remove_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _pool_exists(path: str, err: OSError) -> PlasmiteError:
    return PlasmiteError("AlreadyExists", "pool already exists", path=path,
                         hint="Choose a different name or remove the existing pool file.",
                         causes=[describe_os_error(err)])


def _create_exclusively(path: str, pool_path: str) -> int:
    """Create ``path`` (and its parent directories) for a new pool; return its descriptor."""
    try:
        parent = os.path.dirname(path)
        if parent:
            os.makedirs(parent, exist_ok=True)
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0),
                       0o666)
    except FileExistsError as err:
        raise _pool_exists(pool_path, err) from err
    except OSError as err:
        # Upstream reports every other create failure (a read-only directory
        # included) as Io, exit code 8; scripts rely on it.
        raise PlasmiteError("Io", "failed to create pool file", path=pool_path,
                            causes=[describe_os_error(err)]) from err


def _initialise_pool_file(fd: int, layout: PoolLayout, pool_path: str) -> mmap.mmap:
    """Size a new pool file, reserve its blocks, write its header; return the mapping.

    The same steps as upstream: size the (sparse, zero) file, write the header with
    a plain write, zero the index through the mapping.
    """
    try:
        os.ftruncate(fd, layout.file_size)
        reserve_file_space(fd, layout.file_size)
        os.pwrite(fd, encode_pool_header(layout), 0)
        mapping = map_pool_file(fd, layout.file_size, writable=True)
        mapping[INDEX_OFFSET:layout.ring_offset] = bytes(layout.ring_offset - INDEX_OFFSET)
        return mapping
    except OSError as err:
        if err.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
            raise PlasmiteError("Io", "not enough disk space for the pool", path=pool_path,
                                hint="Free some space or create a smaller pool (--size).",
                                causes=[describe_os_error(err)]) from err
        raise PlasmiteError("Io", "failed to size pool file", path=pool_path,
                            causes=[describe_os_error(err)]) from err


class Cursor:
    """Follows a pool's messages in seq order, starting at a given seq.

    :meth:`next_frame` returns the next committed message or None when
    caught up.  When writers lap the cursor (overwrite messages it has not
    read yet) it skips ahead to the oldest live message and adds the skipped
    count to ``dropped_count``.  Never returns a seq twice or out of order,
    and never loops forever: a ring that contradicts its header raises
    PlasmiteError Corrupt.  Not thread-safe; use one cursor per thread.
    """

    def __init__(self, pool: LocalPool, next_seq: int):
        self.pool = pool
        self.next_seq = max(next_seq, 1)
        self.dropped_count = 0
        self._offset = None  # ring offset of next_seq when known

    def next_frame(self):
        """Return the next message as a Frame, or None if there is none yet."""
        pool = self.pool
        state = pool.read_state()
        for _ in range(8):
            oldest, newest = state[3], state[4]
            if self.next_seq > newest:
                return None
            if oldest == 0 or self.next_seq < oldest:
                # Writers overwrote what we had not read yet (or emptied the ring).
                first_live = newest + 1 if oldest == 0 else oldest
                self.dropped_count += first_live - self.next_seq
                self.next_seq = first_live
                self._offset = None
                if oldest == 0:
                    return None
            offset = self._offset
            if offset is None:
                offset = pool.locate(self.next_seq, state)
            view = None
            if offset is not None:
                for _hop in range(3):
                    view = pool.inspect_frame(offset)
                    if view.found != FOUND_WRAP:
                        break
                    offset = 0
                if view.found == FOUND_MESSAGE and view.seq == self.next_seq:
                    payload = pool._copy_payload(offset, view.payload_length)
                    if pool._is_still_live(self.next_seq):
                        self._offset = view.next_offset
                        self.next_seq += 1
                        return Frame(view.seq, view.timestamp_ns, payload)
                    state = pool.read_state()
                    self._offset = None
                    continue
            latest = pool._settled_state(state)
            if latest != state:
                state = latest
                self._offset = None
                continue
            if pool._is_interrupted_emptying(state):
                self.dropped_count += state[4] + 1 - self.next_seq
                self.next_seq = state[4] + 1
                self._offset = None
                return None
            if offset is None:
                offset = pool._walk_from_tail(self.next_seq, state)[0]
                view = pool.inspect_frame(offset)
            if view.found == FOUND_PENDING and view.seq == self.next_seq:
                # Published but never committed (a damaged file).  Upstream
                # waits on it forever; we wait only while it is the newest,
                # then skip it as a dropped message.
                if self.next_seq >= state[4] or view.next_offset is None:
                    return None
                self.dropped_count += 1
                self.next_seq += 1
                self._offset = view.next_offset
                continue
            raise pool._corrupt_at(offset, self.next_seq, view.problem)
        return None


# -- whole-pool operations ----------------------------------------------------

INTERRUPTED_APPEND_WARNING = ("warning: a writer was killed while publishing an append; "
                              "the pool reads correctly and the next append completes it")


def validate_pool(pool: LocalPool) -> tuple:
    """Walk every live frame of an open pool and check it; return (issues, last_good_seq, warnings).

    Finds what upstream's doctor finds (frame headers that do not decode,
    frames that are not committed, seq gaps, a walk that does not end at the
    head) and what it misses: missing commit markers and payloads that are
    not valid Lite3 messages.  ``issues`` holds at most one problem, the first
    (``{"code", "message", "offset", "seq"}``, seq being the last good seq
    for header problems and the frame's own seq for payload problems);
    ``warnings`` note a publication a killed writer left half done (the
    next append completes it) and index slots that point nowhere useful,
    checked on the same three sample slots upstream reports on.  Reads
    only; bounded.
    """
    state = pool.read_state()
    head, tail, _tail_next, oldest, newest = state
    issues = []
    warnings = []
    last_good_seq = None
    if pool._is_interrupted_emptying(state):
        warnings.append(INTERRUPTED_APPEND_WARNING)
        oldest = 0
    if oldest:
        offset = tail
        expected = oldest
        for _ in range(2 * pool._max_steps()):
            if expected > newest:
                break
            view = pool.inspect_frame(offset)
            if view.found == FOUND_WRAP:
                offset = 0
                continue
            if expected == oldest and view.found == FOUND_MESSAGE and view.seq < oldest:
                # An eviction raised oldest and was killed before moving the tail.
                if INTERRUPTED_APPEND_WARNING not in warnings:
                    warnings.append(INTERRUPTED_APPEND_WARNING)
                offset = view.next_offset
                continue
            problem = None
            seq = last_good_seq
            if view.found == FOUND_PENDING:
                problem = "unexpected frame state"
            elif view.found == FOUND_INVALID:
                if view.problem == "missing commit marker":
                    problem = "missing commit marker"
                    seq = view.seq
                else:
                    problem = "frame header invalid: Corrupt: " + view.problem
            elif view.seq != expected:
                problem = "seq mismatch: expected %d, found %d" % (expected, view.seq)
            else:
                try:
                    payload = pool._copy_payload(offset, view.payload_length)
                    validate_lite3_message(payload)
                    decode_message(payload)
                except PlasmiteError as err:
                    problem = "payload invalid: " + err.message
                    seq = view.seq
            if problem:
                issues.append({"code": "corrupt", "message": problem, "offset": offset,
                               "seq": seq})
                break
            last_good_seq = view.seq
            expected += 1
            offset = view.next_offset
        else:
            issues.append({"code": "corrupt", "message": "frame walk did not terminate",
                           "offset": offset, "seq": last_good_seq})
        if not issues and offset != head:
            found = pool._unpublished_frame(head, tail, oldest, newest)
            if found is not None and found[0].next_offset == offset:
                # A publication killed between its newest and head stores.
                warnings.append(INTERRUPTED_APPEND_WARNING)
            else:
                issues.append({"code": "corrupt", "message": "head offset mismatch",
                               "offset": offset, "seq": last_good_seq})
    capacity = pool.index_capacity
    for slot in sorted({0, capacity // 2, capacity - 1}) if capacity else ():
        slot_seq, slot_offset = INDEX_SLOT.unpack_from(pool._mapping, INDEX_OFFSET + 16 * slot)
        if slot_seq == 0:
            continue
        is_valid = (oldest != 0 and oldest <= slot_seq <= newest and slot_offset < pool.ring_size
                    and slot_offset % 8 == 0)
        if is_valid:
            view = pool.inspect_frame(slot_offset)
            is_valid = view.found == FOUND_MESSAGE and view.seq == slot_seq
        if not is_valid:
            warnings.append("warning: index slot %d seq %d is stale or invalid" % (slot, slot_seq))
    return issues, last_good_seq, warnings


def diagnose_pool(path: str, pool_ref: str) -> dict:
    """Return a doctor report for one pool file (the shape of upstream's ``doctor``).

    A pool that cannot be opened because it is corrupt or of another format
    version gives a ``corrupt`` report; other open errors (NotFound,
    Permission, Io) are raised as PlasmiteError.
    """
    report = {"issue_count": 0, "issues": [], "last_good_seq": None, "path": path,
              "pool_ref": pool_ref, "remediation_hints": [], "snapshot_path": None,
              "status": "ok"}
    try:
        pool = LocalPool.open(path)
    except PlasmiteError as err:
        if err.kind == "Corrupt":
            report["issues"] = [{"code": "corrupt", "message": err.message, "offset": err.offset,
                                 "seq": err.seq}]
            report["remediation_hints"] = [
                "Pool appears corrupt. Consider recreating it or running diagnostics."]
        elif err.kind == "Usage" and err.message.startswith("unsupported pool format version"):
            report["issues"] = [{"code": "format", "message": err.message, "offset": None,
                                 "seq": None}]
            report["remediation_hints"] = [err.hint]
        else:
            raise
        report["issue_count"] = 1
        report["status"] = "corrupt"
        return report
    with pool:
        issues, last_good_seq, warnings = validate_pool(pool)
    report["issues"] = issues
    report["issue_count"] = len(issues)
    report["last_good_seq"] = last_good_seq
    if issues:
        report["status"] = "corrupt"
        report["remediation_hints"] = [
            "Pool appears corrupt. Consider recreating it or running diagnostics."]
    else:
        report["remediation_hints"] = warnings
    return report


def list_pools(directory) -> list:
    """Describe every ``*.plasmite`` file in a directory, sorted by name (``pool list``).

    A readable pool gives ``{"bounds", "file_size", "mtime", "name", "path"}``;
    one that fails to open gives ``{"error": {"error": {...}}, "name", "path"}``
    (upstream nests the whole error envelope there) and does not stop the
    listing.  A missing directory lists nothing.  Raises PlasmiteError Io when
    the directory exists but cannot be read.
    """
    directory = os.fspath(directory)
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    except OSError as err:
        raise error_from_os(err, "failed to read pool directory", path=directory) from err
    entries = []
    for file_name in names:
        stem, extension = os.path.splitext(file_name)
        if extension != POOL_SUFFIX:
            continue
        path = os.path.join(directory, file_name)
        entry = {"name": stem, "path": path}
        try:
            with LocalPool.open(path) as pool:
                bounds = pool.bounds()
                entry["bounds"] = {"oldest": bounds[0], "newest": bounds[1]} if bounds else {}
                entry["file_size"] = pool.layout.file_size
            mtime_ns = os.stat(path).st_mtime_ns
            entry["mtime"] = format_timestamp(mtime_ns) if mtime_ns >= 0 else None
        except PlasmiteError as err:
            entry = {"error": {"error": with_automatic_hint(err).to_dict()}, "name": stem,
                     "path": path}
        except OSError as err:
            entry = {"error": {"error": with_automatic_hint(error_from_os(err, path=path)).to_dict()},
                     "name": stem, "path": path}
        entries.append(entry)
    entries.sort(key=lambda item: item["name"])
    return entries


def delete_pool_file(path: str) -> None:
    """Delete a pool file (any file: no validation, as upstream).

    Raises PlasmiteError NotFound ("pool not found") or Io/Permission.
    """
    try:
        os.unlink(path)
    except FileNotFoundError as err:
        raise PlasmiteError("NotFound", "pool not found", path=path,
                            hint="Create the pool first or check --dir.",
                            causes=[describe_os_error(err)]) from err
    except OSError as err:
        raise error_from_os(err, "failed to delete pool", path=path) from err


# =============================================================================
# 7. Expressions
# =============================================================================
# The --where language: the jq subset of spec/where.md, with jq's semantics.
# A tokenizer and a recursive-descent parser build a small tree; a compiler
# turns it once into nested closures, so a predicate costs a few calls per
# message.  Owns ExpressionSyntaxError, ExpressionRuntimeError and the --where
# decision.  Uses PlasmiteError (section 2); needs functools, itertools, json,
# math, operator, re and collections.abc (Callable, Iterator: annotations only).

# Nesting bound for parse, compile and evaluation, which all recurse once per
# level.  The parser spends five frames per level of parentheses, so 100
# levels stay well inside CPython's default limit of 1000 frames even when
# evaluation meets a message nested 128 levels deep (upstream's JSON limit).
MAX_EXPRESSION_DEPTH = 100

# `"ab" * n` is refused beyond this many code points: jq would try to build
# it, but a predicate must never exhaust memory.
MAX_REPEAT_LENGTH = 1 << 26

# sub/gsub with generator replacements produce one output per combination;
# past this many the expression is refused instead of running for ever.
MAX_SUBSTITUTION_OUTPUTS = 10000

_REGEX_CACHE_SIZE = 256

_KEYWORDS = frozenset(["and", "or", "if", "then", "elif", "else", "end", "as", "def",
                       "reduce", "foreach", "try", "catch", "label", "import", "include",
                       "__loc__"])

# jq's lexer as one alternation.  Multi-character operators come first so that
# they win, as in jq's greedy lexer: `?//` (destructuring, unsupported) before
# `?`, `//=` before `//`, `==` before `=`.  Spec/where.md section 4.
_TOKEN_PATTERN = LazyPattern(r"""
    (?P<space> [ \t\r\n]+ | \#[^\n]* )
  | (?P<number> (?: [0-9]+ (?: \.[0-9]* )? | \.[0-9]+ ) (?: [eE][+-]?[0-9]+ )? )
  | (?P<field> \.[A-Za-z_][A-Za-z0-9_]* )
  | (?P<variable> \$[A-Za-z_][A-Za-z0-9_]* )
  | (?P<name> [A-Za-z_][A-Za-z0-9_]* )
  | (?P<string> " )
  | (?P<operator> \?// | \.\. | [=!<>]= | //=? | [|+\-*/%]= | [.\[\](){}|,:;+\-*/%<>=?$] )
""", re.VERBOSE)
_STRING_TEXT = LazyPattern(r'[^"\\]+')
_FOUR_HEX_DIGITS = LazyPattern(r"[0-9A-Fa-f]{4}")
_STRING_ESCAPES = {'"': '"', "\\": "\\", "/": "/", "b": "\b", "f": "\f", "n": "\n",
                   "r": "\r", "t": "\t"}

# Hints for characters that people bring from other languages (spec section 4).
_CHARACTER_HINTS = {
    "'": "jq strings use double quotes: \"text\"",
    "&": "use 'and' to combine conditions",
    "!": "negate with '| not', e.g. (.data.ok | not)",
    "@": "@formats (@base64, @csv, ...) are not supported in --where",
    "`": "jq strings use double quotes: \"text\"",
}

# Operator levels of spec/where.md section 5; `|` (level 1) is parse_pipe's.
_BINARY_LEVELS = {",": 2, "//": 3, "or": 5, "and": 6, "==": 7, "!=": 7, "<": 7, "<=": 7,
                  ">": 7, ">=": 7, "+": 8, "-": 8, "*": 9, "/": 9, "%": 9}
_CHAIN_KINDS = {",": "comma", "//": "alternative", "or": "or", "and": "and"}
_COMPARISON_LEVEL = 7
_ASSIGNMENT_OPERATORS = frozenset(["=", "|=", "+=", "-=", "*=", "/=", "%=", "//="])

# jq builtins outside the --where subset (spec section 7, "Out of scope"): they
# are undefined here like any unknown name, but the hint says why.
_UNSUPPORTED_BUILTINS = frozenset([
    "path", "paths", "leaf_paths", "del", "delpaths", "setpath", "to_stream", "tostream",
    "fromstream", "truncate_stream", "env", "input", "inputs", "debug", "stderr",
    "input_filename", "input_line_number", "now", "mktime", "gmtime", "localtime",
    "strftime", "strptime", "strflocaltime", "todate", "fromdate", "date", "dateadd",
    "datesub", "todateiso8601", "fromdateiso8601", "halt", "halt_error", "range", "while",
    "until", "repeat", "walk", "map_values", "combinations", "transpose", "ascii",
    "builtins", "get_search_list", "splits_by", "infinite", "nan", "isinfinite", "isnan",
    "isnormal", "isvalid", "getpath_or", "limit_by", "input_stream", "ltrim", "rtrim",
    "trim", "abs", "toarray", "pick", "have_decnum", "have_literal_numbers", "significand",
    "pow", "log", "exp", "log10", "log2", "exp10", "exp2", "tojson_stream", "INDEX",
    "GROUP_BY", "UNIQUE_BY", "ANY", "ALL", "getpath_values", "error_message", "recurse_down",
])


# -- errors -------------------------------------------------------------------

class ExpressionSyntaxError(PlasmiteError):
    """A --where expression that cannot be compiled (kind Usage, exit code 2).

    Raised for bad tokens, grammar errors, unknown functions or arities,
    undefined variables and expressions nested too deeply.  Like
    json.JSONDecodeError it locates the fault: ``expression`` is the source
    text, ``position`` the 0-based character index, ``line`` and ``column``
    are 1-based, and ``detail`` is the message without the location.
    format_expression_error() renders it with a caret under the fault.
    """

    def __init__(self, detail: str, expression: str, position: int, *, hint: str | None = None):
        position = max(0, min(position, len(expression)))
        line = expression.count("\n", 0, position) + 1
        column = position - (expression.rfind("\n", 0, position) + 1) + 1
        if "\n" in expression:
            location = "line %d, column %d" % (line, column)
        else:
            location = "column %d" % column
        super().__init__("Usage", "invalid expression: %s at %s" % (detail, location), hint=hint)
        self.detail = detail
        self.expression = expression
        self.position = position
        self.line = line
        self.column = column


_NO_VALUE = object()


class ExpressionRuntimeError(PlasmiteError):
    """An error raised while evaluating an expression (kind Usage).

    Examples: indexing a string with a key, `test` on a number, division by
    zero, an invalid regex, `error(...)`.  ``value`` is the jq error value that
    `try ... catch` hands to its handler: the argument of `error(v)`, else the
    message text.  For --where it means "no match", never an exit.
    """

    def __init__(self, message: str, value: object = _NO_VALUE):
        super().__init__("Usage", message)
        self.value = message if value is _NO_VALUE else value


def _syntax_error(detail, text, position, hint=None):
    """Build an ExpressionSyntaxError (a helper so call sites stay on one line)."""
    return ExpressionSyntaxError(detail, text, position, hint=hint)


# -- values: types, order, text -----------------------------------------------
# Values are what json.loads produces (None, bool, int, float, str, list,
# dict), used as they are: nothing is converted up front, so evaluating a
# predicate costs nothing for the parts of a message it never reads.  jq
# holds every number as a double; we convert at each arithmetic or comparison
# (_to_double), which is what makes 9007199254740993 == 9007199254740992.

_NUMBER_TYPES = (int, float)
_TYPE_NAMES = {type(None): "null", bool: "boolean", int: "number", float: "number",
               str: "string", list: "array", dict: "object"}
# Ranks of jq's total order: null < false < true < numbers < strings < arrays < objects.
_TYPE_RANKS = {type(None): 0, bool: 1, int: 3, float: 3, str: 4, list: 5, dict: 6}
_NUMBER_RANK = 3
_DOUBLE_MAX_TEXT = "1.7976931348623157e+308"  # jq prints infinities as the largest double


def _type_name(value) -> str:
    """Return jq's name for the type of a JSON value (`type`)."""
    return _TYPE_NAMES.get(type(value)) or type(value).__name__


def _rank(value) -> int:
    """Return the place of the value's type in jq's total order (booleans split in two)."""
    return _TYPE_RANKS[type(value)] + (value is True)


def _to_double(number) -> float:
    """Round a JSON number to the IEEE double jq would hold (big ints included)."""
    try:
        return float(number)
    except OverflowError:
        # json.loads turns 1e400 into inf; an integer literal that large goes the same way.
        return math.inf if number > 0 else -math.inf


def _is_truthy(value) -> bool:
    """Return jq truthiness: everything but false and null is true (spec 3)."""
    return value is not None and value is not False


def _equal(left, right) -> bool:
    """Return jq equality: numbers as doubles, objects regardless of key order."""
    left_type = type(left)
    right_type = type(right)
    if left_type is right_type:
        if left_type is str or left_type is float:
            return left == right
        if left_type is int:
            # Distinct big integers can round to one double (spec section 3).
            return left == right or _to_double(left) == _to_double(right)
        if left_type is list:
            return len(left) == len(right) and all(map(_equal, left, right))
        if left_type is dict:
            return len(left) == len(right) and all(
                key in right and _equal(item, right[key]) for key, item in left.items())
        return left is right
    if left_type in _NUMBER_TYPES and right_type in _NUMBER_TYPES:
        return _to_double(left) == _to_double(right)
    return False


def _compare(left, right) -> int:
    """Return a negative, zero or positive number as jq orders ``left`` and ``right``.

    Spec/where.md 3.1: type ranks first; numbers by value, strings by code
    point (Python's order), arrays element-wise then by length, objects by
    their sorted key lists and then by the values in that key order.
    """
    left_rank = _rank(left)
    right_rank = _rank(right)
    if left_rank != right_rank:
        return left_rank - right_rank
    if left_rank == _NUMBER_RANK:
        left_number = _to_double(left)
        right_number = _to_double(right)
        return (left_number > right_number) - (left_number < right_number)
    if left_rank == 4:
        return (left > right) - (left < right)
    if left_rank == 5:
        for left_item, right_item in zip(left, right):
            result = _compare(left_item, right_item)
            if result:
                return result
        return len(left) - len(right)
    if left_rank == 6:
        left_keys = sorted(left)
        right_keys = sorted(right)
        if left_keys != right_keys:
            return _compare(left_keys, right_keys)
        for key in left_keys:
            result = _compare(left[key], right[key])
            if result:
                return result
    return 0


_sort_key = functools.cmp_to_key(_compare)


def _format_number(number) -> str:
    """Format a number as jq prints it (spec/where.md section 9).

    Shortest round-trip digits D with the value written 0.D x 10^E: exponent
    form when E <= -4 or E > len(D) + 15, else plain decimal without ".0".
    Examples: 1.0 -> "1", 1e-05 -> "1e-05", 1e16 -> "1e+16", -0.0 -> "-0",
    18446744073709551615 -> "18446744073709552000" (the double it rounds to).
    """
    if type(number) is int and -(1 << 53) <= number <= (1 << 53):
        return str(number)
    number = _to_double(number)
    if number != number:
        return "null"
    if number in (math.inf, -math.inf):
        return ("-" if number < 0 else "") + _DOUBLE_MAX_TEXT
    if number == 0:
        return "-0" if math.copysign(1.0, number) < 0 else "0"
    if number.is_integer() and abs(number) < 1e16:
        return str(int(number))
    sign = "-" if number < 0 else ""
    mantissa, _, exponent_text = repr(abs(number)).partition("e")
    whole, _, fraction = mantissa.partition(".")
    digits = whole + fraction
    exponent = len(whole) + (int(exponent_text) if exponent_text else 0)
    stripped = digits.lstrip("0")
    exponent -= len(digits) - len(stripped)
    digits = stripped.rstrip("0")
    if exponent <= -4 or exponent > len(digits) + 15:
        text = digits[0] + ("." + digits[1:] if len(digits) > 1 else "")
        return "%s%se%s%02d" % (sign, text, "-" if exponent - 1 < 0 else "+", abs(exponent - 1))
    if exponent <= 0:
        return sign + "0." + "0" * -exponent + digits
    if exponent < len(digits):
        return sign + digits[:exponent] + "." + digits[exponent:]
    return sign + digits + "0" * (exponent - len(digits))


def _encode_string(text: str) -> str:
    """Return a string as JSON text the way jq writes it."""
    # json.dumps escapes quotes, backslashes and C0 controls as jq does; jq
    # also escapes DEL (spec section 9), which json leaves alone.
    return json.dumps(text, ensure_ascii=False).replace("\x7f", "\\u007f")


def _json_pieces(value):
    """Yield the compact JSON text of ``value`` in pieces (lazy, so it can be cut short)."""
    value_type = type(value)
    if value_type is str:
        yield _encode_string(value)
    elif value is None:
        yield "null"
    elif value_type is bool:
        yield "true" if value else "false"
    elif value_type in _NUMBER_TYPES:
        yield _format_number(value)
    elif value_type is list:
        yield "["
        for index, item in enumerate(value):
            if index:
                yield ","
            yield from _json_pieces(item)
        yield "]"
    else:
        yield "{"
        for index, (key, item) in enumerate(value.items()):
            yield ("," if index else "") + _encode_string(key) + ":"
            yield from _json_pieces(item)
        yield "}"


def _to_json(value) -> str:
    """Return the compact JSON text of a value as jq prints it (`tojson`, `tostring`)."""
    return "".join(_json_pieces(value))


def _describe(value) -> str:
    """Describe a value for an error message the way jq does: ``string ("upstream r...)``."""
    text = ""
    if type(value) is str:
        value = value[:15]  # never encode a long string just to cut it
    for piece in _json_pieces(value):
        text += piece
        if len(text) > 14:
            text = text[:11] + "..."
            break
    return "%s (%s)" % (_type_name(value), text)


# -- values: indexing ------------------------------------------------------------
# jq's rules (spec 6): a missing key or an index out of range is null, and null
# can be indexed by anything; only indexing a non-container is an error.

def _index_error(container, key) -> ExpressionRuntimeError:
    """Return jq's error for indexing ``container`` with ``key``."""
    if type(key) is str:
        return ExpressionRuntimeError('Cannot index %s with string "%s"' % (_type_name(container), key))
    return ExpressionRuntimeError("Cannot index %s with %s" % (_type_name(container), _type_name(key)))


def _array_item(array: list, key):
    """Return ``array[key]`` with jq's rules: negative from the end, out of range is null."""
    if type(key) is float:
        if not math.isfinite(key):
            return None
        key = math.floor(key)  # jq 1.7 floors fractional indices; 1.6 differed (unspecified)
    if key < 0:
        key += len(array)
        if key < 0:
            return None
    return array[key] if key < len(array) else None


def _index(container, key):
    """Return ``container[key]`` as jq's `.[key]` does, or raise ExpressionRuntimeError.

    Strings index objects, numbers index arrays, an array indexes an array
    (the positions where it occurs, jq's `.[[1, 2]]`), and null gives null
    for any string or number key.
    """
    key_type = type(key)
    container_type = type(container)
    if key_type is str:
        if container_type is dict:
            return container.get(key)
    elif key_type in _NUMBER_TYPES:
        if container_type is list:
            return _array_item(container, key)
    elif key_type is list and container_type is list:
        return _array_indices(container, key)
    if container is None and key_type in (str, int, float):
        return None
    raise _index_error(container, key)


def _iterate(container):
    """Return the values `.[]` yields, or raise ExpressionRuntimeError."""
    if type(container) is list:
        return container
    if type(container) is dict:
        return container.values()
    raise ExpressionRuntimeError("Cannot iterate over %s" % _describe(container))


def _iterate_optional(container):
    """Return what `.[]?` iterates: like _iterate, but nothing instead of an error."""
    if type(container) is list:
        return container
    if type(container) is dict:
        return container.values()
    return ()


def _slice(container, start, end):
    """Return ``container[start:end]`` for arrays and strings with jq's clamping."""
    if container is None:
        return None
    if type(container) not in (list, str):
        raise ExpressionRuntimeError("Cannot index %s with object" % _type_name(container))
    length = len(container)
    bounds = []
    for bound, default in ((start, 0), (end, length)):
        if bound is None:
            bound = default
        elif type(bound) not in _NUMBER_TYPES:
            raise ExpressionRuntimeError("Start and end indices of an array slice must be numbers")
        bound = _to_double(bound)
        if bound != bound:
            bound = 0.0  # NaN (from sqrt of a negative): unspecified; never int(NaN)
        if bound < 0:
            bound += length
        bounds.append(min(max(bound, 0.0), float(length)))
    low, high = bounds
    high = max(high, low)
    # jq truncates the start and rounds the end up.
    return container[int(low):int(math.ceil(high))]


def _recurse(value):
    """Yield `..`: the value, then every array item and object value, depth first."""
    pending = [value]
    while pending:
        item = pending.pop()
        yield item
        if type(item) is list:
            pending.extend(reversed(item))
        elif type(item) is dict:
            pending.extend(reversed(list(item.values())))


# -- values: arithmetic ------------------------------------------------------------
# The table of spec/where.md 6.1.  Results are floats; tostring prints whole
# numbers without ".0", so `.seq + 1 | tostring` is "13" as in jq.

def _arithmetic_error(left, right, verb) -> ExpressionRuntimeError:
    """Return jq's "T (v) and U (w) cannot be <verb>" error."""
    return ExpressionRuntimeError("%s and %s cannot be %s" % (_describe(left), _describe(right), verb))


def _add(left, right):
    """jq's `+`: numbers, null as identity, string/array concatenation, shallow object merge."""
    left_type = type(left)
    right_type = type(right)
    if left_type in _NUMBER_TYPES and right_type in _NUMBER_TYPES:
        return _to_double(left) + _to_double(right)
    if left is None:
        return right
    if right is None:
        return left
    if left_type is right_type:
        if left_type is str or left_type is list:
            return left + right
        if left_type is dict:
            merged = dict(left)
            merged.update(right)
            return merged
    raise _arithmetic_error(left, right, "added")


def _subtract(left, right):
    """jq's `-`: numbers, and arrays minus every item equal to one of the right side."""
    left_type = type(left)
    right_type = type(right)
    if left_type in _NUMBER_TYPES and right_type in _NUMBER_TYPES:
        return _to_double(left) - _to_double(right)
    if left_type is list and right_type is list:
        return [item for item in left if not any(_equal(item, other) for other in right)]
    raise _arithmetic_error(left, right, "subtracted")


def _deep_merge(left: dict, right: dict) -> dict:
    """Return jq's `*` of two objects: a recursive merge, the right side winning."""
    merged = dict(left)
    for key, item in right.items():
        if type(item) is dict and type(merged.get(key)) is dict:
            merged[key] = _deep_merge(merged[key], item)
        else:
            merged[key] = item
    return merged


def _multiply(left, right):
    """jq's `*`: numbers, deep object merge, and string repetition either way round."""
    left_type = type(left)
    right_type = type(right)
    if left_type in _NUMBER_TYPES and right_type in _NUMBER_TYPES:
        return _to_double(left) * _to_double(right)
    if left_type is dict and right_type is dict:
        return _deep_merge(left, right)
    if left_type is str and right_type in _NUMBER_TYPES:
        return _repeat(left, _to_double(right))
    if right_type is str and left_type in _NUMBER_TYPES:
        return _repeat(right, _to_double(left))
    raise _arithmetic_error(left, right, "multiplied")


def _repeat(text: str, count: float):
    """Return ``text`` repeated as jq's `string * number` does: null for n <= 0."""
    if not count > 0:
        return None  # jq: n <= 0 gives null
    if not text:
        return text  # Python refuses a huge count even for "" (OverflowError)
    if not count * len(text) <= MAX_REPEAT_LENGTH:
        raise ExpressionRuntimeError("string repetition would exceed %d characters" % MAX_REPEAT_LENGTH)
    return text * max(1, int(count))


def _divide(left, right):
    """jq's `/`: numbers (dividing by zero is an error) and string splitting."""
    left_type = type(left)
    right_type = type(right)
    if left_type in _NUMBER_TYPES and right_type in _NUMBER_TYPES:
        divisor = _to_double(right)
        if divisor == 0:
            raise ExpressionRuntimeError("%s and %s cannot be divided because the divisor is zero"
                                         % (_describe(left), _describe(right)))
        return _to_double(left) / divisor
    if left_type is str and right_type is str:
        return _split_text(left, right)
    raise _arithmetic_error(left, right, "divided")


def _truncate(number: float) -> int:
    """Truncate a double toward zero for `%`, refusing infinities and NaN."""
    if not math.isfinite(number):
        raise ExpressionRuntimeError("%s cannot be used with %%" % _describe(number))
    return int(number)


def _modulo(left, right):
    """jq's `%`: both operands truncated to integers, C remainder (sign of the dividend)."""
    if type(left) in _NUMBER_TYPES and type(right) in _NUMBER_TYPES:
        divisor = _truncate(_to_double(right))
        if divisor == 0:
            raise ExpressionRuntimeError("%s and %s cannot be divided because the divisor is zero"
                                         % (_describe(left), _describe(right)))
        dividend = _truncate(_to_double(left))
        remainder = abs(dividend) % abs(divisor)
        return float(-remainder if dividend < 0 else remainder)
    raise _arithmetic_error(left, right, "divided")


def _negate(value):
    """jq's unary minus: numbers only."""
    if type(value) in _NUMBER_TYPES:
        return -_to_double(value)
    raise ExpressionRuntimeError("%s cannot be negated" % _describe(value))


_ARITHMETIC = {"+": _add, "-": _subtract, "*": _multiply, "/": _divide, "%": _modulo}
_ORDER_TESTS = {"<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge}


# -- builtins on values ----------------------------------------------------------
# One function per jq builtin that maps an input (and argument values) to one
# output.  The wiring to argument filters is in _BUILTINS; the builtins that
# take filters themselves (select, map, any/2, ...) follow the compiler helpers.

def _length(value):
    """jq's `length`: code points, items, keys; 0 for null; |x| for numbers.

    Python strings are sequences of code points, as jq counts them ("😀" has
    length 1, "e\\u0301" length 2).  A boolean has no length: an error.
    """
    value_type = type(value)
    if value_type in (str, list, dict):
        return len(value)
    if value is None:
        return 0
    if value_type in _NUMBER_TYPES:
        return abs(value)
    raise ExpressionRuntimeError("%s has no length" % _describe(value))


def _utf8_byte_length(value):
    """jq's `utf8bytelength`: the size of a string in UTF-8."""
    if type(value) is not str:
        raise ExpressionRuntimeError("%s only strings have UTF-8 byte length" % _describe(value))
    # surrogatepass: json.loads lets lone surrogates through; never raise on them.
    return len(value.encode("utf-8", "surrogatepass"))


def _not(value):
    """jq's `not`: the negated truthiness of the input."""
    return value is None or value is False


def _keys(value):
    """jq's `keys`: object keys sorted by code point, or an array's indices."""
    if type(value) is dict:
        return sorted(value)
    if type(value) is list:
        return list(range(len(value)))
    raise ExpressionRuntimeError("%s has no keys" % _describe(value))


def _keys_unsorted(value):
    """jq's `keys_unsorted`: object keys in insertion order (arrays as `keys`)."""
    if type(value) is dict:
        return list(value)
    return _keys(value)


def _has(container, key):
    """jq's `has(key)`: key present (even if null) or index in range; null has nothing.

    Objects take string keys and arrays numbers; any other pairing is an
    error ("Cannot check whether object has a number key").
    """
    if type(container) is dict and type(key) is str:
        return key in container
    if type(container) is list and type(key) in _NUMBER_TYPES:
        return 0 <= key < len(container)
    if container is None:
        return False  # spec section 7: null | has(k) is false
    raise ExpressionRuntimeError("Cannot check whether %s has a %s key"
                                 % (_type_name(container), _type_name(key)))


def _contains_kind(value) -> str:
    """Return the kind `contains` compares: a type name, with true and false apart (jq's
    JV_KIND_TRUE and JV_KIND_FALSE), so `false | contains(true)` is an error."""
    if value is True or value is False:
        return "true" if value else "false"
    return _type_name(value)


def _contains_value(container, wanted) -> bool:
    """jq's containment: substrings, sub-arrays matched against any item, sub-objects.

    Recursive and forgiving: every item of a wanted array must be contained
    in some item of the container (`["admin"] | contains(["adm"])` is true),
    and a kind mismatch deeper down is simply false.
    """
    if _contains_kind(container) != _contains_kind(wanted):
        return False
    if type(container) is dict:
        return all(key in container and _contains_value(container[key], item)
                   for key, item in wanted.items())
    if type(container) is list:
        return all(any(_contains_value(item, target) for item in container) for target in wanted)
    if type(container) is str:
        return wanted in container
    return _equal(container, wanted)


def _contains(container, wanted):
    """jq's `contains(b)`; the two sides must be of one kind (spec 7)."""
    if _contains_kind(container) != _contains_kind(wanted):
        raise ExpressionRuntimeError("%s and %s cannot have their containment checked"
                                     % (_describe(container), _describe(wanted)))
    return _contains_value(container, wanted)


def _inside(value, container):
    """jq's `inside(b)`: `b | contains(input)`."""
    return _contains(container, value)


def _is_in(key, container):
    """jq's `in(container)`: `container | has(input)`."""
    return _has(container, key)


def _starts_with(value, prefix):
    """jq's `startswith(s)`; both sides must be strings."""
    if type(value) is not str or type(prefix) is not str:
        raise ExpressionRuntimeError("startswith() requires string inputs")
    return value.startswith(prefix)


def _ends_with(value, suffix):
    """jq's `endswith(s)`; both sides must be strings."""
    if type(value) is not str or type(suffix) is not str:
        raise ExpressionRuntimeError("endswith() requires string inputs")
    return value.endswith(suffix)


def _trim_prefix(value, prefix):
    """jq's `ltrimstr(s)`: strip the prefix if present; anything else passes unchanged."""
    if type(value) is str and type(prefix) is str and value.startswith(prefix):
        return value[len(prefix):]
    return value


def _trim_suffix(value, suffix):
    """jq's `rtrimstr(s)`: strip the suffix if present; anything else passes unchanged."""
    if type(value) is str and type(suffix) is str and suffix and value.endswith(suffix):
        return value[:-len(suffix)]
    return value


_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")
_ASCII_UPPER = str.maketrans("abcdefghijklmnopqrstuvwxyz", "ABCDEFGHIJKLMNOPQRSTUVWXYZ")


def _ascii_downcase(value):
    """jq's `ascii_downcase`: maps A-Z only, so `"ÉCOLE"` gives `"École"`.

    The error text is jq's, whose definition goes through `explode`.
    """
    if type(value) is not str:
        raise ExpressionRuntimeError("explode input must be a string")
    return value.translate(_ASCII_LOWER)


def _ascii_upcase(value):
    """jq's `ascii_upcase`: maps a-z only."""
    if type(value) is not str:
        raise ExpressionRuntimeError("explode input must be a string")
    return value.translate(_ASCII_UPPER)


def _explode(value):
    """jq's `explode`: the code points of a string."""
    if type(value) is not str:
        raise ExpressionRuntimeError("explode input must be a string")
    return [ord(character) for character in value]


def _implode(value):
    """jq's `implode`: the string of a list of code points."""
    if type(value) is not list or not all(type(item) in _NUMBER_TYPES for item in value):
        raise ExpressionRuntimeError("implode input must be an array of numbers")
    try:
        return "".join(chr(int(item)) for item in value)
    except (ValueError, OverflowError):
        raise ExpressionRuntimeError("implode input contains an invalid code point") from None


def _to_text(value):
    """jq's `tostring`: strings unchanged, anything else as compact JSON."""
    return value if type(value) is str else _to_json(value)


# A JSON number literal (jq also takes "007", "1." and ".5"; "+5", spaces and
# "inf" are unspecified and refused here, as are "nan" and "0x10").
_NUMBER_TEXT = LazyPattern(r"-?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?\Z")


def _to_number(value):
    """jq's `tonumber`: numbers unchanged, strings holding a JSON number literal.

    Python's float() alone would also take "nan", "inf" and "1_000", which
    jq refuses (spec 7), hence the pattern first.
    """
    if type(value) in _NUMBER_TYPES:
        return value
    if type(value) is str:
        if _NUMBER_TEXT.match(value):
            return float(value)
        raise ExpressionRuntimeError("Cannot parse '%s' as a number" % value[:40])
    raise ExpressionRuntimeError("%s cannot be parsed as a number" % _describe(value))


def _reject_constant(text):
    """json.loads hook: NaN and Infinity are not JSON, so `fromjson` refuses them."""
    raise ValueError("%s is not valid JSON" % text)


def _from_json(value):
    """jq's `fromjson`: parse a string as one JSON value."""
    if type(value) is not str:
        raise ExpressionRuntimeError("%s cannot be parsed as JSON" % _describe(value))
    try:
        return json.loads(value, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as error:
        raise ExpressionRuntimeError("%s (while parsing '%s')" % (error, value[:40])) from None


def _require_number(value):
    """Return the input as a double, or raise jq's "number required"."""
    if type(value) not in _NUMBER_TYPES:
        raise ExpressionRuntimeError("%s number required" % _describe(value))
    return _to_double(value)


def _floor(value):
    """jq's `floor`."""
    number = _require_number(value)
    return float(math.floor(number)) if math.isfinite(number) else number


def _ceil(value):
    """jq's `ceil`."""
    number = _require_number(value)
    return float(math.ceil(number)) if math.isfinite(number) else number


def _round(value):
    """C's round(): halves away from zero (Python's round() rounds halves to even)."""
    number = _require_number(value)
    if not math.isfinite(number):
        return number
    whole = math.floor(abs(number))
    if abs(number) - whole >= 0.5:
        whole += 1
    return math.copysign(float(whole), number)


def _sqrt(value):
    """jq's `sqrt` (NaN for negative numbers, as C's sqrt)."""
    number = _require_number(value)
    return math.sqrt(number) if number >= 0 else math.nan


def _fabs(value):
    """jq's `fabs`."""
    return abs(_require_number(value))


def _add_all(value):
    """jq's `add`: the `+` of all items (or object values); null when there are none."""
    total = None
    for item in _iterate(value):
        total = _add(total, item)
    return total


def _any_value(value):
    """jq's `any`: is some item (or object value) truthy?"""
    return any(map(_is_truthy, _iterate(value)))


def _all_values(value):
    """jq's `all`: is every item (or object value) truthy?"""
    return all(map(_is_truthy, _iterate(value)))


def _require_array(value, name):
    """Return the input if it is an array, else raise jq's error for ``name``."""
    if type(value) is not list:
        raise ExpressionRuntimeError("%s cannot be %s, as it is not an array" % (_describe(value), name))
    return value


def _sort(value):
    """jq's `sort`: a stable sort in jq's total order."""
    return sorted(_require_array(value, "sorted"), key=_sort_key)


def _unique(value):
    """jq's `unique`: sorted, equal items kept once."""
    result = []
    for item in _sort(value):
        if not result or _compare(result[-1], item):
            result.append(item)
    return result


def _minimum(value):
    """jq's `min`: the first of the smallest items; null for []."""
    items = _require_array(value, "compared")
    return min(items, key=_sort_key) if items else None


def _maximum(value):
    """jq's `max`: the last of the largest items; null for []."""
    items = _require_array(value, "compared")
    if not items:
        return None
    # jq keeps the last of equal maxima (and min keeps the first, like Python's min).
    best = items[0]
    for item in items[1:]:
        if _compare(item, best) >= 0:
            best = item
    return best


def _reverse(value):
    """jq's `reverse`: arrays and (as jq 1.7) strings; null gives []."""
    if type(value) in (list, str):
        return value[::-1]
    if value is None:
        return []
    raise ExpressionRuntimeError("Cannot reverse %s" % _describe(value))


def _flatten_depth(value, depth):
    """jq's `flatten(depth)`: iteratively, so deep arrays cannot exhaust the stack."""
    if type(depth) not in _NUMBER_TYPES or depth < 0:
        raise ExpressionRuntimeError("flatten depth must not be negative")
    result = []
    pending = [(item, depth) for item in reversed(_require_array(value, "flattened"))]
    while pending:
        item, remaining = pending.pop()
        if type(item) is list and remaining != 0:  # jq's test, so 1.5 flattens fully
            pending.extend((inner, remaining - 1) for inner in reversed(item))
        else:
            result.append(item)
    return result


def _flatten(value):
    """jq's `flatten`: all the way down."""
    return _flatten_depth(value, 1e9)


def _first_item(value):
    """jq's `first`: `.[0]`."""
    return _index(value, 0)


def _last_item(value):
    """jq's `last`: `.[-1]`."""
    return _index(value, -1)


def _to_entries(value):
    """jq's `to_entries`: [{key, value}] in insertion order (indices for arrays)."""
    if type(value) is dict:
        return [{"key": key, "value": item} for key, item in value.items()]
    if type(value) is list:
        return [{"key": index, "value": item} for index, item in enumerate(value)]
    raise ExpressionRuntimeError("%s has no keys" % _describe(value))


def _from_entries(value):
    """jq 1.7's from_entries (1.6 errors on k/K keys): the key is .key unless null, else
    .k // .name // .Name // .K // .Key, JSON text when not a string; value .value or .v."""
    result = {}
    for entry in _iterate(value):
        if type(entry) is not dict:
            raise ExpressionRuntimeError("Cannot index %s with \"key\"" % _type_name(entry))
        key = entry.get("key")
        if key is None:
            for name in ("k", "name", "Name", "K", "Key"):
                key = entry.get(name)
                if _is_truthy(key):
                    break
        if type(key) is not str:
            key = _to_json(key)
        result[key] = entry["value"] if "value" in entry else entry.get("v")
    return result


def _get_path(value, path):
    """jq's `getpath(path)`: index step by step; a null on the way gives null."""
    if type(path) is not list:
        raise ExpressionRuntimeError("Path must be specified as an array")
    for key in path:
        if value is None:
            return None
        value = _index(value, key)
    return value


def _split_text(value, separator):
    """jq's `split(s)` and `string / string`: split on a literal separator."""
    if type(value) is not str or type(separator) is not str:
        raise ExpressionRuntimeError("split input and separator must be strings")
    if not value:
        return []  # jq splits "" into no pieces at all
    if not separator:
        return list(value)
    return value.split(separator)


def _join(value, separator):
    """jq's `join(s)`: strings as is, numbers and booleans as JSON, null as ""."""
    pieces = []
    for item in _iterate(value):
        if item is None:
            pieces.append("")
        elif type(item) is str:
            pieces.append(item)
        elif type(item) in (bool, int, float):
            pieces.append(_to_json(item))
        else:
            raise ExpressionRuntimeError("Cannot join with %s" % _type_name(item))
    if len(pieces) < 2:
        return pieces[0] if pieces else ""  # the separator is never used
    if type(separator) is not str:
        raise _arithmetic_error(pieces[0], separator, "added")
    return separator.join(pieces)


def _array_indices(array, wanted):
    """Positions where ``wanted`` (an array) occurs in ``array`` as a contiguous run."""
    if not wanted:
        return []
    size = len(wanted)
    return [start for start in range(len(array) - size + 1)
            if all(_equal(array[start + offset], wanted[offset]) for offset in range(size))]


def _indices(value, wanted):
    """jq's `indices(s)`: code point offsets in a string, or positions in an array."""
    if value is None:
        return None
    if type(value) is str and type(wanted) is str:
        if not wanted:
            return None
        positions = []
        start = value.find(wanted)
        while start >= 0:
            positions.append(start)  # code points, overlapping, like jq's _strindices
            start = value.find(wanted, start + 1)
        return positions
    if type(value) is list:
        return _array_indices(value, wanted if type(wanted) is list else [wanted])
    raise ExpressionRuntimeError("Cannot determine the indices of %s in %s"
                                 % (_describe(wanted), _describe(value)))


def _first_index(value, wanted):
    """jq's `index(s)`: the first of `indices(s)`, or null."""
    positions = _indices(value, wanted)
    return positions[0] if positions else None


def _last_index(value, wanted):
    """jq's `rindex(s)`: the last of `indices(s)`, or null."""
    positions = _indices(value, wanted)
    return positions[-1] if positions else None


def _raise_error(value, message):
    """jq's `error(message)`: raise with ``message`` as the value `catch` receives."""
    if type(message) is str:
        raise ExpressionRuntimeError(message, message)
    raise ExpressionRuntimeError("%s (not a string)" % _to_json(message), message)


def _raise_input_error(value):
    """jq's `error`: raise with the input as the error value."""
    return _raise_error(value, value)


def _is_type(name):
    """Return a test for one jq type name (for `numbers`, `strings`, ...)."""
    return lambda value: _type_name(value) == name


_TYPE_SELECTORS = {
    "nulls": _is_type("null"), "booleans": _is_type("boolean"), "numbers": _is_type("number"),
    "strings": _is_type("string"), "arrays": _is_type("array"), "objects": _is_type("object"),
    "iterables": lambda value: type(value) in (list, dict),
    "scalars": lambda value: type(value) not in (list, dict),
    "values": lambda value: value is not None,
}


# -- regular expressions -----------------------------------------------------------
# jq uses Oniguruma (Perl-NT syntax); Python's re agrees on the common subset.
# _translate_regex rewrites the constructs that differ (spec/where.md section 8)
# and refuses the ones it cannot express, so a pattern never silently matches
# something else.  Failures are runtime errors, as in jq.

_REGEX_FLAGS = {"g": 0, "i": re.IGNORECASE, "x": re.VERBOSE, "n": 0, "s": 0, "p": re.DOTALL,
                "l": 0}
_GROUP_NAME = LazyPattern(r"[A-Za-z_][A-Za-z0-9_]*")
_INLINE_FLAGS = LazyPattern(r"\(\?([imsx]*)(?:-([imsx]*))?([:)])")
_HEX_DIGITS = LazyPattern(r"[0-9A-Fa-f]{1,2}")
_BRACED_HEX = LazyPattern(r"\{([0-9A-Fa-f]{1,8})\}")
_PROPERTY_NAME = LazyPattern(r"\{(\^?)([A-Za-z_ -]+)\}")
_POSIX_BRACKET = LazyPattern(r"\[:(\^?)([A-Za-z]+):\]")
_LINE_BREAK = "(?:\\r\\n|[\\n\\v\\f\\r\\x85\\u2028\\u2029])"
# Perl-NT reads a letter escape it does not define as the letter itself (\\v is
# "v", \\u is "u", \\h is "h"), where Python has other meanings or errors; so
# only these letters keep their backslash.
_SAME_ESCAPES = frozenset("dDwWsSbBAtnrfa")
_UNSUPPORTED_ESCAPES = frozenset("KGXyY")  # keep, search start, graphemes, segment boundaries
_CLASS_CONTROL_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "f": "\f", "a": "\a", "b": "\b"}

# The Unicode general categories, and what POSIX brackets ([[:alpha:]]) and
# \p{...} names mean in them.  Oniguruma uses derived properties for a few of
# these (Alphabetic, Uppercase...); the categories are the usual approximation.
_GENERAL_CATEGORIES = frozenset(
    "Lu Ll Lt Lm Lo Mn Mc Me Nd Nl No Pc Pd Ps Pe Pi Pf Po Sm Sc Sk So Zs Zl Zp Cc Cf Cs Co Cn"
    .split())
_LETTERS = ("Lu", "Ll", "Lt", "Lm", "Lo")
_PROPERTY_CATEGORIES = {
    "alpha": _LETTERS + ("Nl",), "alnum": _LETTERS + ("Nl", "Nd"), "upper": ("Lu",),
    "lower": ("Ll",), "punct": ("Pc", "Pd", "Ps", "Pe", "Pi", "Pf", "Po"), "cntrl": ("Cc",),
    "graph": tuple(sorted(_GENERAL_CATEGORIES - {"Zs", "Zl", "Zp", "Cc", "Cs", "Cn"})),
    "print": tuple(sorted(_GENERAL_CATEGORIES - {"Zl", "Zp", "Cc", "Cs", "Cn"})),
}
for _category in _GENERAL_CATEGORIES:
    _PROPERTY_CATEGORIES[_category.lower()] = (_category,)
    _PROPERTY_CATEGORIES.setdefault(_category[0].lower(), ())
    _PROPERTY_CATEGORIES[_category[0].lower()] += (_category,)
del _category
# Names Python's re can say directly.
_PROPERTY_ATOMS = {"digit": "\\d", "space": "\\s", "word": "\\w", "xdigit": "[0-9A-Fa-f]",
                   "ascii": "[\\x00-\\x7f]", "any": "(?s:.)"}
_NEGATED_ATOMS = {"\\d": "\\D", "\\s": "\\S", "\\w": "\\W"}


def _regex_unsupported(what):
    """Return the runtime error for a regex construct Python cannot express."""
    return ExpressionRuntimeError("Regex failure: %s is not supported" % what)


@functools.lru_cache(maxsize=None)
def _category_ranges():
    """Map each Unicode general category to its code point ranges (built once, ~0.3 s)."""
    import unicodedata  # only patterns with \p{..} or POSIX brackets pay for it
    ranges = {}
    category_of = unicodedata.category
    previous = category_of("\0")
    start = 0
    for code_point in range(1, 0x110000):
        category = category_of(chr(code_point))
        if category != previous:
            ranges.setdefault(previous, []).append((start, code_point - 1))
            previous = category
            start = code_point
    ranges.setdefault(previous, []).append((start, 0x10FFFF))
    return ranges


def _category_atom(categories) -> str:
    """Return a Python set matching the code points of the given general categories."""
    spans = sorted(span for category in categories for span in _category_ranges().get(category, ()))
    body = "".join("\\U%08x" % low if low == high else "\\U%08x-\\U%08x" % (low, high)
                   for low, high in spans)
    return "[%s]" % body


def _property_atom(name: str, is_negated: bool) -> str:
    """Return a Python pattern matching one character with (or without) property ``name``.

    ``name`` is a POSIX bracket name or a \\p{...} name; like Oniguruma,
    case, spaces, underscores and hyphens are ignored.  Scripts and other
    properties are refused.
    """
    key = name.replace(" ", "").replace("_", "").replace("-", "").lower()
    if key in _PROPERTY_ATOMS:
        atom = _PROPERTY_ATOMS[key]
    elif key == "blank":
        atom = "(?:\\t|%s)" % _category_atom(("Zs",))
    elif key in _PROPERTY_CATEGORIES:
        atom = _category_atom(_PROPERTY_CATEGORIES[key])
    else:
        raise _regex_unsupported("the property %r" % name)
    if not is_negated:
        return atom
    return _NEGATED_ATOMS.get(atom) or "(?:(?!%s)(?s:.))" % atom


def _read_escaped_character(pattern, index):
    """Decode the character escape at ``pattern[index]`` (a backslash), or return None.

    Handles the escapes that stand for one character in Oniguruma but that
    Python spells differently or lacks: \\xH, \\x{H..}, \\e, \\cX.
    Returns (character, next index).
    """
    letter = pattern[index + 1:index + 2]
    if letter == "x":
        braced = _BRACED_HEX.match(pattern, index + 2)
        if braced:
            value = int(braced.group(1), 16)
            if value > 0x10FFFF:
                raise ExpressionRuntimeError("Regex failure: too big wide-char value")
            return chr(value), braced.end()
        digits = _HEX_DIGITS.match(pattern, index + 2)
        if digits:
            return chr(int(digits.group(), 16)), digits.end()
        return None
    if letter == "e":
        return "\x1b", index + 2
    if letter == "c" and index + 2 < len(pattern):
        return chr(ord(pattern[index + 2]) & 0x1F), index + 3
    return None


def _escape_class_character(character: str) -> str:
    """Return one literal character written safely inside a Python set."""
    # Escape what is special inside a Python set, plus what Python warns about
    # as a possible future set operation ([, &, ~, |).
    if character in "\\]^-[&~|":
        return "\\" + character
    return character


def _read_class_character(pattern, index):
    """Read one literal character of a bracket expression at ``pattern[index]``.

    Returns (character, next index), or None for an octal escape (which
    Python reads as Oniguruma does) or a backslash ending the pattern.
    """
    character = pattern[index]
    if character != "\\":
        return character, index + 1
    letter = pattern[index + 1:index + 2]
    decoded = _read_escaped_character(pattern, index)
    if decoded:
        return decoded
    if letter in _CLASS_CONTROL_ESCAPES:
        return _CLASS_CONTROL_ESCAPES[letter], index + 2
    if not letter or letter.isdigit():
        return None
    return letter, index + 2  # punctuation, or a letter Perl-NT does not define


def _translate_class(pattern: str, start: int):
    """Translate the bracket expression at ``pattern[start]``; return (python, next index).

    POSIX brackets and \\p{..} become alternatives around the Python set,
    since Python sets cannot hold them.  Perl-NT syntax has no nested sets
    or &&: any other "[" and "&" are literals, escaped so Python agrees.
    """
    index = start + 1
    is_negated = pattern.startswith("^", index)
    if is_negated:
        index += 1
    body = []
    alternatives = []
    length = len(pattern)
    is_first = True  # a "]" right after "[" or "[^" is a literal
    while True:
        if index >= length:
            raise ExpressionRuntimeError("Regex failure: premature end of char-class")
        character = pattern[index]
        if character == "]" and not is_first:
            break
        is_first = False
        posix = _POSIX_BRACKET.match(pattern, index) if character == "[" else None
        if posix:
            alternatives.append(_property_atom(posix.group(2), bool(posix.group(1))))
            index = posix.end()
            continue
        letter = pattern[index + 1:index + 2] if character == "\\" else ""
        if letter in ("p", "P"):
            found = _PROPERTY_NAME.match(pattern, index + 2)
            if not found:
                raise ExpressionRuntimeError("Regex failure: invalid character property name")
            alternatives.append(_property_atom(found.group(2),
                                               (letter == "P") != (found.group(1) == "^")))
            index = found.end()
            continue
        read = _read_class_character(pattern, index) if letter not in tuple("dDwWsS") else None
        if read is None:
            if character == "\\" and not letter:
                raise ExpressionRuntimeError("Regex failure: end pattern at escape")
            body.append(pattern[index:index + 2])  # \d, \w, \s and friends, octal, or an error
            index += 2
            continue
        literal, index = read
        if pattern.startswith("-", index) and index + 1 < length and pattern[index + 1] != "]":
            upper = _read_class_character(pattern, index + 1)
            if upper is None:
                raise _regex_unsupported("a class escape as a range end")
            body.append(_escape_class_character(literal) + "-" + _escape_class_character(upper[0]))
            index = upper[1]
        else:
            body.append(_escape_class_character(literal))
    index += 1
    if not alternatives:
        return "[%s%s]" % ("^" if is_negated else "", "".join(body)), index
    if body:
        alternatives.append("[%s]" % "".join(body))
    if is_negated:
        return "(?:(?!%s)(?s:.))" % "|".join(alternatives), index
    return "(?:%s)" % "|".join(alternatives), index


def _translate_escape(pattern: str, index: int):
    """Translate the escape at ``pattern[index]`` outside brackets; return (python, next index)."""
    letter = pattern[index + 1:index + 2]
    if not letter:
        raise ExpressionRuntimeError("Regex failure: end pattern at escape")
    if letter in _SAME_ESCAPES or letter.isdigit():
        return "\\" + letter, index + 2  # digits: octal or backreference, alike in both
    if letter == "z":
        return "\\Z", index + 2
    if letter == "Z":
        return "(?=\\n?\\Z)", index + 2  # Oniguruma's \\Z also matches before a final newline
    decoded = _read_escaped_character(pattern, index)
    if decoded:
        return re.escape(decoded[0]), decoded[1]
    if letter == "k" and pattern.startswith("<", index + 2):
        end = pattern.find(">", index + 3)
        name = pattern[index + 3:end] if end > 0 else ""
        if name.isdigit():
            return "(?:\\%s)" % name, end + 1
        found = _GROUP_NAME.match(name)
        if not found or found.end() != len(name):
            raise ExpressionRuntimeError("Regex failure: invalid backref name")
        return "(?P=%s)" % name, end + 1
    if letter in ("p", "P"):
        found = _PROPERTY_NAME.match(pattern, index + 2)
        if not found:
            raise ExpressionRuntimeError("Regex failure: invalid character property name")
        return _property_atom(found.group(2), (letter == "P") != (found.group(1) == "^")), found.end()
    if letter == "Q":
        end = pattern.find("\\E", index + 2)
        end = len(pattern) if end < 0 else end
        quoted = re.escape(pattern[index + 2:end]).replace(" ", "\\ ")  # spaces survive the x flag
        return quoted, min(end + 2, len(pattern))
    if letter == "R":
        return _LINE_BREAK, index + 2
    if letter == "N":
        return "[^\\n]", index + 2
    if letter == "O":
        return "(?s:.)", index + 2
    if letter in _UNSUPPORTED_ESCAPES or (letter == "g" and pattern[index + 2:index + 3] in "<'"):
        raise _regex_unsupported("\\" + pattern[index + 1:index + 3].rstrip("<'"))
    if "a" <= letter.lower() <= "z":
        return letter, index + 2  # a letter Perl-NT does not define stands for itself
    return re.escape(letter), index + 2


def _translate_regex(pattern: str, is_extended: bool) -> str:
    """Rewrite an Oniguruma (Perl-NT) pattern as an equivalent Python pattern.

    What changes (everything else is copied, and means the same in both):

        (?<name>x) (?'name'x)   ->  (?P<name>x)
        \\k<name>  \\k<2>         ->  (?P=name)  (?:\\2)
        \\z  \\Z                   ->  \\Z  (?=\\n?\\Z)
        a(?i)b|c                ->  a(?i:b|c)   (to the end of the enclosing group)
        \\xH \\x{HHHH} \\e \\cX     ->  the character itself
        \\h \\v \\u \\q (undefined) ->  the letter itself
        \\Q...\\E \\R \\N \\O          ->  escaped text, line break, [^\\n], (?s:.)
        \\p{Lu} [[:alpha:]]      ->  sets built from Unicode categories
        [..[..&&..]             ->  "[" and "&" as literals (no nested sets in Perl-NT)

    Python 3.11+ rejects a mid-pattern (?i) and older versions apply it to
    the whole pattern, hence the scoped group.  Raises ExpressionRuntimeError
    for what Python cannot express: (?P...) (not jq syntax), \\K, \\G, \\X,
    \\y, \\g<..>, scripts such as \\p{Greek}.
    """
    output = []
    # One entry per open group: [scoped groups to close with it, extended mode inside it].
    groups = [[0, is_extended]]
    index = 0
    length = len(pattern)
    while index < length:
        character = pattern[index]
        if character == "\\":
            piece, index = _translate_escape(pattern, index)
            output.append(piece)
        elif character == "[":
            piece, index = _translate_class(pattern, index)
            output.append(piece)
        elif character == "#" and groups[-1][1]:
            end = pattern.find("\n", index)
            end = length if end < 0 else end
            output.append(pattern[index:end])  # an extended-mode comment: copy, never interpret
            index = end
        elif character == ")":
            if len(groups) > 1:
                output.append(")" * groups.pop()[0])
            output.append(")")
            index += 1
        elif character != "(":
            output.append(character)
            index += 1
        elif not pattern.startswith("(?", index):
            groups.append([0, groups[-1][1]])
            output.append("(")
            index += 1
        else:
            index = _translate_group_opening(pattern, index, output, groups)
    output.append(")" * groups[0][0])
    return "".join(output)


def _translate_group_opening(pattern, index, output, groups) -> int:
    """Translate the "(?" construct at ``pattern[index]``; return the next index."""
    extension = pattern[index + 2:index + 3]
    if extension == "#":
        end = pattern.find(")", index)
        if end < 0:
            raise ExpressionRuntimeError("Regex failure: end pattern in group")
        output.append(pattern[index:end + 1])
        return end + 1
    if extension == "P":
        raise _regex_unsupported("Python's (?P...) syntax (write (?<name>...))")
    if extension in ("<", "'") and pattern[index + 3:index + 4] not in ("=", "!"):
        name_match = _GROUP_NAME.match(pattern, index + 3)
        closer = ">" if extension == "<" else "'"
        if not name_match or not pattern.startswith(closer, name_match.end()):
            raise ExpressionRuntimeError("Regex failure: invalid group name")
        groups.append([0, groups[-1][1]])
        output.append("(?P<%s>" % name_match.group())
        return name_match.end() + 1
    if extension in (":", "=", "!", ">", "<"):
        width = 4 if extension == "<" else 3
        groups.append([0, groups[-1][1]])
        output.append(pattern[index:index + width])
        return index + width
    flags = _INLINE_FLAGS.match(pattern, index)
    if not flags or not (flags.group(1) or flags.group(2)):
        raise _regex_unsupported("the group %r" % pattern[index:index + 4])
    added, removed = flags.group(1), flags.group(2) or ""
    is_extended = groups[-1][1]
    if "x" in added:
        is_extended = True
    if "x" in removed:
        is_extended = False
    output.append("(?%s%s:" % (added, "-" + removed if removed else ""))
    if flags.group(3) == ")":
        groups[-1][0] += 1  # isolated option: scope it to the rest of this group
        groups[-1][1] = is_extended
    else:
        groups.append([0, is_extended])
    return flags.end()


class _Regex:
    """A jq regex compiled for Python, with the flags Python cannot express itself."""

    __slots__ = ("compiled", "is_global", "should_ignore_empty", "is_longest", "group_names")

    def __init__(self, compiled, flags):
        self.compiled = compiled
        self.is_global = "g" in flags
        self.should_ignore_empty = "n" in flags
        self.is_longest = "l" in flags
        self.group_names = {number: name for name, number in compiled.groupindex.items()}


_regex_cache = {}


def _compile_regex(pattern, flags) -> _Regex:
    """Compile a jq pattern and flag string (cached), or raise ExpressionRuntimeError."""
    key = (pattern, flags)
    cached = _regex_cache.get(key)
    if cached is None:
        try:
            cached = _build_regex(pattern, flags)
        except ExpressionRuntimeError as error:
            cached = error.message
        if len(_regex_cache) >= _REGEX_CACHE_SIZE:
            _regex_cache.clear()
        _regex_cache[key] = cached
    if type(cached) is str:
        raise ExpressionRuntimeError(cached)
    return cached


def _build_regex(pattern, flags) -> _Regex:
    """Compile a jq pattern and flag string into a _Regex; raise ExpressionRuntimeError."""
    if type(pattern) is not str:
        raise ExpressionRuntimeError("%s cannot be matched, as it is not a string" % _describe(pattern))
    if flags is None:
        flags = ""
    elif type(flags) is not str:
        raise ExpressionRuntimeError("%s is not a string" % _describe(flags))
    python_flags = 0
    for letter in flags:
        if letter not in _REGEX_FLAGS:
            raise ExpressionRuntimeError("%s is not a valid modifier string" % flags)
        python_flags |= _REGEX_FLAGS[letter]
    translated = _translate_regex(pattern, "x" in flags)
    try:
        compiled = re.compile(translated, python_flags)
    except (re.error, OverflowError, RecursionError, ValueError) as error:
        raise ExpressionRuntimeError("Regex failure: %s" % error) from None
    return _Regex(compiled, flags)


def _find_matches(value, regex: _Regex, is_global):
    """Yield the matches jq's loop finds: each search starts where the last match
    ended, one character further after an empty match (Python's finditer would
    retry a non-empty match at the same place); the n flag skips empty matches."""
    search = regex.compiled.search
    start = 0
    length = len(value)
    while start <= length:
        match = search(value, start)
        if match is None:
            return
        is_empty = match.end() == match.start()
        if not (is_empty and regex.should_ignore_empty):
            yield match
            if not is_global:
                return
        start = match.end() + 1 if is_empty else match.end()


def _regex_search(value, regex: _Regex) -> bool:
    """jq's `test`: does the pattern match anywhere in the string?

    The input must be a string (jq: "number (503) cannot be matched, as it
    is not a string").  With the n flag only a non-empty match counts.
    """
    if type(value) is not str:
        raise ExpressionRuntimeError("%s cannot be matched, as it is not a string" % _describe(value))
    if regex.should_ignore_empty:
        return any(True for _ in _find_matches(value, regex, False))
    return regex.compiled.search(value) is not None


def _unpack_regex_argument(argument):
    """jq's test/1 and match/1 also take ["re", "flags"]."""
    if type(argument) is str:
        return argument, None
    if type(argument) is list and argument:
        return argument[0], argument[1] if len(argument) > 1 else None
    raise ExpressionRuntimeError("%s not a string or array" % _type_name(argument))


def _match_records(value, regex: _Regex, is_global=False):
    """Yield jq match objects: offset, length, string, captures (code point offsets)."""
    if type(value) is not str:
        raise ExpressionRuntimeError("%s cannot be matched, as it is not a string" % _describe(value))
    if regex.is_longest:
        raise _regex_unsupported("the l (longest match) flag outside test")
    for match in _find_matches(value, regex, is_global or regex.is_global):
        captures = []
        for group in range(1, regex.compiled.groups + 1):
            start = match.start(group)
            name = regex.group_names.get(group)
            if start < 0:
                captures.append({"offset": -1, "length": 0, "string": None, "name": name})
            else:
                captures.append({"offset": start, "length": match.end(group) - start,
                                 "string": match.group(group), "name": name})
        yield {"offset": match.start(), "length": match.end() - match.start(),
               "string": match.group(), "captures": captures}


def _capture_object(record) -> dict:
    """Return the {name: text} object of a match's named groups (capture, sub)."""
    return {capture["name"]: capture["string"] for capture in record["captures"]
            if capture["name"] is not None}


def _split_records(value, regex: _Regex):
    """jq's `split(re; flags)`: the text between the matches."""
    pieces = []
    previous = 0
    for record in _match_records(value, regex, is_global=True):
        pieces.append(value[previous:record["offset"]])
        previous = record["offset"] + record["length"]
    pieces.append(value[previous:])
    return pieces


def _scan_result(record):
    """Return what `scan` emits for one match."""
    if record["captures"]:
        return [capture["string"] for capture in record["captures"]]
    return record["string"]


# -- tokens and parse tree -------------------------------------------------------
# The whole expression is tokenized first (string interpolations recursively),
# then parsed.  Every token remembers its character position, which is what
# the syntax errors and their caret report.

_END = "<end>"  # kind of the token after the last one (not the keyword `end`)


class _Token:
    """One token: ``kind`` is the operator or keyword text itself, or one of
    name, field, variable, number, string, _END."""

    __slots__ = ("kind", "value", "position")

    def __init__(self, kind, value, position):
        self.kind = kind
        self.value = value
        self.position = position

    def describe(self) -> str:
        """Return the token as error messages quote it."""
        if self.kind == _END:
            return "end of expression" if self.value is None else "'%s'" % self.value
        if self.kind == "string":
            return "string"
        if self.kind in ("field", "variable"):
            return "'%s%s'" % ("." if self.kind == "field" else "$", self.value)
        return "'%s'" % self.value


def _invalid_character(text, index):
    """Return the syntax error for a character no token starts with, with a hint."""
    character = text[index]
    hint = _CHARACTER_HINTS.get(character)
    if hint is None and index > 0 and text[index - 1] == "." and character.isalpha():
        hint = 'field names are ASCII; quote others: ."%s" or .["%s"]' % (
            _leading_word(text, index), _leading_word(text, index))
    return _syntax_error("unexpected character %r" % character, text, index, hint)


def _leading_word(text, index):
    """Return the run of letters and digits at ``text[index]`` (for hints)."""
    end = index
    while end < len(text) and (text[end].isalnum() or text[end] == "_"):
        end += 1
    return text[index:end]


def _tokenize(text, start=0, depth=0, opener=None):
    """Split ``text[start:]`` into tokens; return (tokens, end).

    `.name` is one field token (ASCII names only; keywords allowed: `.if`),
    so `.data .status` is a path and `.foo-bar` is `.foo - bar`.  Numbers
    carry no sign.  The list ends with an _END token.  Inside a string interpolation
    (``opener`` is the position of its backslash) tokenizing stops at the ")"
    that closes it, which becomes the end token.  Raises ExpressionSyntaxError.
    """
    if depth > MAX_EXPRESSION_DEPTH:
        raise _syntax_error("expression nests too deeply (more than %d levels)"
                            % MAX_EXPRESSION_DEPTH, text, opener or 0)
    tokens = []
    open_parentheses = 0
    index = start
    length = len(text)
    while True:
        if index >= length:
            if opener is not None:
                raise _syntax_error("unterminated string interpolation", text, opener,
                                    "close the interpolation with ')' and the string with '\"'")
            tokens.append(_Token(_END, None, length))
            return tokens, length
        match = _TOKEN_PATTERN.match(text, index)
        if match is None:
            raise _invalid_character(text, index)
        group = match.lastgroup
        end = match.end()
        if group == "space":
            index = end
            continue
        if group == "operator":
            symbol = match.group()
            if opener is not None and symbol == ")":
                if not open_parentheses:
                    tokens.append(_Token(_END, ")", index))
                    return tokens, end
                open_parentheses -= 1
            elif symbol == "(":
                open_parentheses += 1
            tokens.append(_Token(symbol, symbol, index))
        elif group == "name":
            word = match.group()
            tokens.append(_Token(word if word in _KEYWORDS else "name", word, index))
        elif group == "string":
            parts, end = _scan_string(text, index, depth)
            tokens.append(_Token("string", parts, index))
        elif group == "number":
            tokens.append(_Token("number", match.group(), index))
        else:
            tokens.append(_Token(group, match.group()[1:], index))  # field, variable
        index = end


def _scan_string(text, start, depth):
    """Read the string literal that opens at ``text[start]``; return (parts, end).

    ``parts`` alternates literal text and token lists of interpolations
    (``"a\\(x)b"`` gives ["a", tokens of x, "b"]).  Escapes are JSON's plus
    ``\\(``; anything else is a syntax error (spec section 4).
    """
    parts = []
    pieces = []
    index = start + 1
    length = len(text)
    while True:
        if index >= length:
            raise _syntax_error("unterminated string", text, start, 'close the string with "')
        character = text[index]
        if character == '"':
            break
        if character != "\\":
            chunk = _STRING_TEXT.match(text, index)
            pieces.append(chunk.group())
            index = chunk.end()
            continue
        escape = text[index + 1:index + 2]
        if escape in _STRING_ESCAPES:
            pieces.append(_STRING_ESCAPES[escape])
            index += 2
        elif escape == "u":
            code_point, index = _read_unicode_escape(text, index)
            pieces.append(chr(code_point))
        elif escape == "(":
            tokens, index = _tokenize(text, index + 2, depth + 1, opener=index)
            parts.append("".join(pieces))
            parts.append(tokens)
            pieces = []
        elif not escape:
            raise _syntax_error("unterminated string", text, start, 'close the string with "')
        else:
            raise _syntax_error("invalid escape '\\%s' in string" % escape, text, index,
                                'a regex backslash is written twice in jq strings: "\\\\d"')
    parts.append("".join(pieces))
    return parts, index + 1


def _read_unicode_escape(text, index):
    """Decode ``\\uXXXX`` at ``text[index]``, joining a surrogate pair; return (code point, end)."""
    digits = _FOUR_HEX_DIGITS.match(text, index + 2)
    if not digits:
        raise _syntax_error("invalid \\uXXXX escape in string", text, index)
    code_point = int(digits.group(), 16)
    end = digits.end()
    if 0xD800 <= code_point < 0xDC00:
        low = _FOUR_HEX_DIGITS.match(text, end + 2) if text.startswith("\\u", end) else None
        if not low or not 0xDC00 <= int(low.group(), 16) < 0xE000:
            raise _syntax_error("invalid \\uXXXX\\uXXXX surrogate pair escape", text, index,
                                "write a character outside the BMP as a pair, e.g. \\ud83d\\ude00")
        return 0x10000 + ((code_point - 0xD800) << 10) + int(low.group(), 16) - 0xDC00, low.end()
    if 0xDC00 <= code_point < 0xE000:
        return 0xFFFD, end  # jq replaces a lone low surrogate
    return code_point, end


class _Node:
    """A parse tree node.  ``kind`` names the construct, ``value`` holds its
    literal, name, operator or optional flag, and ``depth`` bounds recursion."""

    __slots__ = ("kind", "position", "children", "value", "depth")

    def __init__(self, kind, position, children=(), value=None):
        self.kind = kind
        self.position = position
        self.children = tuple(children)
        self.value = value
        self.depth = 1 + max([child.depth for child in self.children] or [0])


class _Parser:
    """Recursive-descent parser for spec/where.md section 5.

    Binary operators are parsed by precedence climbing (one function for
    levels 2-9) so that a parenthesis costs five Python frames, not eleven;
    chains of `,` `//` `or` `and` become one n-ary node, so long flat
    predicates do not count as nesting.

    Error positions, as the caret shows them: an unexpected token is blamed
    where it starts (the end of the text when the expression stops early);
    an unterminated string at its opening quote; a bad escape at its
    backslash; an unknown function or variable at its name; nesting at the
    first token past the limit.  Messages quote the token and, for brackets,
    name the one left open.
    """

    def __init__(self, text, tokens, depth=0):
        self.text = text
        self.tokens = tokens
        self.index = 0
        self.depth = depth

    # -- helpers ----------------------------------------------------------------

    def peek(self, offset=0) -> _Token:
        """Return the token ``offset`` places ahead (the end token past the end)."""
        return self.tokens[min(self.index + offset, len(self.tokens) - 1)]

    def advance(self) -> _Token:
        """Consume and return the current token (the end token is never consumed)."""
        token = self.tokens[self.index]
        if token.kind != _END:
            self.index += 1
        return token

    def fail(self, detail, position, hint=None):
        """Raise ExpressionSyntaxError for ``detail`` at ``position``."""
        raise _syntax_error(detail, self.text, position, hint)

    def unexpected(self, token, hint=None):
        """Raise the error for a token that cannot stand here."""
        if hint is None:
            hint = self.hint_for(token)
        self.fail("unexpected %s" % token.describe(), token.position, hint)

    def hint_for(self, token):
        """Return a hint for a common mistake that ends at ``token``, or None."""
        kind = token.kind
        previous = self.tokens[self.index - 1] if self.index else None
        if kind == "|" and previous is not None and previous.kind == "|":
            return "use 'or' to combine conditions"
        if kind == "?//":
            return "write '.a? // b' with a space: '?//' is jq's destructuring operator"
        if kind in _ASSIGNMENT_OPERATORS:
            return "assignment is not supported; compare with =="
        if kind == "name" and token.value == "in":
            return 'jq has no "in" operator; use IN(...), e.g. (.data.status | IN("a", "b"))'
        if kind == _END and token.value is None:
            return "the expression is incomplete"
        return None

    def expect(self, kind, opener=None) -> _Token:
        """Consume a token of ``kind`` or fail, naming the bracket ``opener`` it would close."""
        token = self.tokens[self.index]
        if token.kind != kind:
            detail = "expected '%s'" % kind
            if opener is not None:
                detail += " for '%s' at column %d" % (opener.kind, opener.position + 1)
            self.fail("%s, found %s" % (detail, token.describe()), token.position,
                      self.hint_for(token))
        return self.advance()

    def node(self, kind, position, children=(), value=None) -> _Node:
        """Build a tree node, refusing trees deeper than MAX_EXPRESSION_DEPTH."""
        tree = _Node(kind, position, children, value)
        if tree.depth > MAX_EXPRESSION_DEPTH:
            self.fail_too_deep(position)
        return tree

    def fail_too_deep(self, position):
        """Raise the error for an expression nested more than MAX_EXPRESSION_DEPTH levels."""
        self.fail("expression nests too deeply (more than %d levels)" % MAX_EXPRESSION_DEPTH,
                  position, "split the expression into several --where options")

    # -- grammar ----------------------------------------------------------------

    def parse_program(self) -> _Node:
        """program := pipe END

        Also parses the inside of a string interpolation, whose END is the
        ')' that closes it.
        """
        tree = self.parse_pipe()
        token = self.tokens[self.index]
        if token.kind != _END:
            hint = None
            if token.kind == ")":
                hint = "this ')' has no matching '('"
            self.unexpected(token, hint)
        return tree

    def parse_pipe(self) -> _Node:
        """pipe := binary(2) ('|' binary(2))*      -- `|` is associative: one n-ary node"""
        stages = [self.parse_binary(2)]
        position = stages[0].position
        while self.tokens[self.index].kind == "|":
            self.advance()
            stages.append(self.parse_binary(2))
        if len(stages) == 1:
            return stages[0]
        return self.node("pipe", position, stages)

    def parse_binary(self, minimum_level) -> _Node:
        """binary(n) := unary (OP binary(level(OP) + 1))*   for OP with level >= n

        Levels: 2 `,`  3 `//` (right)  5 `or`  6 `and`  7 comparisons (at most
        one)  8 `+ -`  9 `* / %`.  Same-operator chains of levels 2-6 are
        gathered into one node; `//` is right-associative, which for a chain
        means the same thing.
        """
        left = self.parse_unary()
        while True:
            token = self.tokens[self.index]
            level = _BINARY_LEVELS.get(token.kind)
            if level is None:
                if token.kind in _ASSIGNMENT_OPERATORS:
                    self.fail("assignment operator '%s' is not supported" % token.kind,
                              token.position, "compare with ==")
                return left
            if level < minimum_level:
                return left
            if token.kind in _CHAIN_KINDS:
                items = [left]
                while self.tokens[self.index].kind == token.kind:
                    self.advance()
                    items.append(self.parse_binary(level + 1))
                left = self.node(_CHAIN_KINDS[token.kind], left.position, items)
                continue
            self.advance()
            right = self.parse_binary(level + 1)
            if level == _COMPARISON_LEVEL:
                left = self.node("compare", token.position, (left, right), token.kind)
                following = self.tokens[self.index]
                if _BINARY_LEVELS.get(following.kind) == _COMPARISON_LEVEL:
                    self.fail("comparisons do not chain", following.position,
                              "combine them with 'and': a < b and b < c")
            else:
                left = self.node("arithmetic", token.position, (left, right), token.kind)

    def parse_unary(self) -> _Node:
        """unary := '-'* postfix ('as' '$'NAME '|' pipe)?

        jq parses a binding wherever an operand may stand, and its body runs
        to the end of the enclosing pipe: `1 + .a as $x | $x` is
        `1 + (.a as $x | $x)`.
        """
        signs = []
        while self.tokens[self.index].kind == "-":
            signs.append(self.advance())
        operand = self.parse_postfix()
        if self.tokens[self.index].kind == "as":
            operand = self.parse_binding(operand)
        for sign in reversed(signs):
            operand = self.node("negate", sign.position, (operand,))
        return operand

    def parse_binding(self, source) -> _Node:
        """binding := postfix 'as' '$'NAME '|' pipe"""
        as_token = self.advance()
        variable = self.tokens[self.index]
        if variable.kind != "variable":
            self.fail("expected '$name' after 'as', found %s" % variable.describe(),
                      variable.position, "destructuring patterns are not supported")
        self.advance()
        self.expect("|")
        self.depth += 1
        if self.depth > MAX_EXPRESSION_DEPTH:
            self.fail_too_deep(as_token.position)
        try:
            body = self.parse_pipe()
        finally:
            self.depth -= 1
        return self.node("bind", as_token.position, (source, body), variable.value)

    def parse_postfix(self) -> _Node:
        """postfix := primary suffix*
        suffix  := FIELD | '.' STRING | '.'? '[' (']' | pipe ']' | slice) | '?'

        A '?' right after an index, iteration or slice makes only that suffix
        error-tolerant (jq's `.a?`); after anything else it is `try term`.
        Every recursive cycle of the grammar except a binding's body passes
        through here, so this is where nesting is counted.
        """
        first = self.tokens[self.index]
        self.depth += 1
        if self.depth > MAX_EXPRESSION_DEPTH:
            self.fail_too_deep(first.position)
        try:
            return self.parse_suffixes(first)
        finally:
            self.depth -= 1

    def parse_suffixes(self, first) -> _Node:
        """postfix := primary suffix*      (the loop of parse_postfix)"""
        is_suffix = first.kind == "field" or (first.kind == "." and self.peek(1).kind == "string")
        term = self.parse_primary()
        while True:
            token = self.tokens[self.index]
            kind = token.kind
            if kind == "field":
                self.advance()
                key = self.node("literal", token.position, (), token.value)
                term = self.node("index", token.position, (term, key), False)
            elif kind == "." and self.peek(1).kind == "string":
                self.advance()
                key = self.parse_string(self.advance())
                term = self.node("index", token.position, (term, key), False)
            elif kind == "." and self.peek(1).kind == "[":
                self.advance()  # jq 1.7's `.a.[0]`; the '[' is read next time round
                continue
            elif kind == "[":
                term = self.parse_bracket_suffix(term)
            elif kind == "?":
                self.advance()
                if is_suffix and term.value is False and term.kind in ("index", "iterate", "slice"):
                    term = self.node(term.kind, term.position, term.children, True)
                else:
                    term = self.node("try", token.position, (term,))
                is_suffix = False
                continue
            else:
                return term
            is_suffix = True

    def parse_bracket_suffix(self, term) -> _Node:
        """bracket := '[' ']' | '[' pipe ']' | '[' pipe ':' pipe? ']' | '[' ':' pipe ']'

        A missing slice bound is null, which is how jq spells "from the start"
        and "to the end"; `[:]` is a syntax error in jq and here.
        """
        opener = self.advance()
        kind = self.tokens[self.index].kind
        if kind == "]":
            self.advance()
            return self.node("iterate", opener.position, (term,), False)
        start = None
        if kind != ":":
            start = self.parse_pipe()
        if self.tokens[self.index].kind == ":":
            self.advance()
            end = None
            if self.tokens[self.index].kind != "]":
                end = self.parse_pipe()
            elif start is None:
                self.unexpected(self.tokens[self.index])
            self.expect("]", opener)
            null = self.node("literal", opener.position, (), None)
            return self.node("slice", opener.position, (term, start or null, end or null), False)
        self.expect("]", opener)
        return self.node("index", opener.position, (term, start), False)

    def parse_primary(self) -> _Node:
        """primary := '.' | '.' STRING | FIELD | '..' | NUMBER | STRING | '$'NAME
                   | '(' pipe ')' | '[' pipe? ']' | object
                   | NAME | NAME '(' pipe (';' pipe)* ')'
                   | if | try | reduce
        """
        token = self.tokens[self.index]
        kind = token.kind
        if kind == "field":
            self.advance()
            identity = self.node("identity", token.position)
            key = self.node("literal", token.position, (), token.value)
            return self.node("index", token.position, (identity, key), False)
        if kind == ".":
            self.advance()
            identity = self.node("identity", token.position)
            if self.tokens[self.index].kind == "string":
                key = self.parse_string(self.advance())
                return self.node("index", token.position, (identity, key), False)
            return identity
        if kind == "number":
            self.advance()
            number = float(token.value)
            if math.isinf(number):
                self.fail("number literal out of range", token.position,
                          "numbers are IEEE doubles (at most about 1.8e308)")
            return self.node("literal", token.position, (), number)
        if kind == "string":
            return self.parse_string(self.advance())
        if kind == "(":
            self.advance()
            inner = self.parse_pipe()
            self.expect(")", token)
            return inner
        if kind == "[":
            self.advance()
            if self.tokens[self.index].kind == "]":
                self.advance()
                return self.node("literal", token.position, (), [])
            inner = self.parse_pipe()
            self.expect("]", token)
            return self.node("array", token.position, (inner,))
        if kind == "{":
            return self.parse_object()
        if kind == "name":
            return self.parse_call()
        if kind == "variable":
            self.advance()
            return self.node("variable", token.position, (), token.value)
        if kind == "..":
            self.advance()
            return self.node("recurse", token.position)
        if kind == "if":
            return self.parse_if()
        if kind == "try":
            return self.parse_try()
        if kind == "reduce":
            return self.parse_reduce()
        if kind in ("def", "foreach", "label", "import", "include"):
            self.fail("'%s' is not supported in --where expressions" % kind, token.position)
        if kind == "$":
            self.fail("expected a variable name after '$'", token.position)
        self.unexpected(token)

    def parse_string(self, token) -> _Node:
        """string := '"' (TEXT | '\\(' pipe ')')* '"'

        An interpolated string becomes a chain of `+` over its pieces, each
        `\\(e)` piece formatted as text, which is how jq compiles it; so its
        outputs follow `+`'s order, the last interpolation outermost.
        """
        parts = token.value
        tree = self.node("literal", token.position, (), parts[0])
        for number, part in enumerate(parts[1:], 1):
            if number % 2:
                inner = _Parser(self.text, part, self.depth).parse_program()
                piece = self.node("format", inner.position, (inner,))
            elif part:
                piece = self.node("literal", token.position, (), part)
            else:
                continue
            tree = self.node("arithmetic", token.position, (tree, piece), "+")
        return tree

    def parse_call(self) -> _Node:
        """call := NAME ('(' pipe (';' pipe)* ')')?

        Arguments are full pipes separated by ';' (`test("a"; "i")`); whether
        the name and arity exist is the compiler's question.  `not` is an
        ordinary name, so `not .x` is `(not).x`, as jq parses it.
        """
        name = self.advance()
        arguments = []
        if self.tokens[self.index].kind == "(":
            opener = self.advance()
            arguments.append(self.parse_pipe())
            while self.tokens[self.index].kind == ";":
                self.advance()
                arguments.append(self.parse_pipe())
            self.expect(")", opener)
        return self.node("call", name.position, arguments, name.value)

    def parse_object(self) -> _Node:
        """object := '{' (entry (',' entry)* ','?)? '}'
        entry  := (STRING | NAME | KEYWORD) (':' object_value)? | '$'NAME
                | '(' pipe ')' ':' object_value
        """
        # jq accepts a trailing comma here ({"a": 1,}), and keywords as bare keys.
        opener = self.advance()
        children = []
        while self.tokens[self.index].kind != "}":
            token = self.tokens[self.index]
            kind = token.kind
            if kind == "variable":
                self.advance()
                children.append(self.node("literal", token.position, (), token.value))
                children.append(self.node("variable", token.position, (), token.value))
            else:
                if kind == "string":
                    key = self.parse_string(self.advance())
                elif kind == "name" or kind in _KEYWORDS:
                    self.advance()
                    key = self.node("literal", token.position, (), token.value)
                elif kind == "(":
                    self.advance()
                    key = self.parse_pipe()
                    self.expect(")", token)
                    if self.tokens[self.index].kind != ":":
                        self.expect(":")
                else:
                    self.fail("expected an object key, found %s" % token.describe(), token.position,
                              'keys are strings: {"k": v}, {k: v} or {(expression): v}')
                if self.tokens[self.index].kind == ":":
                    self.advance()
                    value = self.parse_object_value()
                else:
                    identity = self.node("identity", token.position)
                    value = self.node("index", token.position, (identity, key), False)
                children.extend((key, value))
            separator = self.tokens[self.index]
            if separator.kind == ",":
                self.advance()
            elif separator.kind != "}":
                hint = None
                if separator.kind in _BINARY_LEVELS:
                    hint = 'parenthesize an operator in an object value: {"a": (1 + 2)}'
                if hint is None:
                    self.expect("}", opener)
                self.unexpected(separator, hint)
        self.advance()
        return self.node("object", opener.position, children)

    def parse_object_value(self) -> _Node:
        """object_value := negation ('|' negation)*     negation := '-'* postfix

        jq's ExpD: a value may be a pipe of terms but not a bare binary
        operator, so `{"a": 1 + 2}` is a syntax error, as in jq; the hint says
        to parenthesize.
        """
        stages = []
        while True:
            signs = []
            while self.tokens[self.index].kind == "-":
                signs.append(self.advance())
            stage = self.parse_postfix()
            for sign in reversed(signs):
                stage = self.node("negate", sign.position, (stage,))
            stages.append(stage)
            if self.tokens[self.index].kind != "|":
                break
            self.advance()
        if len(stages) == 1:
            return stages[0]
        return self.node("pipe", stages[0].position, stages)

    def parse_if(self) -> _Node:
        """if := 'if' pipe 'then' pipe ('elif' pipe 'then' pipe)* ('else' pipe)? 'end'

        A missing else means `else .` (jq 1.7; spec section 5 allows it).
        """
        branches = []
        opener = self.tokens[self.index]
        while True:
            keyword = self.advance()
            condition = self.parse_pipe()
            self.expect("then", keyword)
            branches.append((keyword, condition, self.parse_pipe()))
            if self.tokens[self.index].kind != "elif":
                break
        if self.tokens[self.index].kind == "else":
            self.advance()
            otherwise = self.parse_pipe()
        else:
            otherwise = self.node("identity", self.tokens[self.index].position)
        self.expect("end", opener)
        for keyword, condition, consequence in reversed(branches):
            otherwise = self.node("if", keyword.position, (condition, consequence, otherwise))
        return otherwise

    def parse_try(self) -> _Node:
        """try := 'try' postfix ('catch' postfix)?

        Both operands are postfix terms (spec 5), so `try error("x") catch .
        == "x"` compares the result of the whole try.
        """
        keyword = self.advance()
        body = self.parse_postfix()
        if self.tokens[self.index].kind == "catch":
            self.advance()
            return self.node("try", keyword.position, (body, self.parse_postfix()))
        return self.node("try", keyword.position, (body,))

    def parse_reduce(self) -> _Node:
        """reduce := 'reduce' postfix 'as' '$'NAME '(' pipe ';' pipe ')'

        The source is a postfix term so that its 'as' is reduce's own, not the
        start of a binding (parse_unary's).
        """
        keyword = self.advance()
        source = self.parse_postfix()
        self.expect("as")
        variable = self.tokens[self.index]
        if variable.kind != "variable":
            self.fail("expected '$name' after 'as', found %s" % variable.describe(),
                      variable.position, "destructuring patterns are not supported")
        self.advance()
        opener = self.expect("(")
        initial = self.parse_pipe()
        self.expect(";")
        update = self.parse_pipe()
        self.expect(")", opener)
        return self.node("reduce", keyword.position, (source, initial, update), variable.value)


# -- compiled closures --------------------------------------------------------------
# Why closures rather than an interpreter walking the tree: each node is
# decided once, at compile time, so evaluation makes only the calls the
# expression needs.  Two further choices carry most of the speed:
#   * a node that always yields exactly one output (a path, a comparison, a
#     test(...) call) is compiled to a plain function as well as a stream;
#     callers use the function and no generator or tuple is built;
#   * streams are built from map(), itertools.chain and tuples where jq's order
#     allows, and only otherwise from generators.
# Measured on CPython 3.11, noisy 2-core VM (tests/bench/bench_where.py):
# `.data.status == "green"` 0.2-0.3 us per message, `.meta.tags[]? == "error"`
# and `.data.msg | test("timeout")` 0.4-0.6 us, a four-clause and/or 0.8-1.3 us,
# while json.loads of the same 218-byte message costs 3.4-4.7 us.

class _Compiled:
    """A compiled subexpression: closures taking (value, variables).

    ``stream`` returns an iterable of outputs.  ``single`` is set when the
    subexpression always yields exactly one output or raises; composing
    singles avoids building iterators, which is most of the speed.
    ``outputs`` is the tuple of outputs when known at compile time.
    ``variables`` is a tuple of the values bound by enclosing `as $x` (the
    compiler resolves each name to a slot), so closures share no state and
    one compiled expression is safe to run from several threads at once.
    """

    __slots__ = ("single", "stream", "outputs")

    def __init__(self, single=None, stream=None, outputs=None):
        self.single = single
        self.outputs = outputs
        if stream is None:
            def stream(value, variables):
                return (single(value, variables),)
        self.stream = stream


def _constant(outputs) -> _Compiled:
    """Return a _Compiled whose outputs are the given values, whatever the input."""
    outputs = tuple(outputs)

    def stream(value, variables):
        return outputs
    if len(outputs) != 1:
        return _Compiled(None, stream, outputs)
    constant = outputs[0]

    def single(value, variables):
        return constant
    return _Compiled(single, stream, outputs)


def _identity(value, variables):
    """The compiled `.`: its input, unchanged."""
    return value


_IDENTITY = _Compiled(_identity)


def _apply(function, operand: _Compiled) -> _Compiled:
    """Compile `operand | function(.)` for a Python function of one value."""
    inner = operand.single
    if inner is not None:
        if inner is _identity:
            def single(value, variables):
                return function(value)
        else:
            def single(value, variables):
                return function(inner(value, variables))
        return _Compiled(single)
    inner_stream = operand.stream

    def stream(value, variables):
        return map(function, inner_stream(value, variables))
    return _Compiled(stream=stream)


def _nested_product(count, open_level):
    """Run ``count`` nested loops lazily; yield the list of current items at each innermost step.

    ``open_level(level, chosen)`` returns the iterable of loop ``level`` given
    the items already chosen by the outer loops.  It is called only when that
    loop starts, so outputs and errors come in jq's order, and the loops are
    driven iteratively: a long chain never deepens the Python stack.
    """
    iterators = [iter(open_level(0, []))]
    chosen = []
    while iterators:
        level = len(iterators) - 1
        for item in iterators[level]:
            del chosen[level:]
            chosen.append(item)
            if level + 1 == count:
                yield chosen
            else:
                iterators.append(iter(open_level(level + 1, chosen)))
                break
        else:
            iterators.pop()


def _call(function, arguments) -> _Compiled:
    """Compile `function(input, argument values...)` over the cartesian product of
    the argument outputs, first argument outermost (jq's C-function calls)."""
    if len(arguments) == 1 and arguments[0].single is not None:
        first = arguments[0].single

        def single(value, variables):
            return function(value, first(value, variables))
        return _Compiled(single)
    if len(arguments) == 2 and arguments[0].single is not None and arguments[1].single is not None:
        first, second = arguments[0].single, arguments[1].single

        def single_of_two(value, variables):
            return function(value, first(value, variables), second(value, variables))
        return _Compiled(single_of_two)
    streams = [argument.stream for argument in arguments]

    def stream(value, variables):
        def open_level(level, chosen):
            return streams[level](value, variables)
        for chosen in _nested_product(len(streams), open_level):
            yield function(value, *chosen)
    return _Compiled(stream=stream)


def _lift_values(function):
    """Builtin builder for a function of the input alone (e.g. `length`)."""
    compiled = _Compiled(lambda value, variables: function(value))
    return lambda arguments: compiled


def _lift_call(function):
    """Builtin builder for a function of the input and its argument values."""
    return lambda arguments: _call(function, arguments)


# -- builtins taking filters -------------------------------------------------------------

def _build_select(arguments):
    """jq's `select(f)`: the input once for each truthy output of f."""
    condition = arguments[0]
    if condition.single is not None:
        test = condition.single

        def stream(value, variables):
            result = test(value, variables)
            return (value,) if result is not None and result is not False else ()
        return _Compiled(stream=stream)
    condition_stream = condition.stream

    def generate(value, variables):
        for result in condition_stream(value, variables):
            if result is not None and result is not False:
                yield value
    return _Compiled(stream=generate)


def _build_type_selector(name):
    """Builder for `numbers`, `strings`, ...: the input if it has that type."""
    predicate = _TYPE_SELECTORS[name]

    def stream(value, variables):
        return (value,) if predicate(value) else ()
    compiled = _Compiled(stream=stream)
    return lambda arguments: compiled


def _build_map(arguments):
    """jq's `map(f)`: `[.[] | f]`."""
    mapper = arguments[0]
    if mapper.single is not None:
        function = mapper.single

        def single(value, variables):
            return [function(item, variables) for item in _iterate(value)]
        return _Compiled(single)
    mapper_stream = mapper.stream

    def single_of_streams(value, variables):
        return [output for item in _iterate(value) for output in mapper_stream(item, variables)]
    return _Compiled(single_of_streams)


def _decide_any(outputs) -> bool:
    """Return whether some output is truthy, reading no further than the first."""
    for output in outputs:
        if output is not None and output is not False:
            return True
    return False


def _decide_all(outputs) -> bool:
    """Return whether every output is truthy, stopping at the first falsy one."""
    for output in outputs:
        if output is None or output is False:
            return False
    return True


def _build_quantifier(decide, arity):
    """any/all with 1 or 2 arguments: stop at the first decisive output (jq 1.7)."""
    def build(arguments):
        condition = arguments[-1].stream
        if arity == 1:
            def single(value, variables):
                return decide(output for item in _iterate(value)
                              for output in condition(item, variables))
        else:
            generator = arguments[0].stream

            def single(value, variables):
                return decide(output for item in generator(value, variables)
                              for output in condition(item, variables))
        return _Compiled(single)
    return build


def _build_first(arguments):
    """jq's `first(f)`: the first output of f, if any (f stops there)."""
    source = arguments[0]
    if source.single is not None:
        return source
    source_stream = source.stream
    return _Compiled(stream=lambda value, variables: itertools.islice(source_stream(value, variables), 1))


def _build_last(arguments):
    """jq's `last(f)`: the last output of f; null when there is none (jq 1.6 and 1.7)."""
    source_stream = arguments[0].stream

    def single(value, variables):
        result = None  # jq: reduce f as $x (null; $x)
        for result in source_stream(value, variables):
            pass
        return result
    return _Compiled(single)


def _limit_count(count):
    """Return a `limit`/`nth` count, which must be a number."""
    if type(count) not in _NUMBER_TYPES:
        raise ExpressionRuntimeError("Invalid limit: %s is not a number" % _describe(count))
    return count


def _build_limit(arguments):
    """jq's `limit(n; f)`: the first n outputs; none for n = 0 (spec 12.1), all for n < 0."""
    count_stream, source_stream = arguments[0].stream, arguments[1].stream

    def stream(value, variables):
        for count in count_stream(value, variables):
            count = _limit_count(count)
            if count > 0:
                outputs = source_stream(value, variables)
                if math.isfinite(count):
                    outputs = itertools.islice(outputs, math.ceil(count))
                yield from outputs
            elif count < 0:
                yield from source_stream(value, variables)
    return _Compiled(stream=stream)


def _build_nth(arguments):
    """jq's `nth(n; f)`: `last(limit(n + 1; f))`."""
    count_stream, source_stream = arguments[0].stream, arguments[1].stream

    def stream(value, variables):
        for count in count_stream(value, variables):
            count = _limit_count(count)
            if count < 0:
                raise ExpressionRuntimeError("Out of bounds negative array index")
            outputs = source_stream(value, variables)
            if math.isfinite(count):
                outputs = itertools.islice(outputs, int(count) + 1)
            result = _NO_VALUE
            for result in outputs:
                pass
            yield None if result is _NO_VALUE else result
    return _Compiled(stream=stream)


def _build_isempty(arguments):
    """jq's `isempty(f)`: does f produce no output? (stops at the first)"""
    source_stream = arguments[0].stream

    def single(value, variables):
        for _ in source_stream(value, variables):
            return False
        return True
    return _Compiled(single)


def _build_in_values(arguments):
    """IN(s): does any output of s equal the input?"""
    source_stream = arguments[0].stream

    def single(value, variables):
        return any(_equal(item, value) for item in source_stream(value, variables))
    return _Compiled(single)


def _build_in_source(arguments):
    """IN(source; s): does any output of source equal any output of s?"""
    source_stream, candidates_stream = arguments[0].stream, arguments[1].stream

    def single(value, variables):
        for candidate in candidates_stream(value, variables):
            for item in source_stream(value, variables):
                if _equal(item, candidate):
                    return True
        return False
    return _Compiled(single)


def _build_keyed(combine):
    """min_by/max_by/sort_by/group_by/unique_by: key each item by [f]."""
    def build(arguments):
        key_stream = arguments[0].stream

        def single(value, variables):
            items = _require_array(value, "sorted")
            keyed = [(list(key_stream(item, variables)), item) for item in items]
            return combine(keyed)
        return _Compiled(single)
    return build


def _sort_keyed(keyed):
    """Sort (key, item) pairs by key in jq's order, stably."""
    keyed.sort(key=lambda pair: _sort_key(pair[0]))
    return keyed


def _group_keyed(keyed):
    """Return the items grouped by equal keys, groups in key order (group_by)."""
    groups = []
    previous = _NO_VALUE
    for key, item in _sort_keyed(keyed):
        if previous is _NO_VALUE or _compare(previous, key):
            groups.append([])
        groups[-1].append(item)
        previous = key
    return groups


def _min_keyed(keyed):
    """min_by: the first item with the smallest key; null for []."""
    if not keyed:
        return None
    best = keyed[0]
    for pair in keyed[1:]:
        if _compare(pair[0], best[0]) < 0:
            best = pair
    return best[1]


def _max_keyed(keyed):
    """max_by: the last item with the largest key; null for []."""
    if not keyed:
        return None
    best = keyed[0]
    for pair in keyed[1:]:
        if _compare(pair[0], best[0]) >= 0:
            best = pair
    return best[1]


def _build_with_entries(arguments):
    """jq's `with_entries(f)`: `to_entries | map(f) | from_entries`."""
    mapper_stream = arguments[0].stream

    def single(value, variables):
        entries = [output for entry in _to_entries(value) for output in mapper_stream(entry, variables)]
        return _from_entries(entries)
    return _Compiled(single)


def _build_recurse(arguments):
    """jq's `recurse` (no argument): the same as `..`."""
    return _Compiled(stream=lambda value, variables: _recurse(value))


def _regex_builtin(function, is_stream=False, has_array_form=False):
    """Builder for test, match, capture, scan, split/2 and splits: ``function(input, regex)``.

    The arguments are (re) or (re; flags); ``has_array_form`` also accepts
    jq's test(["re", "flags"]) and match(["re", "flags"]).  A constant
    pattern is compiled once, here, but a bad one is still reported only when
    evaluated, as jq does (`false and test("(")` is false).  With
    ``is_stream`` the list that ``function`` returns is emitted item by item.
    """
    def build(arguments):
        accepts_array = has_array_form and len(arguments) == 1
        if len(arguments) == 1:
            arguments = [arguments[0], _constant((None,))]

        def regex_of(pattern, flags):
            if accepts_array:
                pattern, flags = _unpack_regex_argument(pattern)
            return _compile_regex(pattern, flags)
        regex = None
        pattern, flags = arguments
        if all(argument.outputs is not None and len(argument.outputs) == 1 for argument in arguments):
            try:
                regex = regex_of(pattern.outputs[0], flags.outputs[0])
            except ExpressionRuntimeError:
                pass  # reported at run time, by the general path below
        if regex is not None:
            compiled = _Compiled(lambda value, variables: function(value, regex))
        else:
            compiled = _call(lambda value, pattern_value, flags_value: function(
                value, regex_of(pattern_value, flags_value)), arguments)
        if not is_stream:
            return compiled
        lists = compiled.stream
        return _Compiled(stream=lambda value, variables: itertools.chain.from_iterable(
            lists(value, variables)))
    return build


def _match_list(value, regex):
    """match: the match objects, all of them with the g flag."""
    return list(_match_records(value, regex))


def _capture_list(value, regex):
    """capture: one {name: text} object per match."""
    return [_capture_object(record) for record in _match_records(value, regex)]


def _scan_list(value, regex):
    """scan: every match's text, or the list of its groups' texts when it has groups."""
    return [_scan_result(record) for record in _match_records(value, regex, is_global=True)]


def _build_substitute(is_global, arity):
    """sub/gsub: the replacement is a filter run on each match's capture object."""
    def build(arguments):
        pattern, replacement = arguments[0], arguments[1]
        flags = arguments[2] if arity == 3 else _constant((None,))
        replacement_stream = replacement.stream
        parameters = _call(lambda value, pattern_value, flags_value: (pattern_value, flags_value),
                           [pattern, flags])

        def stream(value, variables):
            for pattern_value, flags_value in parameters.stream(value, variables):
                regex = _compile_regex(pattern_value, flags_value)
                yield from _substitute(value, regex, replacement_stream, variables, is_global)
        return _Compiled(stream=stream)
    return build


def _substitute(value, regex, replacement_stream, variables, is_global):
    """Yield the results of sub/gsub on one string, one per choice of replacements."""
    records = list(_match_records(value, regex, is_global))
    if not records:
        yield value
        return
    choices = []
    combinations = 1
    for record in records:
        outputs = list(replacement_stream(_capture_object(record), variables))
        for output in outputs:
            if type(output) is not str:
                raise _arithmetic_error(value, output, "added")
        combinations *= len(outputs)
        if combinations > MAX_SUBSTITUTION_OUTPUTS:
            raise ExpressionRuntimeError("substitution would produce more than %d outputs"
                                         % MAX_SUBSTITUTION_OUTPUTS)
        choices.append(outputs)
    # jq varies the replacement of the first match fastest.
    for reversed_replacements in itertools.product(*reversed(choices)):
        replacements = reversed_replacements[::-1]
        pieces = []
        previous = 0
        for record, replacement in zip(records, replacements):
            pieces.append(value[previous:record["offset"]])
            pieces.append(replacement)
            previous = record["offset"] + record["length"]
        pieces.append(value[previous:])
        yield "".join(pieces)


def _build_constant(value):
    """Builder for `true`, `false` and `null`."""
    compiled = _constant((value,))
    return lambda arguments: compiled


_EMPTY = _constant(())

# (name, arity) -> builder(compiled arguments) -> _Compiled.  The MUST functions
# of spec/where.md section 7 come first, then the NICE ones.  Out-of-scope jq
# builtins (paths, dates, input, env...) are absent on purpose: calling them is
# the usual "name/arity is not defined" syntax error, with a hint.
_BUILTINS = {
    ("true", 0): _build_constant(True),
    ("false", 0): _build_constant(False),
    ("null", 0): _build_constant(None),
    ("empty", 0): lambda arguments: _EMPTY,
    ("not", 0): _lift_values(_not),
    ("error", 0): _lift_values(_raise_input_error),
    ("error", 1): _lift_call(_raise_error),
    ("select", 1): _build_select,
    ("length", 0): _lift_values(_length),
    ("utf8bytelength", 0): _lift_values(_utf8_byte_length),
    ("type", 0): _lift_values(_type_name),
    ("has", 1): _lift_call(_has),
    ("in", 1): _lift_call(_is_in),
    ("contains", 1): _lift_call(_contains),
    ("inside", 1): _lift_call(_inside),
    ("startswith", 1): _lift_call(_starts_with),
    ("endswith", 1): _lift_call(_ends_with),
    ("ltrimstr", 1): _lift_call(_trim_prefix),
    ("rtrimstr", 1): _lift_call(_trim_suffix),
    ("ascii_downcase", 0): _lift_values(_ascii_downcase),
    ("ascii_upcase", 0): _lift_values(_ascii_upcase),
    ("explode", 0): _lift_values(_explode),
    ("implode", 0): _lift_values(_implode),
    ("tostring", 0): _lift_values(_to_text),
    ("tonumber", 0): _lift_values(_to_number),
    ("tojson", 0): _lift_values(_to_json),
    ("fromjson", 0): _lift_values(_from_json),
    ("any", 0): _lift_values(_any_value),
    ("all", 0): _lift_values(_all_values),
    ("any", 1): _build_quantifier(_decide_any, 1),
    ("all", 1): _build_quantifier(_decide_all, 1),
    ("any", 2): _build_quantifier(_decide_any, 2),
    ("all", 2): _build_quantifier(_decide_all, 2),
    # NICE from here on.
    ("keys", 0): _lift_values(_keys),
    ("keys_unsorted", 0): _lift_values(_keys_unsorted),
    ("to_entries", 0): _lift_values(_to_entries),
    ("from_entries", 0): _lift_values(_from_entries),
    ("with_entries", 1): _build_with_entries,
    ("map", 1): _build_map,
    ("add", 0): _lift_values(_add_all),
    ("join", 1): _lift_call(_join),
    ("split", 1): _lift_call(_split_text),
    ("index", 1): _lift_call(_first_index),
    ("rindex", 1): _lift_call(_last_index),
    ("indices", 1): _lift_call(_indices),
    ("test", 1): _regex_builtin(_regex_search, has_array_form=True),
    ("test", 2): _regex_builtin(_regex_search),
    ("match", 1): _regex_builtin(_match_list, is_stream=True, has_array_form=True),
    ("match", 2): _regex_builtin(_match_list, is_stream=True),
    ("capture", 1): _regex_builtin(_capture_list, is_stream=True),
    ("capture", 2): _regex_builtin(_capture_list, is_stream=True),
    ("scan", 1): _regex_builtin(_scan_list, is_stream=True),
    ("scan", 2): _regex_builtin(_scan_list, is_stream=True),
    ("split", 2): _regex_builtin(_split_records),
    ("splits", 1): _regex_builtin(_split_records, is_stream=True),
    ("splits", 2): _regex_builtin(_split_records, is_stream=True),
    ("sub", 2): _build_substitute(False, 2),
    ("sub", 3): _build_substitute(False, 3),
    ("gsub", 2): _build_substitute(True, 2),
    ("gsub", 3): _build_substitute(True, 3),
    ("first", 0): _lift_values(_first_item),
    ("last", 0): _lift_values(_last_item),
    ("first", 1): _build_first,
    ("last", 1): _build_last,
    ("nth", 1): _lift_call(_index),
    ("nth", 2): _build_nth,
    ("limit", 2): _build_limit,
    ("isempty", 1): _build_isempty,
    ("IN", 1): _build_in_values,
    ("IN", 2): _build_in_source,
    ("sort", 0): _lift_values(_sort),
    ("sort_by", 1): _build_keyed(lambda keyed: [item for _, item in _sort_keyed(keyed)]),
    ("group_by", 1): _build_keyed(_group_keyed),
    ("unique", 0): _lift_values(_unique),
    ("unique_by", 1): _build_keyed(lambda keyed: [group[0] for group in _group_keyed(keyed)]),
    ("min", 0): _lift_values(_minimum),
    ("max", 0): _lift_values(_maximum),
    ("min_by", 1): _build_keyed(_min_keyed),
    ("max_by", 1): _build_keyed(_max_keyed),
    ("reverse", 0): _lift_values(_reverse),
    ("flatten", 0): _lift_values(_flatten),
    ("flatten", 1): _lift_call(_flatten_depth),
    ("floor", 0): _lift_values(_floor),
    ("ceil", 0): _lift_values(_ceil),
    ("round", 0): _lift_values(_round),
    ("sqrt", 0): _lift_values(_sqrt),
    ("fabs", 0): _lift_values(_fabs),
    ("getpath", 1): _lift_call(_get_path),
    ("recurse", 0): _build_recurse,
}
for _name in _TYPE_SELECTORS:
    _BUILTINS[(_name, 0)] = _build_type_selector(_name)
del _name
_BUILTIN_ARITIES = {}
for _name, _arity in _BUILTINS:
    _BUILTIN_ARITIES.setdefault(_name, []).append(_arity)
del _name, _arity


# -- compiler -------------------------------------------------------------------------

class _Compiler:
    """Turn a parse tree into _Compiled closures (one instance per expression)."""

    def __init__(self, text):
        self.text = text

    def compile(self, node: _Node, scope: tuple) -> _Compiled:
        """Compile ``node``; ``scope`` holds the variable names bound around it, innermost last."""
        return getattr(self, "compile_" + node.kind)(node, scope)

    def compile_identity(self, node, scope):
        """`.`: the input, unchanged (shared: _identity lets compositions drop it)."""
        return _IDENTITY

    def compile_literal(self, node, scope):
        """Numbers, strings and `[]`: constants, known at compile time.

        Constants let equality, regex and index nodes specialise (see
        compile_compare); a literal array or object is one shared object,
        which is safe because nothing here mutates values.
        """
        return _constant((node.value,))

    def compile_recurse(self, node, scope):
        """`..`: the input and everything inside it, depth first, pre-order (_recurse)."""
        return _Compiled(stream=lambda value, variables: _recurse(value))

    def compile_variable(self, node, scope):
        """`$name`: the value bound by the nearest enclosing `as $name` or reduce.

        Names resolve now, to a slot of the ``variables`` tuple, so an
        undefined one is a syntax error (jq: `$x is not defined`) and a lookup
        costs one tuple index.
        """
        name = node.value
        for slot in range(len(scope) - 1, -1, -1):
            if scope[slot] == name:
                return _Compiled(lambda value, variables: variables[slot])
        raise _syntax_error("$%s is not defined" % name, self.text, node.position,
                            "bind it first: EXPRESSION as $%s | ..." % name)

    def compile_format(self, node, scope):
        """An interpolated `\\(e)`: each output of e as text (`tostring`)."""
        return _apply(_to_text, self.compile(node.children[0], scope))

    def compile_negate(self, node, scope):
        """Unary minus; folded at compile time for number literals (`-1` is a constant)."""
        operand = self.compile(node.children[0], scope)
        if operand.outputs is not None and all(type(output) in _NUMBER_TYPES for output in operand.outputs):
            return _constant([_negate(output) for output in operand.outputs])
        return _apply(_negate, operand)

    def compile_array(self, node, scope):
        """`[e]`: one array of all outputs of e; an error in e propagates.

        `[1, 2]` and other arrays of constants are built once, at compile
        time, which makes `== ["a", "b"]` and `contains(["x"])` cheap.
        """
        content = self.compile(node.children[0], scope)
        if content.outputs is not None:
            return _constant((list(content.outputs),))
        content_stream = content.stream
        return _Compiled(lambda value, variables: list(content_stream(value, variables)))

    def compile_object(self, node, scope):
        """`{k: v, ...}`: one object per combination of key and value outputs.

        The first entry is the outermost loop and, within an entry, the key
        loops outside the value (jq's order: `{"a": (1, 2), "b": (3, 4)}`
        gives a1b3, a1b4, a2b3, a2b4).  Keys must be strings; a constant key
        that is not is a compile error, as jq folds it, otherwise a runtime
        error.  Later duplicates overwrite earlier ones in place.
        """
        compiled = [self.compile(child, scope) for child in node.children]
        keys, values = compiled[0::2], compiled[1::2]
        for key_node, key in zip(node.children[0::2], keys):
            # jq folds a constant key at compile time, so it reports a bad one then too.
            if key.outputs is not None and len(key.outputs) == 1 and type(key.outputs[0]) is not str:
                raise _syntax_error(_object_key_error(key.outputs[0]).message, self.text,
                                    key_node.position, 'object keys are strings: {"1": v}')
        if all(part.outputs is not None and len(part.outputs) == 1 for part in compiled) and all(
                type(key.outputs[0]) is str for key in keys):
            return _constant(({key.outputs[0]: item.outputs[0] for key, item in zip(keys, values)},))
        if all(part.single is not None for part in compiled):
            pairs = [(key.single, item.single) for key, item in zip(keys, values)]

            def single(value, variables):
                result = {}
                for key_single, item_single in pairs:
                    key = key_single(value, variables)
                    if type(key) is not str:
                        raise _object_key_error(key)
                    result[key] = item_single(value, variables)
                return result
            return _Compiled(single)
        streams = [(key.stream, item.stream) for key, item in zip(keys, values)]

        def entries(level, value, variables):
            key_stream, item_stream = streams[level]
            for key in key_stream(value, variables):
                if type(key) is not str:
                    raise _object_key_error(key)
                for item in item_stream(value, variables):
                    yield key, item

        def stream(value, variables):
            if not streams:
                yield {}
                return
            for chosen in _nested_product(len(streams), lambda level, chosen: entries(
                    level, value, variables)):
                yield dict(chosen)
        return _Compiled(stream=stream)

    def compile_index(self, node, scope):
        """`t[k]`, `t.k`, `t."k"`, optionally followed by `?`.

        The key is evaluated on the same input as t, not on t's output
        (`.data[.key]` reads `.key` of the envelope; spec 6), with the key's
        outputs as the outer loop, as jq.  A `?` swallows only the errors of
        this indexing step, not those of t or of the key.  Chains of constant
        keys without `?` (the common `.data.status`) become one walking
        closure: see compile_path.
        """
        target_node, key_node = node.children
        is_optional = node.value
        key = self.compile(key_node, scope)
        if not is_optional and key.outputs is not None and len(key.outputs) == 1:
            keys = [key.outputs[0]]
            while (target_node.kind == "index" and target_node.value is False
                   and target_node.children[1].kind == "literal"):
                keys.append(target_node.children[1].value)
                target_node = target_node.children[0]
            keys.reverse()
            return self.compile_path(self.compile(target_node, scope), keys)
        target = self.compile(target_node, scope)
        if not is_optional and target.single is not None and key.single is not None:
            target_single, key_single = target.single, key.single

            def single(value, variables):
                key_value = key_single(value, variables)
                return _index(target_single(value, variables), key_value)
            return _Compiled(single)
        target_stream, key_stream = target.stream, key.stream

        def stream(value, variables):
            for key_value in key_stream(value, variables):
                for container in target_stream(value, variables):
                    if is_optional:
                        try:
                            result = _index(container, key_value)
                        except ExpressionRuntimeError:
                            continue
                        yield result
                    else:
                        yield _index(container, key_value)
        return _Compiled(stream=stream)

    def compile_path(self, target: _Compiled, keys) -> _Compiled:
        """Compile `TARGET.k1.k2[n]...` with constant keys into one walking closure."""
        walk = _path_walker(keys)
        if target.single is _identity:
            return _Compiled(walk)
        if target.single is not None:
            target_single = target.single
            return _Compiled(lambda value, variables: walk(target_single(value, variables), variables))
        target_stream = target.stream
        return _Compiled(stream=lambda value, variables: map(
            walk, target_stream(value, variables), itertools.repeat(variables)))

    def compile_iterate(self, node, scope):
        """`t[]` and `t[]?`: array items or object values, in order.

        The list or dict view itself is the stream, so iterating costs no
        copy; `[]?` turns "Cannot iterate over T" into no output.
        """
        target = self.compile(node.children[0], scope)
        iterate = _iterate_optional if node.value else _iterate
        if target.single is not None:
            target_single = target.single
            if target_single is _identity:
                return _Compiled(stream=lambda value, variables: iterate(value))
            return _Compiled(stream=lambda value, variables: iterate(target_single(value, variables)))
        target_stream = target.stream
        return _Compiled(stream=lambda value, variables: itertools.chain.from_iterable(
            map(iterate, target_stream(value, variables))))

    def compile_slice(self, node, scope):
        """`t[a:b]`: arrays and strings by code point, bounds clamped (jq's parse_slice)."""
        target, start, end = [self.compile(child, scope) for child in node.children]
        is_optional = node.value
        target_stream, start_stream, end_stream = target.stream, start.stream, end.stream

        def stream(value, variables):
            for start_value in start_stream(value, variables):
                for end_value in end_stream(value, variables):
                    for container in target_stream(value, variables):
                        try:
                            result = _slice(container, start_value, end_value)
                        except ExpressionRuntimeError:
                            if is_optional:
                                continue
                            raise
                        yield result
        return _Compiled(stream=stream)

    def compile_try(self, node, scope):
        """`try body catch handler`, `try body` and `(term)?`.

        The body's outputs pass through until its first runtime error, which
        ends the body; the handler (if any) then runs with the error's value
        as input (the message string, or what error(v) was given).  Syntax
        errors cannot happen here and RecursionError is left to the caller.
        """
        body_stream = self.compile(node.children[0], scope).stream
        handler_stream = None
        if len(node.children) == 2:
            handler_stream = self.compile(node.children[1], scope).stream

        def stream(value, variables):
            # Only errors raised while producing the body's outputs are caught;
            # errors downstream of a yielded output are not (jq 1.7, spec 6).
            try:
                for output in body_stream(value, variables):
                    yield output
            except ExpressionRuntimeError as error:
                if handler_stream is not None:
                    yield from handler_stream(error.value, variables)
        return _Compiled(stream=stream)

    def compile_pipe(self, node, scope):
        """`a | b | ...`: each output of one stage feeds the next, in order.

        Runs of single-output stages collapse into one closure; one
        multi-output stage is driven with map(), the rest by _nested_product,
        so no pipe, however long, deepens the stack.  `.data.msg | test("x")`
        compiles to two calls per message.
        """
        groups = []  # a run of single-output stages becomes one closure
        for is_single, run in itertools.groupby(
                (self.compile(child, scope) for child in node.children),
                key=lambda stage: stage.single is not None):
            if is_single:
                groups.append(_Compiled(_compose_singles([stage.single for stage in run])))
            else:
                groups.extend(run)
        if len(groups) == 1:
            return groups[0]
        stream_count = sum(1 for group in groups if group.single is None)
        if stream_count == 1:
            return _compose_around_stream(groups)
        streams = [group.stream for group in groups]
        count = len(streams)

        def stream(value, variables):
            def open_level(level, chosen):
                return streams[level](chosen[-1] if level else value, variables)
            for chosen in _nested_product(count, open_level):
                yield chosen[-1]
        return _Compiled(stream=stream)

    def compile_comma(self, node, scope):
        """`a, b, ...`: all outputs of a, then all of b, and so on.

        Each operand starts only when the previous one is exhausted, so in
        `(true, error("x"))` the `true` comes out before the error.
        """
        items = [self.compile(child, scope) for child in node.children]
        if all(item.outputs is not None for item in items):
            return _constant([output for item in items for output in item.outputs])
        streams = [item.stream for item in items]

        def stream(value, variables):
            for item_stream in streams:
                yield from item_stream(value, variables)
        return _Compiled(stream=stream)

    def compile_alternative(self, node, scope):
        """`a // b // ...`: the truthy outputs of a, or if it has none those of b.

        Errors in a are not a reason to fall through: they propagate, so
        `(.data.x.y // 1)` fails when .data is a string (spec 6).  A chain is
        right-associative, which for `//` means trying operands in order.
        """
        items = [self.compile(child, scope) for child in node.children]
        if all(item.single is not None for item in items):
            singles = [item.single for item in items]
            heads, last = singles[:-1], singles[-1]

            def single(value, variables):
                for head in heads:
                    result = head(value, variables)
                    if result is not None and result is not False:
                        return result
                return last(value, variables)
            return _Compiled(single)
        streams = [item.stream for item in items]
        head_streams, last_stream = streams[:-1], streams[-1]

        def stream(value, variables):
            # Errors from the left side propagate (spec section 6): only the
            # absence of truthy outputs falls through to the next alternative.
            for head in head_streams:
                has_truthy = False
                for output in head(value, variables):
                    if output is not None and output is not False:
                        has_truthy = True
                        yield output
                if has_truthy:
                    return
            yield from last_stream(value, variables)
        return _Compiled(stream=stream)

    def compile_or(self, node, scope):
        """`a or b or ...` (see compile_logic)."""
        return self.compile_logic(node, scope, is_and=False)

    def compile_and(self, node, scope):
        """`a and b and ...` (see compile_logic)."""
        return self.compile_logic(node, scope, is_and=True)

    def compile_logic(self, node, scope, is_and):
        """and/or chains: left outermost, a decisive output short-circuits (spec 6).

        `a and b`: for each output of a, false if it is falsy, else one
        boolean per output of b; `or` mirrors it.  So `false and error("x")`
        is false and `(true, false) and (true, false)` is true, false, false.
        Outputs are always booleans (`1 and "a"` is true).
        """
        items = [self.compile(child, scope) for child in node.children]
        short_circuit_value = not is_and  # or: a truthy output decides; and: a falsy one does
        if all(item.single is not None for item in items):
            singles = tuple(item.single for item in items)

            def single(value, variables):
                for item in singles:
                    result = item(value, variables)
                    if (result is not None and result is not False) is short_circuit_value:
                        return short_circuit_value
                return not short_circuit_value
            return _Compiled(single)
        streams = [item.stream for item in items]
        count = len(streams)

        def stream(value, variables):
            # Each level holds the iterator of one operand; an undecided output
            # opens the next operand, exhausting a level resumes the one above.
            iterators = [iter(streams[0](value, variables))]
            while iterators:
                for output in iterators[-1]:
                    if (output is not None and output is not False) is short_circuit_value:
                        yield short_circuit_value
                    elif len(iterators) == count:
                        yield not short_circuit_value
                    else:
                        iterators.append(iter(streams[len(iterators)](value, variables)))
                        break
                else:
                    iterators.pop()
        return _Compiled(stream=stream)

    def compile_compare(self, node, scope):
        """`== != < <= > >=` with jq's equality and total order (spec 3.1).

        Comparing with a constant, the shape of almost every predicate, gets
        a specialised test: operator.eq for strings (only a str equals a str,
        so Python's == is jq's), identity for null and booleans, and doubles
        for numbers (so 1 == 1.0 and big integers round as in jq).  A
        constant on the left of == or != is moved to the right.
        """
        left, right = [self.compile(child, scope) for child in node.children]
        symbol = node.value
        if symbol in ("==", "!="):
            if left.outputs is not None and len(left.outputs) == 1 and right.outputs is None:
                left, right = right, left  # equality is symmetric; constants go right
            function = _equality_function(symbol, right)
        else:
            function = _order_function(symbol, right)
        if function is not None and left.single is not None:
            left_single = left.single
            if left_single is _identity:
                return _Compiled(lambda value, variables: function(value))
            return _Compiled(lambda value, variables: function(left_single(value, variables)))
        if function is not None:
            left_stream = left.stream
            return _Compiled(stream=lambda value, variables: map(function, left_stream(value, variables)))
        return _binary(_COMPARISONS[symbol], left, right)

    def compile_arithmetic(self, node, scope):
        """`+ - * / %` with jq's type rules (spec 6.1); see _binary for the order."""
        left, right = [self.compile(child, scope) for child in node.children]
        return _binary(_ARITHMETIC[node.value], left, right)

    def compile_call(self, node, scope):
        """A builtin call, looked up by name and arity in _BUILTINS.

        An unknown name or arity is a syntax error, as in jq (`foo/1 is not
        defined`), with a hint: the arities that exist, "out of scope" for jq
        builtins --where leaves out, or the nearest known name.
        """
        name = node.value
        arity = len(node.children)
        builder = _BUILTINS.get((name, arity))
        if builder is None:
            raise _syntax_error("%s/%d is not defined" % (name, arity), self.text, node.position,
                                _call_hint(name, arity))
        return builder([self.compile(child, scope) for child in node.children])

    def compile_bind(self, node, scope):
        """`source as $name | body`: body once per output of source, with $name bound.

        The body runs on the binding's own input, not on source's output
        (`.data.code as $c | .seq` reads the envelope's seq).
        """
        source = self.compile(node.children[0], scope)
        body = self.compile(node.children[1], scope + (node.value,))
        body_stream = body.stream
        if source.single is not None:
            source_single = source.single
            if body.single is not None:
                body_single = body.single
                return _Compiled(lambda value, variables: body_single(
                    value, variables + (source_single(value, variables),)))
            return _Compiled(stream=lambda value, variables: body_stream(
                value, variables + (source_single(value, variables),)))
        source_stream = source.stream

        def stream(value, variables):
            for bound in source_stream(value, variables):
                yield from body_stream(value, variables + (bound,))
        return _Compiled(stream=stream)

    def compile_reduce(self, node, scope):
        """`reduce source as $name (initial; update)`: fold the outputs of source.

        For each output of initial, the state starts there and each output
        of source replaces it by the last output of update (run on the state
        with $name bound); an update with no output leaves null, as in jq.
        """
        source_stream = self.compile(node.children[0], scope).stream
        initial_stream = self.compile(node.children[1], scope).stream
        update_stream = self.compile(node.children[2], scope + (node.value,)).stream

        def stream(value, variables):
            for state in initial_stream(value, variables):
                for item in source_stream(value, variables):
                    # The last output of the update wins; none at all gives null (jq).
                    result = None
                    for result in update_stream(state, variables + (item,)):
                        pass
                    state = result
                yield state
        return _Compiled(stream=stream)

    def compile_if(self, node, scope):
        """`if c then a else b end` (`elif` nests): per output of c, those of a or b.

        Truthiness as everywhere: only false and null choose the else branch.
        """
        condition, consequence, otherwise = [self.compile(child, scope) for child in node.children]
        if all(part.single is not None for part in (condition, consequence, otherwise)):
            test, then_single, else_single = condition.single, consequence.single, otherwise.single

            def single(value, variables):
                result = test(value, variables)
                if result is not None and result is not False:
                    return then_single(value, variables)
                return else_single(value, variables)
            return _Compiled(single)
        condition_stream, then_stream, else_stream = (
            condition.stream, consequence.stream, otherwise.stream)

        def stream(value, variables):
            for result in condition_stream(value, variables):
                if result is not None and result is not False:
                    yield from then_stream(value, variables)
                else:
                    yield from else_stream(value, variables)
        return _Compiled(stream=stream)


def _object_key_error(key):
    """Return jq's error for an object key that is not a string."""
    return ExpressionRuntimeError("Cannot use %s as object key" % _describe(key))


def _call_hint(name, arity):
    """Return the hint for an undefined name/arity: arities, out of scope, or a near name."""
    if name in _BUILTIN_ARITIES:
        arities = sorted(_BUILTIN_ARITIES[name])
        if name == "not":
            return "not takes no argument: write (EXPRESSION | not)"
        return "%s takes %s argument%s" % (name, " or ".join(map(str, arities)),
                                          "" if arities == [1] else "s")
    if name in _UNSUPPORTED_BUILTINS:
        return "%s is a jq builtin that --where does not support" % name
    import difflib  # error path only
    close = difflib.get_close_matches(name, sorted(_BUILTIN_ARITIES), n=1)
    if close:
        return "did you mean %s?" % close[0]
    return 'strings need double quotes: "%s"' % name


def _path_walker(keys):
    """Return a closure (value, variables) -> value walking constant keys, jq style.

    A single name (`.seq`) gets its own closure: measured on CPython 3.11 it
    saves about 35 ns of the loop's 115 (unrolling two names saved nothing).
    A null on the way makes the rest of the path null.
    """
    if all(type(key) is str for key in keys):
        if len(keys) == 1:
            key = keys[0]

            def walk_one(value, variables):
                if type(value) is dict:
                    return value.get(key)
                if value is None:
                    return None
                raise _index_error(value, key)
            return walk_one
        keys = tuple(keys)

        def walk_names(value, variables):
            for key in keys:
                if type(value) is dict:
                    value = value.get(key)
                elif value is None:
                    return None  # null.a.b... is null all the way down
                else:
                    raise _index_error(value, key)
            return value
        return walk_names
    keys = tuple(keys)

    def walk(value, variables):
        for key in keys:
            value = _index(value, key)
        return value
    return walk


def _compose_singles(singles):
    """Return one closure running single-output stages in order (`a | b | c`).

    Identity stages drop out; long runs loop instead of nesting closures, so
    a pipe of thousands of stages never deepens the Python stack.
    """
    singles = [single for single in singles if single is not _identity] or [_identity]
    if len(singles) == 1:
        return singles[0]
    if len(singles) == 2:
        first, second = singles

        def run_two(value, variables):
            return second(first(value, variables), variables)
        return run_two
    stages = tuple(singles)

    def run_all(value, variables):
        for stage in stages:
            value = stage(value, variables)
        return value
    return run_all


def _compose_around_stream(groups) -> _Compiled:
    """Compile a pipe of the form [single] | stream | [single] without generators."""
    before = groups[0].single
    index = 1 if before is not None else 0
    middle = groups[index].stream
    after = groups[index + 1].single if index + 1 < len(groups) else None
    if before is None:
        source = middle
    else:
        def source(value, variables):
            return middle(before(value, variables), variables)
    if after is None:
        return _Compiled(stream=source)
    return _Compiled(stream=lambda value, variables: map(
        after, source(value, variables), itertools.repeat(variables)))


def _binary(function, left: _Compiled, right: _Compiled) -> _Compiled:
    """Compile `left OP right`: right outputs outermost, left innermost (spec 6).

    So `[(1, 2) + (10, 20)]` is [11, 12, 21, 22] and `(.a, .b) == (1, 2)`
    yields four booleans.  Both sides see the same input.
    """
    if left.single is not None and right.single is not None:
        left_single, right_single = left.single, right.single

        def single(value, variables):
            right_value = right_single(value, variables)
            return function(left_single(value, variables), right_value)
        return _Compiled(single)
    left_stream, right_stream = left.stream, right.stream

    def stream(value, variables):
        for right_value in right_stream(value, variables):
            for left_value in left_stream(value, variables):
                yield function(left_value, right_value)
    return _Compiled(stream=stream)


_COMPARISONS = {
    "==": _equal,
    "!=": lambda left, right: not _equal(left, right),
    "<": lambda left, right: _compare(left, right) < 0,
    "<=": lambda left, right: _compare(left, right) <= 0,
    ">": lambda left, right: _compare(left, right) > 0,
    ">=": lambda left, right: _compare(left, right) >= 0,
}


def _equality_function(symbol, right: _Compiled):
    """Specialise `x == CONSTANT` / `x != CONSTANT`; None when the right side varies.

    Returns a one-argument test; functools.partial over operator functions
    keeps the string and null/boolean cases free of Python frames, which
    matters for `.meta.tags[]? == "error"` where it runs once per tag.
    """
    if right.outputs is None or len(right.outputs) != 1:
        return None
    constant = right.outputs[0]
    is_equal = symbol == "=="
    if type(constant) is str:
        # A str only equals a str, so Python's == is jq's here.
        return functools.partial(operator.eq if is_equal else operator.ne, constant)
    if constant is None or type(constant) is bool:
        return functools.partial(operator.is_ if is_equal else operator.is_not, constant)
    if type(constant) in _NUMBER_TYPES:
        number = _to_double(constant)

        def number_test(value):
            value_type = type(value)
            if value_type is float or value_type is int:
                return (_to_double(value) == number) is is_equal
            return not is_equal
        return number_test
    if is_equal:
        return lambda value: _equal(value, constant)
    return lambda value: not _equal(value, constant)


def _order_function(symbol, right: _Compiled):
    """Specialise `x < CONSTANT` and friends for numbers and strings.

    Values of the constant's own type compare directly; any other type is
    ordered by its rank alone (`"1500" > 1000` is true: strings sort after
    numbers), which is jq's total order without a call to _compare.
    """
    if right.outputs is None or len(right.outputs) != 1:
        return None
    constant = right.outputs[0]
    order_test = _ORDER_TESTS[symbol]
    if type(constant) in _NUMBER_TYPES:
        number = _to_double(constant)

        def number_order(value):
            value_type = type(value)
            if value_type is float or value_type is int:
                return order_test(_to_double(value), number)
            return order_test(_rank(value), _NUMBER_RANK)
        return number_order
    if type(constant) is str:
        def string_order(value):
            if type(value) is str:
                return order_test(value, constant)
            return order_test(_rank(value), 4)
        return string_order
    return lambda value: order_test(_compare(value, constant), 0)


# -- public API -------------------------------------------------------------------------

def compile_expression(text: str) -> Callable[[object], Iterator[object]]:
    """Compile a jq expression once; return ``run(value) -> iterator of outputs``.

    ``run`` yields the expression's outputs for one input (a value as
    json.loads produces it) lazily, in jq's order, and raises
    ExpressionRuntimeError at the point jq would fail (outputs already yielded
    stay valid).  Outputs may share structure with the input and with
    constants in the expression: treat them as read-only.  Numbers come back
    as int or float and compare by value.  Raises ExpressionSyntaxError
    (kind Usage) when ``text`` is not a valid expression of the --where
    subset.  The result holds no state: it is safe to use from several
    threads at once and costs nothing to keep.
    """
    stream = _compile_program(text).stream

    def run(value):
        try:
            yield from stream(value, ())
        except RecursionError:
            # A message nested deeper than comparisons or tostring can walk.
            raise ExpressionRuntimeError("value nests too deeply to evaluate") from None
    return run


def _compile_program(text: str) -> _Compiled:
    """Tokenize, parse and compile ``text``; raise ExpressionSyntaxError."""
    if type(text) is not str:
        raise PlasmiteError("Usage", "expression must be a string, not %s" % type(text).__name__)
    parser = None
    try:
        tokens, _ = _tokenize(text)
        parser = _Parser(text, tokens)
        tree = parser.parse_program()
        return _Compiler(text).compile(tree, ())
    except RecursionError:
        # Only reachable when the caller's own stack is already deep.
        position = parser.tokens[parser.index].position if parser is not None else 0
        raise _syntax_error("expression nests too deeply", text, position) from None


def evaluate_expression(text: str, value: object) -> Iterator[object]:
    """Evaluate a jq expression on one input; return an iterator of its outputs.

    Compiles ``text`` first, so a malformed expression raises
    ExpressionSyntaxError at once; runtime failures raise
    ExpressionRuntimeError while the iterator is consumed, after the outputs
    jq would have printed before failing.  See compile_expression() for the
    value conventions; use it instead when one expression runs many times.
    """
    return compile_expression(text)(value)


def _non_boolean_error(text, output, message) -> PlasmiteError:
    """Return the usage error for a --where output that is not a boolean.

    Message and hint start as upstream's ("filter expression must yield
    booleans", "Expression `...` yielded non-boolean value: ..."); the rest
    of the hint says how to fix the expression.
    """
    seq = message.get("seq") if type(message) is dict and type(message.get("seq")) is int else None
    return PlasmiteError(
        "Usage", "filter expression must yield booleans", seq=seq,
        hint="Expression `%s` yielded non-boolean value: %s. A --where predicate must output "
             "true or false: compare the value (.data.x == \"y\") or test it with "
             "(... != null); select(...) outputs the message itself, not a boolean."
             % (text, _describe(output)))


def compile_where(text: str) -> Callable[[dict], bool]:
    """Compile one ``--where`` expression into ``predicate(message) -> bool``.

    The predicate evaluates the expression against the full message envelope
    ({"seq", "time", "meta", "data"}) and walks its outputs in order
    (spec/where.md section 2): an output that is not true/false raises
    PlasmiteError (kind Usage: the command must stop and report it); a
    runtime error means no match (False), even after a true output; at the
    end it returns True if any output was true (no output: False).  Raises
    ExpressionSyntaxError at compile time.  Thread-safe; no side effects.
    """
    program = _compile_program(text)
    single = program.single
    if single is not None:
        def predicate(message) -> bool:
            try:
                output = single(message, ())
            except (ExpressionRuntimeError, RecursionError):
                return False
            if output is True or output is False:
                return output
            raise _non_boolean_error(text, output, message)
        return predicate
    stream = program.stream

    def predicate_of_stream(message) -> bool:
        is_match = False
        try:
            for output in stream(message, ()):
                if output is True:
                    is_match = True
                elif output is not False:
                    raise _non_boolean_error(text, output, message)
        except (ExpressionRuntimeError, RecursionError):
            return False
        return is_match
    return predicate_of_stream


def compile_where_all(texts: list[str]) -> Callable[[dict], bool]:
    """Compile several ``--where`` expressions into one predicate that ANDs them.

    They run in the given (command-line) order and evaluation stops at the
    first that does not match; an empty list matches every message.  Errors
    as for compile_where(), which the CLI and the server both rely on, so
    local and remote peek decide alike.  Tag filtering stays with the caller.
    """
    predicates = [compile_where(text) for text in texts]
    if len(predicates) == 1:
        return predicates[0]

    def predicate(message) -> bool:
        for one_predicate in predicates:
            if not one_predicate(message):
                return False
        return True
    return predicate


def format_expression_error(error: PlasmiteError) -> str:
    """Render an expression error for a terminal: message, expression line, caret.

    For an ExpressionSyntaxError the line of the expression holding the
    fault is shown with a caret under it; a long line is cut to a window
    around the fault.  Other errors render as their message alone.
    """
    message = getattr(error, "message", None) or str(error)
    if not isinstance(error, ExpressionSyntaxError):
        return message
    text = error.expression
    line_start = text.rfind("\n", 0, error.position) + 1
    line_end = text.find("\n", error.position)
    line = text[line_start:len(text) if line_end < 0 else line_end]
    column = error.position - line_start
    width = 72  # fits a terminal with the two-space indent and the "..." marks
    if len(line) > width:
        start = max(0, min(column - width // 2, len(line) - width))
        prefix = "..." if start else ""
        suffix = "..." if start + width < len(line) else ""
        column = column - start + len(prefix)
        line = prefix + line[start:start + width] + suffix
    # Tabs and other controls would shift the caret: show them as spaces.
    line = "".join(" " if character < " " else character for character in line)
    return "%s\n  %s\n  %s^" % (message, line, " " * column)


# =============================================================================
# 8. Ingest
# =============================================================================
# Turns the bytes `pls poke POOL` reads from stdin in stream mode into JSON records,
# framed exactly as upstream v0.1.0 frames them (spec/cli.md 7.5): modes auto, jsonl,
# json, seq and jq, plus the event streams and multi-line JSON that only the auto
# sniff selects. Uses PlasmiteError, describe_os_error and parse_json_value; the CLI
# applies --errors stop|skip to what read_records yields and prints the notices.

INGEST_MODES = ("auto", "jsonl", "json", "seq", "jq")
ERROR_POLICIES = ("stop", "skip")
SNIFF_MAX_BYTES = 8192  # auto mode decides from at most this much input...
SNIFF_MAX_LINES = 8  # ...or from the first 8 lines, whichever it reads first (Q9: copied)
MAX_RECORD_BYTES = 1024 * 1024  # a record longer than this (not equal) is Oversize
MAX_SNIPPET_BYTES = 200  # longer snippets become their first 197 bytes plus "..."

PARSE_FAILURE_MESSAGE = "invalid json input"
OVERSIZE_FAILURE_MESSAGE = "record exceeds size limit"
PARSE_FAILURE_HINT = "Use -e skip to continue or select the correct input mode."
JQ_FAILURE_HINT = "Use --in jsonl for line-delimited input."
OVERSIZE_FAILURE_HINT = "Records are limited to 1 MiB; use -e skip to skip larger ones."
SKIP_NOTICE_KIND = "ingest_skip"
SUMMARY_NOTICE_KIND = "ingest_summary"
SUMMARY_NOTICE_MESSAGE = "ingestion completed with skipped records"

_READ_CHUNK_BYTES = 64 * 1024
_RECORD_SEPARATOR = b"\x1e"  # RFC 7464 (json-seq) starts each record with RS
_DATA_FIELD = b"data:"
# "Whitespace" throughout is JSON's (space, tab, CR, LF): what a JSON parser skips.
_BLANK = LazyPattern(rb"[ \t\r\n]*\Z")
_CONTAINER_START = LazyPattern(rb"[ \t\r\n]*[\[{]")
_WHITESPACE = LazyPattern(rb"[ \t\r\n]*")
# The first non-blank line of an event stream is a field or a comment (spec/cli.md 7.5).
_EVENT_STREAM_START = LazyPattern(rb"[ \t\r\n]*(?:data|event|id)?:")
# Inside a JSON string: everything up to the closing quote, or up to a backslash
# that ends the text (its escaped byte has not arrived yet).
_STRING_BODY = LazyPattern(rb'(?:[^"\\]+|\\.)*', re.DOTALL)
_STRUCTURAL = LazyPattern(rb'["\[\]{}]')
# serde_json ends a number or literal at whitespace or one of these delimiters.
_SCALAR_END = LazyPattern(rb'[ \t\r\n"\[\]{},:]')
_SCALAR_STARTS = b"-0123456789tfn"
_SELF_DELIMITED_STARTS = b'{["'
_QUOTE, _BACKSLASH = ord('"'), ord("\\")
_OPENERS = b"[{"
_INVALID = object()  # what _parse returns for text that is not JSON (None is JSON null)


class IngestRecord(namedtuple("IngestRecord", "index data hint")):
    """A record that parsed as JSON, ready to append as a message's ``data``.

    ``index`` is the 1-based record counter (failed records count too); ``data`` is
    the parsed value (serde_json's values; object keys in document order, since the
    append and its receipt sort them), which may still be a non-object that the append
    rejects with "data must be object"; ``hint`` is the hint of the Usage error ``--errors stop``
    raises if appending this record fails (set only in jq mode, else None).
    """

    __slots__ = ()


class IngestFailure(namedtuple("IngestFailure", "index error_kind message mode line snippet hint")):
    """A record that could not be taken: a Parse or Oversize failure.

    ``index`` counts records as in IngestRecord; ``error_kind`` is "Parse" or
    "Oversize" and ``message`` its fixed text; ``mode`` is the mode named in notices
    (jsonl, json, seq, event; "jq" in jq mode, which never emits notices); ``line`` is
    the 1-based line number where the mode defines one, else None; ``snippet`` is the
    record text (lossy UTF-8, never empty), shortened to MAX_SNIPPET_BYTES; ``hint`` is
    the hint for ``--errors stop``. In jq mode a failure is always the last item yielded.
    """

    __slots__ = ()

    def to_error(self) -> PlasmiteError:
        """Return the Usage error with which ``--errors stop`` aborts on this failure."""
        return PlasmiteError("Usage", self.message, hint=self.hint)


def check_stream_options(mode: str, errors: str) -> None:
    """Reject an ``--in``/``--errors`` pair that upstream refuses before reading stdin.

    Raises PlasmiteError Usage for mode "jq" with errors "skip" (a stream of
    self-delimited values cannot be resynchronised after a bad one), and ValueError
    for a mode not in INGEST_MODES or a policy not in ERROR_POLICIES.
    """
    if mode not in INGEST_MODES:
        raise ValueError("unknown ingest mode %r" % (mode,))
    if errors not in ERROR_POLICIES:
        raise ValueError("unknown error policy %r" % (errors,))
    if mode == "jq" and errors == "skip":
        raise PlasmiteError("Usage", "skip is not supported for jq-style streams",
                            hint="Use --in jsonl or --in auto for resyncable streams.")


def read_records(stream, mode: str = "auto", errors: str = "stop"):
    """Return an iterator over the records of a binary stream, framed as ``--in mode``.

    ``stream`` is a binary file object (``sys.stdin.buffer``, ``io.BytesIO``);
    ``mode`` is one of INGEST_MODES and ``errors`` the ``--errors`` policy, which
    matters only in auto mode (the multi-line resync happens under "skip" alone).
    The iterator yields IngestRecord and IngestFailure items in input order, each as
    soon as the input that completes it has been read (in auto mode, after the sniff
    prefix), so a live pipe is ingested as it arrives; mode "json" reads to EOF first.
    It holds at most one record plus the sniff prefix: an oversize record is reported
    when it passes MAX_RECORD_BYTES and the rest of it is read and dropped. Blank
    input yields nothing. Options are checked now, before anything is read
    (see check_stream_options); iterating raises PlasmiteError Io "failed to read
    stdin" if a read fails, and never raises for bad input. Iterating blocks on reads.
    """
    check_stream_options(mode, errors)
    return _generate_records(_available_reader(stream), mode, errors == "skip")


def skip_notice_details(failure: IngestFailure, pool_path: str) -> dict:
    """Return the ``details`` of the ``ingest_skip`` notice for ``failure`` (cli.md 4)."""
    details = {"mode": failure.mode, "index": failure.index, "error_kind": failure.error_kind,
               "pool_path": pool_path, "snippet": failure.snippet}
    if failure.line is not None:
        details["line"] = failure.line
    return details


def summary_notice_details(total: int, ok: int, failed: int, pool_path: str) -> dict:
    """Return the ``details`` of the ``ingest_summary`` notice (cli.md 4)."""
    return {"total": total, "ok": ok, "failed": failed, "pool_path": pool_path}


# -- reading -------------------------------------------------------------------

def _available_reader(stream):
    """Return ``read(size)``: at most ``size`` bytes of what ``stream`` has, b"" at EOF.

    A BufferedReader's ``read(size)`` waits for all ``size`` bytes, which would stall
    a live pipe (``tail -f log | pls poke pool``); ``read1`` returns what one read of
    the pipe gives. Raw streams have no ``read1``, and their ``read`` already does that.
    """
    read = getattr(stream, "read1", None) or stream.read

    def read_available(size: int) -> bytes:
        try:
            return read(size)
        except OSError as err:
            raise PlasmiteError("Io", "failed to read stdin",
                                causes=[describe_os_error(err)]) from err
    return read_available


def _read_chunks(read, prefix: bytes):
    """Yield ``prefix`` (the bytes the sniff consumed), then chunks from ``read`` to EOF."""
    if prefix:
        yield prefix
    while True:
        chunk = read(_READ_CHUNK_BYTES)
        if not chunk:
            return
        yield chunk


def _read_sniff_prefix(read) -> bytes:
    """Read until SNIFF_MAX_BYTES bytes, SNIFF_MAX_LINES newlines or EOF; return the bytes.

    Reads never ask for more than the byte limit, so the prefix is at most
    SNIFF_MAX_BYTES long; how many lines it holds depends on how the input arrives.
    """
    prefix = bytearray()
    while len(prefix) < SNIFF_MAX_BYTES and prefix.count(b"\n") < SNIFF_MAX_LINES:
        chunk = read(SNIFF_MAX_BYTES - len(prefix))
        if not chunk:
            break
        prefix += chunk
    return bytes(prefix)


def _sniff_mode(prefix: bytes) -> str:
    """Choose the auto mode's framing: "seq", "event" or "multiline" (cli.md 7.5)."""
    if _RECORD_SEPARATOR in prefix:
        return "seq"
    if _EVENT_STREAM_START.match(prefix):
        return "event"
    return "multiline"


def _generate_records(read, mode: str, should_resync: bool):
    """Yield the items of read_records (which has checked the options)."""
    prefix = b""
    if mode == "auto":
        prefix = _read_sniff_prefix(read)
        mode = _sniff_mode(prefix)
    chunks = _read_chunks(read, prefix)
    if mode == "multiline":
        yield from _read_multiline(chunks, should_resync)
    else:
        yield from _MODE_READERS[mode](chunks)


def _split_stream(chunks, separator: bytes, max_bytes: int, trailing: bytes = b""):
    """Split chunks at ``separator``; yield ``(text, ending, is_oversize)`` per piece.

    ``text`` is the piece without the separator and without its final run of
    ``trailing`` bytes (b"\\r" for lines); ``ending`` is what was cut off, separator
    included, so ``text + ending`` is the raw piece (a last piece at EOF has no
    separator; an empty one is not yielded). A piece whose text grows past
    ``max_bytes`` is yielded at once, flagged oversize, with the part read so far as
    ``text``; the rest of it is read and dropped. So memory stays near ``max_bytes``
    plus one chunk however long a piece is. Each piece is yielded once, in order.
    """
    pending = bytearray()
    content_length = 0  # len(pending) without its final run of trailing bytes
    is_dropping = False  # the current piece was yielded as oversize: skip to its end
    for chunk in chunks:
        start = 0
        while True:
            end = chunk.find(separator, start)
            if not is_dropping:
                part = chunk[start:] if end < 0 else chunk[start:end]
                kept = part.rstrip(trailing) if trailing else part
                if kept:
                    content_length = len(pending) + len(kept)
                pending += part
                if content_length > max_bytes:
                    yield bytes(pending), b"", True
                    is_dropping = True
                    pending.clear()
                    content_length = 0
                elif len(pending) > max_bytes + 1:
                    # Only trailing bytes lie past max_bytes. If a content byte follows
                    # them the piece is oversize whatever their count, so one is enough.
                    del pending[max_bytes + 1:]
            if end < 0:
                break
            if is_dropping:
                is_dropping = False
            else:
                yield (bytes(pending[:content_length]),
                       bytes(pending[content_length:]) + separator, False)
                pending.clear()
                content_length = 0
            start = end + 1
    if pending:
        yield bytes(pending[:content_length]), bytes(pending[content_length:]), False


def _split_lines(chunks, max_bytes: int = MAX_RECORD_BYTES):
    """Split chunks into lines (see _split_stream); ``text`` lacks trailing CR and LF."""
    return _split_stream(chunks, b"\n", max_bytes, b"\r")


# -- records and failures --------------------------------------------------------

def _parse(text):
    """Return the JSON value of ``text`` (bytes or str), or _INVALID if it is not JSON.

    Keys stay unsorted: records are encoded and their receipts printed, both sorted.
    """
    try:
        return parse_json_value(text, should_sort_keys=False)
    except PlasmiteError:
        return _INVALID


def _stop_hint(mode: str, error_kind=None):
    """Return the hint of the error ``--errors stop`` raises (cli.md 7.5).

    In jq mode every failure, append failures included, points to ``--in jsonl``.
    Upstream gives Oversize failures no hint; ours says what the limit is.
    """
    if mode == "jq":
        return JQ_FAILURE_HINT
    if error_kind == "Parse":
        return PARSE_FAILURE_HINT
    if error_kind == "Oversize":
        return OVERSIZE_FAILURE_HINT
    return None


def _make_snippet(record) -> str:
    """Return the notice snippet of ``record`` (bytes-like; lossy UTF-8 like upstream).

    Text of at most MAX_SNIPPET_BYTES UTF-8 bytes is returned whole; longer text is
    cut to 197 bytes at a character boundary (Q8: upstream slices at byte 197 and
    panics inside a character) and "..." is added. Only the head is decoded: every
    input byte decodes to at least one output byte, so 4 spare bytes decide the length.
    """
    head = bytes(record[:MAX_SNIPPET_BYTES + 4]).decode("utf-8", "replace")
    encoded = head.encode("utf-8")
    if len(encoded) <= MAX_SNIPPET_BYTES:
        return head
    return encoded[:MAX_SNIPPET_BYTES - 3].decode("utf-8", "ignore") + "..."


def _failure(index: int, error_kind: str, mode: str, line, record) -> IngestFailure:
    """Build the failure of record ``index``; ``record`` is its (partial) raw text."""
    message = PARSE_FAILURE_MESSAGE if error_kind == "Parse" else OVERSIZE_FAILURE_MESSAGE
    return IngestFailure(index, error_kind, message, mode, line, _make_snippet(record),
                         _stop_hint(mode, error_kind))


def _decode(index: int, mode: str, line, record, text=None):
    """Parse ``text`` (default: ``record``); return an IngestRecord or a Parse failure."""
    data = _parse(record if text is None else text)
    if data is _INVALID:
        return _failure(index, "Parse", mode, line, record)
    return IngestRecord(index, data, _stop_hint(mode))


class _ValueScanner:
    """Find where a JSON array, object or string that starts a text ends, fed in pieces.

    It follows only what decides the end: bracket depth outside strings and the
    string/escape state. On valid JSON it finds exactly the closing byte, so text it
    has not seen close is certainly not JSON yet; on invalid text it may report an
    end that the parser then rejects. Once it reports an end it must not be fed again.
    """

    def __init__(self):
        self.depth = 0
        self.is_in_string = False
        self.is_escape_pending = False

    def feed(self, text, position: int):
        """Scan ``text[position:]`` (the text so far; earlier bytes were fed before).

        Return the offset just past the value's last byte once it closes, else None.
        """
        end = len(text)
        while position < end:
            if self.is_in_string:
                if self.is_escape_pending:
                    self.is_escape_pending = False
                    position += 1
                    continue
                position = _STRING_BODY.match(text, position).end()
                if position == end:
                    return None
                if text[position] == _BACKSLASH:
                    # The text's last byte: it escapes the first byte of the next piece.
                    self.is_escape_pending = True
                else:
                    self.is_in_string = False
                    if self.depth == 0:
                        return position + 1
                position += 1
            else:
                match = _STRUCTURAL.search(text, position)
                if match is None:
                    return None
                position = match.end()
                byte = text[match.start()]
                if byte == _QUOTE:
                    self.is_in_string = True
                elif byte in _OPENERS:
                    self.depth += 1
                else:
                    self.depth -= 1
                    if self.depth == 0:
                        return position
        return None


# -- framing, one reader per mode -------------------------------------------------

def _read_jsonl(chunks):
    """Frame --in jsonl: one record per line; blank lines are skipped and not counted.

    ``line`` is the physical line number (blank lines counted). A line that is
    whitespace only and also longer than MAX_RECORD_BYTES is Oversize: its length is
    known before its content is.
    """
    index = 0
    for line_number, (text, _, is_oversize) in enumerate(_split_lines(chunks), 1):
        if is_oversize:
            index += 1
            yield _failure(index, "Oversize", "jsonl", line_number, text)
        elif not _BLANK.match(text):
            index += 1
            yield _decode(index, "jsonl", line_number, text)


def _read_multiline(chunks, should_resync: bool):
    """Frame auto mode's JSON lines, where one record may span several lines.

    As jsonl, except that a line that does not parse and whose left-trimmed text
    starts with ``{`` or ``[`` starts a buffer: the following raw lines (endings
    kept, the first line's dropped, as upstream builds it) are appended until the
    buffer parses; EOF first gives a Parse failure. The buffer's length is checked
    before each parse attempt, and ``line`` is where the record started. With
    ``should_resync`` (``--errors skip``) a line starting with ``{`` or ``[`` fails
    the buffer and starts the next record itself. Notices call this mode "jsonl".

    Upstream re-parses the whole buffer after every line, which is quadratic on a big
    pretty-printed document. Here a _ValueScanner says when the top-level value
    closes: before that no parse can succeed, and after a failed attempt at the close
    none can (later bytes are whitespace, which changes nothing, or make it invalid).
    So one parse per record gives the same results.
    """
    index = 0
    pending = None  # the raw text of the record being accumulated
    pending_index = pending_line = 0
    scanner = None  # None once the pending value has closed: no parse can succeed
    for line_number, (text, ending, is_oversize) in enumerate(_split_lines(chunks), 1):
        if pending is not None:
            if not (should_resync and _CONTAINER_START.match(text)):
                if is_oversize or len(pending) + len(text) + len(ending) > MAX_RECORD_BYTES:
                    yield _failure(pending_index, "Oversize", "jsonl", pending_line,
                                   bytes(pending) + text)
                    pending = None
                    continue
                start = len(pending)
                pending += text
                pending += ending
                if scanner is not None and scanner.feed(pending, start) is not None:
                    scanner = None
                    data = _parse(pending)
                    if data is not _INVALID:
                        yield IngestRecord(pending_index, data, None)
                        pending = None
                continue
            yield _failure(pending_index, "Parse", "jsonl", pending_line, pending)
            pending = None
        if is_oversize:
            index += 1
            yield _failure(index, "Oversize", "jsonl", line_number, text)
            continue
        if _BLANK.match(text):
            continue
        index += 1
        data = _parse(text)
        if data is not _INVALID:
            yield IngestRecord(index, data, None)
        elif _CONTAINER_START.match(text):
            pending = bytearray(text)
            pending_index, pending_line = index, line_number
            scanner = _ValueScanner()
            if scanner.feed(pending, 0) is not None:
                scanner = None  # the line's own value closed and failed to parse above
        else:
            yield _failure(index, "Parse", "jsonl", line_number, text)
    if pending is not None:
        yield _failure(pending_index, "Parse", "jsonl", pending_line, pending)


def _read_json(chunks):
    """Frame --in json: all input is one document (record 1); blank input gives nothing.

    The size limit applies to the whole input and is checked first. Bytes past the
    limit are counted and dropped, so an oversize input is not held in memory.
    """
    document = bytearray()
    length = 0
    for chunk in chunks:
        length += len(chunk)
        if len(document) <= MAX_RECORD_BYTES:
            document += chunk
    if length > MAX_RECORD_BYTES:
        yield _failure(1, "Oversize", "json", None, document)
    elif not _BLANK.match(document):
        yield _decode(1, "json", None, document)


def _read_seq(chunks):
    """Frame json-seq (--in seq, or auto after an RS byte): records split on 0x1E.

    Blank segments are ignored and not counted; segments are decoded as lossy UTF-8
    (invalid bytes become U+FFFD) and have no ``line``. A segment that grows past
    MAX_RECORD_BYTES (raw bytes) fails at once and is skipped up to the next RS.
    """
    index = 0
    for text, _, is_oversize in _split_stream(chunks, _RECORD_SEPARATOR, MAX_RECORD_BYTES):
        if is_oversize:
            index += 1
            yield _failure(index, "Oversize", "seq", None, text)
        elif not _BLANK.match(text):
            index += 1
            yield _decode(index, "seq", None, text, text.decode("utf-8", "replace"))


def _read_event(chunks):
    """Frame an event stream (auto only): one record per event's ``data:`` lines.

    A ``data:`` line adds its value (one space after the colon removed); comments
    (``:``), other fields and unknown lines are ignored; an empty line (whitespace
    is not empty) ends the event, and so does EOF. The data lines, joined with LF,
    are the record; an event without data, or with blank data, is no record.
    ``line`` is the ending empty line, or the last line at EOF. The joined length is
    checked as each data line is added: an oversize event fails at that line and
    the rest of it is ignored up to its empty line. (Q10: upstream then also drops
    every later event; this resumes at the next one.)
    """
    index = 0
    data = None  # the current event's joined data lines, once it has one
    is_dropping = False  # the current event was reported oversize
    line_number = 0
    # A data line's value may be MAX_RECORD_BYTES long: allow for "data: " before it.
    lines = _split_lines(chunks, MAX_RECORD_BYTES + len(_DATA_FIELD) + 1)
    for line_number, (text, _, is_oversize) in enumerate(lines, 1):
        if not text:
            if data is not None and not _BLANK.match(data):
                index += 1
                yield _decode(index, "event", line_number, data)
            data = None
            is_dropping = False
        elif not is_dropping and text.startswith(_DATA_FIELD):
            value = text[len(_DATA_FIELD):]
            if value[:1] == b" ":
                value = value[1:]
            length = len(value) if data is None else len(data) + 1 + len(value)
            if is_oversize or length > MAX_RECORD_BYTES:
                index += 1
                record = value if data is None else bytes(data) + b"\n" + value
                yield _failure(index, "Oversize", "event", line_number, record)
                data = None
                is_dropping = True
            elif data is None:
                data = bytearray(value)
            else:
                data += b"\n"
                data += value
    if data is not None and not _BLANK.match(data):
        index += 1
        yield _decode(index, "event", line_number, data)


def _find_value_end(buffer: bytearray, chunks):
    """Read chunks into ``buffer`` until the value it starts with is complete.

    Return the value's length, or None when no JSON value starts with its first byte
    or the input ends inside a string, array or object. A number or literal ends at
    whitespace, a delimiter or EOF, as serde_json's StreamDeserializer ends it.
    """
    first = buffer[0]
    if first in _SELF_DELIMITED_STARTS:
        find_end = _ValueScanner().feed
    elif first in _SCALAR_STARTS:
        find_end = _find_scalar_end
    else:
        return None
    position = 0
    while True:
        end = find_end(buffer, position)
        if end is not None:
            return end
        position = len(buffer)
        chunk = next(chunks, None)
        if chunk is None:
            return len(buffer) if find_end is _find_scalar_end else None
        buffer += chunk


def _find_scalar_end(text, position: int):
    """Return the offset of the first scalar-ending byte at or after ``position``, or None."""
    match = _SCALAR_END.search(text, position)
    return None if match is None else match.start()


def _read_jq(chunks):
    """Frame --in jq: JSON values separated by whitespace or self-delimited (``{..}{..}``).

    Values are read as serde_json's StreamDeserializer reads them and yielded as soon
    as complete. The first failure ends the stream: nothing can resynchronise a
    stream of bare values. Upstream applies no size limit here, so a value is held
    whole however long it is.
    """
    chunks = iter(chunks)
    buffer = bytearray()
    index = 0
    while True:
        del buffer[:_WHITESPACE.match(buffer).end()]
        if not buffer:
            chunk = next(chunks, None)
            if chunk is None:
                return
            buffer += chunk
            continue
        index += 1
        end = _find_value_end(buffer, chunks)
        if end is None:
            yield _failure(index, "Parse", "jq", None, buffer)
            return
        value = bytes(buffer[:end])
        del buffer[:end]
        item = _decode(index, "jq", None, value)
        yield item
        if isinstance(item, IngestFailure):
            return


_MODE_READERS = {"jsonl": _read_jsonl, "json": _read_json, "seq": _read_seq,
                 "event": _read_event, "jq": _read_jq}


# =============================================================================
# 9. Remote client
# =============================================================================
# The HTTP client behind ``http(s)://host:port/POOL`` refs: ref parsing, one
# kept-alive connection per server (http.client, ssl and urllib imported
# lazily), the v0 routes as RemotePool methods, and upstream's status-to-kind
# mapping, so a remote failure raises the PlasmiteError kind a local one would.

REMOTE_REF_HINT = "Use shorthand: http(s)://host:port/<pool>."
REMOTE_TOKEN_VARIABLE = "PLASMITE_TOKEN"
REMOTE_TOKEN_FILE_VARIABLE = "PLASMITE_TOKEN_FILE"
REMOTE_CA_FILE_VARIABLE = "PLASMITE_CA_FILE"
REMOTE_CONNECT_TIMEOUT = 30.0  # seconds, as upstream's client
# Upstream's client has no read timeout.  A plain request gets this long; a
# stream gets its own timeout_ms plus this, since the server ends it then.
REMOTE_READ_TIMEOUT = 60.0
REMOTE_USER_AGENT = "plasmite.py/" + __version__
LITE3_CONTENT_TYPE = "application/x-plasmite-lite3"
LITE3_STREAM_CONTENT_TYPE = "application/x-plasmite-lite3-stream"
# One tail_lite3 frame header: seq, timestamp (ns), payload length; big-endian.
LITE3_STREAM_FRAME = struct.Struct(">QQI")

# How the client names an error the server sent without a JSON envelope
# (remote.md 9.1): 5xx is Internal, anything not listed is Io.
ERROR_KINDS_BY_STATUS = {400: "Usage", 413: "Usage", 401: "Permission", 403: "Permission",
                         404: "NotFound", 409: "AlreadyExists", 423: "Busy"}

# Patterns stay strings so `import plasmite` compiles none; re caches them on first use.
_PORT_PATTERN = r"[0-9]+"
# WHATWG forbidden host code points, plus the percent sign a decoded host may not keep.
_FORBIDDEN_HOST_CHARACTERS = frozenset(" #%/:<>?@[\\]^|\x7f")
_DOT_SEGMENTS = frozenset((".", "%2e"))
_DOUBLE_DOT_SEGMENTS = frozenset(("..", ".%2e", "%2e.", "%2e%2e"))


def _split_http_url(text: str) -> tuple:
    """Split an http(s) URL into ``(scheme, host, port, path, has_query_or_fragment)``.

    Parses as WHATWG URL parsers do where it matters for pool refs: tabs and
    newlines are dropped, backslashes count as slashes, userinfo is ignored,
    the host is percent-decoded and lower-cased (IPv6 in brackets, compressed),
    and the scheme's default port becomes None.  ``path`` is the raw,
    still percent-encoded path ('' when absent).  Raises ValueError naming the
    problem ("empty host", "invalid IPv6 address", "invalid port number",
    "invalid domain character").
    """
    from urllib.parse import unquote

    text = re.sub(r"[\t\n\r]", "", text.strip("\x00 "))
    scheme, _, rest = text.partition("://")
    scheme = scheme.lower()
    rest = rest.lstrip("/\\")
    end = len(rest)
    for delimiter in "/\\?#":
        position = rest.find(delimiter)
        if position != -1:
            end = min(end, position)
    authority, remainder = rest[:end], rest[end:]
    authority = authority.rpartition("@")[2]
    if authority.startswith("["):
        import ipaddress

        close = authority.find("]")
        if close == -1:
            raise ValueError("invalid IPv6 address")
        try:
            host = "[%s]" % ipaddress.IPv6Address(authority[1:close]).compressed
        except ValueError:
            raise ValueError("invalid IPv6 address") from None
        port_text = authority[close + 1:]
        if port_text and not port_text.startswith(":"):
            raise ValueError("invalid port number")
        port_text = port_text[1:]
    else:
        host_text, _, port_text = authority.partition(":")
        host = unquote(host_text).lower()
        if not host:
            raise ValueError("empty host")
        if any(character in _FORBIDDEN_HOST_CHARACTERS or character < " " for character in host):
            raise ValueError("invalid domain character")
    port = None
    if port_text:
        if not re.fullmatch(_PORT_PATTERN, port_text) or int(port_text) > 65535:
            raise ValueError("invalid port number")
        port = int(port_text)
        if port == (443 if scheme == "https" else 80):
            port = None
    cut = len(remainder)
    for delimiter in "?#":
        position = remainder.find(delimiter)
        if position != -1:
            cut = min(cut, position)
    return scheme, host, port, remainder[:cut].replace("\\", "/"), cut < len(remainder)


def _path_segments(path: str) -> list:
    """Return the segments of a URL path after WHATWG dot-segment removal."""
    parts = path[1:].split("/") if path else [""]
    segments = []
    for index, part in enumerate(parts):
        is_last = index == len(parts) - 1
        lowered = part.lower()
        if lowered in _DOUBLE_DOT_SEGMENTS:
            if segments:
                segments.pop()
            if is_last:
                segments.append("")
        elif lowered in _DOT_SEGMENTS:
            if is_last:
                segments.append("")
        else:
            segments.append(part)
    return segments


def _base_url(scheme: str, host: str, port) -> str:
    return "%s://%s%s/" % (scheme, host, "" if port is None else ":%d" % port)


def parse_remote_ref(text: str):
    """Classify a POOL argument: None for a local ref, ``(base_url, pool)`` for a remote one.

    Follows spec/cli.md 6.2: refs starting with ``http://`` or ``https://``
    must be the shorthand ``http(s)://host[:port]/<pool>``; ``base_url`` is
    ``scheme://host[:port]/`` (default port dropped) and ``pool`` the single
    path segment, percent-decoded.  Any other ``scheme://`` is rejected.
    Raises PlasmiteError Usage with upstream's messages and hints; does no I/O.
    """
    if not text.startswith(("http://", "https://")):
        if "://" in text:
            raise PlasmiteError("Usage", "remote pool ref must use http or https scheme",
                                hint=REMOTE_REF_HINT)
        return None
    from urllib.parse import unquote

    try:
        scheme, host, port, path, has_query = _split_http_url(text)
    except ValueError as err:
        raise PlasmiteError("Usage", "invalid remote pool ref", hint=REMOTE_REF_HINT,
                            causes=[str(err)]) from None
    if has_query:
        raise PlasmiteError("Usage", "remote pool ref must not include query or fragment",
                            hint=REMOTE_REF_HINT)
    if "%2f" in path.lower():
        raise PlasmiteError("Usage", "remote pool name must not contain path separators",
                            hint="Use a single pool segment: http(s)://host:port/<pool>.")
    segments = _path_segments(path)
    if len(segments) != 1 or segments[0] in ("", "pool"):
        raise PlasmiteError("Usage",
                            "remote pool ref must use shorthand http(s)://host:port/<pool>",
                            hint="API-shaped URLs are not accepted as pool refs.")
    return _base_url(scheme, host, port), unquote(segments[0])


def parse_server_url(text: str) -> str:
    """Parse a server argument (``pool list URL``); return its base URL ``scheme://host[:port]/``.

    Accepts ``http(s)://host[:port]`` with an optional trailing ``/``.
    Raises PlasmiteError Usage for anything else (other schemes, a path,
    query or fragment).
    """
    if not text.startswith(("http://", "https://")):
        raise PlasmiteError("Usage", "server URL must use http or https scheme",
                            hint="Use http(s)://host:port.")
    try:
        scheme, host, port, path, has_query = _split_http_url(text)
    except ValueError as err:
        raise PlasmiteError("Usage", "invalid server URL", hint="Use http(s)://host:port.",
                            causes=[str(err)]) from None
    if has_query or path not in ("", "/"):
        raise PlasmiteError("Usage", "server URL must not include a path, query or fragment",
                            hint="Use http(s)://host:port (pool names go in pool refs).")
    return _base_url(scheme, host, port)


def read_remote_token():
    """Return the bearer token for remote refs from the environment, or None.

    PLASMITE_TOKEN holds the token itself; PLASMITE_TOKEN_FILE names a file
    holding it (surrounding whitespace trimmed, as ``serve --token-file``).
    Raises PlasmiteError Usage when both are set or the file is blank, Io
    when the file cannot be read.
    """
    token = os.environ.get(REMOTE_TOKEN_VARIABLE)
    token_path = os.environ.get(REMOTE_TOKEN_FILE_VARIABLE)
    if token and token_path:
        raise PlasmiteError("Usage", "%s cannot be combined with %s"
                            % (REMOTE_TOKEN_VARIABLE, REMOTE_TOKEN_FILE_VARIABLE),
                            hint="Set only one of them.")
    if token:
        return token
    if not token_path:
        return None
    try:
        with open(token_path, encoding="utf-8") as token_file:
            token = token_file.read().strip()
    except (OSError, UnicodeDecodeError) as err:
        cause = describe_os_error(err) if isinstance(err, OSError) else \
            "stream did not contain valid UTF-8"
        raise PlasmiteError("Io", "failed to read token file", path=token_path,
                            causes=[cause]) from err
    if not token:
        raise PlasmiteError("Usage", "token file is empty", path=token_path,
                            hint="Write the server's token into %s." % REMOTE_TOKEN_FILE_VARIABLE)
    return token


def _quote_segment(name: str) -> str:
    from urllib.parse import quote

    return quote(name, safe="")


def _transport_error(url: str, err: Exception) -> PlasmiteError:
    """Describe a failure to reach a server as upstream does: Io "request failed"."""
    import socket
    import ssl

    hint = None
    if isinstance(err, ssl.SSLCertVerificationError):
        detail = "certificate verify failed: %s" % (err.verify_message or err.reason)
        hint = ("The server's certificate is not trusted; set %s to its CA or certificate file "
                "(serve init writes serve-cert.pem)." % REMOTE_CA_FILE_VARIABLE)
    elif isinstance(err, socket.gaierror):
        detail = "failed to lookup address information: %s" % err.strerror
    elif isinstance(err, socket.timeout):
        detail = "timed out"
    elif isinstance(err, OSError) and err.errno:
        detail = describe_os_error(err)
    else:
        detail = str(err) or type(err).__name__
    if isinstance(err, ConnectionRefusedError):
        causes = ["%s: Connection Failed: Connect error: %s" % (url, detail), detail]
    else:
        causes = ["%s: %s" % (url, detail), detail]
    return PlasmiteError("Io", "request failed", hint=hint, causes=causes)


def remote_status_error(status: int, payload: bytes) -> PlasmiteError:
    """Turn a non-2xx response into the PlasmiteError it stands for (remote.md 9.1).

    A JSON error envelope gives its kind (unknown kinds become Internal),
    message, path, seq and offset; otherwise the kind follows the status and
    the message is ``remote error status <code>``.
    """
    try:
        fields = json.loads(payload.decode("utf-8"))["error"]
        kind = fields["kind"]  # TypeError unless fields is a dict
    except (ValueError, KeyError, TypeError, AttributeError):
        kind = "Internal" if status >= 500 else ERROR_KINDS_BY_STATUS.get(status, "Io")
        return PlasmiteError(kind, "remote error status %d" % status)
    if kind not in EXIT_CODES:
        kind = "Internal"
    message, path, seq, offset = (fields.get(name) for name in ("message", "path", "seq", "offset"))
    return PlasmiteError(kind, message if isinstance(message, str) else None,
                         path=path if isinstance(path, str) else None,
                         seq=seq if isinstance(seq, int) else None,
                         offset=offset if isinstance(offset, int) else None)


def _response_field(document, key: str, expected_type=dict):
    """Return ``document[key]`` if the server's JSON has that shape, else Internal."""
    if not isinstance(document, dict) or not isinstance(document.get(key), expected_type):
        raise PlasmiteError("Internal", "invalid response json")
    return document[key]


class RemoteClient:
    """A client for one plasmite server, e.g. ``RemoteClient("http://127.0.0.1:9700/")``.

    Sends HTTP/1.1 requests over one kept-alive connection (reopened when the
    server closed it), with ``Authorization: Bearer <token>`` when a token is
    known, and verifies HTTPS against the system trust store or ``ca_file``.
    ``token`` and ``ca_file`` default to PLASMITE_TOKEN / PLASMITE_TOKEN_FILE
    and PLASMITE_CA_FILE; pass "" for none.  Errors are PlasmiteError: the kind the server
    reported (remote.md 9.1), Io "request failed" when it cannot be reached.
    Blocks on the network; not thread-safe (one client per thread).  Close it
    with :meth:`close` or use it as a context manager.
    """

    def __init__(self, base_url: str, token=None, ca_file=None):
        try:
            scheme, host, port, path, has_query = _split_http_url(base_url)
        except ValueError as err:
            raise PlasmiteError("Usage", "invalid server URL", causes=[str(err)]) from None
        if scheme not in ("http", "https") or has_query:
            raise PlasmiteError("Usage", "invalid server URL",
                                hint="Use http(s)://host:port.")
        self.is_tls = scheme == "https"
        self.host = host[1:-1] if host.startswith("[") else host
        self.port = port if port is not None else (443 if self.is_tls else 80)
        self.path_prefix = path.rstrip("/")
        self.base_url = _base_url(scheme, host, port)[:-1] + self.path_prefix + "/"
        # An empty token or CA file means none (and the environment is not consulted).
        self.token = (token if token is not None else read_remote_token()) or None
        self.ca_file = (ca_file if ca_file is not None
                        else os.environ.get(REMOTE_CA_FILE_VARIABLE)) or None
        self._connection = None
        self._is_streaming = False

    def __enter__(self) -> "RemoteClient":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection (a later request opens a new one). Idempotent."""
        if self._connection is not None:
            self._connection.close()
            self._connection = None
        self._is_streaming = False

    # -- transport ----------------------------------------------------------

    def _tls_context(self):
        import ssl

        try:
            return ssl.create_default_context(cafile=self.ca_file)
        except (OSError, ssl.SSLError) as err:
            raise PlasmiteError("Io", "failed to load CA file", path=self.ca_file,
                                causes=[str(err)]) from err

    def _connect(self, read_timeout) -> tuple:
        """Return (connection, is_reused), connected, with ``read_timeout`` on its socket."""
        import http.client

        if self._is_streaming:
            self.close()  # a stream left unfinished: its connection is mid-body
        connection = self._connection
        is_reused = connection is not None and connection.sock is not None
        if connection is None:
            if self.is_tls:
                connection = http.client.HTTPSConnection(
                    self.host, self.port, timeout=REMOTE_CONNECT_TIMEOUT,
                    context=self._tls_context())
            else:
                connection = http.client.HTTPConnection(self.host, self.port,
                                                        timeout=REMOTE_CONNECT_TIMEOUT)
            self._connection = connection
        if connection.sock is None:
            connection.connect()
        connection.sock.settimeout(read_timeout)
        return connection, is_reused

    def send(self, method: str, target: str, body=None, content_type="application/json",
             read_timeout=REMOTE_READ_TIMEOUT):
        """Send one request for ``target`` (a path such as ``/v0/pools``); return the response.

        The status and headers are read, the body is not.  A request that
        meets a kept-alive connection the server has just closed is sent again
        once on a new connection (the server never saw it).  Raises
        PlasmiteError Io "request failed" on transport errors.
        """
        import http.client

        headers = {"Accept": "application/json", "User-Agent": REMOTE_USER_AGENT}
        if body is not None:
            headers["Content-Type"] = content_type
        if self.token is not None:
            headers["Authorization"] = ("Bearer " + self.token).encode("utf-8")
        may_resend = True
        while True:
            is_reused = False
            try:
                connection, is_reused = self._connect(read_timeout)
                connection.request(method, self.path_prefix + target, body=body, headers=headers)
                return connection.getresponse()
            except (OSError, http.client.HTTPException) as err:
                self.close()
                is_stale = isinstance(err, (ConnectionResetError, BrokenPipeError,
                                            http.client.RemoteDisconnected))
                if not (may_resend and is_reused and is_stale):
                    raise _transport_error(self.base_url + target.lstrip("/"), err) from err
                may_resend = False

    def _read_body(self, response, target: str) -> bytes:
        """Read a whole response body; Io "request failed" if the connection breaks."""
        import http.client

        try:
            return response.read()
        except (OSError, http.client.HTTPException) as err:
            self.close()
            raise _transport_error(self.base_url + target.lstrip("/"), err) from err

    def fetch(self, method: str, target: str, body=None, content_type="application/json") -> tuple:
        """Send a request and read the whole response; return (response, body bytes).

        Raises the PlasmiteError a non-2xx status stands for, or Io.
        """
        response = self.send(method, target, body, content_type)
        payload = self._read_body(response, target)
        if not 200 <= response.status < 300:
            raise remote_status_error(response.status, payload)
        return response, payload

    def fetch_json(self, method: str, target: str, document=None, body=None,
                   content_type="application/json"):
        """Send ``document`` as JSON (or ``body`` as is); return the parsed JSON response.

        Raises PlasmiteError as :meth:`fetch`, and Internal "invalid response
        json" when a success response is not JSON.
        """
        if document is not None:
            body = dump_json(document).encode("utf-8")
        _response, payload = self.fetch(method, target, body, content_type)
        try:
            return parse_json_value(payload)
        except PlasmiteError:
            raise PlasmiteError("Internal", "invalid response json") from None

    def open_stream(self, target: str, read_timeout):
        """GET a streaming route; return the response once its 200 status has arrived.

        The connection stays busy until :meth:`read_stream` or
        :meth:`read_frames` has read the stream to its end.
        """
        response = self.send("GET", target, read_timeout=read_timeout)
        if response.status != 200:
            raise remote_status_error(response.status, self._read_body(response, target))
        self._is_streaming = True
        return response

    def read_stream(self, response):
        """Yield the non-empty lines of a streamed body until it ends cleanly.

        Raises PlasmiteError Io "failed to read tail stream" when the stream
        breaks off (upstream's servers abort the body on late errors).  Reads
        with read1, which reports a chunked body cut short (readline would
        take it for the end).
        """
        import http.client

        pending = b""
        try:
            while True:
                try:
                    data = response.read1(65536)
                except (OSError, http.client.HTTPException, ValueError) as err:
                    raise PlasmiteError("Io", "failed to read tail stream",
                                        causes=[str(err) or type(err).__name__]) from err
                if not data:
                    self._is_streaming = False
                    if pending.strip():
                        yield pending
                    return
                lines = (pending + data).split(b"\n")
                pending = lines.pop()
                for line in lines:
                    if line.strip():
                        yield line
        finally:
            if self._is_streaming:
                self.close()

    def read_frames(self, response):
        """Yield Frame(seq, timestamp_ns, payload) from a tail_lite3 body until it ends.

        Raises PlasmiteError Io "failed to read tail stream" on a broken stream.
        """
        import http.client

        try:
            while True:
                try:
                    header = response.read(LITE3_STREAM_FRAME.size)
                    if not header:
                        self._is_streaming = False
                        return
                    if len(header) < LITE3_STREAM_FRAME.size:
                        raise ValueError("truncated frame header")
                    seq, timestamp_ns, length = LITE3_STREAM_FRAME.unpack(header)
                    payload = response.read(length)
                    if len(payload) < length:
                        raise ValueError("truncated frame payload")
                except (OSError, http.client.HTTPException, ValueError) as err:
                    raise PlasmiteError("Io", "failed to read tail stream",
                                        causes=[str(err) or type(err).__name__]) from err
                yield Frame(seq, timestamp_ns, payload)
        finally:
            if self._is_streaming:
                self.close()

    # -- server-wide operations ---------------------------------------------

    def list_pools(self) -> list:
        """Return the server's pools (``GET /v0/pools``): pool info dicts with name and path."""
        return _response_field(self.fetch_json("GET", "/v0/pools"), "pools", list)

    def create_pool(self, name: str, size_bytes=None) -> dict:
        """Create a pool on the server; return its info. AlreadyExists if it exists."""
        document = {"pool": name}
        if size_bytes is not None:
            document["size_bytes"] = size_bytes
        try:
            return _response_field(self.fetch_json("POST", "/v0/pools", document), "pool")
        except PlasmiteError as err:
            err.path = name
            raise

    def delete_pool(self, name: str) -> None:
        """Delete a pool on the server. NotFound if it does not exist."""
        try:
            self.fetch_json("DELETE", "/v0/pools/" + _quote_segment(name))
        except PlasmiteError as err:
            err.path = name
            raise

    def open_pool(self, name: str) -> "RemotePool":
        """Open a pool on the server (``POST /v0/pools/open``); NotFound if missing."""
        try:
            info = _response_field(self.fetch_json("POST", "/v0/pools/open", {"pool": name}),
                                   "pool")
        except PlasmiteError as err:
            err.path = name
            raise
        return RemotePool(self, name, info)


class RemotePool:
    """A pool on a plasmite server, used through the HTTP v0 routes.

    Offers what the CLI needs of a LocalPool: ``info``, ``append``,
    ``append_lite3``, ``get``, ``get_lite3``, ``tail`` and ``tail_lite3``.
    Messages are dicts shaped like :func:`message_fields` returns.  Every
    error is the PlasmiteError the server reported, with ``path`` set to the
    pool name (and ``seq`` for get), as upstream's client does; transport
    failures are Io.  ``opened_info`` is the pool info the open returned.
    Not thread-safe; closing it closes its client.
    """

    def __init__(self, client: RemoteClient, name: str, opened_info=None):
        self.client = client
        self.name = name
        self.opened_info = opened_info

    @classmethod
    def open(cls, base_url: str, name: str, token=None, ca_file=None) -> "RemotePool":
        """Connect to ``base_url`` and open pool ``name`` there (see RemoteClient for auth/TLS)."""
        client = RemoteClient(base_url, token, ca_file)
        try:
            return client.open_pool(name)
        except BaseException:
            client.close()
            raise

    def close(self) -> None:
        """Close the underlying client connection."""
        self.client.close()

    def __enter__(self) -> "RemotePool":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _target(self, suffix: str) -> str:
        return "/v0/pools/" + _quote_segment(self.name) + suffix

    def _fetch_json(self, method: str, suffix: str, document=None, seq=None, **raw_body):
        try:
            return self.client.fetch_json(method, self._target(suffix), document, **raw_body)
        except PlasmiteError as err:
            err.path = self.name
            if seq is not None:
                err.seq = seq
            raise

    # -- reading and writing --------------------------------------------------

    def info(self) -> dict:
        """Return the pool info (``pool info --json`` shape; ``path`` is the server's)."""
        return _response_field(self._fetch_json("GET", "/info"), "pool")

    def append(self, data, tags=(), durability="fast") -> dict:
        """Append ``data`` (a dict) with tags; return the committed message as the server echoes it.

        ``durability`` "flush" asks the server to flush; anything else is fast.
        Non-object data is rejected by the server: Usage "data must be object".
        """
        document = {"data": data, "durability": "flush" if durability == "flush" else "fast",
                    "tags": list(tags)}
        return _response_field(self._fetch_json("POST", "/append", document), "message")

    def append_lite3(self, payload, durability="fast") -> dict:
        """Append a Lite3 message payload as is; return the stored message.

        An invalid payload is refused by the server with Corrupt.
        """
        suffix = "/append_lite3" + ("?durability=flush" if durability == "flush" else "")
        document = self._fetch_json("POST", suffix, body=bytes(payload),
                                    content_type=LITE3_CONTENT_TYPE)
        return _response_field(document, "message")

    def get(self, seq: int) -> dict:
        """Return message ``seq``; NotFound "message not found" when it is not stored."""
        return _response_field(self._fetch_json("GET", "/messages/%d" % seq, seq=seq), "message")

    def get_lite3(self, seq: int) -> bytes:
        """Return the stored Lite3 payload of message ``seq`` (Corrupt if it is invalid)."""
        try:
            _response, payload = self.client.fetch("GET", self._target("/messages/%d/lite3" % seq))
        except PlasmiteError as err:
            err.path = self.name
            err.seq = seq
            raise
        return payload

    def _open_stream(self, suffix: str, since_seq, timeout_ms, max_messages, tags):
        from urllib.parse import urlencode

        query = [(name, str(int(value))) for name, value in (
            ("since_seq", since_seq), ("max", max_messages), ("timeout_ms", timeout_ms))
            if value is not None]
        query += [("tag", tag) for tag in tags]
        target = self._target(suffix) + ("?" + urlencode(query) if query else "")
        read_timeout = None if timeout_ms is None else timeout_ms / 1000 + REMOTE_READ_TIMEOUT
        try:
            return self.client.open_stream(target, read_timeout)
        except PlasmiteError as err:
            err.path = self.name
            raise

    def tail(self, since_seq=None, timeout_ms=None, max_messages=None, tags=()):
        """Stream messages (``GET .../tail``); return an iterator of message dicts.

        The request is sent now (so a refused stream raises here); the
        iterator ends when the server ends the stream (``max_messages``
        delivered, or ``timeout_ms`` after the request; the server's limit
        when None).  Without ``since_seq`` the server starts at the oldest
        message.  Iterating raises Io "failed to read tail stream" for a
        broken stream and Internal "invalid tail message json" for a bad line.
        """
        response = self._open_stream("/tail", since_seq, timeout_ms, max_messages, tags)
        return self._messages(response)

    def _messages(self, response):
        for line in self.client.read_stream(response):
            try:
                message = parse_json_value(line)
            except PlasmiteError:
                message = None
            if not isinstance(message, dict):
                raise PlasmiteError("Internal", "invalid tail message json", path=self.name)
            yield message

    def tail_lite3(self, since_seq=None, timeout_ms=None, max_messages=None, tags=()):
        """Stream raw messages (``GET .../tail_lite3``); return an iterator of Frame tuples.

        Same arguments and endings as :meth:`tail`; frames carry seq,
        timestamp_ns and the stored Lite3 payload.
        """
        response = self._open_stream("/tail_lite3", since_seq, timeout_ms, max_messages, tags)
        return self.client.read_frames(response)


def list_remote_pools(base_url: str, token=None, ca_file=None) -> list:
    """Return the pools a server offers (``GET /v0/pools``), as pool info dicts sorted by name."""
    with RemoteClient(base_url, token, ca_file) as client:
        pools = client.list_pools()
    if not all(isinstance(entry, dict) for entry in pools):
        raise PlasmiteError("Internal", "invalid response json")
    return sorted(pools, key=lambda entry: str(entry.get("name", "")))


# =============================================================================
# 10. Server and web UI
# =============================================================================
# ``pls serve``: validated options (ServeConfig), ``serve check``/``serve init``
# documents, TLS loading, and a ThreadingHTTPServer speaking HTTP protocol v0
# (remote.md 5-7) over LocalPool: a dict of small route functions, one
# try/except boundary per request, bearer auth, access modes, limits, JSONL /
# Lite3 / SSE streams.  http.server, ssl and socket are imported lazily.

# -- self-signed TLS certificate ----------------------------------------------
# Python's ssl module can load a certificate but not make one, so this part mints
# the one upstream makes with rcgen (spec/remote.md 2.2): ECDSA over NIST P-256 with
# Python ints (SEC 1, FIPS 186-4, deterministic nonces of RFC 6979), a small DER
# writer (X.690) and an X.509 v3 certificate (RFC 5280).  hashlib, hmac, ipaddress
# and secrets are imported only when a certificate is made (secrets alone costs
# about 7 ms of import time), so `import plasmite` does not pay for them.

# NIST P-256 (SEC 2 2.4.2, FIPS 186-4 D.1.2.3): the curve y^2 = x^3 - 3x + b over
# the integers modulo a prime, and a generator point of prime order (cofactor 1,
# so every point but infinity has that order).  The doubling formula below relies
# on the coefficient a being -3.
_P256_PRIME = 2**256 - 2**224 + 2**192 + 2**96 - 1
_P256_B = 0x5AC635D8AA3A93E7B3EBBD55769886BC651D06B0CC53B0F63BCE3C3E27D2604B
_P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
_P256_GENERATOR = (0x6B17D1F2E12C4247F8BCE6E563A440F277037D812DEB33A0F4A13945D898C296,
                   0x4FE342E2FE1A7F9B8EE7EB4A7C0F9E162BCE33576B315ECECBB6406837BF51F5)
_P256_SCALAR_BYTES = 32  # field elements and scalars are both 256 bits long

# A Jacobian point (x, y, z) stands for the affine point (x/z^2, y/z^3), which lets
# additions and doublings skip the modular inverse; z == 0 is the point at infinity.
# Coordinate names follow the formulas of the Explicit-Formulas Database.
_INFINITY = (1, 1, 0)

# Object identifiers, in dotted form; _der_object_identifier encodes them.
_OID_COMMON_NAME = "2.5.4.3"  # X.520
_OID_SUBJECT_ALT_NAME = "2.5.29.17"  # RFC 5280 4.2.1.6
_OID_BASIC_CONSTRAINTS = "2.5.29.19"  # RFC 5280 4.2.1.9
_OID_EC_PUBLIC_KEY = "1.2.840.10045.2.1"  # RFC 5480 2.1.1
_OID_PRIME256V1 = "1.2.840.10045.3.1.7"  # RFC 5480 2.1.1.1 (secp256r1)
_OID_ECDSA_WITH_SHA256 = "1.2.840.10045.4.3.2"  # RFC 5758 3.2

# DER tags (X.690 8.1.2): one byte each here; bit 0x20 marks a constructed value,
# and 0x80 / 0xA0 start the context-specific tags [0], [1], ... used by X.509.
_TAG_BOOLEAN = 0x01
_TAG_INTEGER = 0x02
_TAG_BIT_STRING = 0x03
_TAG_OCTET_STRING = 0x04
_TAG_OBJECT_IDENTIFIER = 0x06
_TAG_UTF8_STRING = 0x0C
_TAG_UTC_TIME = 0x17
_TAG_GENERALIZED_TIME = 0x18
_TAG_SEQUENCE = 0x30
_TAG_SET = 0x31
_TAG_CONTEXT_PRIMITIVE = 0x80  # IMPLICIT [n] of a primitive type: tag is 0x80 | n
_TAG_CONTEXT_CONSTRUCTED = 0xA0  # EXPLICIT [n]: tag is 0xA0 | n

# What upstream's rcgen certificate carries (spec/remote.md 2.2).
_CERTIFICATE_COMMON_NAME = "rcgen self signed cert"
_CERTIFICATE_NOT_BEFORE = (1975, 1, 1)
_CERTIFICATE_NOT_AFTER = (4096, 1, 1)
_CERTIFICATE_DNS_NAMES = ("localhost",)
_CERTIFICATE_IP_ADDRESSES = ("127.0.0.1", "::1")
_SERIAL_NUMBER_BITS = 159  # RFC 5280 4.1.2.2: positive and at most 20 octets, sign bit included
_PEM_LINE_CHARACTERS = 64  # RFC 7468 2: base64 lines of exactly 64 characters but the last


# -- P-256 arithmetic and ECDSA --


def _double_point(point: tuple) -> tuple:
    """Return 2*point for a Jacobian point on P-256 (formula dbl-2001-b, a = -3).

    Needs no special case: z3 = 2*y1*z1, so infinity (z1 == 0) doubles to infinity.
    """
    x1, y1, z1 = point
    prime = _P256_PRIME
    delta = z1 * z1 % prime
    gamma = y1 * y1 % prime
    beta = x1 * gamma % prime
    alpha = 3 * (x1 - delta) * (x1 + delta) % prime
    x3 = (alpha * alpha - 8 * beta) % prime
    z3 = ((y1 + z1) * (y1 + z1) - gamma - delta) % prime
    y3 = (alpha * (4 * beta - x3) - 8 * gamma * gamma) % prime
    return x3, y3, z3


def _add_points(point: tuple, other: tuple) -> tuple:
    """Return point + other for two Jacobian points on P-256 (formula add-1998-cmo-2).

    The formula breaks down when the two affine points share an x coordinate, so
    that case becomes a doubling (same point) or infinity (a point and its negation).
    """
    x1, y1, z1 = point
    x2, y2, z2 = other
    if z1 == 0:
        return other
    if z2 == 0:
        return point
    prime = _P256_PRIME
    z1_squared = z1 * z1 % prime
    z2_squared = z2 * z2 % prime
    u1 = x1 * z2_squared % prime  # both x coordinates over the common denominator
    u2 = x2 * z1_squared % prime
    s1 = y1 * z2 * z2_squared % prime  # both y coordinates over the common denominator
    s2 = y2 * z1 * z1_squared % prime
    if u1 == u2:
        return _double_point(point) if s1 == s2 else _INFINITY
    u_difference = (u2 - u1) % prime
    s_difference = (s2 - s1) % prime
    u_difference_squared = u_difference * u_difference % prime
    u_difference_cubed = u_difference * u_difference_squared % prime
    u1_scaled = u1 * u_difference_squared % prime
    x3 = (s_difference * s_difference - u_difference_cubed - 2 * u1_scaled) % prime
    y3 = (s_difference * (u1_scaled - x3) - s1 * u_difference_cubed) % prime
    z3 = z1 * z2 * u_difference % prime
    return x3, y3, z3


def _multiply_point(scalar: int, point: tuple = _P256_GENERATOR) -> tuple:
    """Return scalar*point as an affine (x, y) pair; point is affine and on P-256.

    scalar must be in [1, order - 1], which keeps the result away from infinity.
    Plain double-and-add, so the running time depends on the scalar's bits: Python
    ints are not constant-time anyway, and a key made and used once on the local
    machine gives no one a timing oracle to query.
    """
    result = _INFINITY
    addend = (point[0], point[1], 1)
    for bit in bin(scalar)[2:]:
        result = _double_point(result)
        if bit == "1":
            result = _add_points(result, addend)
    x, y, z = result
    z_inverse = pow(z, -1, _P256_PRIME)
    z_inverse_squared = z_inverse * z_inverse % _P256_PRIME
    return (x * z_inverse_squared % _P256_PRIME,
            y * z_inverse_squared * z_inverse % _P256_PRIME)


def _generate_key_pair() -> tuple:
    """Return a fresh P-256 key pair: (private scalar, public affine point).

    The private scalar is uniform in [1, order - 1], drawn from the OS random source.
    """
    import secrets

    private_scalar = secrets.randbelow(_P256_ORDER - 1) + 1
    return private_scalar, _multiply_point(private_scalar)


def _generate_nonces(private_scalar: int, digest: bytes):
    """Yield ECDSA nonces for signing a SHA-256 digest, as RFC 6979 3.2 derives them.

    The nonces are HMAC-SHA-256 outputs keyed by the private scalar and the digest,
    so a weak or repeated random source can never make two signatures share a nonce
    (which would reveal the key).  P-256's order and SHA-256 are both 256 bits long,
    so bits2int is a plain big-endian read and bits2octets one reduction modulo the
    order.  Yields candidates in [1, order - 1] for as long as the caller asks.
    """
    import hmac

    order = _P256_ORDER
    seed = (private_scalar.to_bytes(_P256_SCALAR_BYTES, "big")
            + (int.from_bytes(digest, "big") % order).to_bytes(_P256_SCALAR_BYTES, "big"))
    # hmac_key and state are K and V of the RFC (steps b-g).
    state = b"\x01" * 32
    hmac_key = hmac.digest(b"\x00" * 32, state + b"\x00" + seed, "sha256")
    state = hmac.digest(hmac_key, state, "sha256")
    hmac_key = hmac.digest(hmac_key, state + b"\x01" + seed, "sha256")
    state = hmac.digest(hmac_key, state, "sha256")
    while True:  # step h: one HMAC output is exactly one 256-bit candidate
        state = hmac.digest(hmac_key, state, "sha256")
        candidate = int.from_bytes(state, "big")
        if 1 <= candidate < order:
            yield candidate
        hmac_key = hmac.digest(hmac_key, state + b"\x00", "sha256")
        state = hmac.digest(hmac_key, state, "sha256")


def _sign_digest(private_scalar: int, digest: bytes) -> tuple:
    """Return the ECDSA signature (r, s) of a SHA-256 digest (FIPS 186-4 6.4).

    r and s are the two INTEGERs of ECDSA-Sig-Value (RFC 5480 2.2 names them so).
    s is not normalised to the lower half of the order: X.509 verifiers accept both
    halves, and RFC 6979's test vectors keep the raw value.
    """
    order = _P256_ORDER
    digest_number = int.from_bytes(digest, "big")  # a 256-bit digest needs no truncation
    for nonce in _generate_nonces(private_scalar, digest):
        r = _multiply_point(nonce)[0] % order
        s = pow(nonce, -1, order) * (digest_number + r * private_scalar) % order
        if r != 0 and s != 0:  # RFC 6979 3.2 h.3: otherwise take the next nonce
            return r, s


# -- DER encoding (X.690) --
# Each function returns one complete TLV: tag, length, contents.


def _der(tag: int, contents: bytes) -> bytes:
    """Return a DER value: tag byte, definite length (short or long form), contents."""
    length = len(contents)
    if length < 0x80:
        return bytes((tag, length)) + contents
    length_bytes = length.to_bytes((length.bit_length() + 7) // 8, "big")
    return bytes((tag, 0x80 | len(length_bytes))) + length_bytes + contents


def _der_integer(number: int) -> bytes:
    """Return a non-negative INTEGER in the fewest octets that keep its sign bit clear."""
    return _der(_TAG_INTEGER, number.to_bytes(number.bit_length() // 8 + 1, "big"))


def _der_bit_string(contents: bytes) -> bytes:
    """Return a BIT STRING of whole octets (the leading octet counts 0 unused bits)."""
    return _der(_TAG_BIT_STRING, b"\x00" + contents)


def _der_octet_string(contents: bytes) -> bytes:
    """Return an OCTET STRING."""
    return _der(_TAG_OCTET_STRING, contents)


def _der_object_identifier(dotted: str) -> bytes:
    """Return an OBJECT IDENTIFIER from its dotted form, such as "2.5.4.3".

    The first two arcs share one subidentifier (40 * first + second); each
    subidentifier is base 128, most significant group first, with the high bit set
    on every byte but its last (X.690 8.19).
    """
    arcs = [int(arc) for arc in dotted.split(".")]
    encoded = bytearray()
    for subidentifier in [40 * arcs[0] + arcs[1]] + arcs[2:]:
        groups = [subidentifier & 0x7F]
        subidentifier >>= 7
        while subidentifier:
            groups.append(0x80 | (subidentifier & 0x7F))
            subidentifier >>= 7
        encoded.extend(reversed(groups))
    return _der(_TAG_OBJECT_IDENTIFIER, bytes(encoded))


def _der_time(year: int, month: int, day: int) -> bytes:
    """Return midnight UTC of a date as a certificate Time.

    RFC 5280 4.1.2.5: UTCTime (two-digit year) for 1950 through 2049, GeneralizedTime
    (four-digit year) from 2050 on; both end in "Z" and always carry seconds.
    """
    if 1950 <= year < 2050:
        return _der(_TAG_UTC_TIME, b"%02d%02d%02d000000Z" % (year % 100, month, day))
    return _der(_TAG_GENERALIZED_TIME, b"%04d%02d%02d000000Z" % (year, month, day))


def _der_sequence(*elements: bytes) -> bytes:
    """Return a SEQUENCE of already encoded elements, in the order given."""
    return _der(_TAG_SEQUENCE, b"".join(elements))


def _der_set(*elements: bytes) -> bytes:
    """Return a SET of already encoded elements.

    DER sorts the elements of a SET OF; callers here pass a single element.
    """
    return _der(_TAG_SET, b"".join(elements))


def _der_explicit(number: int, element: bytes) -> bytes:
    """Return an EXPLICIT [number] tag wrapped around one encoded element."""
    return _der(_TAG_CONTEXT_CONSTRUCTED | number, element)


# -- the certificate and key --


def _encode_extension(oid: str, value: bytes, *, is_critical: bool = False) -> bytes:
    """Return an X.509 Extension: its OID, the critical flag, the DER value it wraps.

    DER leaves out a field equal to its DEFAULT, so a non-critical extension has no
    BOOLEAN at all (RFC 5280 4.1: ``critical BOOLEAN DEFAULT FALSE``).
    """
    critical_flag = _der(_TAG_BOOLEAN, b"\xff") if is_critical else b""
    return _der_sequence(_der_object_identifier(oid), critical_flag, _der_octet_string(value))


def _encode_public_key(public_point: tuple) -> bytes:
    """Return a public point in SEC 1 2.3.3 uncompressed form: 0x04, x, y (32 bytes each)."""
    x, y = public_point
    return (b"\x04" + x.to_bytes(_P256_SCALAR_BYTES, "big")
            + y.to_bytes(_P256_SCALAR_BYTES, "big"))


def _encode_signature(signature: tuple) -> bytes:
    """Return ECDSA-Sig-Value, SEQUENCE { r INTEGER, s INTEGER } (RFC 5480 2.2)."""
    r, s = signature
    return _der_sequence(_der_integer(r), _der_integer(s))


def _encode_certificate(private_scalar: int, public_point: tuple, packed_ip_addresses: list,
                        serial_number: int) -> bytes:
    """Return the DER of the self-signed X.509 v3 certificate (RFC 5280 4.1).

    packed_ip_addresses holds the 4- or 16-byte iPAddress names that follow the DNS
    names in subjectAltName.  Only two extensions are present:

    * subjectAltName, non-critical because the subject is not empty (4.2.1.6).
    * basicConstraints with cA false, critical: it tells verifiers that honour it
      that a certificate signed by this key is not to be trusted, even though this
      certificate itself is (4.2.1.9 allows it in end-entity certificates).

    OpenSSL 3.0 (under Python's ssl and curl) takes a self-signed certificate found
    in the CAfile as a chain of one, and needs no key identifier extensions for it.
    Tried with OpenSSL 3.0.19 (`openssl verify -x509_strict`, Python 3.8, 3.11 and
    3.13 clients, the last with X509_V_FLAG_X509_STRICT on by default): this shape,
    no extensions but subjectAltName (upstream's rcgen shape), basicConstraints
    cA true, and keyUsage digitalSignature all pass; keyUsage keyCertSign without
    basicConstraints fails the strict check ("invalid CA certificate"), so there
    is no keyUsage here.
    """
    import hashlib

    signature_algorithm = _der_sequence(_der_object_identifier(_OID_ECDSA_WITH_SHA256))
    name = _der_sequence(_der_set(_der_sequence(
        _der_object_identifier(_OID_COMMON_NAME),
        _der(_TAG_UTF8_STRING, _CERTIFICATE_COMMON_NAME.encode("utf-8")))))
    # GeneralName (RFC 5280 4.2.1.6): dNSName is IMPLICIT [2] IA5String and
    # iPAddress IMPLICIT [7] OCTET STRING.
    alternative_names = [_der(_TAG_CONTEXT_PRIMITIVE | 2, dns_name.encode("ascii"))
                         for dns_name in _CERTIFICATE_DNS_NAMES]
    alternative_names += [_der(_TAG_CONTEXT_PRIMITIVE | 7, packed)
                          for packed in packed_ip_addresses]
    extensions = [
        _encode_extension(_OID_SUBJECT_ALT_NAME, _der_sequence(*alternative_names)),
        _encode_extension(_OID_BASIC_CONSTRAINTS, _der_sequence(), is_critical=True),
    ]
    to_be_signed = _der_sequence(
        _der_explicit(0, _der_integer(2)),  # version: 2 means v3
        _der_integer(serial_number),
        signature_algorithm,
        name,  # issuer
        _der_sequence(_der_time(*_CERTIFICATE_NOT_BEFORE), _der_time(*_CERTIFICATE_NOT_AFTER)),
        name,  # subject: the same, which is what makes the certificate self-issued
        _der_sequence(
            _der_sequence(_der_object_identifier(_OID_EC_PUBLIC_KEY),
                          _der_object_identifier(_OID_PRIME256V1)),
            _der_bit_string(_encode_public_key(public_point))),
        _der_explicit(3, _der_sequence(*extensions)),
    )
    signature = _sign_digest(private_scalar, hashlib.sha256(to_be_signed).digest())
    return _der_sequence(to_be_signed, signature_algorithm,
                         _der_bit_string(_encode_signature(signature)))


def _encode_private_key(private_scalar: int, public_point: tuple) -> bytes:
    """Return the DER of an unencrypted PKCS#8 PrivateKeyInfo (RFC 5208 5, RFC 5958 2).

    The algorithm identifier names the curve, so the wrapped SEC 1 ECPrivateKey
    (RFC 5915 3) leaves out its own [0] parameters and keeps the [1] public key, as
    RFC 5915 recommends.  The private key is a fixed 32-byte octet string.
    """
    ec_private_key = _der_sequence(
        _der_integer(1),  # ecPrivkeyVer1
        _der_octet_string(private_scalar.to_bytes(_P256_SCALAR_BYTES, "big")),
        _der_explicit(1, _der_bit_string(_encode_public_key(public_point))),
    )
    return _der_sequence(
        _der_integer(0),  # PKCS#8 v1
        _der_sequence(_der_object_identifier(_OID_EC_PUBLIC_KEY),
                      _der_object_identifier(_OID_PRIME256V1)),
        _der_octet_string(ec_private_key),
    )


def _encode_pem(label: str, der: bytes) -> str:
    """Return DER as a PEM block: the BEGIN line, 64-character base64 lines, the END line."""
    text = binascii.b2a_base64(der, newline=False).decode("ascii")
    lines = [text[start:start + _PEM_LINE_CHARACTERS]
             for start in range(0, len(text), _PEM_LINE_CHARACTERS)]
    return "-----BEGIN %s-----\n%s\n-----END %s-----\n" % (label, "\n".join(lines), label)


def _pack_ip_addresses(extra_ip_addresses) -> list:
    """Return the packed iPAddress names of the certificate, fixed ones first.

    Leaves out unspecified addresses (0.0.0.0, ::), which name no host, and repeats.
    Raises PlasmiteError Usage for a value that is not a literal IP address.
    """
    import ipaddress

    packed_addresses = []
    for value in _CERTIFICATE_IP_ADDRESSES + tuple(extra_ip_addresses):
        try:
            address = ipaddress.ip_address(value)
        except ValueError as err:
            raise PlasmiteError(
                "Usage", "invalid IP address for the TLS certificate",
                hint="Use a literal IPv4 or IPv6 address like 127.0.0.1 or ::1.",
                causes=[str(err)]) from err
        if not address.is_unspecified and address.packed not in packed_addresses:
            packed_addresses.append(address.packed)
    return packed_addresses


def generate_self_signed_certificate(extra_ip_addresses=()) -> tuple[str, str]:
    """Make a new key and a self-signed TLS certificate; return (certificate PEM, key PEM).

    The certificate matches upstream's rcgen one in everything a client checks
    (spec/remote.md 2.2): ECDSA P-256 with SHA-256, subject and issuer
    CN=rcgen self signed cert, valid from 1975-01-01 to 4096-01-01, a random serial,
    and the subject alternative names DNS:localhost, IP:127.0.0.1 and IP:::1, then
    each of ``extra_ip_addresses`` (strings or ipaddress objects; callers pass the
    bind IP).  Unspecified addresses (0.0.0.0, ::) and repeats are left out.  The key
    PEM is an unencrypted PKCS#8 "PRIVATE KEY".  A client that trusts the certificate
    itself (``curl --cacert``, PLASMITE_CA_FILE) reaches the server by any of those
    names.

    Raises PlasmiteError Usage if an extra address is not a literal IP address.
    Touches no files, reads the OS random source, takes a few milliseconds of CPU,
    and is safe to call from several threads at once.
    """
    import secrets

    packed_ip_addresses = _pack_ip_addresses(extra_ip_addresses)
    private_scalar, public_point = _generate_key_pair()
    serial_number = secrets.randbelow(2**_SERIAL_NUMBER_BITS - 1) + 1
    certificate = _encode_certificate(private_scalar, public_point, packed_ip_addresses,
                                      serial_number)
    private_key = _encode_private_key(private_scalar, public_point)
    return _encode_pem("CERTIFICATE", certificate), _encode_pem("PRIVATE KEY", private_key)


DEFAULT_BIND = "127.0.0.1:9700"
DEFAULT_INIT_BIND = "0.0.0.0:9700"
DEFAULT_MAX_BODY_BYTES = 1048576
DEFAULT_MAX_TAIL_TIMEOUT_MS = 30000
DEFAULT_MAX_TAIL_CONCURRENCY = 64
ACCESS_MODES = ("read-only", "write-only", "read-write")
SERVE_INIT_ARTIFACTS = ("serve-token.txt", "serve-cert.pem", "serve-key.pem")
BIND_HINT = "Use a host:port value like 127.0.0.1:9700."
INIT_BIND_HINT = "Use a host:port value like 0.0.0.0:9700."
SERVE_INIT_HINT = ("Run `plasmite serve init` for cert/key artifacts, or use --tls-cert/--tls-key, "
                   "--tls-self-signed, or --insecure-no-tls.")

# Time limits that keep a slow or silent client from holding a thread:
REQUEST_TIMEOUT_SECONDS = 30.0  # head and body, from a request's first byte
IDLE_TIMEOUT_SECONDS = 60.0  # a kept-alive connection waiting for its next request
SEND_TIMEOUT_SECONDS = 30.0  # one write to a client that stopped reading
SHUTDOWN_GRACE_SECONDS = 10.0  # in-flight requests get this long after SIGINT/SIGTERM
STREAM_CHECK_SECONDS = 0.5  # a waiting tail checks for shutdown and a vanished client
MAX_DRAINED_BODY_BYTES = 64 * 1024 * 1024  # an oversized body is read and dropped up to this
# A request's header lines together (http.server alone allows 100 lines of 64 KiB
# each, so a client that stalls before the blank line could hold 6.5 MB, and about
# three times that once parsed, per connection: 30 such clients took the server
# from 44 MB to 520 MB of RSS; issue 6, item 5).  Browsers send a few KiB.
MAX_HEAD_BYTES = 64 * 1024
MAX_FILE_NAME_BYTES = 255  # NAME_MAX of Linux, macOS and the BSDs

VERSION_HEADER = ("plasmite-version", "0")
JSON_CONTENT_TYPE = "application/json"
TEXT_CONTENT_TYPE = "text/plain; charset=utf-8"
HTML_CONTENT_TYPE = "text/html; charset=utf-8"

# Error kind -> HTTP status (remote.md 5.2).  Permission is 403 only for the
# access-mode errors, whose message starts with "forbidden:".
ERROR_STATUSES = {"Usage": 400, "NotFound": 404, "AlreadyExists": 409, "Busy": 423,
                  "Permission": 401, "Corrupt": 500, "Io": 500, "Internal": 500}

_BIND_PATTERN = r"(?:\[([^\]]*)\]|([0-9.]+)):([0-9]+)"
_SHELL_SAFE = r"[A-Za-z0-9/_\-.:=]*"
_PEM_BLOCK = rb"(?s)-----BEGIN ([A-Z0-9 ]+)-----(.*?)-----END \1-----"
_CHUNK_SIZE = LazyPattern(rb"[0-9A-Fa-f]{1,16}")  # at most 2**64 - 1, as upstream's u64
_PRIVATE_KEY_LABELS = (b"PRIVATE KEY", b"RSA PRIVATE KEY", b"EC PRIVATE KEY")
# Log text escapes control characters (and backslashes), as http.server does.
_LOG_ESCAPES = {code: "\\x%02x" % code for code in list(range(0x20)) + list(range(0x7F, 0xA0))}
_LOG_ESCAPES[ord("\\")] = "\\\\"
_LOG_LEVELS = {"error": 0, "warn": 1, "info": 2, "debug": 3}


# -- configuration ------------------------------------------------------------

def parse_bind_address(text: str, hint: str = BIND_HINT) -> tuple:
    """Parse a literal ``IP:PORT`` (``[v6]:PORT`` for IPv6); return (ip_address, port).

    Host names are refused, as upstream's SocketAddr parser does.  Raises
    PlasmiteError Usage "invalid bind address" with ``hint``.
    """
    import ipaddress

    match = re.fullmatch(_BIND_PATTERN, text)
    try:
        if match is None or int(match.group(3)) > 65535:
            raise ValueError(text)
        if match.group(1) is not None:
            address = ipaddress.IPv6Address(match.group(1))
        else:
            address = ipaddress.IPv4Address(match.group(2))
    except ValueError:
        raise PlasmiteError("Usage", "invalid bind address", hint=hint) from None
    return address, int(match.group(3))


def _url_host(address) -> str:
    """The host to put in URLs for a bind address: unspecified becomes loopback."""
    if address.version == 6:
        return "[::1]" if address.is_unspecified else "[%s]" % address.compressed
    return "127.0.0.1" if address.is_unspecified else str(address)


def _is_loopback(address) -> bool:
    # Only ::1 for IPv6: a v4-mapped ::ffff:127.0.0.1 counts as non-loopback
    # (Python 3.13's is_loopback says otherwise, upstream does not).
    if address.version == 6:
        return address.packed == b"\0" * 15 + b"\1"
    return address.is_loopback


class ServeConfig:
    """The validated options of ``serve`` and ``serve check`` (remote.md 2 and 2.1).

    ``directory`` is the pool directory (never created by the server).  The
    constructor applies upstream's twelve checks in order and raises the
    first failure as PlasmiteError Usage with upstream's message and hint; it
    reads the token file but no TLS file.  Attributes: ``bind`` (as given),
    ``address``/``port``, ``token``, ``token_source`` (None, "--token" or
    "--token-file"), ``tls_mode`` ("disabled", "enabled", "self-signed"),
    ``tls_cert``/``tls_key``, ``access``, the three limits, and the
    connection time limits (seconds; not command-line options).
    """

    def __init__(self, directory, bind: str = DEFAULT_BIND, token=None, token_file=None,
                 allow_non_loopback: bool = False, insecure_no_tls: bool = False,
                 tls_cert=None, tls_key=None, tls_self_signed: bool = False,
                 access: str = "read-write", max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
                 max_tail_timeout_ms: int = DEFAULT_MAX_TAIL_TIMEOUT_MS,
                 max_tail_concurrency: int = DEFAULT_MAX_TAIL_CONCURRENCY):
        if access not in ACCESS_MODES:
            raise PlasmiteError("Usage", "invalid access mode",
                                hint="Use read-only, write-only or read-write.")
        self.directory = os.fspath(directory)
        self.bind = bind
        self.address, self.port = parse_bind_address(bind)
        if token is not None and token_file is not None:
            raise PlasmiteError("Usage", "--token cannot be combined with --token-file",
                                hint="Use --token for dev, or run `plasmite serve init` and use "
                                     "the generated --token-file for safer deployments.")
        self.token_source = None
        if token_file is not None:
            token = self._read_token_file(token_file)
            self.token_source = "--token-file"
        elif token is not None:
            self.token_source = "--token"
        self.token = token
        self.is_loopback = _is_loopback(self.address)
        if not self.is_loopback and not allow_non_loopback:
            raise PlasmiteError("Usage", "non-loopback bind requires explicit opt-in",
                                hint="Re-run with --allow-non-loopback or use a loopback address.")
        if (tls_cert is None) != (tls_key is None):
            raise PlasmiteError("Usage", "TLS requires both --tls-cert and --tls-key",
                                hint="Provide both paths or run `plasmite serve init` to generate "
                                     "matching TLS artifacts.")
        if tls_self_signed and tls_cert is not None:
            raise PlasmiteError("Usage", "--tls-self-signed cannot be combined with "
                                "--tls-cert/--tls-key",
                                hint="Use either --tls-self-signed or provide certificate paths; "
                                     "`plasmite serve init` can generate cert/key files.")
        for name, value, example in (("--max-body-bytes", max_body_bytes, 1048576),
                                     ("--max-tail-timeout-ms", max_tail_timeout_ms, 30000),
                                     ("--max-tail-concurrency", max_tail_concurrency, 64)):
            if value <= 0:
                raise PlasmiteError("Usage", "%s must be greater than zero" % name,
                                    hint="Use a positive value like %d." % example)
        self.tls_cert, self.tls_key = tls_cert, tls_key
        self.tls_mode = ("self-signed" if tls_self_signed else
                         "enabled" if tls_cert is not None else "disabled")
        self.access = access
        if not self.is_loopback and self.allows("write"):
            if self.token_source != "--token-file":
                raise PlasmiteError(
                    "Usage", "non-loopback write requires --token-file",
                    hint="Run `plasmite serve init` and use the generated --token-file for "
                         "non-loopback write access.")
            if self.tls_mode == "disabled" and not insecure_no_tls:
                raise PlasmiteError("Usage", "non-loopback write requires TLS",
                                    hint=SERVE_INIT_HINT)
        self.max_body_bytes = max_body_bytes
        self.max_tail_timeout_ms = max_tail_timeout_ms
        self.max_tail_concurrency = max_tail_concurrency
        self.request_timeout = REQUEST_TIMEOUT_SECONDS
        self.idle_timeout = IDLE_TIMEOUT_SECONDS
        self.send_timeout = SEND_TIMEOUT_SECONDS

    @staticmethod
    def _read_token_file(path) -> str:
        try:
            with open(path, encoding="utf-8") as token_file:
                token = token_file.read().strip()
        except (OSError, UnicodeDecodeError) as err:
            cause = describe_os_error(err) if isinstance(err, OSError) else \
                "stream did not contain valid UTF-8"
            raise PlasmiteError("Usage", "failed to read token file", path=path,
                                causes=[cause]) from err
        if not token:
            raise PlasmiteError("Usage", "token file is empty", path=path)
        return token

    def allows(self, operation: str) -> bool:
        """True if the access mode permits ``operation`` ("read" or "write")."""
        return self.access == "read-write" or self.access == operation + "-only"

    @property
    def scheme(self) -> str:
        return "http" if self.tls_mode == "disabled" else "https"

    @property
    def base_url(self) -> str:
        """``scheme://host:port`` as clients should use it (unspecified binds show loopback)."""
        return "%s://%s:%d" % (self.scheme, _url_host(self.address), self.port)


def serve_check_document(config: ServeConfig) -> dict:
    """Return the ``serve check`` document: ``{"check": {...}}`` (remote.md 4.1)."""
    auth = {None: "none", "--token": "bearer token (--token)",
            "--token-file": "bearer token (--token-file)"}[config.token_source]
    return {"check": {
        "access": config.access, "auth": auth, "base_url": config.base_url,
        "limits": {"max_body_bytes": config.max_body_bytes,
                   "max_tail_concurrency": config.max_tail_concurrency,
                   "max_tail_timeout_ms": config.max_tail_timeout_ms},
        "listen": config.bind, "status": "valid", "tls": config.tls_mode,
        "web_ui": config.base_url + "/ui", "web_ui_pool": config.base_url + "/ui/pools/demo"}}


def _auth_line(config: ServeConfig) -> str:
    if config.token_source is None:
        return "auth: none"
    return "auth: bearer token (from %s; value not shown)" % config.token_source


def _endpoint_lines(config: ServeConfig) -> list:
    return ["  listen: " + config.bind, "  base_url: " + config.base_url,
            "  web_ui: %s/ui" % config.base_url,
            "  web_ui_pool: %s/ui/pools/demo" % config.base_url,
            "  " + _auth_line(config), "  tls: " + config.tls_mode, "  access: " + config.access]


def render_serve_check(config: ServeConfig) -> str:
    """Return the terminal form of ``serve check`` (remote.md 4.1), ending in an empty line."""
    lines = ["plasmite serve check", "  status: valid"] + _endpoint_lines(config)
    lines.append("  limits: body=%dB tail_timeout=%dms tail_concurrency=%d" % (
        config.max_body_bytes, config.max_tail_timeout_ms, config.max_tail_concurrency))
    if config.address.is_unspecified:
        lines.append("note: listening on all interfaces; remote clients must use your host IP or "
                     "DNS name.")
    if config.tls_mode == "self-signed":
        lines.append("note: self-signed TLS; clients must trust the generated cert")
    return "\n".join(lines) + "\n\n"


def render_serve_banner(config: ServeConfig) -> str:
    """Return the startup banner ``serve`` prints on a terminal (remote.md 3.1).

    The token is never printed: the curl examples carry a ``<token>`` placeholder.
    """
    insecure = " -k" if config.tls_mode == "self-signed" else ""
    auth = " -H 'Authorization: Bearer <token>'" if config.token is not None else ""
    lines = ["plasmite serve"] + _endpoint_lines(config) + ["  stop: press Ctrl-C", "try:"]
    lines.append("  curl%s -sS -X POST%s -H 'content-type: application/json' --data "
                 "'{\"hello\":\"world\"}' '%s/v0/pools/demo/append'"
                 % (insecure, auth, config.base_url))
    lines.append("  curl%s -N -sS%s '%s/v0/pools/demo/tail?timeout_ms=5000'"
                 % (insecure, auth, config.base_url))
    if config.token_source == "--token-file":
        lines.append("note: the token value is not printed; read it from your token file")
    if config.tls_mode == "self-signed":
        lines.append("note: self-signed TLS; curl examples use -k for local testing")
    if config.address.is_unspecified:
        lines.append("note: listening on all interfaces; remote clients must use your host IP or "
                     "DNS name (not 127.0.0.1).")
    return "\n".join(lines) + "\n\n"


# -- serve init ---------------------------------------------------------------

def shell_quote(text: str) -> str:
    """Quote for a POSIX shell only when needed, as upstream prints next commands."""
    if re.fullmatch(_SHELL_SAFE, text):
        return text
    return "'" + text.replace("'", "'\"'\"'") + "'"


def _comparable_path(path: str) -> tuple:
    """A path's components with "." and repeated slashes removed (Rust's Path equality)."""
    parts = [part for part in path.split("/") if part not in ("", ".")]
    return (path.startswith("/"),) + tuple(parts)


def _write_artifact(path: str, content, mode, message: str) -> None:
    """Write a serve init file; ``mode`` (when given) is forced, even on an existing file."""
    data = content.encode("utf-8") if isinstance(content, str) else bytes(content)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0),
                     0o666 if mode is None else mode)
        with os.fdopen(fd, "wb") as artifact:
            if mode is not None:
                os.fchmod(artifact.fileno(), mode)
            artifact.write(data)
    except OSError as err:
        raise PlasmiteError("Io", message, path=path, causes=[describe_os_error(err)]) from err


def serve_init(bind: str = DEFAULT_INIT_BIND, output_dir: str = ".",
               token_file: str = SERVE_INIT_ARTIFACTS[0], tls_cert: str = SERVE_INIT_ARTIFACTS[1],
               tls_key: str = SERVE_INIT_ARTIFACTS[2], should_force: bool = False) -> dict:
    """Write a token file and a self-signed certificate and key; return the init document.

    Relative artifact paths go under ``output_dir``, itself joined onto the
    working directory without normalising (upstream prints ``/cwd/./serve-token.txt``).
    The token is 32 random bytes as 64 lower-case hex digits plus a newline;
    the token and key files get mode 0600.  The certificate covers localhost,
    127.0.0.1, ::1 and the bind IP.  Returns ``{"init": {"artifact_paths":
    {...}, "next_commands": [...]}}`` (remote.md 4.2); the token is never in
    it.  Raises PlasmiteError Usage (bad bind, duplicate paths),
    AlreadyExists (without ``should_force``) or Io.
    """
    address, port = parse_bind_address(bind, INIT_BIND_HINT)
    base = os.path.join(os.getcwd(), output_dir)
    paths = [os.path.join(base, name) for name in (token_file, tls_cert, tls_key)]
    seen = set()
    for path in paths:
        key = _comparable_path(path)
        if key in seen:
            raise PlasmiteError("Usage", "serve init requires distinct artifact paths", path=path,
                                hint="Use different values for --token-file, --tls-cert, and "
                                     "--tls-key.")
        seen.add(key)
    if not should_force:
        for path in paths:
            if os.path.lexists(path):
                raise PlasmiteError("AlreadyExists", "serve init artifact already exists",
                                    path=path,
                                    hint="Re-run with --force to overwrite or choose different "
                                         "paths.")
    for path in paths:
        parent = os.path.dirname(path)
        try:
            os.makedirs(parent, exist_ok=True)
        except OSError as err:
            raise PlasmiteError("Io", "failed to create artifact directory", path=parent,
                                causes=[describe_os_error(err)]) from err
    extra_addresses = () if address.is_unspecified else (str(address),)
    cert_pem, key_pem = generate_self_signed_certificate(extra_ip_addresses=extra_addresses)
    token_path, cert_path, key_path = paths
    _write_artifact(token_path, os.urandom(32).hex() + "\n", 0o600, "failed to write token file")
    _write_artifact(cert_path, cert_pem, None, "failed to write TLS certificate")
    _write_artifact(key_path, key_pem, 0o600, "failed to write TLS key")
    base_url = "https://%s:%d" % (_url_host(address), port)
    auth = "-H 'Authorization: Bearer <token>'"
    commands = [
        "plasmite serve --bind %s --allow-non-loopback --token-file %s --tls-cert %s --tls-key %s"
        % (bind, shell_quote(token_path), shell_quote(cert_path), shell_quote(key_path)),
        "curl -k -sS -X POST %s -H 'content-type: application/json' "
        "--data '{\"hello\":\"world\"}' %s"
        % (auth, shell_quote(base_url + "/v0/pools/demo/append")),
        "curl -k -N -sS %s %s"
        % (auth, shell_quote(base_url + "/v0/pools/demo/tail?timeout_ms=5000")),
    ]
    return {"init": {"artifact_paths": {"tls_cert": cert_path, "tls_key": key_path,
                                        "token_file": token_path},
                     "next_commands": commands}}


def render_serve_init(document: dict) -> str:
    """Return the terminal form of a :func:`serve_init` document (remote.md 4.2)."""
    paths = document["init"]["artifact_paths"]
    lines = ["serve init: generated artifacts", "  token_file: " + paths["token_file"],
             "  tls_cert:   " + paths["tls_cert"], "  tls_key:    " + paths["tls_key"], "",
             "next commands:"]
    lines += ["  %d. %s" % (number, command)
              for number, command in enumerate(document["init"]["next_commands"], 1)]
    lines += ["", "notes:", "  - token value is not printed; read it from token_file when needed",
              "  - TLS is self-signed; curl examples use -k for local testing"]
    return "\n".join(lines) + "\n"


# -- TLS ----------------------------------------------------------------------

def _read_pem(path, what: str) -> list:
    """Read a PEM file; return the labels of its blocks (Io when unreadable or malformed)."""
    import base64

    try:
        with open(path, "rb") as pem_file:
            data = pem_file.read()
    except OSError as err:
        raise PlasmiteError("Io", "failed to read TLS %s" % what, path=path,
                            causes=[describe_os_error(err)]) from err
    labels = []
    for match in re.finditer(_PEM_BLOCK, data):
        try:
            base64.b64decode(re.sub(rb"\s+", b"", match.group(2)), validate=True)
        except (binascii.Error, ValueError) as err:
            raise PlasmiteError("Io", "failed to parse TLS %s" % what, path=path,
                                causes=[str(err)]) from err
        labels.append(match.group(1))
    if data.count(b"-----BEGIN ") != len(labels):
        raise PlasmiteError("Io", "failed to parse TLS %s" % what, path=path,
                            causes=["unterminated PEM section"])
    return labels


def _refuse_password() -> bytes:
    """Password callback for load_cert_chain: never prompt on the terminal."""
    return b""


def load_tls_context(config: ServeConfig):
    """Return the server's ssl.SSLContext, or None when TLS is off.

    ``--tls-cert``/``--tls-key`` are read and checked as upstream does
    (remote.md 2.1 start-time errors: Io for unreadable or unparsable PEM,
    Usage when no certificate / private key block is found or the pair is
    rejected); ``--tls-self-signed`` makes a certificate in memory.  Offers
    ALPN ``http/1.1`` only.
    """
    import ssl
    import tempfile

    if config.tls_mode == "disabled":
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.set_alpn_protocols(["http/1.1"])
    if config.tls_mode == "self-signed":
        extra = () if config.address.is_unspecified else (str(config.address),)
        cert_pem, key_pem = generate_self_signed_certificate(extra_ip_addresses=extra)
        # ssl loads certificates from files only: use a private scratch directory.
        with tempfile.TemporaryDirectory() as scratch:
            cert_path = os.path.join(scratch, "cert.pem")
            key_path = os.path.join(scratch, "key.pem")
            _write_artifact(cert_path, cert_pem, 0o600, "failed to write TLS certificate")
            _write_artifact(key_path, key_pem, 0o600, "failed to write TLS key")
            context.load_cert_chain(cert_path, key_path, password=_refuse_password)
        return context
    if b"CERTIFICATE" not in _read_pem(config.tls_cert, "certificate"):
        raise PlasmiteError("Usage", "TLS certificate file contains no certificates",
                            path=config.tls_cert)
    if not any(label in _PRIVATE_KEY_LABELS for label in _read_pem(config.tls_key, "key")):
        raise PlasmiteError("Usage", "TLS key file contains no private key", path=config.tls_key)
    try:
        context.load_cert_chain(config.tls_cert, config.tls_key, password=_refuse_password)
    except (ssl.SSLError, OSError) as err:
        raise PlasmiteError("Usage", "invalid TLS certificate or key", causes=[str(err)]) from err
    return context


# -- replies ------------------------------------------------------------------

Reply = namedtuple("Reply", "status body content_type headers is_versioned")
Reply.__doc__ = ("A whole response: status, body bytes, content type (None for none), extra "
                 "header pairs, and whether it carries plasmite-version (handler responses do, "
                 "framework rejections do not).")


class StreamReply:
    """A 200 response whose body is written chunk by chunk as ``chunks`` yields bytes.

    ``close`` runs once the stream ends, however it ends (it releases the
    tail slot and the pool).
    """

    def __init__(self, content_type: str, chunks, headers=(), close=None):
        self.content_type = content_type
        self.chunks = chunks
        self.headers = tuple(headers)
        self._close = close

    def close(self) -> None:
        self.chunks.close()
        if self._close is not None:
            self._close()


class HttpRejection(Exception):
    """A request refused before its route runs, answered with ``reply`` (a Reply)."""

    def __init__(self, reply: Reply):
        super().__init__(reply.status)
        self.reply = reply


def json_reply(document, status: int = 200) -> Reply:
    return Reply(status, dump_json(document).encode("utf-8"), JSON_CONTENT_TYPE, (), True)


def text_rejection(status: int, text: str, should_close: bool = False) -> HttpRejection:
    """A framework-level refusal: text/plain, no plasmite-version header (remote.md 5.1)."""
    headers = (("connection", "close"),) if should_close else ()
    return HttpRejection(Reply(status, text.encode("utf-8"), TEXT_CONTENT_TYPE, headers, False))


def error_status(err: PlasmiteError) -> int:
    """The HTTP status for an error kind (remote.md 5.2)."""
    if err.kind == "Permission" and err.message.startswith("forbidden:"):
        return 403
    return ERROR_STATUSES[err.kind.value]


def error_envelope(err: PlasmiteError) -> str:
    """The HTTP error envelope: kind, message, path, seq, offset in that order, no hint.

    An error raised without a message of its own (PlasmiteError then holds
    the CLI's fallback text) reports ``"error"``, as upstream's server does;
    NotFound's fallback "not found" is also the message pools use, so it stays.
    """
    kind = err.kind.value
    message = err.message
    if message == FALLBACK_MESSAGES[kind] and kind != "NotFound":
        message = "error"
    fields = ['"kind":' + dump_json(kind), '"message":' + dump_json(message)]
    for name in ("path", "seq", "offset"):
        value = getattr(err, name)
        if value is not None:
            fields.append('"%s":%s' % (name, dump_json(value)))
    return '{"error":{%s}}' % ",".join(fields)


def error_reply(err: PlasmiteError) -> Reply:
    return Reply(error_status(err), error_envelope(err).encode("utf-8"), JSON_CONTENT_TYPE, (),
                 True)


# -- request parsing ----------------------------------------------------------

def parse_u64(text: str) -> int:
    """Parse an unsigned 64-bit integer as Rust does; ValueError carries Rust's wording."""
    digits = text[1:] if text.startswith("+") else text
    if not text:
        raise ValueError("cannot parse integer from empty string")
    if not digits or not digits.isascii() or not digits.isdigit():
        raise ValueError("invalid digit found in string")
    value = int(digits)
    if value >= 1 << 64:
        raise ValueError("number too large to fit in target type")
    return value


def parse_tail_query(query_text: str) -> dict:
    """Parse the stream query (remote.md 5.5): since_seq, max, timeout_ms as ints, tag list.

    Unknown keys are ignored; each tag is trimmed and empty ones dropped.
    Raises HttpRejection 400 (text/plain) for a bad number or a repeated
    numeric key.
    """
    from urllib.parse import parse_qsl

    query = {"tag": []}
    for key, value in parse_qsl(query_text, keep_blank_values=True):
        if key == "tag":
            value = value.strip()
            if value:
                query["tag"].append(value)
        elif key in ("since_seq", "max", "timeout_ms"):
            try:
                if key in query:
                    raise ValueError("duplicate field `%s`" % key)
                query[key] = parse_u64(value)
            except ValueError as err:
                raise text_rejection(400, "Failed to deserialize query string: %s" % err) from None
    return query


def parse_durability_query(query_text: str) -> dict:
    """Parse append_lite3's query: ``durability=flush`` flushes, anything else is fast."""
    from urllib.parse import parse_qsl

    return {"durability": dict(parse_qsl(query_text, keep_blank_values=True)).get("durability")}


def is_json_content_type(value) -> bool:
    """True for ``application/json`` and ``application/*+json`` (parameters ignored)."""
    if value is None:
        return False
    major, _, minor = value.split(";", 1)[0].strip().lower().partition("/")
    return major == "application" and (minor == "json" or minor.endswith("+json"))


def _describe_json_value(value) -> str:
    """serde's wording for an unexpected value in a type error."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean `%s`" % ("true" if value else "false")
    if isinstance(value, int):
        return "integer `%d`" % value
    if isinstance(value, float):
        return "floating point `%s`" % dump_json(value)
    if isinstance(value, str):
        return "string %s" % dump_json(value)
    return "sequence" if isinstance(value, list) else "map"


def _field_problem(name: str, value, field_type: str):
    """Return serde's complaint about one body field, or None when it fits."""
    if value is None and field_type != "string":
        return None  # Option<...> fields and serde_json::Value accept null
    if field_type == "string" and not isinstance(value, str):
        return "%s: invalid type: %s, expected a string" % (name, _describe_json_value(value))
    if field_type == "u64":
        if isinstance(value, bool) or not isinstance(value, int):
            return "%s: invalid type: %s, expected u64" % (name, _describe_json_value(value))
        if not 0 <= value < 1 << 64:
            return "%s: invalid value: integer `%d`, expected u64" % (name, value)
    if field_type == "strings":
        if not isinstance(value, list):
            return "%s: invalid type: %s, expected a sequence" % (name, _describe_json_value(value))
        for index, item in enumerate(value):
            if not isinstance(item, str):
                return "%s[%d]: invalid type: %s, expected a string" % (
                    name, index, _describe_json_value(item))
    return None


# Request body shapes: (field, type, is_required); types as in _field_problem,
# "optional_string" accepting null.
BODY_SHAPES = {
    "create": (("pool", "string", True), ("size_bytes", "u64", False)),
    "open": (("pool", "string", True),),
    "append": (("data", "any", True), ("tags", "strings", False),
               ("durability", "optional_string", False)),
}


def check_body_shape(document, shape_name: str, text: bytes) -> None:
    """Raise HttpRejection 422 when a JSON body does not fit its route's shape.

    Messages follow axum + serde_path_to_error: ``<path>: <problem>``; a
    missing field carries serde's position (the end of the document).
    """
    prefix = "Failed to deserialize the JSON body into the target type: "
    if not isinstance(document, dict):
        raise text_rejection(422, prefix + ".: invalid type: %s, expected a JSON object"
                             % _describe_json_value(document))
    for name, field_type, is_required in BODY_SHAPES[shape_name]:
        if name in document:
            value = document[name]
            if field_type == "optional_string":
                field_type = "string" if value is not None else "any"
            problem = _field_problem(name, value, field_type)
            if problem:
                raise text_rejection(422, prefix + problem)
    for name, _field_type, is_required in BODY_SHAPES[shape_name]:
        if is_required and name not in document:
            body = text.decode("utf-8", "replace").rstrip()
            line = body.count("\n") + 1
            column = len(body) - (body.rfind("\n") + 1)
            raise text_rejection(422, prefix + ".: missing field `%s` at line %d column %d"
                                 % (name, line, column))


def _read_chunked_body(rfile, limit: int) -> bytes:
    """Read a chunked request body of at most ``limit`` bytes (RFC 9112 7.1).

    A chunk size is hex digits only: int() would also take "-1" (a read to the
    end of the stream), "0x10" and "1_0".  Raises HttpRejection 400 for a
    malformed size or chunk end, 413 over the limit; ConnectionError at EOF.
    """
    body = bytearray()
    while True:
        line = rfile.readline(1024)
        if not line:
            raise ConnectionError("request body ended early")
        size_text = line.split(b";", 1)[0].strip()
        if not _CHUNK_SIZE.fullmatch(size_text):
            raise text_rejection(400, "Failed to buffer the request body: invalid chunk size",
                                 should_close=True)
        size = int(size_text, 16)
        if size == 0:
            while rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                pass  # trailer fields
            return bytes(body)
        if len(body) + size > limit:
            raise text_rejection(413, "Failed to buffer the request body: length limit exceeded",
                                 should_close=True)
        chunk = rfile.read(size)
        if len(chunk) < size:
            raise ConnectionError("request body ended early")
        body += chunk
        if rfile.readline(1024) not in (b"\r\n", b"\n"):
            raise text_rejection(400, "Failed to buffer the request body: invalid chunk",
                                 should_close=True)


def read_request_body(handler, limit: int) -> bytes:
    """Read the request body (Content-Length or chunked) of at most ``limit`` bytes.

    A body over the limit is read and dropped (up to MAX_DRAINED_BODY_BYTES,
    so the client gets to read the answer) and refused with 413 text/plain,
    closing the connection.  Raises ConnectionError when the client stops early.
    Framing that two parsers could read differently (RFC 9112 6.3) is refused
    with 400: a transfer coding other than chunked alone, or Content-Length
    headers that disagree.  Chunked wins over a Content-Length, and the
    connection then closes after the answer.
    """
    headers = handler.headers
    transfer_codings = headers.get_all("transfer-encoding")
    if transfer_codings is not None:
        if ",".join(transfer_codings).strip().lower() != "chunked":
            raise text_rejection(400, "Failed to buffer the request body: unsupported "
                                 "transfer-encoding", should_close=True)
        if "content-length" in headers:
            handler.close_connection = True
        return _read_chunked_body(handler.rfile, limit)
    length_texts = headers.get_all("content-length")
    if length_texts is None:
        return b""
    length_text = length_texts[0]
    if any(text.strip() != length_text.strip() for text in length_texts):
        raise text_rejection(400, "Failed to buffer the request body: invalid content-length",
                             should_close=True)
    try:
        length = parse_u64(length_text.strip())
    except ValueError:
        raise text_rejection(400, "Failed to buffer the request body: invalid content-length",
                             should_close=True) from None
    if length > limit:
        if length <= MAX_DRAINED_BODY_BYTES:
            remaining = length
            while remaining > 0:
                drained = handler.rfile.read(min(remaining, 65536))
                if not drained:
                    break
                remaining -= len(drained)
        raise text_rejection(413, "Failed to buffer the request body: length limit exceeded",
                             should_close=True)
    body = handler.rfile.read(length)
    if len(body) < length:
        raise ConnectionError("request body ended early")
    return body


def read_json_body(handler, shape_name: str, limit: int) -> dict:
    """Extract a JSON body as axum's Json does: 415, then 413, then 400 syntax, then 422 shape."""
    if not is_json_content_type(handler.headers.get("content-type")):
        raise text_rejection(415, "Expected request with `Content-Type: application/json`",
                             should_close=True)
    text = read_request_body(handler, limit)
    try:
        document = parse_json_value(text)
    except PlasmiteError as err:
        detail = err.message.split(": ", 1)[-1]
        raise text_rejection(400, "Failed to parse the request body as JSON: " + detail) from None
    check_body_shape(document, shape_name, text)
    return document


def check_bearer_token(config: ServeConfig, header_values) -> None:
    """Require one ``Authorization: Bearer <token>`` byte for byte; compared in constant time.

    ``header_values`` lists every Authorization header of the request (None
    for none).  Two or more are refused even if one matches: which one counts
    would depend on the parser.  Raises PlasmiteError Permission "missing
    bearer token" / "invalid bearer token" (401).
    """
    import hmac

    if header_values is None:
        raise PlasmiteError("Permission", "missing bearer token")
    # http.server decodes header bytes as latin-1, so this gives the bytes sent.
    received = header_values[0].encode("latin-1")
    is_valid = hmac.compare_digest(received, ("Bearer " + config.token).encode("utf-8"))
    if not is_valid or len(header_values) > 1:
        raise PlasmiteError("Permission", "invalid bearer token")


def served_pool_path(config: ServeConfig, name: str) -> str:
    """Map a pool name from a request to its file in the pool directory, never outside it.

    Raises PlasmiteError Usage (400) for names holding a path separator (a
    decoded ``%2F``, an absolute path), a NUL byte, or nothing at all, and
    for names whose file name would be too long for the file system (upstream
    tries the file and answers 500 Io; the name is the client's mistake).
    """
    if "/" in name:
        raise PlasmiteError("Usage", "pool name must not contain path separators")
    if "\0" in name:
        raise PlasmiteError("Usage", "pool name must not contain NUL bytes")
    if not name:
        raise PlasmiteError("Usage", "pool name must not be empty")
    path = resolve_pool_path(config.directory, name)
    if len(os.path.basename(path).encode("utf-8")) > MAX_FILE_NAME_BYTES:
        raise PlasmiteError("Usage", "pool name is too long")
    return path


class HttpRequest:
    """What a route function sees: the parsed request and the server serving it.

    ``params`` holds the decoded path parameters (``pool``, ``seq``),
    ``query`` the parsed query of routes that take one, ``body`` the JSON
    document or raw bytes of routes that read one, ``started`` the
    monotonic time the request arrived (stream deadlines count from it).
    """

    def __init__(self, handler, params: dict, query: dict, body):
        self.handler = handler
        self.server = handler.server
        self.config = handler.server.config
        self.method = handler.command
        self.headers = handler.headers
        self.params = params
        self.query = query
        self.body = body
        self.started = handler.request_started

    def pool_path(self, name=None) -> str:
        """The file of the pool the request names (path parameter unless ``name``)."""
        return served_pool_path(self.config, self.params["pool"] if name is None else name)


# -- routes -------------------------------------------------------------------

def pool_document(pool: LocalPool, name: str) -> dict:
    """The HTTP pool info: ``pool info --json`` fields with the requested name and server path."""
    fields = pool.info()
    fields["name"] = name
    fields["path"] = pool.path
    return fields


def describe_pool(request: HttpRequest, name: str) -> Reply:
    with LocalPool.open(request.pool_path(name)) as pool:
        return json_reply({"pool": pool_document(pool, name)})


def route_healthz(request: HttpRequest) -> Reply:
    return json_reply({"ok": True})


def route_ui_page(request: HttpRequest) -> Reply:
    # One page for /ui and /ui/pools/NAME: it routes on location.pathname.
    return Reply(200, WEB_UI_HTML.encode("utf-8"), HTML_CONTENT_TYPE, (), True)


def route_create_pool(request: HttpRequest) -> Reply:
    """POST /v0/pools: create a pool; 409 if it exists (upstream silently truncates it)."""
    name = request.body["pool"]
    path = request.pool_path(name)
    size = request.body.get("size_bytes")
    size = DEFAULT_POOL_SIZE if size is None else size
    if size <= ring_offset_for(auto_index_capacity(size)):
        raise PlasmiteError("Usage", "file_size must exceed header and index size")
    if not os.path.isdir(request.config.directory):
        # The server never creates its pool directory.
        raise PlasmiteError("Io", None, path=path,
                            causes=[describe_os_error(OSError(errno.ENOENT, ""))])
    with LocalPool.create(path, size) as pool:
        return json_reply({"pool": pool_document(pool, name)})


def route_list_pools(request: HttpRequest) -> Reply:
    """GET /v0/pools: info for every ``*.plasmite`` file, sorted by name; one bad pool fails all."""
    directory = request.config.directory
    try:
        file_names = sorted(os.listdir(directory))
    except FileNotFoundError as err:
        raise PlasmiteError("NotFound", "failed to read pool directory", path=directory,
                            causes=[describe_os_error(err)]) from err
    except OSError as err:
        raise error_from_os(err, "failed to read pool directory", path=directory) from err
    pools = []
    for file_name in file_names:
        stem, extension = os.path.splitext(file_name)
        if extension != POOL_SUFFIX:
            continue
        try:
            pool = LocalPool.open(os.path.join(directory, file_name))
        except PlasmiteError as err:
            if err.kind == "NotFound":
                continue  # deleted while we listed
            raise
        with pool:
            pools.append(pool_document(pool, stem))
    return json_reply({"pools": pools})


def route_open_pool(request: HttpRequest) -> Reply:
    return describe_pool(request, request.body["pool"])


def route_pool_info(request: HttpRequest) -> Reply:
    return describe_pool(request, request.params["pool"])


def route_delete_pool(request: HttpRequest) -> Reply:
    path = request.pool_path()
    try:
        os.unlink(path)
    except FileNotFoundError as err:
        raise PlasmiteError("NotFound", "failed to delete pool", path=path,
                            causes=[describe_os_error(err)]) from err
    except OSError as err:
        raise error_from_os(err, "failed to delete pool", path=path) from err
    return json_reply({"ok": True})


def _append_reply(path: str, payload: bytes, should_flush: bool, tags: list, data) -> Reply:
    with LocalPool.open(path) as pool:
        seq, timestamp_ns = pool.append(payload, None, should_flush)
    return json_reply({"message": {"data": data, "meta": {"tags": tags}, "seq": seq,
                                   "time": format_timestamp(timestamp_ns)}})


def route_append(request: HttpRequest) -> Reply:
    """POST /v0/pools/{pool}/append: the response echoes the parsed data."""
    path = request.pool_path()
    body = request.body
    tags = body.get("tags") or []
    payload = encode_message(tags, body["data"])
    return _append_reply(path, payload, body.get("durability") == "flush", tags, body["data"])


def route_append_lite3(request: HttpRequest) -> Reply:
    """POST /v0/pools/{pool}/append_lite3: store a valid Lite3 payload (else 500 Corrupt)."""
    content_type = request.headers.get("content-type")
    if content_type is not None and not content_type.lower().startswith(LITE3_CONTENT_TYPE):
        raise PlasmiteError("Usage", "invalid content-type for lite3 append")
    if not request.body:
        raise PlasmiteError("Usage", "lite3 payload is required")
    path = request.pool_path()
    validate_lite3_message(request.body)
    # Decoding before the append (upstream re-reads after it) keeps payloads
    # that validate but cannot be read back out of the pool.
    tags, data = decode_message(request.body)
    return _append_reply(path, request.body, request.query["durability"] == "flush", tags, data)


def _stored_frame(request: HttpRequest):
    seq = request.params["seq"]
    with LocalPool.open(request.pool_path()) as pool:
        try:
            return pool.get(seq)
        except PlasmiteError as err:
            if err.kind == "NotFound":
                err.path = None  # upstream sends kind, message and seq only
            raise


def route_get_message(request: HttpRequest) -> Reply:
    return json_reply({"message": message_fields(_stored_frame(request))})


def route_get_lite3(request: HttpRequest) -> Reply:
    frame = _stored_frame(request)
    validate_lite3_message(frame.payload)
    return Reply(200, frame.payload, LITE3_CONTENT_TYPE, (("plasmite-seq", str(frame.seq)),), True)


def render_jsonl(frame) -> bytes:
    return message_json(frame).encode("utf-8") + b"\n"


def render_event(frame) -> bytes:
    return b"event: message\ndata: " + message_json(frame).encode("utf-8") + b"\n\n"


def render_lite3_frame(frame) -> bytes:
    validate_lite3_message(frame.payload)
    header = LITE3_STREAM_FRAME.pack(frame.seq, frame.timestamp_ns, len(frame.payload))
    return header + frame.payload


# A tail stream writes at the latest when this much is batched.
STREAM_BATCH_BYTES = 64 * 1024


def follow_pool(request: HttpRequest, pool: LocalPool, deadline: float, render):
    """Yield rendered messages from ``since_seq`` (default: the oldest) in seq order,
    and ``b""`` each time it has caught up and is about to wait.

    Drains history, then waits for appends, until ``max`` messages were sent,
    the deadline passes, the server shuts down, or the client hangs up.  A
    reader lapped by writers resumes at the oldest live message (Cursor).
    """
    query = request.query
    max_messages = query.get("max")
    tags = query["tag"]
    stopping = request.server.stopping
    cursor = pool.cursor(query.get("since_seq") or 1)
    delivered = 0
    while max_messages is None or delivered < max_messages:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or stopping.is_set():
            return
        frame = cursor.next_frame()
        if frame is None:
            yield b""       # caught up: send what is batched before waiting
            if request.handler.is_peer_closed():
                return
            pool.wait_for_seq(cursor.next_seq, min(remaining, STREAM_CHECK_SECONDS), stopping)
            continue
        if tags:
            message_tags = decode_message(frame.payload)[0]
            if not all(tag in message_tags for tag in tags):
                continue
        yield render(frame)
        delivered += 1


def open_tail_stream(request: HttpRequest, render, content_type: str, headers=()) -> StreamReply:
    """Start a stream: take a slot (423), check timeout_ms (400), open the pool (404), go.

    Checking the pool before the headers turns upstream's aborted 200 into
    a 404 envelope for a missing pool.
    """
    config = request.config
    path = request.pool_path()
    slots = request.server.tail_slots
    if not slots.acquire(blocking=False):
        raise PlasmiteError("Busy", "too many concurrent tail requests")
    try:
        timeout_ms = request.query.get("timeout_ms")
        if timeout_ms is None:
            timeout_ms = config.max_tail_timeout_ms
        elif timeout_ms > config.max_tail_timeout_ms:
            raise PlasmiteError("Usage", "tail timeout exceeds server limit")
        pool = LocalPool.open(path)
    except BaseException:
        slots.release()
        raise

    def close():
        pool.close()
        slots.release()

    chunks = follow_pool(request, pool, request.started + timeout_ms / 1000, render)
    return StreamReply(content_type, chunks, headers, close)


def route_tail(request: HttpRequest) -> StreamReply:
    return open_tail_stream(request, render_jsonl, "application/jsonl")


def route_tail_lite3(request: HttpRequest) -> StreamReply:
    since_seq = request.query.get("since_seq")
    if since_seq is not None:
        # Upstream checks the first message before streaming: a corrupt one
        # fails the request, a missing pool or seq does not.
        try:
            with LocalPool.open(request.pool_path()) as pool:
                validate_lite3_message(pool.get(since_seq).payload)
        except PlasmiteError as err:
            if err.kind != "NotFound":
                raise
    return open_tail_stream(request, render_lite3_frame, LITE3_STREAM_CONTENT_TYPE)


def route_ui_events(request: HttpRequest) -> StreamReply:
    return open_tail_stream(request, render_event, "text/event-stream",
                            (("cache-control", "no-cache, no-transform"),
                             ("connection", "keep-alive")))


Route = namedtuple("Route", "handler access body query")
Route.__doc__ = ("One method of a route: its function, the access it needs (None: public, no "
                 "auth), its body (None, 'raw' or a BODY_SHAPES name) and its query parser.")

# Path patterns ({pool}, {seq} are parameters) -> method -> Route.  A static
# segment beats a parameter, so DELETE /v0/pools/open is a 405, as upstream.
ROUTES = {
    ("healthz",): {"GET": Route(route_healthz, None, None, None)},
    ("ui",): {"GET": Route(route_ui_page, None, None, None)},
    ("ui", "pools", "{pool}"): {"GET": Route(route_ui_page, None, None, None)},
    ("v0", "pools"): {"POST": Route(route_create_pool, "write", "create", None),
                      "GET": Route(route_list_pools, "read", None, None)},
    ("v0", "pools", "open"): {"POST": Route(route_open_pool, "read", "open", None)},
    ("v0", "pools", "{pool}"): {"DELETE": Route(route_delete_pool, "write", None, None)},
    ("v0", "pools", "{pool}", "info"): {"GET": Route(route_pool_info, "read", None, None)},
    ("v0", "pools", "{pool}", "append"): {"POST": Route(route_append, "write", "append", None)},
    ("v0", "pools", "{pool}", "append_lite3"): {
        "POST": Route(route_append_lite3, "write", "raw", parse_durability_query)},
    ("v0", "pools", "{pool}", "messages", "{seq}"): {
        "GET": Route(route_get_message, "read", None, None)},
    ("v0", "pools", "{pool}", "messages", "{seq}", "lite3"): {
        "GET": Route(route_get_lite3, "read", None, None)},
    ("v0", "pools", "{pool}", "tail"): {"GET": Route(route_tail, "read", None, parse_tail_query)},
    ("v0", "pools", "{pool}", "tail_lite3"): {
        "GET": Route(route_tail_lite3, "read", None, parse_tail_query)},
    ("v0", "ui", "pools"): {"GET": Route(route_list_pools, "read", None, None)},
    ("v0", "ui", "pools", "{pool}", "info"): {"GET": Route(route_pool_info, "read", None, None)},
    ("v0", "ui", "pools", "{pool}", "events"): {
        "GET": Route(route_ui_events, "read", None, parse_tail_query)},
}


def match_route(method: str, raw_path: str) -> tuple:
    """Find the Route for a method and raw (percent-encoded) path; return (route, params).

    Raises HttpRejection 404 (empty body) for an unknown path, 405 with
    ``allow`` for a known path and another method (HEAD goes with GET), and
    400 text/plain for a path parameter that does not decode.
    """
    from urllib.parse import unquote_to_bytes

    segments = raw_path[1:].split("/") if raw_path.startswith("/") else None
    best = None
    for pattern in ROUTES if segments is not None else ():
        if len(pattern) != len(segments):
            continue
        rank = []
        for expected, segment in zip(pattern, segments):
            if expected.startswith("{") and segment:
                rank.append(1)
            elif expected == segment:
                rank.append(0)
            else:
                break
        else:
            if best is None or rank < best[0]:
                best = (rank, pattern)
    if best is None:
        raise HttpRejection(Reply(404, b"", None, (), False))
    methods = ROUTES[best[1]]
    route = methods.get("GET" if method == "HEAD" else method)
    if route is None:
        allow = ",".join(name + (",HEAD" if name == "GET" else "") for name in methods)
        raise HttpRejection(Reply(405, b"", None, (("allow", allow),), False))
    params = {}
    for index, (expected, segment) in enumerate(zip(best[1], segments)):
        if expected == "{pool}":
            try:
                # http.server decoded the request line as latin-1: undo that first.
                params["pool"] = unquote_to_bytes(segment.encode("latin-1")).decode("utf-8")
            except UnicodeDecodeError:
                raise text_rejection(400, "Invalid URL: Cannot parse `%s` as a UTF-8 string"
                                     % segment) from None
        elif expected == "{seq}":
            try:
                params["seq"] = parse_u64(segment)
            except ValueError:
                raise text_rejection(400, "Invalid URL: Cannot parse value at index 1 with value "
                                     "`%s` to a `u64`" % dump_json(segment)) from None
    return route, params


def process_request(handler):
    """Run one request through upstream's order and its route; return a Reply or StreamReply.

    Order (remote.md 5.1): route, path parameters, query, body (415, 413,
    400, 422), bearer token (401), access mode (403), then the route function
    (pool name check, route checks, work).  Raises HttpRejection or
    PlasmiteError for the caller to answer.
    """
    server = handler.server
    config = server.config
    target = handler.path
    if target.startswith(("http://", "https://")):  # absolute-form: route on its path
        target = "/" + target.split("/", 3)[-1] if target.count("/") >= 3 else "/"
    raw_path, _, query_text = target.partition("?")
    route, params = match_route(handler.command, raw_path)
    # http.server decoded the request line as latin-1; queries are UTF-8.
    query_text = query_text.encode("latin-1").decode("utf-8", "replace")
    query = route.query(query_text) if route.query is not None else {}
    body = None
    if route.body == "raw":
        body = read_request_body(handler, config.max_body_bytes)
    elif route.body is not None:
        body = read_json_body(handler, route.body, config.max_body_bytes)
    elif handler.headers.get("content-length", "0").strip() != "0" or \
            "transfer-encoding" in handler.headers:
        handler.close_connection = True  # an unexpected body is left unread
    handler.finish_reading()
    if route.access is not None:
        if config.token is not None:
            check_bearer_token(config, handler.headers.get_all("authorization"))
        if not config.allows(route.access):
            raise PlasmiteError("Permission", "forbidden: access mode disallows %s operations"
                                % route.access)
    return route.handler(HttpRequest(handler, params, query, body))


# -- the HTTP server ----------------------------------------------------------

def _log_threshold() -> int:
    """The log level from RUST_LOG (upstream's variable): default info."""
    setting = os.environ.get("RUST_LOG", "").lower()
    for name in ("trace", "debug", "info", "warn", "error"):
        if name in setting:
            return _LOG_LEVELS.get(name, 3)
    return -1 if "off" in setting else _LOG_LEVELS["info"]


_SERVER_CLASSES = []


def _server_classes() -> tuple:
    """Return (server class, handler class), defining them on first use (lazy http.server)."""
    if not _SERVER_CLASSES:
        _SERVER_CLASSES.extend(_define_server_classes())
    return tuple(_SERVER_CLASSES)


def _define_server_classes() -> tuple:
    import http.client
    import http.server
    import io
    import socket
    import socketserver
    import threading

    class DeadlineReader(io.RawIOBase):
        """The socket reader behind a handler's rfile, enforcing a whole-request deadline.

        While ``deadline`` is set (from a request's first byte until its body
        is read) each read may block only until then; otherwise the socket's
        own timeout applies (the idle timeout between requests).
        """

        def __init__(self, connection):
            super().__init__()
            self.connection = connection
            self.deadline = None

        def readable(self) -> bool:
            return True

        def readinto(self, buffer) -> int:
            if self.deadline is not None:
                remaining = self.deadline - time.monotonic()
                if remaining <= 0:
                    raise socket.timeout("request timed out")
                self.connection.settimeout(remaining)
            return self.connection.recv_into(buffer)

    class HeadReader:
        """The rfile http.server parses a request's header lines from, at most ``limit`` bytes.

        Going over raises http.client.LineTooLong, which http.server answers
        with 431, as it does for one line that is too long.
        """

        def __init__(self, rfile, limit: int):
            self.rfile = rfile
            self.remaining = limit

        def readline(self, size: int = -1) -> bytes:
            line = self.rfile.readline(size)
            self.remaining -= len(line)
            if self.remaining < 0:
                raise http.client.LineTooLong("header lines")
            return line

    class PlasmiteHTTPServer(http.server.ThreadingHTTPServer):
        """ThreadingHTTPServer with the serve configuration, tail slots and shutdown bookkeeping."""

        daemon_threads = True
        # The listen backlog.  socketserver's 5 overflows under a burst of connects,
        # and each refused handshake waits for a SYN retransmit (1 s, then 3 s):
        # 100 sequential connects took 15 s, and 3 ms with 1024 (as tokio's
        # listener, upstream's).  The kernel caps it at net.core.somaxconn.
        request_queue_size = 1024

        def __init__(self, config: ServeConfig, tls_context):
            self.config = config
            self.tls_context = tls_context
            self.address_family = socket.AF_INET6 if config.address.version == 6 else socket.AF_INET
            self.stopping = threading.Event()
            self.tail_slots = threading.BoundedSemaphore(config.max_tail_concurrency)
            self.log_threshold = _log_threshold()
            self._log_lock = threading.Lock()
            self._connections = {}  # handler -> True while it waits for a request
            self._connections_lock = threading.Lock()
            super().__init__((str(config.address), config.port), PlasmiteRequestHandler,
                             bind_and_activate=False)

        def server_bind(self) -> None:
            # HTTPServer.server_bind would resolve the host name (a DNS query).
            socketserver.TCPServer.server_bind(self)
            self.server_name, self.server_port = self.server_address[:2]

        def finish_request(self, request, client_address) -> None:
            if self.tls_context is None:
                super().finish_request(request, client_address)
                return
            request.settimeout(self.config.request_timeout)
            try:
                tls_request = self.tls_context.wrap_socket(request, server_side=True)
            except OSError:
                return  # failed handshakes are dropped silently, as upstream
            try:
                self.RequestHandlerClass(tls_request, client_address, self)
            finally:
                tls_request.close()

        def handle_error(self, request, client_address) -> None:
            error = sys.exc_info()[1]
            if isinstance(error, OSError):
                self.log("debug", "connection from %s ended: %s" % (client_address[0], error))
            else:
                import traceback

                self.log("error", "request from %s failed: %s" % (
                    client_address[0], traceback.format_exc().rstrip()))

        def log(self, level: str, text: str) -> None:
            """Write one log line to stdout (as upstream's tracing does) if the level is on."""
            if _LOG_LEVELS[level] > self.log_threshold:
                return
            line = "%s %s %s\n" % (format_timestamp(time.time_ns()), level.upper(),
                                   text.translate(_LOG_ESCAPES))
            with self._log_lock:
                try:
                    sys.stdout.write(line)
                    sys.stdout.flush()
                except (OSError, ValueError):
                    pass  # logging never fails a request

        # -- connections and shutdown ------------------------------------------

        def note_connection(self, handler, is_idle) -> None:
            """Record whether a connection waits for a request (None: it closed)."""
            with self._connections_lock:
                if is_idle is None:
                    self._connections.pop(handler, None)
                else:
                    self._connections[handler] = is_idle

        def stop_serving(self, grace: float) -> None:
            """Stop accepting; end streams and idle connections; give the rest ``grace`` s."""
            self.stopping.set()
            self.shutdown()
            self.server_close()
            deadline = time.monotonic() + grace
            while time.monotonic() < deadline:
                with self._connections_lock:
                    if not self._connections:
                        return
                    idle = [handler for handler, is_idle in self._connections.items() if is_idle]
                for handler in idle:
                    try:
                        handler.connection.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
                time.sleep(0.02)

    class PlasmiteRequestHandler(http.server.BaseHTTPRequestHandler):
        """Serves one connection: HTTP/1.1 keep-alive, every method through :meth:`dispatch`."""

        protocol_version = "HTTP/1.1"
        server_version = "plasmite/" + __version__
        # TCP_NODELAY: a reply is written as head then body, and with Nagle's algorithm
        # the body waited for the client's delayed ACK, 40 ms a keep-alive request.
        disable_nagle_algorithm = True
        # Buffered: a reply's head and body leave in one send at the end of the request
        # (http.server flushes there), not two (measured: 1,000 -> 1,900 appends/s).
        wbufsize = 64 * 1024

        def setup(self) -> None:
            super().setup()
            self.rfile.close()
            self.reader = DeadlineReader(self.connection)
            self.rfile = io.BufferedReader(self.reader, 64 * 1024)
            self.is_tls = self.server.tls_context is not None
            self.is_response_started = False
            self.request_started = time.monotonic()
            self.server.note_connection(self, True)

        def finish(self) -> None:
            try:
                super().finish()
            finally:
                self.server.note_connection(self, None)

        def handle_one_request(self) -> None:
            server = self.server
            if server.stopping.is_set():
                self.close_connection = True
                return
            self.reader.deadline = None
            self.connection.settimeout(server.config.idle_timeout)
            try:
                has_request = bool(self.rfile.peek(1))
            except OSError:
                has_request = False
            if not has_request or server.stopping.is_set():
                self.close_connection = True
                return
            server.note_connection(self, False)
            self.is_response_started = False  # per request: send_error may answer before dispatch
            self.request_started = time.monotonic()
            self.reader.deadline = self.request_started + server.config.request_timeout
            try:
                super().handle_one_request()
            finally:
                server.note_connection(self, True)

        def finish_reading(self) -> None:
            """The request is read: from now on only writes happen, each with the send timeout."""
            self.reader.deadline = None
            self.connection.settimeout(self.server.config.send_timeout)

        def is_peer_closed(self) -> bool:
            """True if the client hung up (plain HTTP only: TLS records cannot be peeked)."""
            import select

            if self.is_tls:
                return False
            try:
                if not select.select([self.connection], [], [], 0)[0]:
                    return False
                return self.connection.recv(1, socket.MSG_PEEK) == b""
            except (ValueError, BlockingIOError, InterruptedError, socket.timeout):
                return False
            except OSError:
                return True

        # -- dispatch ------------------------------------------------------------

        def dispatch(self) -> None:
            """Answer one request; the one try/except boundary of the request."""
            try:
                reply = process_request(self)
                if isinstance(reply, StreamReply):
                    self.send_stream(reply)
                else:
                    self.send_reply(reply)
            except Exception as error:  # the request boundary: answer, log, never crash
                self.fail(error)

        do_GET = do_HEAD = do_POST = do_DELETE = do_PUT = do_PATCH = do_OPTIONS = dispatch
        do_TRACE = do_CONNECT = dispatch

        def fail(self, error: Exception) -> None:
            """Answer a request that raised, or cut the connection if that is all that is left."""
            if self.is_response_started or isinstance(error, OSError):
                # Headers are out (the client sees the body cut short, as upstream
                # aborts a failing stream), or the client hung up or timed out.
                if isinstance(error, PlasmiteError):
                    self.server.log("error", "stream aborted: %s: %s" % (error.kind, error))
                elif not isinstance(error, OSError):
                    self.server.handle_error(self.connection, self.client_address)
                self.close_connection = True
                return
            if isinstance(error, HttpRejection):
                reply = error.reply
            elif isinstance(error, PlasmiteError):
                reply = error_reply(error)
            else:
                self.server.handle_error(self.connection, self.client_address)
                reply = error_reply(PlasmiteError("Internal", "internal server error"))
            try:
                self.send_reply(reply)
            except OSError:
                self.close_connection = True

        def write_head(self, status: int, headers) -> None:
            self.send_response_only(status)
            for name, value in headers:
                self.send_header(name, value)
            self.send_header("date", self.date_time_string())
            self.end_headers()
            self.is_response_started = True
            self.log_request(status)

        def send_reply(self, reply: Reply) -> None:
            headers = []
            if reply.content_type is not None:
                headers.append(("content-type", reply.content_type))
            if reply.is_versioned:
                headers.append(VERSION_HEADER)
            headers.extend(reply.headers)
            headers.append(("content-length", str(len(reply.body))))
            self.write_head(reply.status, headers)
            if self.command != "HEAD" and reply.body:
                self.wfile.write(reply.body)

        def send_stream(self, reply: StreamReply) -> None:
            """Send 200 and the stream, one chunk per message (no chunking for HTTP/1.0)."""
            try:
                is_chunked = self.request_version != "HTTP/1.0"
                headers = [("content-type", reply.content_type), VERSION_HEADER]
                if is_chunked:
                    headers.extend(reply.headers)
                    headers.append(("transfer-encoding", "chunked"))
                else:  # an HTTP/1.0 body ends when the connection does
                    headers.extend(pair for pair in reply.headers if pair[0] != "connection")
                    headers.append(("connection", "close"))
                self.write_head(200, headers)
                if self.command == "HEAD":
                    return
                # Messages ready together go out in one write (one write each cost a
                # system call and a packet per message); an empty chunk means the
                # stream caught up, so what is pending goes out before it waits.
                pending, pending_size = [], 0
                try:
                    for chunk in reply.chunks:
                        pending.append(chunk)
                        pending_size += len(chunk)
                        if chunk and pending_size < STREAM_BATCH_BYTES:
                            continue
                        self.write_pending(pending, is_chunked)
                        pending_size = 0
                finally:
                    self.write_pending(pending, is_chunked)   # what came before a failure
                if is_chunked:
                    self.wfile.write(b"0\r\n\r\n")
            finally:
                reply.close()

        def write_pending(self, pending: list, is_chunked: bool) -> None:
            """Send the batched stream chunks as one (HTTP) chunk and empty the batch."""
            data = b"".join(pending)
            pending.clear()
            if data:
                self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data) if is_chunked else data)
            self.wfile.flush()      # the head too, before a stream that has nothing yet waits

        # -- http.server hooks ---------------------------------------------------

        def parse_request(self) -> bool:
            """Parse the request line and at most MAX_HEAD_BYTES of header lines.

            HTTP/0.9 (a request line without a version, answered with a bare
            body) is refused with 400, as upstream's parser does.
            """
            rfile = self.rfile
            self.rfile = HeadReader(rfile, MAX_HEAD_BYTES)
            try:
                if not super().parse_request():
                    return False
            finally:
                self.rfile = rfile
            if self.request_version == "HTTP/0.9":
                self.send_error(400, "HTTP/0.9 is not supported")
                return False
            return True

        def send_error(self, code, message=None, explain=None) -> None:
            """Answer malformed requests (bad request line, huge headers) with an empty body."""
            self.log_error("code %d, message %s", code, message)
            self.close_connection = True
            if self.request_version == "HTTP/0.9":
                # http.server's value until a version parses; it would suppress the
                # status line and leave a malformed request without any answer.
                self.request_version = "HTTP/1.1"
            if not self.is_response_started:
                self.write_head(code, [("content-length", "0"), ("connection", "close")])

        def log_request(self, code="-", size="-") -> None:
            # 501 and 505 answer unknown methods and versions: client mistakes.
            level = "error" if isinstance(code, int) and code >= 500 and code not in (501, 505) \
                else "debug"
            text = "response failed" if level == "error" else "response"
            self.server.log(level, "%s status=%s method=%s path=%s client=%s" % (
                text, code, self.command, getattr(self, "path", "-"), self.client_address[0]))

        def log_error(self, format, *args) -> None:  # noqa: A002 (http.server's signature)
            self.server.log("debug", "%s %s" % (self.address_string(), format % args))

        def log_message(self, format, *args) -> None:  # noqa: A002 (http.server's signature)
            self.server.log("info", "%s %s" % (self.address_string(), format % args))

    return PlasmiteHTTPServer, PlasmiteRequestHandler


def create_server(config: ServeConfig, tls_context=None):
    """Bind the server socket; return the (not yet serving) server.

    Raises PlasmiteError Io "failed to bind server" ("failed to bind TLS
    server" with TLS) with the OS error as cause.
    """
    server_class, _handler_class = _server_classes()
    server = server_class(config, tls_context)
    try:
        server.server_bind()
        server.server_activate()
    except OSError as err:
        server.server_close()
        message = "failed to bind TLS server" if tls_context else "failed to bind server"
        raise PlasmiteError("Io", message, causes=[describe_os_error(err)]) from err
    return server


def run_server(config: ServeConfig, stop_event=None, on_listening=None) -> int:
    """Serve pools over HTTP until SIGINT/SIGTERM or ``stop_event``; return 0.

    Prints the banner to stderr when stderr is a terminal, loads TLS, binds
    (PlasmiteError Io/Usage for TLS files and binding, remote.md 2.1), then
    serves on daemon threads.  ``on_listening(address)`` is called with the
    bound (host, port) once requests are accepted (tests bind port 0).  On
    stop, open streams end cleanly, idle connections close, and in-flight
    requests get SHUTDOWN_GRACE_SECONDS.  Signal handlers are installed only
    when called from the main thread.
    """
    import signal
    import threading

    if is_terminal(sys.stderr):
        sys.stderr.write(render_serve_banner(config))
        sys.stderr.flush()
    tls_context = load_tls_context(config)
    server = create_server(config, tls_context)
    stop = stop_event if stop_event is not None else threading.Event()

    def request_stop(signal_number, frame):
        stop.set()

    previous_handlers = {}
    if threading.current_thread() is threading.main_thread():
        for signal_number in (signal.SIGINT, signal.SIGTERM):
            previous_handlers[signal_number] = signal.signal(signal_number, request_stop)
    serving = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1},
                               name="plasmite-serve", daemon=True)
    serving.start()
    try:
        if on_listening is not None:
            on_listening(server.server_address[:2])
        while not stop.wait(0.2):
            pass
    finally:
        server.stop_serving(SHUTDOWN_GRACE_SECONDS)
        for signal_number, handler in previous_handlers.items():
            signal.signal(signal_number, handler)
    return 0


# -- web UI -------------------------------------------------------------------

# The whole web UI (spec/remote.md 8): one page for /ui and /ui/pools/NAME,
# routing on location.pathname; inline CSS and script, no external assets,
# user content inserted as text only, a strict Content-Security-Policy, and a
# layout that works down to phone width.  Served from memory.
WEB_UI_HTML = r"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1, viewport-fit=cover">
<meta name="color-scheme" content="dark">
<meta name="referrer" content="no-referrer">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'">
<link rel="icon" href="data:,">
<title>Plasmite UI</title>
<style>
:root {
  --bg: #0b0e13; --panel: #11161d; --raised: #171d26; --line: #232c38; --line2: #2e3946;
  --text: #d8dfe8; --muted: #8d99a8; --dim: #5f6b7a;
  --accent: #b295ff; --link: #8ab4ff; --ok: #45d19a; --warn: #e9b85a; --err: #ff7070;
  --mono: ui-monospace, SFMono-Regular, Menlo, Consolas, "DejaVu Sans Mono", "Liberation Mono", monospace;
}
* { box-sizing: border-box; }
html { -webkit-text-size-adjust: 100%; text-size-adjust: 100%; }
body { margin: 0; background: var(--bg); color: var(--text); font: 14px/1.5 var(--mono); min-height: 100vh; }
a { color: var(--link); text-decoration: none; }
a:hover { text-decoration: underline; }
[hidden] { display: none !important; }

.top { position: sticky; top: 0; z-index: 10; background: rgba(11, 14, 19, 0.94);
  border-bottom: 1px solid var(--line); -webkit-backdrop-filter: blur(8px); backdrop-filter: blur(8px); }
.bar, .authbar, main { max-width: 1080px; margin: 0 auto; padding-left: 16px; padding-right: 16px; }
.bar { display: flex; flex-wrap: wrap; align-items: center; gap: 8px 14px; padding-top: 10px; padding-bottom: 10px; }
.lead { display: flex; align-items: center; gap: 12px; min-width: 0; flex: 1 1 auto; }
.brand { font-weight: 700; letter-spacing: 0.14em; white-space: nowrap; }
.brand::before { content: ""; display: inline-block; width: 9px; height: 9px; margin-right: 9px; border-radius: 50%;
  background: var(--accent); box-shadow: 0 0 10px var(--accent); vertical-align: 1px; }
.back { display: inline-flex; align-items: center; min-height: 36px; padding: 0 12px; border: 1px solid var(--line2);
  border-radius: 8px; color: var(--muted); white-space: nowrap; }
.back:hover { color: var(--text); border-color: var(--dim); text-decoration: none; }
.title { font-weight: 700; min-width: 0; overflow-wrap: anywhere; }
.pills { display: flex; flex-wrap: wrap; gap: 6px; }
.pill { display: inline-flex; align-items: center; gap: 6px; padding: 2px 10px; border: 1px solid var(--line2);
  border-radius: 999px; font-size: 12px; color: var(--muted); white-space: nowrap; background: var(--panel); }
.pill.status::before { content: ""; width: 7px; height: 7px; border-radius: 50%; background: currentColor; }
.pill.live { color: var(--ok); border-color: rgba(69, 209, 154, 0.4); }
.pill.live::before { animation: pulse 2s ease-in-out infinite; }
.pill.reconnecting { color: var(--warn); border-color: rgba(233, 184, 90, 0.4); }
.pill.error { color: var(--err); border-color: rgba(255, 112, 112, 0.45); }
.pill.kind { color: var(--accent); border-color: rgba(178, 149, 255, 0.4); }
@keyframes pulse { 50% { opacity: 0.35; } }

.authbar { display: flex; gap: 8px; padding-top: 12px; }
.authbar input { flex: 1 1 auto; min-width: 0; max-width: 420px; }
input, button { font: inherit; color: inherit; }
input { min-height: 38px; padding: 6px 10px; background: var(--panel); border: 1px solid var(--line2);
  border-radius: 8px; outline: none; }
input::placeholder { color: var(--dim); }
input:focus { border-color: var(--accent); }
button { min-height: 38px; padding: 6px 16px; background: var(--raised); border: 1px solid var(--line2);
  border-radius: 8px; cursor: pointer; white-space: nowrap; }
button:hover { border-color: var(--dim); }
button:focus-visible, a:focus-visible, summary:focus-visible { outline: 2px solid var(--accent); outline-offset: 2px; }

main { padding-top: 14px; padding-bottom: 48px; }
.section-label { margin: 18px 0 8px; color: var(--dim); font-size: 12px; letter-spacing: 0.1em; text-transform: uppercase; }
.error-text { color: var(--err); overflow-wrap: anywhere; white-space: pre-wrap; margin: 10px 0; }
.empty { color: var(--dim); padding: 18px 2px; }

.pools { display: flex; flex-direction: column; gap: 8px; }
.pool-row { display: flex; align-items: center; gap: 12px; padding: 12px 14px; min-height: 56px; background: var(--panel);
  border: 1px solid var(--line); border-radius: 10px; color: var(--text); }
.pool-row:hover { border-color: var(--line2); background: var(--raised); text-decoration: none; }
.pool-main { flex: 1 1 auto; min-width: 0; }
.pool-name { color: var(--link); font-weight: 700; overflow-wrap: anywhere; }
.pool-facts { display: flex; flex-wrap: wrap; gap: 2px 16px; margin-top: 2px; font-size: 12px; color: var(--muted); }
.pool-facts span { overflow-wrap: anywhere; min-width: 0; }
.chevron { color: var(--dim); flex: none; }

.info { background: var(--panel); border: 1px solid var(--line); border-radius: 10px; }
.info > summary { display: flex; align-items: center; gap: 10px; min-height: 38px; padding: 6px 14px; cursor: pointer;
  list-style: none; user-select: none; color: var(--dim); font-size: 12px; }
.info > summary::-webkit-details-marker { display: none; }
.info > summary::before { content: "\25B8"; }
.info[open] > summary::before { content: "\25BE"; }
.info-title { letter-spacing: 0.1em; text-transform: uppercase; }
.info-brief { min-width: 0; color: var(--muted); overflow-wrap: anywhere; }
.info[open] .info-brief { display: none; }
.info-body { padding: 0 14px 12px; }
.info-body > .error-text, .info-body > .empty { margin: 0; padding: 2px 0; }
.info-grid { display: grid; grid-template-columns: max-content minmax(0, 1fr); gap: 3px 14px; margin: 0; }
.info-grid dt { color: var(--dim); }
.info-grid dd { margin: 0; min-width: 0; overflow-wrap: anywhere; }
.meter { height: 4px; margin-top: 5px; border-radius: 2px; background: var(--line); overflow: hidden; max-width: 260px; }
.meter i { display: block; height: 100%; background: var(--accent); }

.stream { display: flex; flex-direction: column; gap: 8px; }
.card { background: var(--panel); border: 1px solid var(--line); border-left: 3px solid var(--line2);
  border-radius: 8px; padding: 9px 12px 7px; min-width: 0; }
.card.tone-error { border-left-color: var(--err); }
.card.tone-warn { border-left-color: var(--warn); }
.card.tone-ok { border-left-color: var(--ok); }
.card.tone-accent { border-left-color: var(--accent); }
.card-head { color: var(--muted); font-size: 12px; }
.card-head .seq { color: var(--text); font-weight: 700; font-size: 13px; }
.row { display: flex; gap: 10px; margin-top: 6px; min-width: 0; }
.row-label { flex: none; width: 4ch; color: var(--dim); font-size: 11px; line-height: 21px; }
.row-body { flex: 1 1 auto; min-width: 0; }
.chips { display: flex; flex-wrap: wrap; gap: 4px; }
.chip { padding: 0 8px; border: 1px solid var(--line2); border-radius: 999px; font-size: 12px; line-height: 19px;
  color: #b9c5d3; background: var(--raised); max-width: 100%; overflow-wrap: anywhere; }
.chip.tone-error { color: #ff9c9c; background: rgba(255, 112, 112, 0.1); border-color: rgba(255, 112, 112, 0.4); }
.chip.tone-warn { color: #f3cd85; background: rgba(233, 184, 90, 0.1); border-color: rgba(233, 184, 90, 0.4); }
.chip.tone-ok { color: #7fe3bb; background: rgba(69, 209, 154, 0.1); border-color: rgba(69, 209, 154, 0.4); }
.facts { display: flex; flex-wrap: wrap; gap: 0 16px; line-height: 21px; }
.fact { min-width: 0; overflow-wrap: anywhere; }
.fact .key { color: var(--dim); }
.fact .key::after { content: "="; }
.preview { margin-top: 2px; overflow: hidden; display: -webkit-box; -webkit-box-orient: vertical; -webkit-line-clamp: 2;
  line-clamp: 2; overflow-wrap: anywhere; }
.preview.fallback { color: var(--muted); font-size: 12px; }
details.json { margin-top: 4px; }
details.json summary { display: inline-block; padding: 4px 10px 4px 0; color: var(--dim); font-size: 12px; cursor: pointer;
  list-style: none; user-select: none; }
details.json summary::-webkit-details-marker { display: none; }
details.json summary::before { content: "\25B8  "; }
details.json[open] summary::before { content: "\25BE  "; }
details.json summary:hover { color: var(--muted); }
pre { margin: 2px 0 4px; padding: 8px 10px; max-height: 60vh; overflow: auto; background: #080a0e; border: 1px solid var(--line);
  border-radius: 6px; font: 12px/1.45 var(--mono); white-space: pre-wrap; overflow-wrap: anywhere; color: #c6d0dc; }
.card.failure { border-left-color: var(--err); color: var(--err); font-size: 13px; padding-bottom: 9px; }
.failure-text { overflow-wrap: anywhere; white-space: pre-wrap; }
.failure-count { color: var(--muted); font-size: 12px; margin-left: 8px; }

.latest { position: fixed; right: 16px; bottom: 16px; z-index: 20; border-color: var(--accent); color: var(--accent);
  background: rgba(17, 22, 29, 0.96); box-shadow: 0 4px 16px rgba(0, 0, 0, 0.5); }

@media (max-width: 640px) {
  .bar, .authbar, main { padding-left: 10px; padding-right: 10px; }
  .bar { padding-top: 8px; padding-bottom: 8px; gap: 6px 10px; }
  input, button { font-size: 16px; min-height: 44px; }
  .authbar input { max-width: none; }
  .back { min-height: 40px; }
  .pool-row { padding: 12px; }
  .info > summary { min-height: 44px; padding: 6px 12px; }
  .info-body { padding: 0 12px 12px; }
  .card { padding: 9px 10px 7px; }
  .row { gap: 8px; }
  .row-label { display: none; }
  details.json summary { padding: 8px 14px 8px 0; }
  .latest { right: 10px; bottom: 12px; }
}
</style>
</head>
<body>
<header class="top"><div class="bar" id="bar"></div></header>
<form class="authbar" id="authbar" autocomplete="off">
  <input id="token" type="password" placeholder="Bearer token (optional)" aria-label="Bearer token (optional)" autocomplete="off" spellcheck="false">
  <button id="apply" type="submit">Reload</button>
</form>
<main id="main"></main>
<button id="latest" class="latest" type="button" hidden>&#8595; latest</button>
<script>
"use strict";
(function () {
  // Everything shown from the server or the URL goes in through textContent
  // or element properties; no string is ever parsed as HTML.
  var RECONNECT_MS = 700;
  var STREAM_TIMEOUT_MS = 30000;
  var TIME_REFRESH_MS = 10000;
  var NEAR_BOTTOM_PX = 16;
  var MONTHS = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"];
  var PREFERRED_KEYS = ["type", "id", "state", "task_id", "agent_id", "from_id", "to_id", "path", "ts"];
  var TONES = [
    ["error", ["error", "fail", "panic", "fatal"]],
    ["warn", ["warn", "retry", "reconnect", "cancel"]],
    ["ok", ["done", "ok", "success", "result"]]
  ];
  var ISO_PATTERN = /^\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}(:\d{2}(\.\d+)?)?(Z|[+-]\d{2}:?\d{2})?$/i;
  var TOKEN_STORAGE_KEY = "plasmite-ui-token";

  var params = new URLSearchParams(location.search);
  var bufferLimit = parseBufferLimit(params.get("n"));
  var tokenInput = document.getElementById("token");
  var authForm = document.getElementById("authbar");
  var applyButton = document.getElementById("apply");
  var bar = document.getElementById("bar");
  var main = document.getElementById("main");
  var latestButton = document.getElementById("latest");

  // -- small helpers ---------------------------------------------------------

  function el(tag, className, text) {
    var node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }

  function parseBufferLimit(text) {
    var value = parseInt(text, 10);
    if (!isFinite(value)) return 400;
    return Math.min(2000, Math.max(1, value));
  }

  function readStoredToken() {
    try { return sessionStorage.getItem(TOKEN_STORAGE_KEY) || ""; } catch (err) { return ""; }
  }

  function storeToken(token) {
    try {
      if (token) sessionStorage.setItem(TOKEN_STORAGE_KEY, token);
      else sessionStorage.removeItem(TOKEN_STORAGE_KEY);
    } catch (err) { /* storage unavailable: the token lives in the input only */ }
  }

  function currentToken() {
    return tokenInput.value;
  }

  // Re-read the token: remember it for this tab, and keep a token that came
  // in the URL in step so links and reloads carry the new one.
  function applyToken() {
    var token = currentToken();
    storeToken(token);
    if (params.has("token")) {
      if (token) params.set("token", token); else params.delete("token");
      var search = params.toString();
      history.replaceState(null, "", location.pathname + (search ? "?" + search : "") + location.hash);
    }
  }

  function carriedQuery() {
    var carried = new URLSearchParams();
    if (params.has("token")) carried.set("token", params.get("token"));
    if (params.has("n")) carried.set("n", params.get("n"));
    var text = carried.toString();
    return text ? "?" + text : "";
  }

  function request(url, options) {
    var headers = {};
    var token = currentToken();
    if (token) headers.Authorization = "Bearer " + token;
    var init = { headers: headers, cache: "no-store", credentials: "same-origin" };
    if (options && options.signal) init.signal = options.signal;
    return fetch(url, init);
  }

  function readText(response) {
    return response.text().catch(function () { return ""; });
  }

  function failureText(what, status, body) {
    return what + " failed (" + status + "): " + body;
  }

  function networkReason(err) {
    return (err && err.message) ? err.message : String(err);
  }

  function pad2(value) { return (value < 10 ? "0" : "") + value; }

  function clockTime(date) { return pad2(date.getHours()) + ":" + pad2(date.getMinutes()); }

  function isSameDay(a, b) {
    return a.getFullYear() === b.getFullYear() && a.getMonth() === b.getMonth() && a.getDate() === b.getDate();
  }

  function parseTime(text) {
    if (typeof text !== "string") return NaN;
    // Trim nanoseconds to milliseconds: Date.parse wants at most three digits everywhere.
    var trimmed = text.trim().replace(/(\.\d{3})\d+/, "$1");
    return Date.parse(trimmed);
  }

  function monthDayTime(date) {
    return MONTHS[date.getMonth()] + " " + date.getDate() + " " + clockTime(date);
  }

  function relativeTime(ms) {
    var now = new Date();
    var seconds = Math.floor((now.getTime() - ms) / 1000);
    if (seconds < 5) return "just now";
    if (seconds < 60) return seconds + "s ago";
    if (seconds < 3600) return Math.floor(seconds / 60) + "m ago";
    var date = new Date(ms);
    if (isSameDay(date, now)) return Math.floor(seconds / 3600) + "h ago";
    var yesterday = new Date(now.getFullYear(), now.getMonth(), now.getDate() - 1);
    if (isSameDay(date, yesterday)) return "yesterday " + clockTime(date);
    return monthDayTime(date);
  }

  function shortTime(ms) {
    var date = new Date(ms);
    if (isSameDay(date, new Date())) return clockTime(date) + ":" + pad2(date.getSeconds());
    return monthDayTime(date);
  }

  // Elements whose text is a relative time carry the epoch ms and a renderer.
  var timedNodes = [];
  function trackTime(node, ms, render) {
    node._plasmiteTime = ms;
    node._plasmiteRender = render;
    node.textContent = render(ms);
    timedNodes.push(node);
    return node;
  }

  function refreshTimes() {
    timedNodes = timedNodes.filter(function (node) { return node.isConnected; });
    timedNodes.forEach(function (node) { node.textContent = node._plasmiteRender(node._plasmiteTime); });
  }

  function humanBytes(value) {
    if (typeof value !== "number" || !isFinite(value)) return "-";
    if (value < 1024) return value + " B";
    var units = ["KB", "MB", "GB"];
    var scaled = value / 1024;
    var unit = 0;
    while (scaled >= 1024 && unit < units.length - 1) { scaled /= 1024; unit += 1; }
    return scaled.toFixed(1) + " " + units[unit];
  }

  function collapse(text) { return String(text).replace(/\s+/g, " ").trim(); }

  function truncate(text, limit) {
    return text.length > limit ? text.slice(0, limit - 1) + "\u2026" : text;
  }

  function compactJson(value) {
    try {
      var text = JSON.stringify(value);
      return text === undefined ? String(value) : text;
    } catch (err) { return String(value); }
  }

  function isObject(value) { return value !== null && typeof value === "object" && !Array.isArray(value); }

  function toneOf(tag) {
    var lower = String(tag).toLowerCase();
    for (var i = 0; i < TONES.length; i++) {
      var words = TONES[i][1];
      for (var j = 0; j < words.length; j++) if (lower.indexOf(words[j]) >= 0) return TONES[i][0];
    }
    return "";
  }

  function pill(className, text) { return el("span", "pill " + className, text); }

  function header(leadNodes, pillNodes) {
    bar.textContent = "";
    var lead = el("div", "lead");
    leadNodes.forEach(function (node) { lead.appendChild(node); });
    var pills = el("div", "pills");
    pillNodes.forEach(function (node) { pills.appendChild(node); });
    bar.appendChild(lead);
    bar.appendChild(pills);
  }

  // -- catalog view (/ui) ------------------------------------------------------

  function catalogView() {
    var countPill = pill("", "");
    countPill.hidden = true;
    header([el("span", "brand", "PLASMITE UI")], [pill("kind", "catalog"), countPill]);
    applyButton.textContent = "Reload";
    var generation = 0;

    function load() {
      generation += 1;
      var mine = generation;
      main.textContent = "";
      main.appendChild(el("div", "empty", "loading\u2026"));
      request("/v0/ui/pools").then(function (response) {
        return readText(response).then(function (body) {
          if (mine !== generation) return;
          if (!response.ok) return showFailure(failureText("pool list", response.status, body));
          var listing;
          try { listing = JSON.parse(body); } catch (err) {
            return showFailure(failureText("pool list", response.status, body));
          }
          var pools = (listing && Array.isArray(listing.pools)) ? listing.pools.slice() : [];
          showPools(pools);
        });
      }, function (err) {
        if (mine === generation) showFailure(failureText("pool list", "network", networkReason(err)));
      });
    }

    function showFailure(text) {
      countPill.hidden = true;
      main.textContent = "";
      main.appendChild(el("div", "error-text", text));
    }

    function showPools(pools) {
      pools = pools.filter(isObject);
      pools.sort(function (a, b) {
        var left = String(a.name), right = String(b.name);
        return left < right ? -1 : left > right ? 1 : 0;
      });
      main.textContent = "";
      countPill.textContent = pools.length + (pools.length === 1 ? " pool" : " pools");
      countPill.hidden = false;
      if (!pools.length) {
        main.appendChild(el("div", "empty", "No pools found."));
        return;
      }
      var list = el("nav", "pools");
      var query = carriedQuery();
      pools.forEach(function (info) {
        var name = String(info.name);
        var row = el("a", "pool-row");
        row.href = "/ui/pools/" + encodeURIComponent(name) + query;
        var body = el("div", "pool-main");
        body.appendChild(el("div", "pool-name", name));
        var facts = el("div", "pool-facts");
        facts.appendChild(el("span", "", "path: " + (info.path == null ? "-" : info.path)));
        var ring = el("span", "", "P: " + (info.ring_size == null ? "-" : info.ring_size));
        if (typeof info.ring_size === "number") ring.title = humanBytes(info.ring_size) + " ring";
        facts.appendChild(ring);
        var bounds = isObject(info.bounds) ? info.bounds : {};
        facts.appendChild(el("span", "", "newest: " + (bounds.newest == null ? "-" : bounds.newest)));
        var age = isObject(info.metrics) && isObject(info.metrics.age) ? info.metrics.age : {};
        var newestMs = parseTime(age.newest_time);
        if (!isNaN(newestMs)) {
          var when = trackTime(el("span"), newestMs, relativeTime);
          when.title = age.newest_time;
          facts.appendChild(when);
        }
        body.appendChild(facts);
        row.appendChild(body);
        row.appendChild(el("span", "chevron", "\u203A"));
        list.appendChild(row);
      });
      main.appendChild(list);
    }

    authForm.addEventListener("submit", function (event) {
      event.preventDefault();
      applyToken();
      load();
    });
    load();
  }

  // -- pool watch view (/ui/pools/NAME) ------------------------------------------

  function poolView(name) {
    var apiBase = "/v0/ui/pools/" + encodeURIComponent(name);
    var back = el("a", "back", "< back");
    back.href = "/ui" + carriedQuery();
    var statusPill = pill("status reconnecting", "reconnecting");
    statusPill.setAttribute("role", "status");
    var countPill = pill("count", "");
    var sizePill = pill("size", "");
    sizePill.hidden = true;
    header([back, el("span", "title", "pool: " + name)], [statusPill, countPill, sizePill]);
    applyButton.textContent = "Apply";

    // The info panel folds away on narrow screens, where the stream matters most.
    var infoBox = el("details", "info");
    infoBox.open = !window.matchMedia("(max-width: 640px)").matches;
    var infoSummary = el("summary");
    infoSummary.appendChild(el("span", "info-title", "info"));
    var infoBrief = el("span", "info-brief", "");
    infoSummary.appendChild(infoBrief);
    var infoBody = el("div", "info-body");
    infoBox.appendChild(infoSummary);
    infoBox.appendChild(infoBody);
    var streamLabel = el("div", "section-label", "stream");
    var stream = el("div", "stream");
    var waiting = el("div", "empty", "waiting for messages\u2026");
    main.textContent = "";
    main.appendChild(infoBox);
    main.appendChild(streamLabel);
    main.appendChild(waiting);
    main.appendChild(stream);

    var state = { generation: 0, since: null, lastSeq: 0, count: 0, controller: null, timer: null,
      isInfoFailed: false };

    function setStatus(status) {
      statusPill.className = "pill status " + status;
      statusPill.textContent = status;
    }

    function updateCount() {
      countPill.textContent = state.count + " of " + bufferLimit + " buffered";
      waiting.hidden = stream.firstChild !== null;
    }

    // -- info panel --

    function infoRow(grid, label, value) {
      grid.appendChild(el("dt", "", label));
      var cell = el("dd");
      if (value instanceof Node) cell.appendChild(value); else cell.textContent = value;
      grid.appendChild(cell);
      return cell;
    }

    function timeValue(text) {
      var span = el("span");
      var ms = parseTime(text);
      if (text == null || isNaN(ms)) { span.textContent = text == null ? "-" : String(text); return span; }
      return trackTime(span, ms, function (value) { return text + " (" + relativeTime(value) + ")"; });
    }

    function showInfo(info) {
      state.isInfoFailed = false;
      var bounds = isObject(info.bounds) ? info.bounds : {};
      var metrics = isObject(info.metrics) ? info.metrics : {};
      var usage = isObject(metrics.utilization) ? metrics.utilization : {};
      var age = isObject(metrics.age) ? metrics.age : {};
      var dash = function (value) { return value == null ? "-" : String(value); };
      var grid = el("dl", "info-grid");
      infoRow(grid, "Pool", dash(info.name));
      infoRow(grid, "Path", dash(info.path));
      infoRow(grid, "Size", humanBytes(info.file_size) + " (ring: offset=" + dash(info.ring_offset) +
        " size=" + humanBytes(info.ring_size) + ")");
      var count = metrics.message_count;
      if (count == null && bounds.newest != null && bounds.oldest != null) count = bounds.newest - bounds.oldest + 1;
      infoRow(grid, "Bounds", "oldest=" + dash(bounds.oldest) + " newest=" + dash(bounds.newest) +
        " count=" + dash(count));
      var percent = typeof usage.used_percent === "number" ? usage.used_percent : NaN;
      var utilCell = infoRow(grid, "Util", humanBytes(usage.used_bytes) + " used, " + humanBytes(usage.free_bytes) +
        " free (" + (isFinite(percent) ? percent.toFixed(2) : "-") + "%)");
      if (isFinite(percent)) {
        var meter = el("div", "meter");
        var fill = el("i");
        fill.style.width = Math.min(100, Math.max(0, percent)) + "%";
        meter.appendChild(fill);
        utilCell.appendChild(meter);
      }
      infoRow(grid, "Oldest", timeValue(age.oldest_time));
      infoRow(grid, "Newest", timeValue(age.newest_time));
      infoBody.textContent = "";
      infoBody.appendChild(grid);
      infoBrief.textContent = "oldest=" + dash(bounds.oldest) + " newest=" + dash(bounds.newest) +
        (isFinite(percent) ? " \u00B7 " + percent.toFixed(2) + "% used" : "");
      if (typeof info.ring_size === "number") {
        sizePill.textContent = humanBytes(info.ring_size) + " pool";
        sizePill.hidden = false;
      }
    }

    function showInfoFailure(text) {
      state.isInfoFailed = true;
      infoBody.textContent = "";
      infoBody.appendChild(el("div", "error-text", text));
      infoBrief.textContent = "failed";
      infoBox.open = true;
    }

    function loadInfo(generation) {
      return request(apiBase + "/info").then(function (response) {
        return readText(response).then(function (body) {
          if (generation !== state.generation) return null;
          var info = null;
          if (response.ok) {
            try { info = JSON.parse(body).pool; } catch (err) { info = null; }
          }
          if (!isObject(info)) {
            showInfoFailure(failureText("pool info", response.status, body));
            return null;
          }
          showInfo(info);
          return info;
        });
      }, function (err) {
        if (generation === state.generation) {
          showInfoFailure(failureText("pool info", "network", networkReason(err)));
        }
        return null;
      });
    }

    // -- message cards --

    function factText(key, value) {
      var raw = typeof value === "string" ? value : compactJson(value);
      var text = collapse(raw);
      if (typeof value === "string" && ISO_PATTERN.test(text)) {
        var ms = parseTime(text);
        if (!isNaN(ms)) return { text: shortTime(ms), title: text };
      }
      var limit = key === "ts" ? 42 : 72;
      return { text: truncate(text, limit), title: text.length > limit ? text : "" };
    }

    function collectFacts(sources, preview) {
      var facts = [];
      var seen = {};
      function add(source, key) {
        if (facts.length >= 6 || seen[key] || !Object.prototype.hasOwnProperty.call(source, key)) return;
        if (key === "tags" || key === "data") return;
        if (preview && source === preview.source && key === preview.key) return;  // shown below
        seen[key] = true;
        facts.push([key, source[key]]);
      }
      PREFERRED_KEYS.forEach(function (key) { sources.forEach(function (source) { add(source, key); }); });
      sources.forEach(function (source) { Object.keys(source).forEach(function (key) { add(source, key); }); });
      return facts;
    }

    function findPreview(sources) {
      var keys = ["summary", "body"];
      for (var i = 0; i < sources.length; i++) {
        for (var j = 0; j < keys.length; j++) {
          var value = sources[i][keys[j]];
          if (value === undefined || value === null) continue;
          var text = collapse(typeof value === "string" ? value : compactJson(value));
          if (text) return { text: text, source: sources[i], key: keys[j] };
        }
      }
      return null;
    }

    function cardTone(tags, data) {
      var tones = tags.map(toneOf);
      if (tones.indexOf("error") >= 0) return "error";
      if (tones.indexOf("warn") >= 0) return "warn";
      var type = isObject(data) ? data.type : undefined;
      if (tones.indexOf("ok") >= 0 || type === "result") return "ok";
      if (type === "claim") return "accent";
      return "";
    }

    function row(label, body) {
      var node = el("div", "row");
      node.appendChild(el("span", "row-label", label));
      body.classList.add("row-body");
      node.appendChild(body);
      return node;
    }

    function messageCard(message) {
      var data = message.data;
      var meta = isObject(message.meta) ? message.meta : {};
      var tags = Array.isArray(meta.tags) ? meta.tags.map(String) : [];
      var tone = cardTone(tags, data);
      var card = el("article", "card message" + (tone ? " tone-" + tone : ""));
      card.dataset.seq = String(message.seq);

      var head = el("div", "card-head");
      head.appendChild(el("span", "seq", "#" + message.seq));
      head.appendChild(document.createTextNode(" \u00B7 "));
      var when = el("span", "when");
      var ms = parseTime(message.time);
      if (isNaN(ms)) when.textContent = message.time == null ? "-" : String(message.time);
      else trackTime(when, ms, relativeTime);
      if (message.time != null) when.title = String(message.time);
      head.appendChild(when);
      card.appendChild(head);

      if (tags.length) {
        var chips = el("div", "chips");
        tags.forEach(function (tag) {
          var chipTone = toneOf(tag);
          chips.appendChild(el("span", "chip" + (chipTone ? " tone-" + chipTone : ""), tag));
        });
        card.appendChild(row("meta", chips));
      }

      var sources = [];
      if (isObject(data)) {
        var hasEnvelope = Object.prototype.hasOwnProperty.call(data, "data") &&
          (Object.prototype.hasOwnProperty.call(data, "type") || Object.prototype.hasOwnProperty.call(data, "ts"));
        if (hasEnvelope && isObject(data.data)) sources.push(data.data);
        sources.push(data);
      }
      var dataBody = el("div");
      var preview = findPreview(sources);
      var facts = collectFacts(sources, preview);
      if (facts.length) {
        var factList = el("div", "facts");
        facts.forEach(function (fact) {
          var shown = factText(fact[0], fact[1]);
          var item = el("span", "fact");
          item.appendChild(el("span", "key", fact[0]));
          item.appendChild(el("span", "value", shown.text));
          if (shown.title) item.title = shown.title;
          factList.appendChild(item);
        });
        dataBody.appendChild(factList);
      }
      if (preview) {
        dataBody.appendChild(el("div", "preview", truncate(preview.text, 220)));
      } else {
        var fallback = truncate(compactJson(data), 220);
        dataBody.appendChild(el("div", "preview fallback", fallback));
      }
      card.appendChild(row("data", dataBody));

      var details = el("details", "json");
      details.appendChild(el("summary", "", "json"));
      details.addEventListener("toggle", function () {
        if (details.open && !details.querySelector("pre")) {
          details.appendChild(el("pre", "", JSON.stringify(message, null, 2)));
        }
      });
      card.appendChild(details);
      return card;
    }

    function failureCard(text) {
      var last = stream.lastElementChild;
      if (last && last.classList.contains("failure") && last._plasmiteText === text) {
        last._plasmiteRepeats += 1;
        last.querySelector(".failure-count").textContent = "\u00D7" + last._plasmiteRepeats;
        return;
      }
      var wasNear = isNearBottom();
      var card = el("article", "card failure");
      card._plasmiteText = text;
      card._plasmiteRepeats = 1;
      card.appendChild(el("span", "failure-text", text));
      card.appendChild(el("span", "failure-count", ""));
      stream.appendChild(card);
      updateCount();
      if (wasNear) scrollToBottom();
    }

    function trimBuffer() {
      while (state.count > bufferLimit && stream.firstElementChild) {
        var first = stream.firstElementChild;
        if (first.classList.contains("message")) state.count -= 1;
        stream.removeChild(first);
      }
    }

    function addMessages(messages) {
      var wasNear = isNearBottom();
      var fragment = document.createDocumentFragment();
      messages.forEach(function (message) {
        if (!isObject(message) || typeof message.seq !== "number") return;
        if (message.seq <= state.lastSeq) return;  // at-least-once delivery: de-dupe by seq
        state.lastSeq = message.seq;
        state.since = message.seq + 1;
        fragment.appendChild(messageCard(message));
        state.count += 1;
      });
      stream.appendChild(fragment);
      trimBuffer();
      updateCount();
      if (wasNear) scrollToBottom();
      else updateLatestButton();
    }

    // -- the stream loop (SSE over fetch) --

    function eventsUrl() {
      return apiBase + "/events?" + (state.since != null ? "since_seq=" + state.since + "&" : "") +
        "timeout_ms=" + STREAM_TIMEOUT_MS;
    }

    function readEvents(response, generation) {
      var pending = "";
      var eventName = "";
      var dataLines = [];

      function parseChunk(text) {
        pending += text;
        var batch = [];
        var index;
        while ((index = pending.indexOf("\n")) >= 0) {
          var line = pending.slice(0, index);
          pending = pending.slice(index + 1);
          if (line.charAt(line.length - 1) === "\r") line = line.slice(0, -1);
          if (line === "") {
            if ((eventName || "message") === "message" && dataLines.length) {
              try { batch.push(JSON.parse(dataLines.join("\n"))); } catch (err) { /* bad JSON is ignored */ }
            }
            eventName = "";
            dataLines = [];
            continue;
          }
          if (line.charAt(0) === ":") continue;
          var colon = line.indexOf(":");
          var field = colon < 0 ? line : line.slice(0, colon);
          var value = colon < 0 ? "" : line.slice(colon + 1);
          if (value.charAt(0) === " ") value = value.slice(1);
          if (field === "event") eventName = value;
          else if (field === "data") dataLines.push(value);
        }
        if (batch.length) addMessages(batch);
      }

      if (!response.body || !response.body.getReader) {
        // No streaming body: the whole response arrives when the stream ends.
        return response.text().then(function (text) {
          if (generation === state.generation) parseChunk(text + "\n");
        });
      }
      var reader = response.body.getReader();
      var decoder = new TextDecoder();

      function pump() {
        return reader.read().then(function (chunk) {
          if (generation !== state.generation) { reader.cancel().catch(function () {}); return; }
          if (chunk.done) { parseChunk(decoder.decode()); return; }
          parseChunk(decoder.decode(chunk.value, { stream: true }));
          return pump();
        });
      }
      return pump();
    }

    function openStream(generation) {
      if (generation !== state.generation) return;
      var controller = new AbortController();
      state.controller = controller;
      request(eventsUrl(), { signal: controller.signal }).then(function (response) {
        if (generation !== state.generation) return null;
        if (!response.ok) {
          return readText(response).then(function (body) {
            if (generation !== state.generation) return;
            setStatus("error");
            failureCard(failureText("stream", response.status, body));
            retry(generation, false);
          });
        }
        setStatus("live");
        if (state.isInfoFailed) loadInfo(generation);  // the server is back: refresh the panel too
        return readEvents(response, generation).then(function () {
          if (generation !== state.generation) return;
          setStatus("reconnecting");
          retry(generation, true);
        });
      }).catch(function (err) {
        if (generation !== state.generation) return;
        setStatus("error");
        failureCard(failureText("stream", "network", networkReason(err)));
        retry(generation, false);
      });
    }

    function retry(generation, ended) {
      state.timer = setTimeout(function () {
        if (generation !== state.generation) return;
        // A stream that ended normally is a good moment to refresh the info panel.
        if (ended) loadInfo(generation);
        openStream(generation);
      }, RECONNECT_MS);
    }

    function start() {
      state.generation += 1;
      var generation = state.generation;
      if (state.controller) state.controller.abort();
      if (state.timer) clearTimeout(state.timer);
      state.since = null;
      state.lastSeq = 0;
      state.count = 0;
      stream.textContent = "";
      setStatus("reconnecting");
      updateCount();
      infoBody.textContent = "";
      infoBody.appendChild(el("div", "empty", "loading\u2026"));
      infoBrief.textContent = "loading\u2026";
      loadInfo(generation).then(function (info) {
        if (generation !== state.generation) return;
        var bounds = info && isObject(info.bounds) ? info.bounds : {};
        if (typeof bounds.newest === "number") {
          var oldest = typeof bounds.oldest === "number" ? bounds.oldest : 1;
          state.since = Math.max(oldest, bounds.newest - bufferLimit + 1);
        }
        openStream(generation);
      });
    }

    // -- scrolling --

    function isNearBottom() {
      var scroller = document.scrollingElement || document.documentElement;
      return scroller.scrollHeight - scroller.scrollTop - scroller.clientHeight <= NEAR_BOTTOM_PX;
    }

    function scrollToBottom() {
      var scroller = document.scrollingElement || document.documentElement;
      scroller.scrollTop = scroller.scrollHeight;
      updateLatestButton();
    }

    function updateLatestButton() {
      latestButton.hidden = state.count === 0 || isNearBottom();
    }

    window.addEventListener("scroll", updateLatestButton, { passive: true });
    latestButton.addEventListener("click", scrollToBottom);
    authForm.addEventListener("submit", function (event) {
      event.preventDefault();
      applyToken();
      back.href = "/ui" + carriedQuery();
      start();
    });
    start();
  }

  // -- routing -------------------------------------------------------------------

  tokenInput.value = params.has("token") ? params.get("token") : readStoredToken();
  setInterval(refreshTimes, TIME_REFRESH_MS);
  var path = location.pathname;
  try { path = decodeURIComponent(path); } catch (err) { /* keep the raw path */ }
  var prefix = "/ui/pools/";
  if (path.indexOf(prefix) === 0 && path.length > prefix.length) poolView(path.slice(prefix.length));
  else catalogView();
})();
</script>
</body>
</html>
"""


# =============================================================================
# 11. Python API
# =============================================================================
# The surface users import, shaped like the official plasmite binding: JSON
# bytes in and out, PlasmiteError for everything but wrong argument types
# (TypeError) and values (ValueError).  Built on LocalPool and Cursor.

DEFAULT_POOL_DIR = os.path.join("~", ".plasmite", "pools")


class Durability(str, enum.Enum):
    """How hard an append works to reach the disk.

    FAST leaves the bytes to the kernel's write-back of the shared mapping;
    FLUSH msyncs the frame, index slot and header before the append returns.
    """

    FAST = "fast"
    FLUSH = "flush"

    def __str__(self) -> str:
        return self.value


Lite3Frame = namedtuple("Lite3Frame", "seq timestamp_ns payload")
Lite3Frame.__doc__ = ("A stored message in its raw form: seq, append time in ns since the "
                      "epoch, and the Lite3 payload bytes.")


def parse_message(raw) -> dict:
    """Parse a message returned by the API (JSON bytes or str) into a dict.

    The dict has ``seq``, ``time``, ``meta`` (with ``tags``) and ``data``.
    Raises TypeError for other types and ValueError for text that is not a
    JSON object.
    """
    if isinstance(raw, (bytes, bytearray, memoryview)):
        raw = bytes(raw).decode("utf-8")
    elif not isinstance(raw, str):
        raise TypeError("parse_message expects bytes or str, not %s" % type(raw).__name__)
    message = json.loads(raw)
    if not isinstance(message, dict):
        raise ValueError("a message is a JSON object")
    return message


def message_fields(frame: Frame) -> dict:
    """Decode a stored frame into the message dict users see.

    Raises PlasmiteError Corrupt when the payload is not a valid message.
    """
    try:
        tags, data = decode_message(frame.payload)
    except PlasmiteError as err:
        if err.seq is None:
            err.seq = frame.seq
        raise
    try:
        time_text = format_timestamp(frame.timestamp_ns)
    except ValueError as err:
        raise PlasmiteError("Corrupt", "message timestamp out of range", seq=frame.seq) from err
    return {"data": data, "meta": {"tags": tags}, "seq": frame.seq, "time": time_text}


def message_json(frame: Frame) -> str:
    """Return ``dump_json(message_fields(frame))``, from the buffer when it can.

    Raises PlasmiteError Corrupt when the payload is not a valid message.
    """
    texts = flat_message_json(frame.payload)
    if texts is not None:
        try:
            time_text = format_timestamp(frame.timestamp_ns)
        except ValueError:
            texts = None
    if texts is None:
        return dump_json(message_fields(frame))
    return '{"data":%s,"meta":{"tags":%s},"seq":%d,"time":"%s"}' % (
        texts[0], texts[1], frame.seq, time_text)


def _dump_big_message(message: dict) -> bytes:
    """``dump_json(message).encode()`` for a message holding big strings, in less memory.

    Each string of _BIG_STRING bytes or more is escaped on its own and replaced by a
    placeholder before the rest is dumped, so the decoded string, its escaped text, the
    whole JSON text and its bytes are never all alive at once: a 100 MB string peaks at
    two copies instead of three (json joins its escaped chunk into the text).
    """
    token = "plasmite-big-" + os.urandom(16).hex()
    pieces = []     # UTF-8 JSON of each big string; placeholder i stands for pieces[i]
    containers = [message["data"]]
    while containers:
        container = containers.pop()
        # Keys, not items: an items iterator keeps the last (key, value) pair alive.
        for key in list(container) if isinstance(container, dict) else range(len(container)):
            value = container[key]
            if isinstance(value, (dict, list)):
                containers.append(value)
            elif isinstance(value, str) and len(value) >= _BIG_STRING:
                escaped = _encode_json_string(value)
                container[key] = "%s-%d" % (token, len(pieces))
                del value
                pieces.append(escaped.encode("utf-8"))
                del escaped
    text = dump_json(message).encode("utf-8")
    markers = [b'"%s-%d"' % (token.encode(), index) for index in range(len(pieces))]
    placed = sorted((text.find(marker), index) for index, marker in enumerate(markers))
    if placed and placed[0][0] < 0:  # unreachable unless the data holds the random token
        raise PlasmiteError("Internal", "big message placeholder not found")
    parts, start = [], 0
    for position, index in placed:
        parts += (text[start:position], pieces[index])
        start = position + len(markers[index])
    parts.append(text[start:])
    del pieces
    return b"".join(parts)


def _check_durability(durability) -> bool:
    """Return True for flush; accept Durability members or their strings."""
    if isinstance(durability, Durability):
        return durability is Durability.FLUSH
    if isinstance(durability, str):
        if durability in ("fast", "flush"):
            return durability == "flush"
        raise ValueError("durability must be 'fast' or 'flush', not %r" % durability)
    raise TypeError("durability must be a Durability, not %s" % type(durability).__name__)


def _check_tags(tags) -> list:
    if isinstance(tags, (str, bytes)) or not isinstance(tags, (list, tuple)):
        raise TypeError("tags must be a list of str")
    for tag in tags:
        if not isinstance(tag, str):
            raise TypeError("tags must be a list of str, found %s" % type(tag).__name__)
    return list(tags)


def _check_count(name: str, value, allow_none: bool = True):
    """Validate a non-negative integer argument (seq, count); None passes when allowed."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError("%s must be an int, not %s" % (name, type(value).__name__))
    if value < 0:
        raise ValueError("%s must not be negative" % name)
    return value


def _check_timestamp(timestamp_ns):
    _check_count("timestamp_ns", timestamp_ns)
    if timestamp_ns is not None and timestamp_ns >= 1 << 64:
        raise ValueError("timestamp_ns must fit in 64 bits")
    return timestamp_ns


def _check_seconds(name: str, value):
    """Validate a millisecond duration argument; return seconds or None."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError("%s must be a number, not %s" % (name, type(value).__name__))
    if not value >= 0 or math.isinf(value):
        raise ValueError("%s must be a finite number >= 0" % name)
    return value / 1000


def _has_all_tags(tags: list, wanted: list) -> bool:
    return all(tag in tags for tag in wanted)


class Stream:
    """An iterator over a pool's messages as JSON bytes (from :meth:`Pool.open_stream`).

    ``next_json()`` returns the next message, or None once ``max_messages``
    were returned or no message arrived within ``timeout_ms``.  Blocking
    waits do not spin; :meth:`close` (from any thread) ends them.
    ``dropped_count`` counts messages overwritten before the stream read
    them.  Use as a context manager or iterate it.
    """

    def __init__(self, pool: "Pool", since_seq, max_messages, timeout_ms, tags):
        import threading   # not at module level: a poke never needs it

        local = pool._local()
        if since_seq is None:
            since_seq = local.read_state()[4] + 1
        self._pool = pool
        self._cursor = local.cursor(since_seq)
        self._max_messages = max_messages
        self._timeout = _check_seconds("timeout_ms", timeout_ms)
        self._tags = tags
        self._delivered = 0
        self._stop = threading.Event()

    @property
    def dropped_count(self) -> int:
        """Messages the writers overwrote before this stream could read them."""
        return self._cursor.dropped_count

    def _next_frame(self):
        if self._stop.is_set():
            raise PlasmiteError("Usage", "stream is closed", hint="Open a new stream.")
        if self._max_messages is not None and self._delivered >= self._max_messages:
            return None
        deadline = None if self._timeout is None else time.monotonic() + self._timeout
        cursor = self._cursor
        local = self._pool._local()
        while True:
            frame = cursor.next_frame()
            if frame is None:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return None
                if not local.wait_for_seq(cursor.next_seq, remaining, self._stop):
                    if self._stop.is_set():
                        return None
                    if cursor.next_seq > local.read_state()[4]:
                        return None
                continue
            if self._tags and not _has_all_tags(decode_message(frame.payload)[0], self._tags):
                continue
            self._delivered += 1
            return frame

    def next_json(self):
        """Return the next message as JSON bytes, or None at the end or on timeout."""
        frame = self._next_frame()
        if frame is None:
            return None
        return message_json(frame).encode("utf-8")

    def __iter__(self):
        while True:
            item = self.next_json()
            if item is None:
                return
            yield item

    def close(self) -> None:
        """End the stream; a next_json() blocked in another thread returns None."""
        self._stop.set()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


class Lite3Stream(Stream):
    """Like :class:`Stream`, but yields :class:`Lite3Frame` objects (raw payloads)."""

    def next_frame(self):
        """Return the next message as a Lite3Frame, or None at the end or on timeout."""
        frame = self._next_frame()
        if frame is None:
            return None
        return Lite3Frame(frame.seq, frame.timestamp_ns, frame.payload)

    def __iter__(self):
        while True:
            item = self.next_frame()
            if item is None:
                return
            yield item


class Pool:
    """An open pool: append and read messages as JSON bytes or raw Lite3.

    Safe to use from several threads and alongside other processes (Rust
    plasmite included).  Methods raise PlasmiteError for pool problems,
    TypeError/ValueError for bad arguments, and PlasmiteError once closed.
    """

    def __init__(self, name: str, local: LocalPool):
        self.name = name
        self.path = local.path
        self._pool = local

    def _local(self) -> LocalPool:
        if self._pool.is_closed:
            raise PlasmiteError("Usage", "pool is closed", path=self.path,
                                hint="Open the pool again with Client.open_pool().")
        return self._pool

    # -- writing ------------------------------------------------------------

    def append_json(self, payload, tags=(), durability=Durability.FAST, timestamp_ns=None) -> bytes:
        """Append a JSON object (bytes or str) with tags; return the committed message as JSON bytes.

        The data is normalised as upstream does (keys sorted, serde_json
        number rules) and stored as Lite3.  ``timestamp_ns`` overrides the
        append time (default: now).  Raises PlasmiteError Usage ("invalid
        json", "data must be object", too large), Permission, Corrupt, Io.
        """
        if isinstance(payload, (bytes, bytearray, memoryview)):
            payload = bytes(payload)
        elif not isinstance(payload, str):
            raise TypeError("payload must be JSON bytes or str, not %s" % type(payload).__name__)
        tags = _check_tags(tags)
        should_flush = _check_durability(durability)
        timestamp_ns = _check_timestamp(timestamp_ns)
        local = self._local()
        data = parse_json_value(payload, should_sort_keys=False)   # sorted by encode and dump
        if not isinstance(data, dict):
            raise PlasmiteError("Usage", "data must be object",
                                hint="Wrap the value in an object, e.g. {\"value\": ...}.")
        seq, timestamp_ns = local.append(_encode_envelope(tags, data), timestamp_ns, should_flush)
        # The receipt shows the data as parsed, like upstream's: an integer
        # above 2**63-1 prints as given although Lite3 stores it as a float.
        return dump_json({"data": data, "meta": {"tags": tags}, "seq": seq,
                          "time": format_timestamp(timestamp_ns)}).encode("utf-8")

    def append_lite3(self, payload, durability=Durability.FAST, timestamp_ns=None) -> bytes:
        """Append a pre-encoded Lite3 message payload; return the committed message as JSON bytes.

        The payload must be a valid message document (``{"data": {...},
        "meta": {"tags": [...]}}``), else PlasmiteError Corrupt, as upstream.
        """
        if not isinstance(payload, (bytes, bytearray, memoryview)):
            raise TypeError("payload must be bytes, not %s" % type(payload).__name__)
        payload = bytes(payload)
        should_flush = _check_durability(durability)
        timestamp_ns = _check_timestamp(timestamp_ns)
        local = self._local()
        try:
            validate_lite3_message(payload)
        except PlasmiteError as err:
            err.hint = ("Pass a Lite3 message document ({\"data\": {...}, \"meta\": "
                        "{\"tags\": [...]}}), such as the payload of get_lite3().")
            raise
        seq, timestamp_ns = local.append(payload, timestamp_ns, should_flush)
        return message_json(Frame(seq, timestamp_ns, payload)).encode("utf-8")

    # -- reading ------------------------------------------------------------

    def get_json(self, seq: int) -> bytes:
        """Return message ``seq`` as JSON bytes; PlasmiteError NotFound if it is not in the pool."""
        _check_count("seq", seq, allow_none=False)
        frame = self._local().get(seq)
        if len(frame.payload) < _BIG_STRING:
            return message_json(frame).encode("utf-8")
        message = message_fields(frame)
        del frame   # the payload copy: from here on at most two copies are alive
        return _dump_big_message(message)

    def get_lite3(self, seq: int) -> Lite3Frame:
        """Return message ``seq`` as a Lite3Frame (raw payload); NotFound if absent."""
        _check_count("seq", seq, allow_none=False)
        frame = self._local().get(seq)
        return Lite3Frame(frame.seq, frame.timestamp_ns, frame.payload)

    def open_stream(self, since_seq=None, max_messages=None, timeout_ms=None, tags=None) -> Stream:
        """Open a Stream of messages as JSON bytes.

        ``since_seq`` is the first seq wanted (None: only messages appended
        from now on; older than the oldest: start at the oldest).
        ``max_messages`` ends the stream after that many (counted after the
        tag filter); ``timeout_ms`` ends it when no message arrives for that
        long (None waits forever); ``tags`` keeps messages carrying all of them.
        """
        return Stream(self, *self._stream_arguments(since_seq, max_messages, timeout_ms, tags))

    def open_lite3_stream(self, since_seq=None, max_messages=None, timeout_ms=None,
                          tags=None) -> Lite3Stream:
        """Open a Lite3Stream: like :meth:`open_stream`, yielding Lite3Frame objects."""
        return Lite3Stream(self, *self._stream_arguments(since_seq, max_messages, timeout_ms, tags))

    def _stream_arguments(self, since_seq, max_messages, timeout_ms, tags) -> tuple:
        _check_count("since_seq", since_seq)
        _check_count("max_messages", max_messages)
        _check_seconds("timeout_ms", timeout_ms)
        tags = [] if tags is None else _check_tags(tags)
        return since_seq, max_messages, timeout_ms, tags

    def tail(self, since_seq=None, max_messages=None, timeout_ms=None, tags=None):
        """Yield messages as JSON bytes, as :meth:`open_stream` selects them.

        A generator: the stream closes when the generator does.
        """
        stream = self.open_stream(since_seq, max_messages, timeout_ms, tags)
        with stream:
            yield from stream

    def replay(self, speed=1.0, since_seq=None, max_messages=None, timeout_ms=None, tags=None):
        """Yield stored messages as JSON bytes, paced by their original timing.

        Between two messages it sleeps (their time difference) / ``speed``;
        speed 0 means no delay.  ``since_seq`` None starts at the oldest
        message.  Without ``timeout_ms`` it ends when it reaches the newest
        message; with it, it keeps following like :meth:`tail`.
        """
        if isinstance(speed, bool) or not isinstance(speed, (int, float)):
            raise TypeError("speed must be a number, not %s" % type(speed).__name__)
        if not speed >= 0 or math.isinf(speed):
            raise ValueError("speed must be a finite number >= 0")
        arguments = self._stream_arguments(since_seq, max_messages, timeout_ms, tags)
        if since_seq is None:
            bounds = self._local().bounds()
            arguments = ((bounds[0] if bounds else self._local().read_state()[4] + 1),) + arguments[1:]
        if timeout_ms is None:
            arguments = arguments[:2] + (0,) + arguments[3:]
        stream = Lite3Stream(self, *arguments)
        previous_ns = None
        with stream:
            for frame in stream:
                if previous_ns is not None and speed > 0 and frame.timestamp_ns > previous_ns:
                    time.sleep((frame.timestamp_ns - previous_ns) / 1e9 / speed)
                previous_ns = frame.timestamp_ns
                yield message_json(Frame(*frame)).encode("utf-8")

    # -- information and lifetime -------------------------------------------

    def info_json(self) -> bytes:
        """Return ``pool info --json`` for this pool as JSON bytes."""
        fields = self._local().info()
        fields["name"] = self.name
        fields["path"] = self.path
        return dump_json(fields).encode("utf-8")

    def close(self) -> None:
        """Close the pool; later calls raise PlasmiteError. Idempotent."""
        self._pool.close()

    def __enter__(self) -> "Pool":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


class Client:
    """Opens, creates, lists and deletes pools in one pool directory.

    ``pool_dir`` defaults to ``~/.plasmite/pools``.  A pool name containing
    ``/`` is used as a path.  Closing the client closes every pool it opened.
    """

    def __init__(self, pool_dir=None):
        if pool_dir is None:
            pool_dir = os.path.expanduser(DEFAULT_POOL_DIR)
        elif not isinstance(pool_dir, (str, os.PathLike)):
            raise TypeError("pool_dir must be a str or path, not %s" % type(pool_dir).__name__)
        self.pool_dir = os.fspath(pool_dir)
        self._pools = []
        self._is_closed = False

    def _path_for(self, name) -> str:
        if self._is_closed:
            raise PlasmiteError("Usage", "client is closed", hint="Create a new Client.")
        if not isinstance(name, str):
            raise TypeError("pool name must be a str, not %s" % type(name).__name__)
        if not name or "\x00" in name:
            raise ValueError("pool name must be a non-empty string without NUL")
        return resolve_pool_path(self.pool_dir, name)

    def _track(self, name: str, local: LocalPool) -> Pool:
        pool = Pool(name, local)
        self._pools.append(pool)
        return pool

    def create_pool(self, name: str, size_bytes: int, index_capacity=None) -> Pool:
        """Create a pool of ``size_bytes`` and return it opened.

        ``index_capacity`` None picks upstream's automatic size.  Raises
        PlasmiteError AlreadyExists (an existing pool is never touched),
        Usage (size too small), Permission, Io.
        """
        path = self._path_for(name)
        _check_count("size_bytes", size_bytes, allow_none=False)
        _check_count("index_capacity", index_capacity)
        return self._track(name, LocalPool.create(path, size_bytes, index_capacity))

    def open_pool(self, name: str) -> Pool:
        """Open an existing pool; PlasmiteError NotFound, Corrupt, Usage (format), Permission."""
        return self._track(name, LocalPool.open(self._path_for(name)))

    def pool_info_json(self, name: str) -> bytes:
        """Return ``pool info --json`` for a pool as JSON bytes."""
        with self.open_pool(name) as pool:
            return pool.info_json()

    def list_pools_json(self) -> bytes:
        """Return ``{"pools": [...]}`` for the pool directory as JSON bytes (sorted by name)."""
        if self._is_closed:
            raise PlasmiteError("Usage", "client is closed", hint="Create a new Client.")
        return dump_json({"pools": list_pools(self.pool_dir)}).encode("utf-8")

    def delete_pool(self, name: str) -> None:
        """Delete a pool file; PlasmiteError NotFound if there is none."""
        delete_pool_file(self._path_for(name))

    def close(self) -> None:
        """Close every pool this client opened; later calls raise PlasmiteError."""
        self._is_closed = True
        for pool in self._pools:
            pool.close()
        self._pools.clear()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


# =============================================================================
# 12. Command line
# =============================================================================
# build_parser() and one cmd_<name>(args) -> int per command, modelled on
# upstream's clap CLI: the same commands, flags, outputs, notices and exit
# codes (spec/cli.md).  stdout carries data only; errors and notices go to
# stderr as JSON (or as text on a terminal).

PROGRAM_NAME = "plasmite"
TAGLINE = "Persistent message pools for local IPC"
MISSING_DATA_HINT = "Provide JSON via DATA, --file, or pipe JSON to stdin."

TOP_LEVEL_HELP = """\
%(tagline)s

A pool is a file holding a ring buffer of JSON messages. Writers append
(poke), readers follow (peek); the oldest messages are overwritten when the
ring is full. Pools live in --dir (default ~/.plasmite/pools).

USAGE
  plasmite [--dir DIR] [--color auto|always|never] <COMMAND> [ARGS]

COMMANDS
%(commands)s

OPTIONS
  --dir <DIR>        Pool directory (default: ~/.plasmite/pools)
  --color <COLOR>    Colour output: auto, always or never [default: auto]
  -h, --help         Print help
  -V, --version      Print version

EXAMPLE
  plasmite pool create <name>
  plasmite poke <name> '{"hello": "world"}' --tag greeting
  plasmite peek <name> --tail 10 --jsonl
  plasmite pool info <name>
  plasmite pool list
  plasmite pool delete <name>...

LEARN MORE
  plasmite help <COMMAND>    Show the options and examples of one command
"""

# name -> (one-line description, examples and notes shown at the end of its help)
COMMAND_TEXTS = {
    "pool": ("Manage pool files", ""),
    "pool create": ("Create one or more pools", """\
EXAMPLES
  plasmite pool create events
  plasmite pool create big --size 64M
  plasmite pool create tiny --size 64K --index-capacity 0

NOTES
  Sizes take K/M/G suffixes (powers of 1024). An existing pool is never overwritten."""),
    "pool info": ("Show pool metadata and bounds", """\
EXAMPLES
  plasmite pool info events
  plasmite pool info events --json"""),
    "pool delete": ("Delete one or more pool files", """\
EXAMPLES
  plasmite pool delete events
  plasmite pool delete a b c"""),
    "pool list": ("List pools in the pool directory", """\
EXAMPLES
  plasmite pool list
  plasmite --dir ./pools pool list"""),
    "poke": ("Send a message to a pool", """\
EXAMPLES
  plasmite poke events '{"x": 1}' --tag demo
  plasmite poke events --file message.json
  tail -f app.log.jsonl | plasmite poke events --errors skip
  plasmite poke events '{"x": 1}' --create --create-size 8M

NOTES
  Without DATA or --file, JSON records are read from stdin (JSON lines,
  pretty JSON, RS-separated JSON seq, or server-sent event data: lines).
  Each appended message is printed as one JSON line."""),
    "serve": ("Serve pools over HTTP (loopback default in v0)", """\
EXAMPLES
  plasmite serve
  plasmite serve --bind 127.0.0.1:9800 --token devtoken
  plasmite serve --access read-only --bind 0.0.0.0:9700 --allow-non-loopback
  plasmite serve init && plasmite serve --bind 0.0.0.0:9700 --allow-non-loopback \\
      --token-file serve-token.txt --tls-cert serve-cert.pem --tls-key serve-key.pem

NOTES
  Run flags go before `check`/`init`. Non-loopback binds need --allow-non-loopback;
  non-loopback writes also need --token-file and TLS. Remote refs read a token from
  PLASMITE_TOKEN or PLASMITE_TOKEN_FILE and trust PLASMITE_CA_FILE."""),
    "serve init": ("Bootstrap secure serve token/TLS artifacts", """\
EXAMPLES
  plasmite serve init
  plasmite serve init --output-dir ./secrets --bind 0.0.0.0:9700

NOTES
  Generate token + TLS artifacts and print copy/paste next commands for secure serve
  startup. The token value is never printed; the token and key files are mode 0600."""),
    "serve check": ("Validate serve config and print effective endpoints without starting", """\
EXAMPLES
  plasmite serve check
  plasmite serve --bind 0.0.0.0:9700 --allow-non-loopback --access read-only check"""),
    "get": ("Fetch one message by sequence number", """\
EXAMPLES
  plasmite get events 42"""),
    "peek": ("Watch messages from a pool", """\
EXAMPLES
  plasmite peek events                      # follow new messages
  plasmite peek events --tail 10 --jsonl    # last 10, then follow
  plasmite peek events --since 5m --one
  plasmite peek events --where '.data.status == "error"' --tag web
  plasmite peek events --tail 100 --replay 2

NOTES
  --where takes a jq-style boolean expression over the whole message
  ({seq, time, meta, data}); several --where and --tag flags must all match.
  Exits 124 when --timeout passes without output."""),
    "doctor": ("Diagnose pool health", """\
EXAMPLES
  plasmite doctor events
  plasmite doctor --all"""),
    "version": ("Print version info as JSON", ""),
    "completion": ("Generate shell completions", """\
EXAMPLES
  plasmite completion bash > /etc/bash_completion.d/plasmite
  plasmite completion zsh > "${fpath[1]}/_plasmite"
  plasmite completion fish > ~/.config/fish/completions/plasmite.fish"""),
    "help": ("Print this message or the help of the given subcommand(s)", ""),
}
TOP_LEVEL_ORDER = ["pool", "poke", "serve", "get", "peek", "doctor", "version", "completion", "help"]
COMPLETION_SHELLS = ["bash", "elvish", "fish", "powershell", "zsh"]


class ParserFailure(Exception):
    """An argument error: becomes a Usage error whose hint names the command's --help."""

    def __init__(self, message: str, command_path: str):
        super().__init__(message)
        self.message = message
        self.command_path = command_path


class HelpRequested(Exception):
    """Raised by -h/--help so main() prints help on stdout and exits 0."""

    def __init__(self, text: str):
        super().__init__(text)
        self.text = text


def _clap_message(message: str) -> str:
    """Reword an argparse error the way clap words it (spec/cli.md 1.2)."""
    match = re.match(r"unrecognized arguments: (\S+)", message)
    if match:
        return "unexpected argument '%s' found" % match.group(1)
    match = re.match(r"argument (\S+): invalid choice: '([^']*)'", message)
    if match:
        if match.group(1) == "COMMAND":
            return "unrecognized subcommand '%s'" % match.group(2)
        return "invalid value '%s' for '%s'" % (match.group(2), _flag_display(match.group(1)))
    match = re.match(r"argument (\S+): invalid (\w+) value: '([^']*)'", message)
    if match:
        reason = ("invalid float literal" if match.group(2) == "float"
                  else "invalid digit found in string")
        return "invalid value '%s' for '%s': %s" % (match.group(3), _flag_display(match.group(1)),
                                                     reason)
    match = re.match(r"argument (\S+): (number too large to fit in target type) '(.*)'\Z", message)
    if match:
        return "invalid value '%s' for '%s': %s" % (match.group(3), _flag_display(match.group(1)),
                                                     match.group(2))
    match = re.match(r"argument (\S+): not allowed with argument (\S+)", message)
    if match:  # argparse names the later flag first; clap names them as typed
        return "the argument '%s' cannot be used with '%s'" % (_flag_display(match.group(2)),
                                                                _flag_display(match.group(1)))
    if message.startswith("the following arguments are required"):
        return "the following required arguments were not provided:"
    match = re.match(r"argument (\S+): expected one argument", message)
    if match:
        return "a value is required for '%s' but none was supplied" % _flag_display(match.group(1))
    return message


def _flag_display(names: str) -> str:
    """``-n/--tail`` -> ``--tail <TAIL>``, ``SEQ`` -> ``<SEQ>``: how clap names arguments."""
    if names.isupper() and not names.startswith("-"):  # a positional's metavar
        return "<%s>" % names
    flag = next((name for name in names.split("/") if name.startswith("--")), names)
    value_names = {"--tail": "TAIL", "--replay": "SPEED", "--in": "IN", "--errors": "ERRORS"}
    if flag.startswith("--"):
        return "%s <%s>" % (flag, value_names.get(flag, flag[2:].upper().replace("-", "_")))
    return flag


_INTEGER_TEXT = LazyPattern(r"[+-]?[0-9]+\Z")


def _integer_argument(bits: int):
    """Return an argparse type reading a clap ``u<bits>`` value: ASCII digits, in range.

    Python's int() also takes "1_000", " 5" and other scripts' digits ("١"),
    which clap refuses; so is a value too large for the type.  A leading minus
    passes: the commands refuse it in clap's words, which take "-1" for an
    unknown flag.
    """
    def parse_integer(text: str) -> int:
        import argparse

        if not _INTEGER_TEXT.match(text):
            raise ValueError(text)
        value = int(text)
        if value >= 1 << bits:
            raise argparse.ArgumentTypeError("number too large to fit in target type %r" % text)
        return value

    return parse_integer


def _make_argument_parser_class():
    """Create the argparse subclass lazily (argparse is imported only by main)."""
    import argparse

    class FixedWidthFormatter(argparse.HelpFormatter):
        """argparse's formatter, told its width: otherwise each of the ~80 it makes while
        the parser is built imports shutil and asks for the terminal size, and help text
        is rendered by render_command_help anyway."""

        def __init__(self, prog):
            super().__init__(prog, width=100)

    class CommandParser(argparse.ArgumentParser):
        """argparse with clap-style errors and help, raised instead of printed."""

        def __init__(self, *args, command_path="", **kwargs):
            kwargs.setdefault("add_help", False)
            kwargs.setdefault("formatter_class", FixedWidthFormatter)
            super().__init__(*args, **kwargs)
            self.command_path = command_path
            self.add_argument("-h", "--help", action=HelpAction, nargs=0,
                              help="Print help")

        def error(self, message):
            raise ParserFailure(_clap_message(message), self.command_path)

        def format_help(self):
            return render_command_help(self)

    class HelpAction(argparse.Action):
        def __call__(self, parser, namespace, values, option_string=None):
            raise HelpRequested(parser.format_help())

    return CommandParser, argparse


def render_command_help(parser) -> str:
    """Render clap-style help for one command from its argparse actions."""
    import argparse

    path = parser.command_path
    if not path:
        rows = ["  %-12s%s" % (name, COMMAND_TEXTS[name][0]) for name in TOP_LEVEL_ORDER]
        return TOP_LEVEL_HELP % {"tagline": TAGLINE, "commands": "\n".join(rows)}
    description, notes = COMMAND_TEXTS[path]
    positionals, options, subcommands = [], [], []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            subcommands = [(choice.dest, choice.help) for choice in action._choices_actions]
        elif action.option_strings:
            names = ", ".join(sorted(action.option_strings, key=len))
            if action.nargs != 0:
                names += " <%s>" % (action.metavar or action.dest.upper())
            if len(action.option_strings) == 1 and action.option_strings[0].startswith("--"):
                names = "    " + names
            options.append((names, action.help or ""))
        else:
            label = action.metavar or action.dest.upper()
            label = ("[%s]..." if action.nargs == "*" else "<%s>..." if action.nargs == "+"
                     else "[%s]" if action.nargs == "?" else "<%s>") % label
            positionals.append((label, action.help or ""))
    usage = "Usage: %s %s" % (PROGRAM_NAME, path)
    if subcommands:
        usage += " <COMMAND>"
    else:
        usage += " [OPTIONS]" + "".join(" " + label for label, _ in positionals)
    lines = [description, "", usage]
    for title, rows in (("Commands:", subcommands), ("Arguments:", positionals),
                        ("Options:", options)):
        if rows:
            width = max(len(name) for name, _ in rows) + 2
            lines += ["", title] + ["  %s%s" % (name.ljust(width), text) for name, text in rows]
    if notes:
        lines += ["", notes]
    return "\n".join(lines) + "\n"


def build_parser(only=None):
    """Build the argparse parser (spec/cli.md 1 and 7); ``only`` limits it to one command.

    A run names one command, and building the other 14 parsers took about a third of
    a poke's start-up, so main() asks for the tree of that command alone; a parser
    with every command serves help, completion and unknown commands.
    """
    CommandParser, argparse = _make_argument_parser_class()
    parser = CommandParser(prog=PROGRAM_NAME, command_path="")
    parser.add_argument("-V", "--version", action="store_true", help="Print version")
    parser.add_argument("--dir", help="Pool directory")
    parser.add_argument("--color", choices=["auto", "always", "never"], default="auto",
                        help="Colour output")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=CommandParser)
    for name in TOP_LEVEL_ORDER:
        if only is None or name == only:
            COMMAND_BUILDERS[name](commands, CommandParser)
    return parser


def _add_command(group, name, path, handler):
    sub = group.add_parser(name, help=COMMAND_TEXTS[path][0], command_path=path)
    sub.set_defaults(handler=handler)
    return sub


def add_pool_parser(commands, CommandParser):
    pool = _add_command(commands, "pool", "pool", None)
    pool_commands = pool.add_subparsers(dest="pool_command", metavar="COMMAND",
                                        parser_class=CommandParser)
    create = _add_command(pool_commands, "create", "pool create", cmd_pool_create)
    create.add_argument("names", nargs="+", metavar="NAME", help="Pool names or paths")
    create.add_argument("--size", default="1M", help="Pool file size (K/M/G) [default: 1M]")
    create.add_argument("--index-capacity", type=_integer_argument(32), metavar="INDEX_CAPACITY",
                        help="Index slots (default: automatic; 0 disables the index)")
    info = _add_command(pool_commands, "info", "pool info", cmd_pool_info)
    info.add_argument("name", metavar="NAME", help="Pool name or path")
    info.add_argument("--json", action="store_true", help="Print JSON instead of text")
    delete = _add_command(pool_commands, "delete", "pool delete", cmd_pool_delete)
    delete.add_argument("names", nargs="+", metavar="NAME", help="Pool names or paths")
    pool_list = _add_command(pool_commands, "list", "pool list", cmd_pool_list)
    pool_list.add_argument("server", nargs="?", metavar="URL",
                           help="List a server's pools: http(s)://host:port")


def add_poke_parser(commands, CommandParser):
    poke = _add_command(commands, "poke", "poke", cmd_poke)
    poke.add_argument("pool", metavar="POOL", help="Pool name, path or http(s)://host:port/pool")
    poke.add_argument("data", nargs="?", metavar="DATA", help="Inline JSON object")
    poke.add_argument("--tag", action="append", default=[], metavar="TAG",
                      help="Tag the message (repeatable)")
    poke.add_argument("--file", metavar="FILE", help="Read one JSON value from FILE (- = stdin)")
    poke.add_argument("--durability", default="fast", metavar="DURABILITY",
                      help="fast or flush [default: fast]")
    poke.add_argument("--create", action="store_true", help="Create the pool if it is missing")
    poke.add_argument("--create-size", metavar="CREATE_SIZE", help="Size for --create [default: 1M]")
    poke.add_argument("--retry", type=_integer_argument(32), default=0, metavar="RETRY",
                      help="Retries for busy appends [default: 0]")
    poke.add_argument("--retry-delay", metavar="RETRY_DELAY",
                      help="Delay between retries [default: 50ms]")
    poke.add_argument("-i", "--in", dest="input_format", default="auto", metavar="IN",
                      choices=["auto", "jsonl", "json", "seq", "jq"],
                      help="stdin format: auto, jsonl, json, seq, jq [default: auto]")
    poke.add_argument("-e", "--errors", default="stop", choices=["stop", "skip"], metavar="ERRORS",
                      help="On a bad stdin record: stop or skip [default: stop]")


def add_get_parser(commands, CommandParser):
    get = _add_command(commands, "get", "get", cmd_get)
    get.add_argument("pool", metavar="POOL", help="Pool name or path")
    get.add_argument("seq", type=_integer_argument(64), metavar="SEQ", help="Sequence number")


def add_peek_parser(commands, CommandParser):
    peek = _add_command(commands, "peek", "peek", cmd_peek)
    peek.add_argument("pool", metavar="POOL", help="Pool name, path or http(s)://host:port/pool")
    start = peek.add_mutually_exclusive_group()
    start.add_argument("-n", "--tail", type=_integer_argument(64), default=0, metavar="TAIL",
                       help="Print the last N matching messages first")
    start.add_argument("--since", metavar="SINCE",
                       help="Start at a time: RFC 3339 or relative (5m, 2h, 1d)")
    peek.add_argument("--one", action="store_true", help="Exit after the first message")
    peek.add_argument("--jsonl", action="store_true", help="Same as --format jsonl")
    peek.add_argument("--format", choices=["pretty", "jsonl"], metavar="FORMAT",
                      help="pretty or jsonl [default: pretty]")
    peek.add_argument("--timeout", metavar="TIMEOUT", help="Exit 124 after this long without output")
    peek.add_argument("--data-only", action="store_true", help="Print only .data")
    peek.add_argument("--where", action="append", default=[], metavar="WHERE",
                      help="jq-style boolean filter (repeatable, all must match)")
    peek.add_argument("--tag", action="append", default=[], metavar="TAG",
                      help="Require this tag (repeatable)")
    peek.add_argument("--quiet-drops", action="store_true", help="Suppress drop notices")
    peek.add_argument("--no-notify", action="store_true", help="Poll instead of waiting for wake-ups")
    peek.add_argument("--replay", type=float, metavar="SPEED",
                      help="Replay history at SPEED x original pace (needs --tail or --since)")


def add_doctor_parser(commands, CommandParser):
    doctor = _add_command(commands, "doctor", "doctor", cmd_doctor)
    doctor.add_argument("pool", nargs="?", metavar="POOL", help="Pool name or path")
    doctor.add_argument("--all", action="store_true", help="Check every pool in the directory")


def add_version_parser(commands, CommandParser):
    _add_command(commands, "version", "version", cmd_version)


def add_completion_parser(commands, CommandParser):
    completion = _add_command(commands, "completion", "completion", cmd_completion)
    completion.add_argument("shell", choices=COMPLETION_SHELLS, metavar="SHELL",
                            help="bash, elvish, fish, powershell or zsh")


def add_help_parser(commands, CommandParser):
    help_command = _add_command(commands, "help", "help", None)
    help_command.add_argument("topic", nargs="*", metavar="COMMAND", help="Command to explain")


# -- output -----------------------------------------------------------------

class Output:
    """Where a command writes: stdout documents and streams, stderr errors and notices."""

    def __init__(self, color_mode: str):
        self.color_mode = color_mode
        self.is_stdout_terminal = is_terminal(sys.stdout)
        self.is_stderr_terminal = is_terminal(sys.stderr)

    def stdout_color(self) -> bool:
        if self.color_mode == "auto":
            return self.is_stdout_terminal and not os.environ.get("NO_COLOR")
        return self.color_mode == "always"

    def stderr_color(self) -> bool:
        if self.color_mode == "auto":
            return self.is_stderr_terminal and not os.environ.get("NO_COLOR")
        return self.color_mode == "always"

    def document(self, value) -> None:
        """Print one document: pretty on a terminal or with --color always, else compact."""
        pretty = self.is_stdout_terminal or self.color_mode == "always"
        sys.stdout.write(render_json(value, pretty, pretty and self.stdout_color()) + "\n")
        sys.stdout.flush()

    def stream_item(self, value, pretty: bool) -> None:
        """Write one streamed message; the caller flushes (see flush)."""
        sys.stdout.write(render_json(value, pretty, pretty and self.stdout_color()) + "\n")

    @staticmethod
    def flush() -> None:
        sys.stdout.flush()

    def label(self, text: str, code: int) -> str:
        return "\x1b[%dm%s\x1b[0m" % (code, text) if self.stderr_color() else text

    def error(self, err: PlasmiteError) -> None:
        """Print an error: text with hint on a terminal, a JSON envelope otherwise."""
        with_automatic_hint(err)
        if self.is_stderr_terminal:
            lines = [self.label("error:", 31) + " " + err.message]
            for name in ("hint", "path", "seq", "offset"):
                value = getattr(err, name)
                if value is not None:
                    lines.append("%s %s" % (self.label(name + ":", 33), value))
            if err.causes:
                lines.append(self.label("caused by:", 33) + " " + err.causes[0])
            sys.stderr.write("\n".join(lines) + "\n")
        else:
            sys.stderr.write(dump_json({"error": err.to_dict()}) + "\n")
        sys.stderr.flush()

    def notice(self, command: str, kind: str, message: str, pool_ref: str, details: dict) -> None:
        """Print a non-fatal notice (drops, skipped records) on stderr."""
        if self.is_stderr_terminal:
            sys.stderr.write("%s %s (pool: %s)\n" % (self.label("notice:", 33), message, pool_ref))
        else:
            sys.stderr.write(dump_json({"notice": {
                "cmd": command, "details": details, "kind": kind, "message": message,
                "pool": pool_ref, "time": format_timestamp(time.time_ns())}}) + "\n")
        sys.stderr.flush()


# -- pools from the command line ---------------------------------------------

def pool_directory(args) -> str:
    """The --dir value, else ~/.plasmite/pools (relative .plasmite/pools without HOME)."""
    if args.dir is not None:
        return args.dir
    home = os.environ.get("HOME")
    return os.path.join(home, ".plasmite", "pools") if home else os.path.join(".plasmite", "pools")


# How often an idle follow looks whether its reader has gone.
IDLE_CHECK_SECONDS = 0.5


def is_reader_gone(stream) -> bool:
    """True when ``stream`` is a pipe or socket whose reading end has been closed.

    A follower writing to ``head -1`` would otherwise notice only at its next
    write, which on an idle pool may never come. poll reports POLLERR (Linux) or
    POLLHUP for such a pipe; terminals, files and open pipes report neither.
    """
    import select

    if not hasattr(select, "poll"):
        return False
    try:
        poller = select.poll()
        poller.register(stream.fileno(), 0)   # no events asked: errors and hang-ups only
        return any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0))
    except (OSError, ValueError):
        return False


def check_local_reference(reference: str, command: str) -> None:
    """Reject a URL where a command works on local pool files only (pool create, doctor)."""
    if "://" in reference:
        raise PlasmiteError("Usage", "%s accepts local pool names or paths only" % command,
                            hint="Run it on the server's machine, or pass a pool name or path.")


def missing_pool_hint(reference: str) -> str:
    if "/" in reference:
        return "Pool path not found. Check the path or pass --dir for a different pool directory."
    return ("Create it first: plasmite pool create %s (or pass --dir for a different pool "
            "directory)." % reference)


def open_pool_for_command(args, reference: str) -> LocalPool:
    """Open a local pool named on the command line; NotFound carries the CLI's hint."""
    try:
        return LocalPool.open(resolve_pool_path(pool_directory(args), reference))
    except PlasmiteError as err:
        if err.kind == "NotFound":
            err.hint = missing_pool_hint(reference)
        raise


# -- serve and remote refs ----------------------------------------------------
# The serve command and the remote-ref halves of poke, peek, get, pool info and
# pool list.  They use section 12's pool_directory, missing_pool_hint and
# ParserFailure, so they live there, not in sections 9-10.

_SERVE_NUMBER_FLAGS = ("max_body_bytes", "max_tail_timeout_ms", "max_tail_concurrency")


def add_serve_parser(subparsers, CommandParser):
    """Add ``serve`` (run flags), ``serve check`` and ``serve init`` to the top-level subparsers.

    ``subparsers`` is build_parser's ``commands``; ``CommandParser`` its parser
    class.  Run flags belong to ``serve`` and must come before check/init;
    init's flags use their own ``init_*`` destinations.
    """
    serve = subparsers.add_parser("serve", help=COMMAND_TEXTS["serve"][0],
                                  command_path="serve")
    serve.set_defaults(handler=cmd_serve)
    serve.add_argument("--bind", default=DEFAULT_BIND, metavar="BIND",
                       help="Literal IP:PORT to listen on [default: 127.0.0.1:9700]")
    serve.add_argument("--token", metavar="TOKEN", help="Require this bearer token (dev use)")
    serve.add_argument("--token-file", metavar="TOKEN_FILE",
                       help="Require the bearer token stored in this file")
    serve.add_argument("--allow-non-loopback", action="store_true",
                       help="Permit binding a non-loopback address")
    serve.add_argument("--insecure-no-tls", action="store_true",
                       help="Permit non-loopback writes without TLS")
    serve.add_argument("--tls-cert", metavar="TLS_CERT", help="PEM certificate for HTTPS")
    serve.add_argument("--tls-key", metavar="TLS_KEY", help="PEM private key for HTTPS")
    serve.add_argument("--tls-self-signed", action="store_true",
                       help="Serve HTTPS with a certificate generated at start")
    serve.add_argument("--access", choices=ACCESS_MODES, default="read-write", metavar="ACCESS",
                       help="read-only, write-only or read-write [default: read-write]")
    serve.add_argument("--max-body-bytes", type=_integer_argument(64),
                       default=DEFAULT_MAX_BODY_BYTES,
                       metavar="MAX_BODY_BYTES", help="Request body limit [default: 1048576]")
    serve.add_argument("--max-tail-timeout-ms", type=_integer_argument(64),
                       default=DEFAULT_MAX_TAIL_TIMEOUT_MS,
                       metavar="MAX_TAIL_TIMEOUT_MS",
                       help="Longest (and default) stream timeout_ms [default: 30000]")
    serve.add_argument("--max-tail-concurrency", type=_integer_argument(64),
                       default=DEFAULT_MAX_TAIL_CONCURRENCY,
                       metavar="MAX_TAIL_CONCURRENCY",
                       help="Simultaneous streams [default: 64]")
    actions = serve.add_subparsers(dest="serve_command", metavar="COMMAND",
                                   parser_class=CommandParser)
    actions.add_parser("check", help=COMMAND_TEXTS["serve check"][0],
                       command_path="serve check")
    init = actions.add_parser("init", help=COMMAND_TEXTS["serve init"][0],
                              command_path="serve init")
    init.add_argument("--bind", dest="init_bind", default=DEFAULT_INIT_BIND, metavar="BIND",
                      help="Address for the printed commands and the certificate "
                           "[default: 0.0.0.0:9700]")
    init.add_argument("--output-dir", default=".", metavar="OUTPUT_DIR",
                      help="Directory for relative artifact paths [default: .]")
    init.add_argument("--token-file", dest="init_token_file", default=SERVE_INIT_ARTIFACTS[0],
                      metavar="TOKEN_FILE", help="Token file [default: serve-token.txt]")
    init.add_argument("--tls-cert", dest="init_tls_cert", default=SERVE_INIT_ARTIFACTS[1],
                      metavar="TLS_CERT", help="Certificate file [default: serve-cert.pem]")
    init.add_argument("--tls-key", dest="init_tls_key", default=SERVE_INIT_ARTIFACTS[2],
                      metavar="TLS_KEY", help="Key file [default: serve-key.pem]")
    init.add_argument("--force", action="store_true", help="Overwrite existing artifacts")
    return serve


# The parser builder of each top-level command, for build_parser.
COMMAND_BUILDERS = {"pool": add_pool_parser, "poke": add_poke_parser, "serve": add_serve_parser,
                    "get": add_get_parser, "peek": add_peek_parser, "doctor": add_doctor_parser,
                    "version": add_version_parser, "completion": add_completion_parser,
                    "help": add_help_parser}


def cmd_serve(args) -> int:
    """Run ``serve``, ``serve check`` or ``serve init``."""
    if args.serve_command == "init":
        document = serve_init(args.init_bind, args.output_dir, args.init_token_file,
                              args.init_tls_cert, args.init_tls_key, args.force)
        if args.output.is_stdout_terminal:
            sys.stdout.write(render_serve_init(document))
        else:
            args.output.document(document)
        return 0
    for name in _SERVE_NUMBER_FLAGS:
        value = getattr(args, name)
        if value < 0:
            raise ParserFailure("unexpected argument '%d' found" % value, "serve")
    config = ServeConfig(pool_directory(args), args.bind, args.token, args.token_file,
                         args.allow_non_loopback, args.insecure_no_tls, args.tls_cert,
                         args.tls_key, args.tls_self_signed, args.access, args.max_body_bytes,
                         args.max_tail_timeout_ms, args.max_tail_concurrency)
    if args.serve_command == "check":
        if args.output.is_stdout_terminal:
            sys.stdout.write(render_serve_check(config))
        else:
            args.output.document(serve_check_document(config))
        return 0
    return run_server(config)


# -- remote refs --------------------------------------------------------------

def check_poke_options(args) -> tuple:
    """Check poke's flags in upstream's order; return (should_flush, delay, is_single).

    ``delay`` is the --retry-delay in seconds; ``is_single`` tells DATA /
    --file / terminal stdin (one value) from a stdin stream.
    """
    if args.create_size is not None and not args.create:
        raise PlasmiteError("Usage", "--create-size requires --create",
                            hint="Add --create or remove --create-size.")
    if args.retry_delay is not None and args.retry <= 0:
        raise PlasmiteError("Usage", "--retry-delay requires --retry",
                            hint="Add --retry or remove --retry-delay.")
    if args.retry < 0:  # clap takes "-1" for an unknown flag (spec/cli.md 1)
        raise ParserFailure("unexpected argument '%d' found" % args.retry, "poke")
    durability = args.durability.strip()
    if durability not in ("fast", "flush"):
        raise PlasmiteError("Usage", "invalid durability", hint="Use fast or flush.")
    delay = parse_duration(args.retry_delay) if args.retry_delay is not None else 0.05
    if args.data is not None and args.file is not None:
        raise ParserFailure("the argument '[DATA]' cannot be used with '--file <FILE>'", "poke")
    is_single = args.data is not None or args.file is not None or is_terminal(sys.stdin)
    if not is_single:
        check_stream_options(args.input_format, args.errors)
    return durability == "flush", delay, is_single


def read_single_value(args) -> dict:
    """Read poke's one value from DATA, --file (``-`` = stdin) or nothing; it must be an object."""
    if args.data is not None:
        text = args.data
    elif args.file is not None and args.file != "-":
        try:
            with open(args.file, "rb") as data_file:
                text = data_file.read()
        except OSError as err:
            raise PlasmiteError("Io", "failed to read data file", path=args.file,
                                causes=[describe_os_error(err)]) from err
    elif args.file == "-":
        try:
            text = sys.stdin.buffer.read()
        except OSError as err:
            raise PlasmiteError("Io", "failed to read stdin",
                                causes=[describe_os_error(err)]) from err
    else:
        raise PlasmiteError("Usage", "missing data input", hint=MISSING_DATA_HINT)
    try:
        data = parse_json_value(text)
    except PlasmiteError as err:
        raise PlasmiteError("Usage", "invalid json",
                            hint="Provide a single JSON value (e.g. '{\"x\":1}').",
                            causes=[err.message.split(": ", 1)[-1]]) from err
    if not isinstance(data, dict):
        raise PlasmiteError("Usage", "data must be object")
    return data


def _append_remote(pool: RemotePool, args, data, durability: str, delay: float) -> dict:
    """Append one message, retrying Busy (423) up to --retry times; never transport errors."""
    attempts = 0
    started = time.monotonic()
    while True:
        attempts += 1
        try:
            return pool.append(data, args.tag, durability)
        except PlasmiteError as err:
            if attempts > args.retry or err.kind != "Busy":
                if attempts > 1:
                    note = "Retry attempts: %d (waited %dms)." % (
                        attempts, (time.monotonic() - started) * 1000)
                    err.hint = (err.hint + " " + note) if err.hint else note
                raise
            time.sleep(delay)


def remote_poke(args, base_url: str, pool_name: str) -> int:
    """``poke http(s)://host:port/POOL``: open, then POST each value to the server (remote.md 9.2).

    Prints the server's message (document emitter for one value, compact
    lines for a stdin stream).  Stream failures follow local poke's
    --errors rules; notices name ``<base_url>/<pool>`` (upstream's double slash).
    """
    if args.create:
        raise PlasmiteError("Usage", "remote poke does not support --create",
                            hint="Create remote pools with server-side tooling, not poke.")
    should_flush, delay, is_single = check_poke_options(args)
    durability = "flush" if should_flush else "fast"
    with RemoteClient(base_url) as client:
        try:
            pool = client.open_pool(pool_name)
        except PlasmiteError as err:
            if err.kind == "NotFound":
                err.hint = missing_pool_hint(args.pool)
            raise
        if is_single:
            data = read_single_value(args)
            args.output.document(_append_remote(pool, args, data, durability, delay))
            return 0
        pool_path = base_url + "/" + _quote_segment(pool_name)
        total = appended = skipped = 0
        for item in read_records(sys.stdin.buffer, args.input_format, args.errors):
            total += 1
            if isinstance(item, IngestFailure):
                if args.errors == "stop":
                    raise item.to_error()
                skipped += 1
                args.output.notice("poke", SKIP_NOTICE_KIND, item.message, args.pool,
                                   skip_notice_details(item, pool_path))
                continue
            try:
                if not isinstance(item.data, dict):
                    raise PlasmiteError("Usage", "data must be object")
                message = _append_remote(pool, args, item.data, durability, delay)
            except PlasmiteError as err:
                if args.errors == "stop":
                    raise PlasmiteError("Usage", err.message, hint=item.hint or err.hint,
                                        path=err.path) from err
                raise
            appended += 1
            args.output.stream_item(message, pretty=False)
            args.output.flush()
    if total == 0:
        raise PlasmiteError("Usage", "missing data input", hint=MISSING_DATA_HINT)
    if skipped:
        args.output.notice("poke", SUMMARY_NOTICE_KIND, SUMMARY_NOTICE_MESSAGE, args.pool,
                           summary_notice_details(total, appended, skipped, pool_path))
        return 1
    return 0


def remote_peek(args, base_url: str, pool_name: str, matches) -> int:
    """``peek http(s)://host:port/POOL``: follow the server's tail stream (remote.md 9.3).

    Call after cmd_peek's format/--since/--timeout/--where checks; ``matches``
    is the compiled --where predicate (or None).  Rejects --replay, --since,
    --no-notify, --quiet-drops.  Starts at newest+1 like a local peek, or at
    the last N seqs with --tail N; filters (--tag, --where) run here; each
    request cycle that prints nothing within --timeout exits 124.  Never
    prints drop notices.
    """
    import collections

    for flag, is_set, hint in (
            ("--replay", args.replay is not None,
             "Use local peek with --replay, or omit --replay for remote streams."),
            ("--since", args.since is not None,
             "Use --tail N for remote refs, or run --since against a local pool path."),
            ("--no-notify", args.no_notify, "--no-notify only applies to local pool semaphores."),
            ("--quiet-drops", args.quiet_drops,
             "--quiet-drops only applies to local drop notices.")):
        if is_set:
            raise PlasmiteError("Usage", "remote peek does not support %s" % flag, hint=hint)
    if args.tail < 0:
        raise ParserFailure("unexpected argument '%d' found" % args.tail, "peek")
    is_pretty = not args.jsonl and args.format != "jsonl"
    timeout_ms = round(parse_duration(args.timeout) * 1000) if args.timeout is not None else None
    output = args.output

    def is_wanted(message) -> bool:
        tags = message.get("meta", {}).get("tags", [])
        if not all(tag in tags for tag in args.tag):
            return False
        return matches(message) if matches else True

    def emit(message) -> None:
        output.stream_item(message.get("data") if args.data_only else message, is_pretty)
        output.flush()

    with RemoteClient(base_url) as client:
        pool = client.open_pool(pool_name)
        if args.tail > 0:
            bounds = pool.info().get("bounds") or {}
            since_seq = (max(bounds["newest"] - (args.tail - 1), bounds["oldest"])
                         if "newest" in bounds else None)
        else:
            bounds = pool.opened_info.get("bounds") or {}
            since_seq = bounds["newest"] + 1 if "newest" in bounds else None
        kept = collections.deque(maxlen=args.tail) if args.tail > 0 and args.one else None
        while True:
            has_output = False
            for message in pool.tail(since_seq=since_seq, timeout_ms=timeout_ms):
                if isinstance(message.get("seq"), int):
                    since_seq = message["seq"] + 1
                if not is_wanted(message):
                    continue
                has_output = True
                if kept is not None:  # --tail N --one: the Nth match counting history
                    kept.append(message)
                    if len(kept) == args.tail:
                        emit(message)
                        return 0
                    continue
                emit(message)
                if args.one:
                    return 0
            if timeout_ms is not None and not has_output:
                return EXIT_TIMEOUT


def remote_get(args, base_url: str, pool_name: str) -> int:
    """``get http(s)://host:port/POOL SEQ``: print the server's message (document emitter)."""
    with RemoteClient(base_url) as client:
        try:
            message = RemotePool(client, pool_name).get(args.seq)
        except PlasmiteError as err:
            if err.kind == "NotFound" and err.message == "message not found":
                err.hint = ("Check available messages: plasmite pool info %s (or plasmite peek %s "
                            "--tail 10)." % (args.pool, args.pool))
                err.path = None
            elif err.kind == "NotFound":
                err.hint = missing_pool_hint(args.pool)
                err.seq = None
            raise
    args.output.document(message)
    return 0


def remote_pool_info_fields(base_url: str, pool_name: str, reference: str) -> dict:
    """``pool info http(s)://host:port/POOL``: the server's pool info, named by the ref as typed."""
    with RemoteClient(base_url) as client:
        try:
            fields = RemotePool(client, pool_name).info()
        except PlasmiteError as err:
            if err.kind == "NotFound":
                err.hint = missing_pool_hint(reference)
            raise
    fields["name"] = reference
    return fields


def remote_pool_list(args, base_url: str) -> int:
    """``pool list http(s)://host:port``: print the server's ``{"pools": [...]}`` sorted by name."""
    args.output.document({"pools": list_remote_pools(base_url)})
    return 0


def pool_info_fields(pool: LocalPool, reference: str) -> dict:
    fields = pool.info()
    fields["name"] = reference
    fields["path"] = pool.path
    return fields


# -- pool commands ------------------------------------------------------------

def cmd_pool_create(args) -> int:
    """Create pools; print ``{"created": [<pool info>...]}``."""
    size = parse_size(args.size)
    directory = pool_directory(args)
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as err:
        raise PlasmiteError("Io", None, path=directory, causes=[describe_os_error(err)]) from err
    created = []
    for reference in args.names:
        check_local_reference(reference, "pool create")
        path = resolve_pool_path(directory, reference)
        if os.path.exists(path):
            raise PlasmiteError("AlreadyExists", "pool already exists", path=path,
                                hint="Choose a different name or remove the existing pool file.")
        capacity = args.index_capacity
        if capacity is not None:
            if not 0 <= capacity <= 0xFFFFFFFF:
                raise PlasmiteError("Usage", "invalid value '%d' for '--index-capacity "
                                    "<INDEX_CAPACITY>'" % capacity,
                                    hint="Try `plasmite pool create --help`.")
            if capacity * 16 > size // 2:
                raise PlasmiteError(
                    "Usage", "index capacity is too large for pool size",
                    hint="Reduce --index-capacity or increase --size (index region must be <= 50% "
                         "of the pool file).")
        with LocalPool.create(path, size, capacity) as pool:
            created.append(pool_info_fields(pool, reference))
    args.output.document({"created": created})
    return 0


def format_age(age_ms) -> str:
    if age_ms is None:
        return "-"
    if age_ms < 1000:
        return "%dms ago" % age_ms
    if age_ms < 60000:
        return "%.1fs ago" % (age_ms / 1000)
    return "%ds ago" % (age_ms // 1000)


def cmd_pool_info(args) -> int:
    """Print pool metadata: JSON with --json, else upstream's text form."""
    remote = parse_remote_ref(args.name)
    if remote is not None:
        fields = remote_pool_info_fields(remote[0], remote[1], args.name)
    else:
        with open_pool_for_command(args, args.name) as pool:
            fields = pool_info_fields(pool, args.name)
    if args.json:
        args.output.document(fields)
        return 0
    metrics = fields["metrics"]
    bounds = fields["bounds"]
    usage = metrics["utilization"]
    hundredths = usage["used_bytes"] * 10000 // fields["ring_size"]
    lines = [
        "Pool: %s" % fields["name"],
        "Path: %s" % fields["path"],
        "Size: %d bytes (index: offset=%d slots=%d bytes=%d, ring: offset=%d size=%d)" % (
            fields["file_size"], fields["index_offset"], fields["index_capacity"],
            fields["index_size_bytes"], fields["ring_offset"], fields["ring_size"]),
        "Bounds: oldest=%s newest=%s count=%d" % (bounds.get("oldest", "-"),
                                                  bounds.get("newest", "-"),
                                                  metrics["message_count"]),
        "Utilization: used=%dB free=%dB (%d.%02d%%)" % (usage["used_bytes"], usage["free_bytes"],
                                                       hundredths // 100, hundredths % 100),
        "Oldest: %s (%s)" % (metrics["age"]["oldest_time"] or "-",
                             format_age(metrics["age"]["oldest_age_ms"])),
        "Newest: %s (%s)" % (metrics["age"]["newest_time"] or "-",
                             format_age(metrics["age"]["newest_age_ms"])),
    ]
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


def cmd_pool_list(args) -> int:
    """Print ``{"pools": [...]}`` sorted by name; unreadable pools are listed with their error."""
    if args.server is not None:
        return remote_pool_list(args, parse_server_url(args.server))
    directory = pool_directory(args)
    try:
        pools = list_pools(directory)
    except PlasmiteError as err:
        pools = [{"error": {"error": with_automatic_hint(err).to_dict()}, "name": "pools",
                  "path": directory}]
    args.output.document({"pools": pools})
    return 0


def cmd_pool_delete(args) -> int:
    """Delete pool files, best effort; exit with the first failure's code."""
    deleted, failed = [], []
    first_failure = None
    for reference in args.names:
        try:
            if "://" in reference:
                raise PlasmiteError(
                    "Usage", "pool delete accepts local pool names or paths only",
                    hint="Use pool names/paths for local delete, or call remote APIs directly.")
            path = resolve_pool_path(pool_directory(args), reference)
            delete_pool_file(path)
            deleted.append({"path": path, "pool": reference})
        except PlasmiteError as err:
            failed.append({"error": err.to_dict(), "pool": reference})
            first_failure = first_failure or err
    args.output.document({"deleted": deleted, "failed": failed})
    return first_failure.exit_code if first_failure else 0


# -- poke -------------------------------------------------------------------

def _retryable(err: PlasmiteError) -> bool:
    if err.kind == "Busy":
        return True
    return err.kind == "Io" and any(
        cause.startswith(("Interrupted", "Resource temporarily unavailable", "Connection timed out"))
        for cause in err.causes)


def append_with_retry(pool: LocalPool, tags: list, data, should_flush: bool, retries: int,
                      delay: float) -> tuple:
    """Encode and append one message, retrying retryable failures; return (seq, timestamp_ns)."""
    payload = encode_message(tags, data)
    attempts = 0
    started = time.monotonic()
    while True:
        attempts += 1
        try:
            return pool.append(payload, None, should_flush)
        except PlasmiteError as err:
            if attempts > retries or not _retryable(err):
                if attempts > 1:
                    note = "Retry attempts: %d (waited %dms)." % (
                        attempts, (time.monotonic() - started) * 1000)
                    err.hint = (err.hint + " " + note) if err.hint else note
                raise
            time.sleep(delay)


def receipt(tags: list, data, seq: int, timestamp_ns: int) -> dict:
    """The message poke prints: the data as parsed (upstream echoes its input)."""
    return {"data": data, "meta": {"tags": tags}, "seq": seq, "time": format_timestamp(timestamp_ns)}


def cmd_poke(args) -> int:
    """Append one message (DATA, --file) or a stream of records from stdin."""
    remote = parse_remote_ref(args.pool)
    if remote is not None:
        return remote_poke(args, *remote)
    should_flush, delay, is_single = check_poke_options(args)
    directory = pool_directory(args)
    path = resolve_pool_path(directory, args.pool)
    try:
        pool = LocalPool.open(path)
    except PlasmiteError as err:
        if err.kind != "NotFound" or not args.create:
            if err.kind == "NotFound":
                err.hint = missing_pool_hint(args.pool)
            raise
        size = parse_size(args.create_size) if args.create_size is not None else DEFAULT_POOL_SIZE
        try:
            os.makedirs(directory, exist_ok=True)
        except OSError as os_err:
            raise PlasmiteError("Io", None, path=directory,
                                causes=[describe_os_error(os_err)]) from os_err
        try:
            pool = LocalPool.create(path, size)
        except PlasmiteError as create_err:
            if create_err.kind != "AlreadyExists":  # another poke created it first
                raise
            pool = LocalPool.open(path)
    with pool:
        if is_single:
            return poke_single_value(args, pool, should_flush, delay)
        return poke_stream(args, pool, should_flush, delay)


def poke_single_value(args, pool: LocalPool, should_flush: bool, delay: float) -> int:
    data = read_single_value(args)
    seq, timestamp_ns = append_with_retry(pool, args.tag, data, should_flush, args.retry, delay)
    args.output.document(receipt(args.tag, data, seq, timestamp_ns))
    return 0


def poke_stream(args, pool: LocalPool, should_flush: bool, delay: float) -> int:
    """Append every record read from stdin; print one compact line per message.

    --errors stop ends at the first bad record with a Usage error; --errors
    skip reports bad records as notices, carries on, and exits 1 at the end
    if any was skipped.  Append failures always end the command.
    """
    total = appended = skipped = 0
    for item in read_records(sys.stdin.buffer, args.input_format, args.errors):
        total += 1
        if isinstance(item, IngestFailure):
            if args.errors == "stop":
                raise item.to_error()
            skipped += 1
            args.output.notice("poke", SKIP_NOTICE_KIND, item.message, args.pool,
                               skip_notice_details(item, pool.path))
            continue
        try:
            if not isinstance(item.data, dict):
                raise PlasmiteError("Usage", "data must be object")
            seq, timestamp_ns = append_with_retry(pool, args.tag, item.data, should_flush,
                                                  args.retry, delay)
        except PlasmiteError as err:
            if args.errors == "stop":
                # Upstream reports every append failure of a stream as Usage
                # (quirk Q5, kept: scripts may test for exit code 2).
                raise PlasmiteError("Usage", err.message, hint=item.hint or err.hint,
                                    path=err.path) from err
            raise
        appended += 1
        args.output.stream_item(receipt(args.tag, item.data, seq, timestamp_ns), pretty=False)
        args.output.flush()
    if total == 0:
        raise PlasmiteError("Usage", "missing data input", hint=MISSING_DATA_HINT)
    if skipped:
        args.output.notice("poke", SUMMARY_NOTICE_KIND, SUMMARY_NOTICE_MESSAGE, args.pool,
                           summary_notice_details(total, appended, skipped, pool.path))
        return 1
    return 0

# -- get and peek -------------------------------------------------------------

def cmd_get(args) -> int:
    """Print message SEQ of a pool."""
    if args.seq < 0:
        raise ParserFailure("invalid value '%d' for '<SEQ>': invalid digit found in string"
                            % args.seq, "")
    remote = parse_remote_ref(args.pool)
    if remote is not None:
        return remote_get(args, *remote)
    with open_pool_for_command(args, args.pool) as pool:
        try:
            message = message_fields(pool.get(args.seq))
        except PlasmiteError as err:
            if err.kind == "NotFound":
                err.hint = ("Check available messages: plasmite pool info %s (or plasmite peek %s "
                            "--tail 10)." % (args.pool, args.pool))
                err.path = None
            raise
    args.output.document(message)
    return 0


def compile_filters(expressions: list):
    """Compile every --where into one predicate (all must hold); Usage error on bad syntax."""
    try:
        return compile_where_all(expressions)
    except ExpressionSyntaxError as err:
        raise PlasmiteError(
            "Usage", "invalid filter expression",
            hint="Failed to parse/compile `%s`. %s" % (err.expression, format_expression_error(err)),
            causes=[err.message]) from err


# A tiny --replay SPEED asks for sleeps time.sleep refuses (beyond its 2**63 ns
# clock, or infinite); a century is the same wait to anyone watching.
REPLAY_MAX_SLEEP_SECONDS = 100 * 365 * 86400.0


class PeekSession:
    """One ``peek``: the history scan, the follow loop, filters, drops and the timeout."""

    def __init__(self, args, pool: LocalPool, matches, is_pretty: bool, timeout, since_ns):
        self.args = args
        self.pool = pool
        self.matches = matches
        self.is_pretty = is_pretty
        self.timeout = timeout
        self.since_ns = since_ns
        self.deadline = None if timeout is None else time.monotonic() + timeout
        self.last_seen = None
        self.pending_drop = None  # [last_seen_seq, next_seen_seq] of gaps not yet reported
        self.last_notice = None
        self.is_every_message_wanted = not args.tag and matches is None

    # -- filtering and printing ------------------------------------------------

    def is_wanted(self, message: dict) -> bool:
        tags = message["meta"]["tags"]
        for tag in self.args.tag:
            if tag not in tags:
                return False
        return self.matches(message) if self.matches else True

    def emit(self, message: dict) -> None:
        self.args.output.stream_item(message["data"] if self.args.data_only else message,
                                     self.is_pretty)
        if self.timeout is not None:
            self.deadline = time.monotonic() + self.timeout

    def emit_frame(self, frame: Frame) -> None:
        """emit() a message that no filter needs to see: JSON lines come from the buffer."""
        if self.is_pretty or self.args.data_only:
            self.emit(message_fields(frame))
            return
        sys.stdout.write(message_json(frame) + "\n")
        if self.timeout is not None:
            self.deadline = time.monotonic() + self.timeout

    def note_seq(self, seq: int) -> None:
        """Track the last seq seen (filtered or not) and queue a drop notice on a gap."""
        if self.last_seen is not None and seq > self.last_seen + 1 and not self.args.quiet_drops:
            if self.pending_drop is None:
                self.pending_drop = [self.last_seen, seq]
            else:
                self.pending_drop[1] = seq
        self.last_seen = seq
        if self.pending_drop is not None:
            self.report_drops()

    def report_drops(self) -> None:
        """Print the pending drop notice, at most one per second (spec/cli.md 4)."""
        if self.pending_drop is None:
            return
        now = time.monotonic()
        if self.last_notice is not None and now - self.last_notice < 1:
            return
        last_seen_seq, next_seen_seq = self.pending_drop
        dropped = next_seen_seq - last_seen_seq - 1
        self.args.output.notice("peek", "drop", "dropped %d messages" % dropped, self.args.pool, {
            "dropped_count": dropped, "last_seen_seq": last_seen_seq,
            "next_seen_seq": next_seen_seq, "pool_path": self.pool.path})
        self.pending_drop = None
        self.last_notice = now

    # -- phases -----------------------------------------------------------------

    def history_frames(self, cursor: Cursor, newest: int):
        """Yield the stored frames up to ``newest`` (the scan phase)."""
        while cursor.next_seq <= newest:
            frame = cursor.next_frame()
            if frame is None:
                return
            self.note_seq(frame.seq)
            yield frame

    def history(self, cursor: Cursor, newest: int):
        """Yield (frame, message) for stored messages up to ``newest``."""
        for frame in self.history_frames(cursor, newest):
            yield frame, message_fields(frame)

    def run(self) -> int:
        args = self.args
        pool = self.pool
        newest = pool.read_state()[4]
        if args.tail > 0 and self.is_every_message_wanted:
            # The last N are all the history needed.
            cursor = pool.cursor(max(1, newest - args.tail + 1))
        elif args.tail > 0 or self.since_ns is not None:
            cursor = pool.cursor(1)
        else:
            cursor = pool.cursor(newest + 1)
        if args.replay is not None:
            return self.replay(cursor, newest)
        kept = None
        if args.tail > 0 and self.is_every_message_wanted and not args.one:
            # Printed as read: holding 100,000 decoded messages first cost a quarter of
            # the time (allocation and garbage collection), measured on --tail 100000.
            for frame in self.history_frames(cursor, newest):
                self.emit_frame(frame)
        elif args.tail > 0:
            import collections

            kept = collections.deque(maxlen=args.tail)
            for _frame, message in self.history(cursor, newest):
                if self.is_wanted(message):
                    kept.append(message)
            if args.one:
                if len(kept) == args.tail:
                    self.emit(kept[-1])
                    return 0
            else:
                for message in kept:
                    self.emit(message)
                kept = None
        elif self.since_ns is not None:
            for frame, message in self.history(cursor, newest):
                if frame.timestamp_ns >= self.since_ns and self.is_wanted(message):
                    self.emit(message)
                    if args.one:
                        return 0
        args.output.flush()
        return self.follow(cursor, kept)

    def follow(self, cursor: Cursor, kept) -> int:
        """Print new messages as they arrive; 0 after --one, 124 on --timeout."""
        args = self.args
        pool = self.pool
        while True:
            frame = cursor.next_frame()
            if frame is None:
                args.output.flush()
                if is_reader_gone(sys.stdout):
                    raise BrokenPipeError("stdout's reader has gone")
                self.report_drops()
                # Bounded, so that the reader check above runs while the pool is idle.
                wait = 0.05 if self.pending_drop else IDLE_CHECK_SECONDS
                if self.deadline is not None:
                    remaining = self.deadline - time.monotonic()
                    if remaining <= 0:
                        return EXIT_TIMEOUT
                    wait = min(wait, remaining)
                pool.wait_for_seq(cursor.next_seq, wait)
                continue
            self.note_seq(frame.seq)
            if kept is None and self.is_every_message_wanted:
                self.emit_frame(frame)
                if args.one:
                    return 0
                continue
            message = message_fields(frame)
            if not self.is_wanted(message):
                continue
            if kept is not None:  # --tail N --one: the Nth match counting history
                kept.append(message)
                if len(kept) == args.tail:
                    self.emit(message)
                    return 0
                continue
            self.emit(message)
            if args.one:
                return 0

    def replay(self, cursor: Cursor, newest: int) -> int:
        """Print the selected history paced by its original timing, then exit 0."""
        import collections

        selected = collections.deque(maxlen=self.args.tail or None)
        for frame, message in self.history(cursor, newest):
            if self.since_ns is not None and frame.timestamp_ns < self.since_ns:
                continue
            if self.is_wanted(message):
                selected.append((frame.timestamp_ns, message))
        previous_ns = None
        for timestamp_ns, message in selected:
            if previous_ns is not None and self.args.replay > 0 and timestamp_ns > previous_ns:
                self.args.output.flush()
                time.sleep(min((timestamp_ns - previous_ns) / 1e9 / self.args.replay,
                               REPLAY_MAX_SLEEP_SECONDS))
            previous_ns = timestamp_ns
            self.emit(message)
            if self.args.one:
                break
        return 0


def cmd_peek(args) -> int:
    """Print matching messages: history (--tail/--since) then follow new ones."""
    if args.jsonl and args.format is not None:
        raise PlasmiteError("Usage", "conflicting output options",
                            hint="Use --format jsonl (or --jsonl), but not both.")
    is_pretty = not args.jsonl and args.format != "jsonl"
    now_ns = time.time_ns()
    since_ns = parse_since(args.since, now_ns) if args.since is not None else None
    timeout = parse_duration(args.timeout) if args.timeout is not None else None
    matches = compile_filters(args.where) if args.where else None
    # --tail is a u64, but a deque holds at most sys.maxsize items; no pool
    # holds more messages than that, so the larger counts mean the same.
    args.tail = min(args.tail, sys.maxsize)
    remote = parse_remote_ref(args.pool)
    if remote is not None:
        return remote_peek(args, remote[0], remote[1], matches)
    if args.tail < 0:
        raise ParserFailure("unexpected argument '%d' found" % args.tail, "peek")
    if args.replay is not None:
        replay_hint = "Use --replay 1 for realtime, --replay 2 for 2x, --replay 0 for no delay."
        if args.replay < 0:
            raise PlasmiteError("Usage", "--replay speed must be non-negative", hint=replay_hint)
        if not math.isfinite(args.replay):
            raise PlasmiteError("Usage", "--replay speed must be a finite number", hint=replay_hint)
        if args.tail == 0 and since_ns is None:
            raise PlasmiteError("Usage", "--replay requires --tail or --since",
                                hint="Replay needs historical messages. Use --tail N or --since "
                                     "DURATION.")
    if since_ns is not None and since_ns > now_ns:
        return 0
    with open_pool_for_command(args, args.pool) as pool:
        try:
            return PeekSession(args, pool, matches, is_pretty, timeout, since_ns).run()
        finally:
            args.output.flush()


# -- doctor, version, completion, help ----------------------------------------

def cmd_doctor(args) -> int:
    """Validate pools; print reports; exit 7 if any is corrupt."""
    if args.pool is None and not args.all:
        raise PlasmiteError("Usage", "doctor requires a pool name or --all",
                            hint="Use `plasmite doctor <pool>` or `plasmite doctor --all`.")
    if args.pool is not None and args.all:
        raise PlasmiteError("Usage", "--all cannot be combined with a pool name",
                            hint="Use --all by itself, or provide a single pool.")
    directory = pool_directory(args)
    if args.all:
        try:
            names = os.listdir(directory)
        except OSError as err:
            raise PlasmiteError("NotFound" if err.errno == errno.ENOENT else "Io",
                                "failed to read pool directory", path=directory,
                                causes=[describe_os_error(err)]) from err
        targets = [(path, path) for path in (os.path.join(directory, name) for name in names
                                             if name.endswith(POOL_SUFFIX))]
    else:
        check_local_reference(args.pool, "doctor")
        targets = [(resolve_pool_path(directory, args.pool), args.pool)]
    reports = []
    for path, reference in targets:
        try:
            reports.append(diagnose_pool(path, reference))
        except PlasmiteError as err:
            if err.kind == "NotFound":
                err.hint = missing_pool_hint(reference)
            raise
    if args.output.is_stdout_terminal:
        for report in reports:
            if report["status"] == "ok":
                line = "OK: %s" % report["pool_ref"]
            else:
                line = "CORRUPT: %s" % report["pool_ref"]
                if report["last_good_seq"] is not None:
                    line += " last_good_seq=%d" % report["last_good_seq"]
                if report["issues"]:
                    line += " issue=%s" % report["issues"][0]["message"]
            sys.stdout.write(line + "\n")
    else:
        args.output.document({"reports": reports})
    return EXIT_CODES["Corrupt"] if any(r["status"] != "ok" for r in reports) else 0


def cmd_version(args) -> int:
    """Print ``{"name": "plasmite", "version": ...}``."""
    args.output.document({"name": PROGRAM_NAME, "version": __version__})
    return 0


def command_tree(parser, path="") -> dict:
    """Map each command path to (subcommand names, option flags), for completion scripts."""
    import argparse

    tree = {}
    subcommands, flags = [], []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                subcommands.append(name)
                tree.update(command_tree(sub, (path + " " + name).strip()))
        else:
            flags.extend(action.option_strings)
    tree[path] = (subcommands, flags)
    return tree


def completion_script(shell: str, tree: dict) -> str:
    """Return a completion script for ``plasmite`` (and ``pls``) in the given shell."""
    if shell == "bash":
        cases = []
        for path, (subcommands, flags) in sorted(tree.items()):
            words = " ".join(subcommands + flags)
            cases.append('        "%s") words="%s" ;;' % (path, words))
        return """\
# bash completion for plasmite (and pls)
_plasmite() {
    local current="${COMP_WORDS[COMP_CWORD]}" path="" word words index
    for ((index = 1; index < COMP_CWORD; index++)); do
        word="${COMP_WORDS[index]}"
        case "$word" in -*) continue ;; esac
        case " $(_plasmite_words "$path") " in
            *" $word "*) path="${path:+$path }$word" ;;
        esac
    done
    COMPREPLY=($(compgen -W "$(_plasmite_words "$path")" -- "$current"))
}
_plasmite_words() {
    local words=""
    case "$1" in
%s
    esac
    echo "$words"
}
complete -F _plasmite plasmite pls pls.pyz
""" % "\n".join(cases)
    if shell == "zsh":
        lines = ["#compdef plasmite pls", "# zsh completion for plasmite (and pls)",
                 "_plasmite() {", "  local path_words=() word",
                 "  for word in ${words[2,CURRENT-1]}; do",
                 "    [[ $word == -* ]] || path_words+=($word)", "  done",
                 "  case \"${path_words[*]}\" in"]
        for path, (subcommands, flags) in sorted(tree.items()):
            lines.append("    \"%s\") compadd -- %s ;;" % (path, " ".join(subcommands + flags)))
        lines += ["  esac", "}", "compdef _plasmite plasmite pls", ""]
        return "\n".join(lines)
    if shell == "fish":
        lines = ["# fish completion for plasmite (and pls)"]
        for path, (subcommands, flags) in sorted(tree.items()):
            condition = ("__fish_use_subcommand" if not path else
                         "__fish_seen_subcommand_from %s" % path.split()[-1])
            for name in subcommands:
                lines.append("complete -c plasmite -n '%s' -f -a %s" % (condition, name))
            for flag in flags:
                option = "-l %s" % flag[2:] if flag.startswith("--") else "-s %s" % flag[1:]
                lines.append("complete -c plasmite -n '%s' %s" % (condition, option))
        lines.append("complete -c pls -w plasmite")
        return "\n".join(lines) + "\n"
    if shell == "elvish":
        lines = ["# elvish completion for plasmite", "set edit:completion:arg-completer[plasmite] = {|@words|",
                 "  var path = (str:join ' ' [(each {|word| if (not (str:has-prefix $word -)) { put $word } } $words[1..-1])])",
                 "  var table = ["]
        for path, (subcommands, flags) in sorted(tree.items()):
            lines.append("    &'%s'=[%s]" % (path, " ".join("'%s'" % word for word in subcommands + flags)))
        lines += ["  ]", "  if (has-key $table $path) { all $table[$path] }", "}"]
        return "use str\n" + "\n".join(lines) + "\n"
    lines = ["# PowerShell completion for plasmite", "Register-ArgumentCompleter -Native -CommandName plasmite,pls -ScriptBlock {",
             "    param($wordToComplete, $commandAst, $cursorPosition)",
             "    $path = ($commandAst.CommandElements | Select-Object -Skip 1 | Where-Object { $_ -notlike '-*' -and $_.ToString() -ne $wordToComplete }) -join ' '",
             "    $table = @{"]
    for path, (subcommands, flags) in sorted(tree.items()):
        lines.append("        '%s' = @(%s)" % (path, ", ".join("'%s'" % word for word in subcommands + flags)))
    lines += ["    }", "    $table[$path] | Where-Object { $_ -like \"$wordToComplete*\" } |",
              "        ForEach-Object { [System.Management.Automation.CompletionResult]::new($_) }", "}"]
    return "\n".join(lines) + "\n"


def cmd_completion(args) -> int:
    """Print a shell completion script."""
    sys.stdout.write(completion_script(args.shell, command_tree(build_parser())))
    return 0


# =============================================================================
# 13. Entry point
# =============================================================================

def _die_by_signal(signal_number: int) -> None:
    """Exit by re-raising a signal with its default action, as upstream does on Ctrl-C."""
    import signal

    sys.stdout.flush = lambda: None  # nothing more may be written
    signal.signal(signal_number, signal.SIG_DFL)
    os.kill(os.getpid(), signal_number)


def _help_for(parser, words: list) -> str:
    import argparse

    current = parser
    for word in words:
        found = None
        for action in current._actions:
            if isinstance(action, argparse._SubParsersAction) and word in action.choices:
                found = action.choices[word]
        if found is None:
            raise ParserFailure("unrecognized subcommand '%s'" % word, current.command_path)
        current = found
    return current.format_help()


def _named_command(arguments: list):
    """Return the command a run names when it needs no other command's parser, else None.

    Help, completion and unknown words need the whole tree.
    """
    expects_value = False
    for word in arguments:
        if expects_value:
            expects_value = False
        elif word in ("--dir", "--color"):
            expects_value = True
        elif not word.startswith("-"):
            return word if word in COMMAND_BUILDERS and word not in ("help", "completion") else None
    return None


def main(argv=None) -> int:
    """Run the pls command line with ``argv`` (default sys.argv[1:]); return the exit status.

    Errors print to stderr (a JSON envelope, or text on a terminal) and map
    to upstream's exit codes; a closed stdout ends the command quietly.
    """
    arguments = list(sys.argv[1:] if argv is None else argv)
    arguments = ["--help" if word == "---help" else "--version" if word == "---version" else word
                 for word in arguments]
    output = Output("auto")
    try:
        parser = build_parser(_named_command(arguments))
        if not arguments and argv is None and os.path.basename(sys.argv[0]).startswith("pls"):
            arguments = ["--help"]
        args, extras = parser.parse_known_args(arguments)
        if extras:
            command_path = " ".join(word for word in (getattr(args, "command", None),
                                                      getattr(args, "pool_command", None),
                                                      getattr(args, "serve_command", None))
                                    if word)
            raise ParserFailure("unexpected argument '%s' found" % extras[0], command_path)
        output = args.output = Output(args.color)
        if args.version:
            sys.stdout.write("%s %s\n" % (PROGRAM_NAME, __version__))
            return 0
        if args.command is None:
            raise ParserFailure(TAGLINE, "")
        if args.command == "help":
            sys.stdout.write(_help_for(parser, args.topic))
            return 0
        if args.command == "pool" and args.pool_command is None:
            raise ParserFailure(COMMAND_TEXTS["pool"][0], "pool")
        status = args.handler(args)
        sys.stdout.flush()
        return status
    except HelpRequested as request:
        sys.stdout.write(request.text)
        return 0
    except ParserFailure as failure:
        path = "" if failure.message.startswith("invalid value") else failure.command_path
        output.error(PlasmiteError("Usage", failure.message, hint="Try `%s %s--help`." % (
            PROGRAM_NAME, path + " " if path else "")))
        return EXIT_CODES["Usage"]
    except PlasmiteError as err:
        output.error(err)
        return err.exit_code
    except BrokenPipeError:
        # A reader such as `head -1` closed our stdout: not an error.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        _die_by_signal(2)
        return EXIT_INTERRUPTED
    except Exception as err:  # a bug: report it as Internal, traceback on request
        if os.environ.get("PLASMITE_DEBUG") == "1":
            import traceback

            traceback.print_exc()
        output.error(PlasmiteError("Internal", "internal error: %s: %s" % (type(err).__name__, err),
                                   hint="This is a bug in plasmite.py; rerun with PLASMITE_DEBUG=1 "
                                        "for a traceback and report it."))
        return EXIT_CODES["Internal"]


def exit_process(status: int) -> None:
    """End the process with ``status`` once stdout and stderr are flushed.

    The pyz ends through here: os._exit skips tearing the interpreter down, which
    took 6 ms of a 40 ms poke (measured on 3.13). Nothing is lost by it: files and
    pools are written through the kernel, output is flushed here, and every thread
    main() may leave behind is a daemon.
    """
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):   # a closed pipe: the output has nowhere to go
            pass
    os._exit(status)


if __name__ == "__main__":
    exit_process(main())
