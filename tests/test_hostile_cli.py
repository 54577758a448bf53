"""Hostile input to the CLI (reliability campaign 6): clear errors, contract exit codes, no damage.

Two parts, both against the real ``pls.pyz``:

* stdin for every ``poke --in`` mode (auto, jsonl, json, seq, jq) with
  ``--errors stop`` and ``skip``: random bytes, NUL bytes, invalid UTF-8, a
  50 MB line without a newline, several records over the 1 MiB limit,
  nesting beyond the parser's and Lite3's limits, truncated JSON, and random
  mixtures of good and bad records.  Mixtures are checked against a model of
  spec/cli.md 7.5 (which records are appended, the exit code, the error or
  the skip notices and summary); blobs against the invariants only.
* argv fuzzing: command lines built from the parser's own vocabulary (every
  command, flag and choice, read from ``build_parser()``) plus junk: unknown
  flags, missing values, huge and negative numbers, other scripts' digits,
  bad durations and sizes, unicode, empty strings, ``--`` anywhere.

Always: the exit code is in the contract (0-8, 124), an error is one JSON
envelope line on stderr with a message (and a hint where the contract gives
one), never a traceback nor an Internal error, nothing hangs, and the pool's
existing messages and bytes are unchanged and it validates.

Environment (counts for a run by hand; CI uses the defaults):

  PLASMITE_ARGV_CASES      random command lines (default 300; 3000 by hand)
  PLASMITE_STREAM_ROUNDS   random good/bad mixtures per mode and policy (default 2; 30 by hand)
  PLASMITE_SEED            seed (default 6); printed, and in every failure message
"""

import json
import os
import random
import re
import shutil
import subprocess
import time

import pytest

import plasmite
from conftest import Pls

SEED = int(os.environ.get("PLASMITE_SEED", "6"))
ARGV_CASES = int(os.environ.get("PLASMITE_ARGV_CASES", "300"))
STREAM_ROUNDS = int(os.environ.get("PLASMITE_STREAM_ROUNDS", "2"))
CONTRACT_EXIT_CODES = set(plasmite.EXIT_CODES.values()) | {0, plasmite.EXIT_TIMEOUT}
MODES = ("auto", "jsonl", "json", "seq", "jq")
POOL_SIZE = 16 * 1024 * 1024  # jq mode appends 1 MiB+ records; none may evict the old ones
EXISTING = 20  # messages in the pool before each case
EXISTING_TIMESTAMP = 1_700_000_000_000_000_000  # all equal: --replay never sleeps on them


# -- the pool every case starts from ------------------------------------------------------

class PoolSnapshot:
    """The pool as it was before a case: its bytes and the ranges that must not change."""

    def __init__(self, path):
        self.path = path
        with open(path, "rb") as handle:
            self.data = handle.read()
        with plasmite.LocalPool.open(path) as pool:
            self.state = pool.read_state()
            self.ring_offset = pool.ring_offset
            self.messages = [plasmite.message_fields(pool.get(seq)) for seq in range(1, EXISTING + 1)]

    def restore(self, path):
        with open(path, "wb") as handle:
            handle.write(self.data)

    def damage(self, path):
        """Return why the pool at ``path`` is no longer this pool plus appends, or None.

        The header up to the ring state, the existing frames and their index
        slots must be byte-identical, the existing messages must read back
        equal, and the whole pool must validate.  Returns (problem, new messages).
        """
        if not os.path.exists(path):
            return "pool file is gone", []
        with open(path, "rb") as handle:
            data = handle.read()
        if len(data) != len(self.data) or data[:64] != self.data[:64]:
            return "pool header or size changed", []
        head = self.state[0]
        if data[self.ring_offset:self.ring_offset + head] != self.data[self.ring_offset:
                                                                         self.ring_offset + head]:
            return "existing frames changed", []
        slots = slice(plasmite.INDEX_OFFSET, plasmite.INDEX_OFFSET + 16 * (EXISTING + 1))
        if data[slots] != self.data[slots]:
            return "existing index slots changed", []
        with plasmite.LocalPool.open(path) as pool:
            issues, last_good, _warnings = plasmite.validate_pool(pool)
            oldest, newest = pool.bounds()
            if issues or oldest != 1 or last_good != newest:
                return "pool does not validate: %r" % issues, []
            if [plasmite.message_fields(pool.get(seq)) for seq in range(1, EXISTING + 1)] != self.messages:
                return "existing messages read differently", []
            return None, [plasmite.message_fields(pool.get(seq))
                          for seq in range(EXISTING + 1, newest + 1)]


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("pristine") / "fz.plasmite")
    with plasmite.LocalPool.create(path, POOL_SIZE) as pool:
        for number in range(EXISTING):
            pool.append(plasmite.encode_message(["old", "t%d" % (number % 3)],
                                                {"i": number, "text": "ünïcødé " * number}),
                        timestamp_ns=EXISTING_TIMESTAMP)
    return PoolSnapshot(path)


@pytest.fixture
def case_pls(pyz_path, tmp_path, snapshot):
    """A Pls whose directory holds a fresh copy of the pool ``fz``; runs with cwd and HOME in tmp."""
    directory = tmp_path / "pools"
    directory.mkdir()
    runner = Pls(pyz_path, directory)
    runner.pool_path = str(directory / "fz.plasmite")
    snapshot.restore(runner.pool_path)
    return runner


def run_pls(runner, args, stdin=b"", timeout=60, cwd=None):
    environment = dict(os.environ, HOME=str(cwd or runner.directory))
    environment.pop("PLASMITE_DEBUG", None)
    return subprocess.run(runner.command(*args), input=stdin, capture_output=True, timeout=timeout,
                          cwd=cwd, env=environment)


def stderr_records(result):
    """Return (problems, error object or None, notices) for a finished run's stderr."""
    problems, error, notices = [], None, []
    text = result.stderr.decode("utf-8", errors="replace")
    if "Traceback" in text:
        problems.append("traceback on stderr")
    # JSON lines end at "\n" only (str.splitlines would also split at U+2028, U+0085, ...).
    for line in (line for line in text.split("\n") if line):
        try:
            record = json.loads(line)
        except ValueError:
            problems.append("stderr line is not JSON: %r" % line[:300])
            continue
        if "error" in record and error is None:
            error = record["error"]
        elif "notice" in record:
            notices.append(record["notice"])
        else:
            problems.append("unexpected stderr record: %r" % line[:300])
    if result.returncode not in CONTRACT_EXIT_CODES:
        problems.append("exit code %d is not in the contract" % result.returncode)
    if error is not None:
        if error.get("kind") not in plasmite.EXIT_CODES or error["kind"] == "Internal":
            problems.append("error kind %r" % error.get("kind"))
        elif plasmite.EXIT_CODES[error["kind"]] != result.returncode:
            problems.append("error kind %s but exit code %d" % (error["kind"], result.returncode))
        if not error.get("message"):
            problems.append("error without a message")
    return problems, error, notices


# -- stdin: records and what each mode makes of them ----------------------------------------

def good_record(generator, number):
    value = {"g": number, "text": generator.choice(["plain", "ünï €", "😀", "", "q\"uote\\"]),
             "nested": {"list": [1, 2.5, None, True], "deep": {"x": {"y": [number]}}}}
    return json.dumps(value, ensure_ascii=generator.random() < 0.5).encode(), value


OVERSIZE = b'{"big":"' + b"x" * (plasmite.MAX_RECORD_BYTES) + b'"}'
EXACT_LIMIT = b'{"big":"' + b"y" * (plasmite.MAX_RECORD_BYTES - 10) + b'"}'
assert len(EXACT_LIMIT) == plasmite.MAX_RECORD_BYTES  # not oversize: the limit is "greater than"
TOO_DEEP_FOR_LITE3 = b'{"a":' * 40 + b"1" + b"}" * 40
TOO_DEEP_FOR_JSON = b"[" * 100000

# (record bytes, class, whether it starts a multi-line record in auto mode)
# Classes: "parse" and "oversize" fail the record; "append" is valid JSON the append refuses.
BAD_RECORDS = [
    (b"not-json", "parse"),
    (b"\x00\x00\x00\x00", "parse"),
    (b"\xff\xfe\x80garbage", "parse"),
    (b"tru", "parse"),
    (b'{"a": [1, 2', "parse"),
    (TOO_DEEP_FOR_JSON, "parse"),
    (b'{"s":"\xff\xfe"}', "parse"),  # invalid UTF-8 in a string (seq mode decodes lossily)
    (OVERSIZE, "oversize"),
    (b"[1]", "append"),
    (b'"just a string"', "append"),
    (TOO_DEEP_FOR_LITE3, "append"),
]
APPEND_MESSAGES = {b"[1]": "data must be object", b'"just a string"': "data must be object",
                   TOO_DEEP_FOR_LITE3: "failed to encode json as lite3"}


def classify(record, record_class, mode):
    """The class a record has in ``mode`` (seq decodes invalid UTF-8 lossily; jq has no size limit)."""
    if mode == "seq" and record == b'{"s":"\xff\xfe"}':
        return "good"
    if mode == "jq" and record_class == "oversize":
        return "good"
    return record_class


def frame(records, mode):
    if mode == "seq":
        return b"".join(b"\x1e" + record + b"\n" for record in records)
    if mode == "jq":
        return b" \n".join(records)
    return b"\n".join(records) + b"\n"


def mixture(generator, mode):
    """Return ([(bytes, class, data)], stdin) for a random mixture of good and bad records."""
    count = 1 if mode == "json" else generator.randint(2, 9)
    records = []
    for number in range(count):
        if generator.random() < 0.5:
            record, data = good_record(generator, number)
            records.append((record, "good", data))
        else:
            record, record_class = generator.choice(BAD_RECORDS)
            records.append((record, classify(record, record_class, mode), None))
    if mode == "auto":
        # A bad record that starts with a bracket keeps taking lines until one starts
        # with a bracket (spec/cli.md 7.5); keep the model simple: follow it by one.
        for index in range(len(records) - 1):
            record, record_class, _data = records[index]
            if record_class == "parse" and record[:1] in b"[{":
                if records[index + 1][0][:1] not in b"[{":
                    good, data = good_record(generator, 100 + index)
                    records[index + 1] = (good, "good", data)
    return records, frame([record for record, _class, _data in records], mode)


def expected_stream(records, mode, policy):
    """Model spec/cli.md 7.5: return (exit code, appended data, error message or None, failed)."""
    if mode == "jq" and policy == "skip":
        return 2, [], "skip is not supported for jq-style streams", 0
    appended, failed = [], 0
    for record, record_class, data in records:
        if record_class == "good":
            appended.append(data if data is not None else json.loads(
                record.decode("utf-8", errors="replace")))
        elif record_class == "append":
            return 2, appended, APPEND_MESSAGES[record], failed
        else:
            message = "invalid json input" if record_class == "parse" else "record exceeds size limit"
            if policy == "stop" or mode == "jq":
                return 2, appended, message, failed
            failed += 1
    if not records:
        return 2, [], "missing data input", 0
    return (1 if failed else 0), appended, None, failed


def check_stream_case(runner, snapshot, args, stdin, label):
    """Run one poke with stdin; check the common invariants; return (result, error, notices, new)."""
    started = time.monotonic()
    result = run_pls(runner, ["poke", "fz"] + args, stdin=stdin)
    problems, error, notices = stderr_records(result)
    elapsed = time.monotonic() - started
    damage, new_messages = snapshot.damage(runner.pool_path)
    if damage:
        problems.append(damage)
    printed = [json.loads(line) for line in result.stdout.split(b"\n") if line]
    if [message["seq"] for message in printed] != [message["seq"] for message in new_messages]:
        problems.append("stdout seqs %r, pool has %r" % ([m["seq"] for m in printed],
                                                         [m["seq"] for m in new_messages]))
    elif [message["data"] for message in printed] != [message["data"] for message in new_messages]:
        problems.append("stdout data differs from the stored messages")
    if result.returncode == 0 and error is not None:
        problems.append("exit 0 with an error")
    if result.returncode not in (0, 1, 2, 8):
        problems.append("poke exit %d" % result.returncode)
    if result.returncode == 1:
        summaries = [notice for notice in notices if notice["kind"] == "ingest_summary"]
        if error is not None or len(summaries) != 1:
            problems.append("exit 1 without exactly one ingest summary (or with an error)")
    if error is not None and error["message"] in ("invalid json input", "record exceeds size limit"):
        if not error.get("hint"):
            problems.append("%r without a hint" % error["message"])
    assert not problems, "%s (seed %d, %.1f s): %s\nstderr: %s" % (
        label, SEED, elapsed, problems, result.stderr[:2000])
    return result, error, notices, new_messages


@pytest.mark.campaign
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_stream_mixtures(case_pls, snapshot, mode, policy):
    generator = random.Random("%d/%s/%s" % (SEED, mode, policy))
    for round_number in range(STREAM_ROUNDS):
        snapshot.restore(case_pls.pool_path)
        records, stdin = mixture(generator, mode)
        label = "mixture %s -e %s round %d %r" % (mode, policy, round_number,
                                                   [(r[:30], c) for r, c, _d in records])
        result, error, notices, new_messages = check_stream_case(
            case_pls, snapshot, ["--in", mode, "--errors", policy], stdin, label)
        code, appended, message, failed = expected_stream(records, mode, policy)
        assert result.returncode == code, label
        assert [m["data"] for m in new_messages] == appended, label
        assert (error or {}).get("message") == message, (label, error)
        skips = [notice for notice in notices if notice["kind"] == "ingest_skip"]
        assert len(skips) == failed, (label, notices)
        if failed and code == 1:
            summary = notices[-1]
            assert summary["kind"] == "ingest_summary", label
            assert summary["details"]["failed"] == failed
            assert summary["details"]["ok"] == len(appended)


def hostile_blobs(generator):
    """Inputs checked against the invariants only (what they frame into depends on the mode)."""
    return {
        "random bytes": bytes(generator.randrange(256) for _ in range(64 * 1024)),
        "random bytes with newlines": b"\n".join(
            bytes(generator.randrange(256) for _ in range(generator.randrange(200)))
            for _ in range(200)),
        "NUL bytes": b"\x00" * (1024 * 1024 + 5),
        "invalid UTF-8": b'{"a":"\xc3\x28"}\n\xa0\xa1\n{"b":"\xed\xa0\x80"}\n\xf0\x28\x8c\xbc\n',
        "50 MB line without newline": b'{"s":"' + b"x" * (50 * 1024 * 1024) + b'"}',
        "three huge records": b"\n".join([b'{"ok":1}', OVERSIZE, b'{"ok":2}', OVERSIZE + OVERSIZE,
                                          EXACT_LIMIT, OVERSIZE, b'{"ok":3}']) + b"\n",
        "deep nesting": TOO_DEEP_FOR_JSON + b"\n" + TOO_DEEP_FOR_LITE3 + b"\n" + b'{"a":' * 129
                        + b"1" + b"}" * 129 + b"\n",
        "truncated JSON": b'{"a": {"b": [1, 2, {"c": "unterminated',
        "separators only": b"\x1e\x1e\n\n \t\x1e",
        "event stream junk": b"data: {\"x\":1}\n\ndata: \xff\n\nevent: x\ndata: [1\n\n: c\n",
    }


@pytest.mark.campaign
@pytest.mark.parametrize("mode", MODES)
def test_stream_hostile_blobs(case_pls, snapshot, mode):
    generator = random.Random("%d/blobs/%s" % (SEED, mode))
    for name, stdin in hostile_blobs(generator).items():
        for policy in ("stop", "skip"):
            snapshot.restore(case_pls.pool_path)
            label = "%s, --in %s -e %s" % (name, mode, policy)
            result, error, _notices, new_messages = check_stream_case(
                case_pls, snapshot, ["--in", mode, "-e", policy], stdin, label)
            if name == "50 MB line without newline":
                expected = ("payload exceeds ring capacity" if mode == "jq" and policy == "stop"
                            else "skip is not supported for jq-style streams" if mode == "jq"
                            else "record exceeds size limit" if policy == "stop" else None)
                assert (error or {}).get("message") == expected, (label, error)
                assert new_messages == [] and result.returncode == (2 if expected else 1), label
            if name == "three huge records" and mode in ("auto", "jsonl") and policy == "skip":
                assert result.returncode == 1, label
                assert [m["data"] for m in new_messages] == [
                    {"ok": 1}, {"ok": 2}, json.loads(EXACT_LIMIT), {"ok": 3}], label


# -- argv fuzzing -----------------------------------------------------------------------------

def parser_vocabulary():
    """Every command path with its options, from the real parser: {path: [(flags, takes_value, choices)]}."""
    import argparse

    commands = {}

    def walk(parser, path):
        options = []
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    walk(sub, path + (name,))
            elif action.option_strings:
                options.append((action.option_strings, action.nargs != 0, action.choices))
        commands[path] = options

    walk(plasmite.build_parser(), ())
    return commands


POOL_REFS = ["fz", "fz.plasmite", "./pools/fz.plasmite", "missing", "", "ü名", "a" * 300, "sub/x",
             "http://127.0.0.1:1/fz", "https://[::1", "tcp://x/y", "HTTP://h/p", "-", ".", "..",
             "fz/", "\t", "x y", "new%d"]
VALUES = ["0", "1", "5", "+3", "-1", "-0", "18446744073709551615", "18446744073709551616",
          "99999999999999999999999999", "4294967296", "9223372036854775808", "1e3", "1.5", ".5",
          "inf", "NaN", "-inf", "1_000", " 7 ", "٣", "５", "", " ", "ü", "\u200b", "abc", "--",
          "-", "100ms", "1s", "0ms", "1d", "-5m", "1.5s", "ms", "18446744073709551616ms",
          "5m", "1h", "2999-01-01T00:00:00Z", "1970-01-01T00:00:00Z", "1969-12-31T23:59:59Z",
          "2024-02-30T00:00:00Z", "1K", "64k", "1M", "1G", "0", "10", "1MiB", "8E",
          "18446744073709551615G", '{"x":1}', "{}", "[1]", '{"x":1e999}', '{"a":' * 40,
          ".data.i == 1", "not valid jq", ".", "(" * 300, ".[0]" * 500, ".meta.tags[]? == \"old\"",
          "bash", "zsh", "fish", "powershell", "elvish", "nope", "fast", "flush", "slow",
          "auto", "jsonl", "json", "seq", "jq", "stop", "skip", "pretty", "xml",
          "127.0.0.1:0", "0.0.0.0:0", "[::1]:0", "nope:x", "read-only", "write-only",
          "data.json", "pools", "missing.json", "pools/fz.plasmite"]
JUNK = ["--bogus", "-x", "--", "---help", "-h", "--help", "-V", "--version", "--tail=5",
        "--timeout=", "-n5", "-n", "--dir", "--color", "\u00e9", "🙂", "", "--=", "-", "-1"]


def stdout_document(result) -> dict:
    """Parse stdout as one JSON document (--color always may colour it); {} if it is not one."""
    try:
        document = json.loads(re.sub(rb"\x1b\[[0-9;]*m", b"", result.stdout))
    except ValueError:
        return {}
    return document if isinstance(document, dict) else {}


# Parser errors always point at --help (spec/cli.md 1.2); other errors carry the hint the
# contract gives them, which is sometimes none (e.g. "failed to read token file").
PARSER_MESSAGE = re.compile(r"unexpected argument|invalid value|unrecognized subcommand|"
                            r"the following required arguments|a value is required|"
                            r"cannot be used with").match


def fuzz_argv(generator, vocabulary):
    """Build one random command line: [global flags] command [flags, values, junk]."""
    paths = [path for path in vocabulary if path and path[0] != "serve"]
    argv = []
    if generator.random() < 0.2:
        argv += generator.choice([["--color", generator.choice(["auto", "always", "never", "x"])],
                                  ["--dir", generator.choice(["pools", "other", "", "ü"])]])
    choice = generator.random()
    if choice < 0.06:
        path = ("serve", generator.choice(["check", "init"]))
        argv.append("serve")
        run_flags = vocabulary[("serve",)]
        for _ in range(generator.randrange(4)):
            flags, takes_value, choices = generator.choice(run_flags)
            argv.append(generator.choice(flags))
            if takes_value:
                argv.append(generator.choice(list(choices) if choices and generator.random() < 0.6
                                             else VALUES))
        argv.append(path[1])
        options = vocabulary[path]
    else:
        path = generator.choice(paths)
        argv += list(path)
        options = vocabulary[path]
    words = []
    if path[0] == "peek":
        words += ["--timeout", "300ms"]  # a later --timeout may override it (values are short)
    for _ in range(generator.randrange(6)):
        kind = generator.random()
        if kind < 0.45 and options:
            flags, takes_value, choices = generator.choice(options)
            words.append(generator.choice(flags))
            if takes_value and generator.random() < 0.92:
                words.append(generator.choice(list(choices) if choices and generator.random() < 0.6
                                              else VALUES))
        elif kind < 0.75:
            ref = generator.choice(POOL_REFS)
            words.append(ref % generator.randrange(1000) if "%d" in ref else ref)
        elif kind < 0.9:
            words.append(generator.choice(VALUES))
        else:
            words.append(generator.choice(JUNK))
    if path[0] == "serve":
        words = [word for word in words if word != "--"]
    if path[0] == "peek":
        # Keep peek bounded: only the short durations may replace our --timeout.
        words = [word for word in words if word not in ("1h", "5m")]
    return argv + words


@pytest.mark.campaign
def test_argv_fuzzing(case_pls, snapshot, tmp_path):
    generator = random.Random(SEED)
    vocabulary = parser_vocabulary()
    with open(tmp_path / "data.json", "w") as handle:
        handle.write('{"from":"file"}')
    stdins = [b"", b'{"x":1}\n{"x":2}\n', b"garbage\n", b"\x1e{\"y\":1}"]
    started = time.monotonic()
    exit_codes = {}
    for case in range(ARGV_CASES):
        argv = fuzz_argv(generator, vocabulary)
        stdin = generator.choice(stdins)
        label = "seed %d case %d: pls %r stdin %r" % (SEED, case, argv, stdin)
        try:
            result = run_pls(case_pls, argv, stdin=stdin, timeout=60, cwd=str(tmp_path))
        except subprocess.TimeoutExpired:
            pytest.fail("hang: %s" % label)
        exit_codes[result.returncode] = exit_codes.get(result.returncode, 0) + 1
        problems, error, _notices = stderr_records(result)
        if result.returncode not in (0, plasmite.EXIT_TIMEOUT) and error is None:
            document = stdout_document(result)
            is_doctor_report = result.returncode == 7 and "reports" in document
            is_skip_summary = result.returncode == 1 and b"ingest_summary" in result.stderr
            is_delete_report = result.returncode != 1 and "deleted" in document
            if not (is_doctor_report or is_skip_summary or is_delete_report):
                problems.append("exit %d without an error envelope" % result.returncode)
        if error is not None and PARSER_MESSAGE(error["message"]):
            if "--help" not in error.get("hint", ""):
                problems.append("parser error without a --help hint")
        if result.returncode == 0 and result.stderr and error is not None:
            problems.append("exit 0 with an error on stderr")
        if os.path.exists(case_pls.pool_path):
            damage, _new = snapshot.damage(case_pls.pool_path)
            if damage:
                problems.append(damage)
        assert not problems, "%s: %s\nstdout %r\nstderr %r" % (label, problems, result.stdout[:500],
                                                              result.stderr[:1500])
        snapshot.restore(case_pls.pool_path)
        for directory, keep in ((str(tmp_path), ("data.json", "pools")),
                                (case_pls.directory, ("fz.plasmite",))):
            for name in os.listdir(directory):
                if name not in keep:
                    path = os.path.join(directory, name)
                    if os.path.isdir(path) and not os.path.islink(path):
                        shutil.rmtree(path)
                    else:
                        os.unlink(path)
    print("argv fuzzing: seed %d, %d cases in %.1f s, exit codes %r"
          % (SEED, ARGV_CASES, time.monotonic() - started, sorted(exit_codes.items())))


# -- regressions found by the campaign ---------------------------------------------------------

def test_integer_flags_parse_as_clap_does(case_pls):
    """int() took other scripts' digits and underscores; u32/u64 values had no upper bound."""
    for args, value, flag in [(["get", "fz", "١"], "١", "<SEQ>"),
                              (["get", "fz", "1_0"], "1_0", "<SEQ>"),
                              (["peek", "fz", "--tail", " 5"], " 5", "--tail <TAIL>")]:
        code, error = case_pls.error(*args)
        assert code == 2 and error["message"] == (
            "invalid value '%s' for '%s': invalid digit found in string" % (value, flag))
    for args, value, flag in [(["get", "fz", "18446744073709551616"], "18446744073709551616", "<SEQ>"),
                              (["poke", "fz", "{}", "--retry", "4294967296"], "4294967296",
                               "--retry <RETRY>"),
                              (["pool", "create", "new", "--index-capacity", "4294967296"],
                               "4294967296", "--index-capacity <INDEX_CAPACITY>")]:
        code, error = case_pls.error(*args)
        assert code == 2 and error["message"] == (
            "invalid value '%s' for '%s': number too large to fit in target type" % (value, flag))
    assert case_pls.json("get", "fz", "+2")["seq"] == 2


def test_peek_tail_larger_than_a_deque(case_pls):
    """--tail 2**64-1 is a valid u64 but made collections.deque raise OverflowError (Internal)."""
    result = case_pls.run("peek", "fz", "--tail", str(2 ** 64 - 1), "--jsonl", "--timeout", "10ms")
    assert result.returncode == plasmite.EXIT_TIMEOUT, result.stderr
    assert len(result.stdout.splitlines()) == EXISTING
    result = case_pls.run("peek", "fz", "--tail", str(2 ** 64 - 1), "--replay", "0", "--jsonl")
    assert result.returncode == 0 and len(result.stdout.splitlines()) == EXISTING


def test_replay_at_a_tiny_speed_sleeps_instead_of_crashing(case_pls):
    """--replay 1e-300 asked time.sleep for 1e291 s: OverflowError, an Internal error."""
    case_pls.run("poke", "fz", "{}")
    process = case_pls.popen("peek", "fz", "--tail", "2", "--replay", "1e-300", "--jsonl")
    try:
        first = json.loads(process.stdout.readline())
        assert first["seq"] == EXISTING  # printed at once; then it waits ~forever for the next
        with pytest.raises(subprocess.TimeoutExpired):
            process.wait(timeout=1)
    finally:
        process.kill()
        process.wait()
    assert b"Traceback" not in process.stderr.read()


def test_pool_create_beyond_the_largest_file_offset(case_pls):
    """--size 2**64-1 is a valid u64: ftruncate raised OverflowError and left a 0-byte stub."""
    for size in (2 ** 63, 2 ** 64 - 1):
        code, error = case_pls.error("pool", "create", "huge", "--size", str(size))
        assert code == 8 and error["kind"] == "Io"
        assert error["message"] == "not enough disk space for the pool" and error["hint"]
        assert not os.path.exists(os.path.join(case_pls.directory, "huge.plasmite"))
