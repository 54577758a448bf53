"""The pls command line, run as real processes of the built pls.pyz (spec/cli.md)."""

import json
import os
import pty
import select
import shutil
import signal
import subprocess
import sys
import time

import pytest

from conftest import POOL_FIXTURES

ESC = "\x1b["


def run_in_terminal(command, timeout=20, env=None):
    """Run with stdin, stdout and stderr on a pseudo-terminal; return (exit code, output text)."""
    master, slave = pty.openpty()
    process = subprocess.Popen(command, stdin=slave, stdout=slave, stderr=slave, env=env,
                               close_fds=True)
    os.close(slave)
    chunks = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 0.1)
        if ready:
            try:
                data = os.read(master, 65536)
            except OSError:
                break
            if not data:
                break
            chunks.append(data)
        elif process.poll() is not None:
            break
    os.close(master)
    code = process.wait(timeout=5)
    return code, b"".join(chunks).decode("utf-8", "replace").replace("\r\n", "\n")


# -- help, version, parser errors ----------------------------------------------

def test_help_and_version(pls):
    top = pls.run("--help").stdout.decode()
    assert any(line.startswith("  pool") and line.endswith("Manage pool files")
               for line in top.splitlines())
    assert "plasmite pool list" in top
    result = pls.run("help")
    assert result.returncode == 0 and b"USAGE" in result.stdout and b"COMMANDS" in result.stdout
    pool_help = pls.run("help", "pool").stdout.decode()
    assert "Usage: plasmite pool <COMMAND>" in pool_help
    assert "  list    List pools in the pool directory" in pool_help
    for command in (["pool", "create"], ["poke"], ["peek"], ["get"], ["doctor"], ["completion"]):
        text = pls.run(*command, "--help").stdout.decode()
        assert text.startswith(pls.run("help", *command).stdout.decode()[:20])
        assert "EXAMPLES" in text and "Usage: plasmite " + " ".join(command) in text
    assert pls.json("version") == {"name": "plasmite", "version": "0.1.0"}
    assert pls.run("--version").stdout == b"plasmite 0.1.0\n"
    assert pls.run("---version").stdout == b"plasmite 0.1.0\n"


def test_without_arguments_pls_prints_help_and_plasmite_fails(pls, tmp_path):
    result = subprocess.run([pls.pyz], capture_output=True, stdin=subprocess.DEVNULL)
    assert result.returncode == 0 and b"COMMANDS" in result.stdout
    plasmite = tmp_path / "plasmite"
    shutil.copyfile(pls.pyz, plasmite)
    result = subprocess.run([sys.executable, str(plasmite)], capture_output=True)
    assert result.returncode == 2
    assert json.loads(result.stderr)["error"] == {
        "hint": "Try `plasmite --help`.", "kind": "Usage",
        "message": "Persistent message pools for local IPC"}


@pytest.mark.parametrize("args, message, hint", [
    (["pool"], "Manage pool files", "Try `plasmite pool --help`."),
    (["peek"], "the following required arguments were not provided:", "Try `plasmite peek --help`."),
    (["peek", "a", "--bogus"], "unexpected argument '--bogus' found", "Try `plasmite peek --help`."),
    (["pool", "list", "--dir", "X"], "unexpected argument '--dir' found",
     "Try `plasmite pool list --help`."),
    (["frob"], "unrecognized subcommand 'frob'", "Try `plasmite --help`."),
    (["peek", "a", "--format", "xml"], "invalid value 'xml' for '--format <FORMAT>'",
     "Try `plasmite --help`."),
    (["peek", "a", "--tail", "x"],
     "invalid value 'x' for '--tail <TAIL>': invalid digit found in string", "Try `plasmite --help`."),
    (["peek", "a", "--replay", "abc", "-n1"],
     "invalid value 'abc' for '--replay <SPEED>': invalid float literal", "Try `plasmite --help`."),
    (["completion", "fake"], "invalid value 'fake' for '<SHELL>'", "Try `plasmite --help`."),
    (["peek", "a", "-n", "1", "--since", "5m"],
     "the argument '--tail <TAIL>' cannot be used with '--since <SINCE>'", "Try `plasmite peek --help`."),
    (["poke", "a", "{}", "--file", "x"], "the argument '[DATA]' cannot be used with '--file <FILE>'",
     "Try `plasmite poke --help`."),
])
def test_parser_errors_are_usage_envelopes(pls, args, message, hint):
    code, error = pls.error(*args, use_dir=False)
    assert code == 2
    assert error == {"hint": hint, "kind": "Usage", "message": message}


def test_color_option_must_precede_the_command(pls):
    code, error = pls.error("--color", "sometimes", "version")
    assert code == 2 and error["message"] == "invalid value 'sometimes' for '--color <COLOR>'"


# -- pool commands -------------------------------------------------------------------

def test_pool_create_info_list_delete(pls):
    created = pls.json("pool", "create", "alpha", "beta", "--size", "64K")["created"]
    assert [item["name"] for item in created] == ["alpha", "beta"]
    assert created[0]["path"].endswith("alpha.plasmite") and created[0]["bounds"] == {}
    assert created[0]["index_capacity"] == 256 and created[0]["file_size"] == 65536
    info = pls.json("pool", "info", "alpha", "--json")
    assert info["metrics"]["utilization"]["used_percent"] == 0.0
    text = pls.run("pool", "info", "alpha").stdout.decode().splitlines()
    assert text[0] == "Pool: alpha" and text[3] == "Bounds: oldest=- newest=- count=0"
    assert text[4].endswith("(0.00%)") and text[5] == "Oldest: - (-)"
    names = [item["name"] for item in pls.json("pool", "list")["pools"]]
    assert names == ["alpha", "beta"]
    result = pls.run("pool", "delete", "alpha", "missing", "http://127.0.0.1:9700/demo")
    assert result.returncode == 3
    report = json.loads(result.stdout)
    assert report["deleted"] == [{"path": os.path.join(pls.directory, "alpha.plasmite"),
                                  "pool": "alpha"}]
    assert [entry["pool"] for entry in report["failed"]] == ["missing", "http://127.0.0.1:9700/demo"]
    assert [entry["error"]["kind"] for entry in report["failed"]] == ["NotFound", "Usage"]


def test_pool_create_errors(pls, tmp_path):
    assert pls.run("pool", "create", "p").returncode == 0
    code, error = pls.error("pool", "create", "p")
    assert code == 4 and error["kind"] == "AlreadyExists"
    assert error["path"].endswith("p.plasmite") and "different name" in error["hint"]
    code, error = pls.error("pool", "create", "q", "--size", "10")
    assert code == 2 and error["message"] == "file_size must exceed header and index size"
    assert not os.path.exists(os.path.join(pls.directory, "q.plasmite"))
    code, error = pls.error("pool", "create", "q", "--size", "64K", "--index-capacity", "4096")
    assert code == 2 and error["message"] == "index capacity is too large for pool size"
    for size, message in (("1MiB", "invalid size suffix"), ("1.5M", "invalid size suffix"),
                          ("", "invalid size"), ("99999999999999999999", "invalid size"),
                          ("99999999999G", "size overflow")):
        code, error = pls.error("pool", "create", "q", "--size", size)
        assert (code, error["message"]) == (2, message) and error["hint"]
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, error = pls.error("pool", "create", str(blocker / "sub" / "p.plasmite"))
    assert code == 8 and error["kind"] == "Io" and error["hint"]


def test_bad_pool_files(pls):
    os.makedirs(pls.directory)
    with open(os.path.join(pls.directory, "bad.plasmite"), "wb") as handle:
        handle.write(b"NOPE")
    code, error = pls.error("pool", "info", "bad")
    assert code == 7 and error["kind"] == "Corrupt" and error["path"].endswith("bad.plasmite")
    assert "Recreate" in error["hint"]
    shutil.copyfile(os.path.join(POOL_FIXTURES, "base3_clean_64k.plasmite"),
                    os.path.join(pls.directory, "good.plasmite"))
    pools = pls.json("pool", "list")["pools"]
    assert [entry["name"] for entry in pools] == ["bad", "good"]
    assert pools[0]["error"]["error"]["kind"] == "Corrupt"
    assert pools[1]["bounds"] == {"newest": 3, "oldest": 1}
    code, error = pls.error("--color", "always", "peek", "missing", "--tail", "1")
    assert code == 3 and error["path"].endswith("missing.plasmite")
    assert "pool create" in error["hint"]
    code, error = pls.error("get", "./nowhere/x.plasmite", "1")
    assert code == 3 and "Pool path not found" in error["hint"]


# -- poke and get ------------------------------------------------------------------------

def test_poke_and_get(pls, tmp_path):
    pls.run("pool", "create", "demo")
    message = pls.json("poke", "demo", '{"x": 1, "big": 18446744073709551615}', "--tag", "ping")
    assert message["seq"] == 1 and message["meta"]["tags"] == ["ping"] and message["data"]["x"] == 1
    assert message["data"]["big"] == 18446744073709551615  # the echo is the parsed input
    fetched = pls.json("get", "demo", "1")
    assert fetched["seq"] == 1 and fetched["data"]["x"] == 1
    assert fetched["data"]["big"] == 1.8446744073709552e19  # stored as a float, like upstream
    data_file = tmp_path / "data.json"
    data_file.write_text('{\n  "from": "file"\n}\n')
    assert pls.json("poke", "demo", "--file", str(data_file))["data"] == {"from": "file"}
    assert pls.json("poke", "demo", "--file", "-", input=b'{"from": "stdin"}')["data"] == {
        "from": "stdin"}
    assert pls.json("poke", "demo", "{}", "--durability", "flush")["seq"] == 4
    code, error = pls.error("get", "demo", "999")
    assert code == 3 and error["seq"] == 999 and "pool info" in error["hint"]
    code, error = pls.error("get", "demo", "x")
    assert code == 2


@pytest.mark.parametrize("args, kind, message", [
    (["[1]"], "Usage", "data must be object"),
    (["{bad"], "Usage", "invalid json"),
    (['{"a": NaN}'], "Usage", "invalid json"),
    (["{}", "--durability", "slow"], "Usage", "invalid durability"),
    (["{}", "--create-size", "1M"], "Usage", "--create-size requires --create"),
    (["{}", "--retry-delay", "1s"], "Usage", "--retry-delay requires --retry"),
    (["{}", "--retry", "1", "--retry-delay", "soon"], "Usage", "invalid duration"),
    (['{"a":' * 40 + "1" + "}" * 40], "Usage", "failed to encode json as lite3"),
])
def test_poke_rejects_bad_input_and_keeps_the_pool(pls, args, kind, message):
    pls.run("pool", "create", "demo", "--size", "64K")
    pls.run("poke", "demo", '{"keep": true}')
    path = os.path.join(pls.directory, "demo.plasmite")
    before = open(path, "rb").read()
    code, error = pls.error("poke", "demo", *args)
    assert (code, error["kind"], error["message"]) == (2, kind, message)
    assert open(path, "rb").read() == before


def test_poke_missing_pool_create_and_oversize(pls):
    code, error = pls.error("poke", "missing", "{}")
    assert code == 3 and "pool create" in error["hint"]
    message = pls.json("poke", "autopool", '{"a": 1}', "--create", "--create-size", "64K")
    assert message["seq"] == 1
    assert os.path.getsize(os.path.join(pls.directory, "autopool.plasmite")) == 65536
    code, error = pls.error("poke", "autopool", json.dumps({"blob": "x" * 70000}))
    assert code == 2 and error["message"] == "payload exceeds ring capacity" and error["hint"]


def test_poke_without_data_on_a_terminal_is_usage(pls):
    pls.run("pool", "create", "demo")
    code, text = run_in_terminal(pls.command("poke", "demo"))
    assert code == 2
    assert ESC + "31merror:" + ESC + "0m missing data input" in text and "--file" in text


def test_poke_waits_for_a_held_lock_with_retry(pls):
    pls.run("pool", "create", "demo")
    path = os.path.join(pls.directory, "demo.plasmite")
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, sys, time\n"
        "fd = os.open(sys.argv[1], os.O_RDWR); fcntl.flock(fd, fcntl.LOCK_EX)\n"
        "print('locked', flush=True); time.sleep(0.15)\n"), path], stdout=subprocess.PIPE)
    assert holder.stdout.readline() == b"locked\n"
    result = pls.run("poke", "demo", '{"x": 1}', "--retry", "5", "--retry-delay", "50ms")
    holder.wait(5)
    assert result.returncode == 0 and json.loads(result.stdout)["seq"] == 1


# -- peek -----------------------------------------------------------------------------------

def peek_lines(result):
    return [json.loads(line) for line in result.stdout.decode().splitlines()]


def test_peek_tail_timeout_and_formats(pls):
    pls.run("pool", "create", "demo")
    for number in range(5):
        pls.run("poke", "demo", json.dumps({"i": number}), "--tag", "even" if number % 2 == 0 else "odd")
    result = pls.run("peek", "demo", "--tail", "2", "--jsonl", "--timeout", "200ms")
    assert result.returncode == 124
    assert [line["data"]["i"] for line in peek_lines(result)] == [3, 4]
    result = pls.run("peek", "demo", "-n", "10", "--format", "jsonl", "--tag", "even", "--timeout", "0ms")
    assert [line["data"]["i"] for line in peek_lines(result)] == [0, 2, 4]
    result = pls.run("peek", "demo", "-n", "1", "--data-only", "--jsonl", "--timeout", "0ms")
    assert result.stdout == b'{"i":4}\n'
    result = pls.run("peek", "demo", "-n", "1", "--data-only", "--format", "pretty", "--timeout", "0ms")
    assert json.loads(result.stdout) == {"i": 4} and result.stdout.count(b"\n") == 3
    pretty = pls.run("peek", "demo", "-n", "1", "--timeout", "0ms").stdout.decode()
    assert pretty.startswith('{\n  "data": {\n    "i": 4\n  },') and json.loads(pretty)["seq"] == 5
    code, error = pls.error("peek", "demo", "--jsonl", "--format", "jsonl")
    assert code == 2 and error["message"] == "conflicting output options"
    assert "--format jsonl" in error["hint"]
    result = pls.run("peek", "demo", "--since", "2999-01-01T00:00:00Z")
    assert result.returncode == 0 and result.stdout == b""
    result = pls.run("peek", "demo", "--since", "1h", "--jsonl", "--one")
    assert result.returncode == 0 and peek_lines(result)[0]["data"] == {"i": 0}
    for bad in ("5x", "2026-13-01T00:00:00Z", "yesterday"):
        code, error = pls.error("peek", "demo", "--since", bad)
        assert code == 2 and error["message"] == "invalid --since value"
    code, error = pls.error("peek", "demo", "--timeout", "1d")
    assert code == 2 and error["message"] == "invalid duration"


def test_peek_on_empty_pool_times_out(pls):
    pls.run("pool", "create", "demo")
    started = time.monotonic()
    result = pls.run("peek", "demo", "--jsonl", "--timeout", "500ms")
    assert result.returncode == 124 and result.stdout == b"" and result.stderr == b""
    assert 0.45 < time.monotonic() - started < 5


def test_peek_follows_new_messages(pls):
    pls.run("pool", "create", "demo")
    follower = pls.popen("peek", "demo", "--jsonl", "--one", "--timeout", "10s")
    time.sleep(0.3)
    pls.run("poke", "demo", '{"x": 1}')
    pls.run("poke", "demo", '{"x": 2}')
    out, _ = follower.communicate(timeout=10)
    assert follower.returncode == 0
    assert [json.loads(line)["data"] for line in out.decode().splitlines()] == [{"x": 1}]


def test_peek_tail_one_waits_for_the_nth_match(pls):
    pls.run("pool", "create", "demo")
    follower = pls.popen("peek", "demo", "--tail", "2", "--jsonl", "--one", "--timeout", "10s")
    time.sleep(0.3)
    pls.run("poke", "demo", '{"x": 1}')
    pls.run("poke", "demo", '{"x": 2}')
    out, _ = follower.communicate(timeout=10)
    assert follower.returncode == 0
    assert [json.loads(line)["data"] for line in out.decode().splitlines()] == [{"x": 2}]


def test_concurrent_pokers_and_a_follower(pls):
    pls.run("pool", "create", "demo", "--size", "4M")
    follower = pls.popen("peek", "demo", "--jsonl", "--timeout", "3s")
    time.sleep(0.3)
    pokers = [pls.popen("poke", "demo", stdin=subprocess.PIPE) for _ in range(3)]
    for number, poker in enumerate(pokers):
        lines = "".join(json.dumps({"p": number, "i": i}) + "\n" for i in range(100))
        poker.stdin.write(lines.encode())
        poker.stdin.close()
    for poker in pokers:
        assert poker.wait(30) == 0
    out, _ = follower.communicate(timeout=30)
    assert follower.returncode == 124
    messages = [json.loads(line) for line in out.decode().splitlines()]
    assert [message["seq"] for message in messages] == list(range(1, 301))
    for number in range(3):
        assert [m["data"]["i"] for m in messages if m["data"]["p"] == number] == list(range(100))


def test_peek_reports_drops_when_lapped(pls):
    pls.run("pool", "create", "demo", "--size", "1M")
    follower = pls.popen("peek", "demo", "--jsonl", "--timeout", "5s")
    time.sleep(0.3)
    pls.run("poke", "demo", '{"first": true}')
    assert json.loads(follower.stdout.readline())["seq"] == 1
    follower.send_signal(signal.SIGSTOP)  # a reader too slow to keep up
    blob = "y" * 8000
    poker = pls.popen("poke", "demo", stdin=subprocess.PIPE)
    poker.communicate("".join(json.dumps({"i": i, "blob": blob}) + "\n" for i in range(200)).encode(),
                      timeout=30)
    follower.send_signal(signal.SIGCONT)
    out, err = follower.communicate(timeout=30)
    notices = [json.loads(line)["notice"] for line in err.decode().splitlines()]
    assert notices and notices[0]["kind"] == "drop" and notices[0]["cmd"] == "peek"
    assert notices[0]["pool"] == "demo" and notices[0]["details"]["dropped_count"] > 0
    details = notices[0]["details"]
    assert details["next_seen_seq"] - details["last_seen_seq"] - 1 == details["dropped_count"]
    seqs = [json.loads(line)["seq"] for line in out.decode().splitlines()]
    assert seqs == sorted(set(seqs)) and seqs[-1] == 201


def test_quiet_drops_suppresses_notices(pls):
    pls.run("pool", "create", "demo", "--size", "1M")
    follower = pls.popen("peek", "demo", "--jsonl", "--timeout", "3s", "--quiet-drops")
    time.sleep(0.3)
    pls.run("poke", "demo", '{"first": true}')
    assert json.loads(follower.stdout.readline())["seq"] == 1
    follower.send_signal(signal.SIGSTOP)
    pls.run("poke", "demo", input="".join(json.dumps({"i": i, "blob": "y" * 8000}) + "\n"
                                          for i in range(200)).encode())
    follower.send_signal(signal.SIGCONT)
    _, err = follower.communicate(timeout=30)
    assert err == b""


def test_peek_closed_stdout_and_ctrl_c(pls):
    pls.run("pool", "create", "demo")
    for number in range(50):
        pls.run("poke", "demo", json.dumps({"i": number}))
    # The reader starts late, so peek has printed its history and is waiting on an idle
    # pool when the reader goes: it must notice by itself (no further write comes).
    pipeline = subprocess.run("%s | (sleep 0.5; head -1)" % " ".join(
        "'%s'" % word for word in pls.command("peek", "demo", "--tail", "50", "--jsonl")),
        shell=True, capture_output=True, timeout=20,
        executable="/bin/bash", env=dict(os.environ, PIPESTATUS_CHECK="1"))
    assert json.loads(pipeline.stdout)["data"] == {"i": 0}
    assert b"Traceback" not in pipeline.stderr and pipeline.stderr == b""
    follower = pls.popen("peek", "demo", "--jsonl")
    time.sleep(0.5)
    follower.send_signal(signal.SIGINT)
    follower.wait(10)
    assert follower.returncode in (-signal.SIGINT, 130)
    assert b"Traceback" not in follower.stderr.read()


def test_peek_replay(pls):
    pls.run("pool", "create", "demo")
    for number in range(1, 4):
        pls.run("poke", "demo", json.dumps({"i": number}))
        time.sleep(0.1)
    started = time.monotonic()
    result = pls.run("peek", "demo", "--tail", "100", "--replay", "0", "--jsonl")
    assert result.returncode == 0 and [m["data"]["i"] for m in peek_lines(result)] == [1, 2, 3]
    result = pls.run("peek", "demo", "--tail", "2", "--replay", "1", "--jsonl")
    assert [m["data"]["i"] for m in peek_lines(result)] == [2, 3]
    assert time.monotonic() - started > 0.08
    result = pls.run("peek", "demo", "--tail", "5", "--replay", "0", "--one", "--data-only", "--jsonl")
    assert result.stdout == b'{"i":1}\n'
    for args, message in ((["--replay", "1"], "--replay requires --tail or --since"),
                          (["--tail", "5", "--replay=-1"], "--replay speed must be non-negative"),
                          (["--tail", "5", "--replay", "inf"], "--replay speed must be a finite number")):
        code, error = pls.error("peek", "demo", *args)
        assert (code, error["message"]) == (2, message)


# -- doctor, completion, terminal and colour output ------------------------------------------

def test_doctor(pls):
    pls.run("pool", "create", "doctorpool")
    assert pls.json("doctor", "doctorpool")["reports"][0]["status"] == "ok"
    shutil.copyfile(os.path.join(POOL_FIXTURES, "corrupt_payload_64k.plasmite"),
                    os.path.join(pls.directory, "bad.plasmite"))
    result = pls.run("doctor", "bad")
    assert result.returncode == 7
    assert json.loads(result.stdout)["reports"][0]["status"] == "corrupt"
    result = pls.run("doctor", "--all")
    assert result.returncode == 7
    assert sorted(r["status"] for r in json.loads(result.stdout)["reports"]) == ["corrupt", "ok"]
    code, error = pls.error("doctor")
    assert code == 2 and "requires a pool name or --all" in error["message"]
    assert "doctor <pool>" in error["hint"]
    code, error = pls.error("doctor", "foo", "--all")
    assert code == 2 and "--all cannot be combined" in error["message"]
    code, error = pls.error("doctor", "missing")
    assert code == 3 and error["kind"] == "NotFound"
    code, text = run_in_terminal(pls.command("doctor", "bad"))
    assert code == 7 and text.startswith("CORRUPT: bad last_good_seq=1 issue=payload invalid")


@pytest.mark.parametrize("shell", ["bash", "zsh", "fish", "elvish", "powershell"])
def test_completion_scripts(pls, shell):
    result = pls.run("completion", shell)
    assert result.returncode == 0
    script = result.stdout.decode()
    assert "pool" in script and "poke" in script and "peek" in script and "tail" in script
    if shell == "bash":
        assert "_plasmite()" in script
        assert subprocess.run(["bash", "-n"], input=result.stdout).returncode == 0
        probe = ('source /dev/stdin; COMP_WORDS=(plasmite pool cr); COMP_CWORD=2; _plasmite; '
                 'echo "${COMPREPLY[@]}"; COMP_WORDS=(plasmite peek demo --ta); COMP_CWORD=3; '
                 '_plasmite; echo "${COMPREPLY[@]}"')
        words = subprocess.run(["bash", "-c", probe], input=result.stdout, capture_output=True)
        assert words.stdout.decode().splitlines() == ["create", "--tail --tag"]
    elif shell == "zsh":
        assert script.startswith("#compdef plasmite")
        if shutil.which("zsh"):
            assert subprocess.run(["zsh", "-n"], input=result.stdout).returncode == 0
    elif shell == "fish":
        assert "complete -c plasmite" in script
        if shutil.which("fish"):
            assert subprocess.run(["fish", "--no-execute"], input=result.stdout).returncode == 0
            words = subprocess.run(["fish", "-c", "source; complete -C 'plasmite po'"],
                                   input=result.stdout, capture_output=True)
            assert sorted(words.stdout.decode().split()) == ["poke", "pool"]


def test_terminal_output_is_pretty_and_errors_are_text(pls):
    pls.run("pool", "create", "demo")
    code, text = run_in_terminal(pls.command("--color", "never", "version"))
    assert code == 0 and text == '{\n  "name": "plasmite",\n  "version": "0.1.0"\n}\n'
    code, text = run_in_terminal(pls.command("get", "demo", "7"))
    assert code == 3
    lines = text.splitlines()
    assert ESC + "31merror:" + ESC + "0m message not found" in lines[0]
    assert "hint:" in lines[1] and "seq:" in text
    env = dict(os.environ, NO_COLOR="1")
    code, text = run_in_terminal(pls.command("get", "demo", "7"), env=env)
    assert text.startswith("error: message not found\nhint: ")


def test_color_modes_when_piped(pls):
    pls.run("pool", "create", "demo")
    pls.run("poke", "demo", '{"x": 1}')
    coloured = pls.run("--color", "always", "pool", "info", "demo", "--json", use_dir=False)
    coloured = subprocess.run(pls.command("pool", "info", "demo", "--json")[:2]
                              + ["--color", "always", "--dir", pls.directory, "pool", "info",
                                 "demo", "--json"], capture_output=True)
    assert ESC + '36m"name"' + ESC + "0m" in coloured.stdout.decode()
    plain = subprocess.run(pls.command()[:2] + ["--color", "never", "--dir", pls.directory,
                                                "pool", "info", "demo", "--json"], capture_output=True)
    assert ESC not in plain.stdout.decode()
    line = subprocess.run(pls.command()[:2] + ["--color", "always", "--dir", pls.directory, "peek",
                                               "demo", "-n", "1", "--format", "jsonl", "--timeout",
                                               "0ms"], capture_output=True).stdout.decode()
    assert ESC not in line and json.loads(line)["data"] == {"x": 1}


def test_startup_imports_stay_lean(pyz_path):
    # -S: no site packages, so only what plasmite itself imports is listed.
    result = subprocess.run([sys.executable, "-S", "-X", "importtime", pyz_path, "version"],
                            capture_output=True, text=True)
    assert result.returncode == 0
    imported = {line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines()}
    assert "plasmite" in imported
    for heavy in ("http.server", "http.client", "urllib", "urllib.request", "ssl", "email",
                  "email.utils", "socket", "pathlib"):
        assert heavy not in imported


# -- stdin streams through the CLI (spec/cli.md 7.5 and the upstream scenarios of 9) --------------

@pytest.mark.parametrize("stdin, args, count", [
    (b'{\n  "x": 1,\n  "y": [1, 2]\n}\n', [], 1),
    (b'data: {"x":1}\n\ndata: {"x":2}\n\n', [], 2),
    (b'\x1e{"x":1}\x1e{"x":2}', [], 2),
    (b'\x1e{"x":1}\x1e{"x":2}', ["-i", "seq"], 2),
    (b'{\n  "x": 1\n}\n', ["-i", "json"], 1),
    (b'data: {"x":1}\n', [], 1),
    (b'{"x":1}\n{"x":2}', [], 2),
    (b'{"x":1} {"x":2}\n[3]', ["-i", "jq"], None),
])
def test_stdin_formats(pls, stdin, args, count):
    pls.run("pool", "create", "demo")
    result = pls.run("poke", "demo", *args, input=stdin)
    if count is None:  # jq mode: the array is a record that fails to append
        assert result.returncode == 2
        assert json.loads(result.stderr)["error"]["message"] == "data must be object"
        assert len(result.stdout.splitlines()) == 2
        return
    assert result.returncode == 0, result.stderr
    receipts = [json.loads(line) for line in result.stdout.splitlines()]
    assert [receipt["seq"] for receipt in receipts] == list(range(1, count + 1))
    shown = pls.run("peek", "demo", "--tail", str(count), "--jsonl", "--timeout", "0ms")
    assert [json.loads(line)["seq"] for line in shown.stdout.splitlines()] == list(range(1, count + 1))


def test_stdin_errors_skip_and_stop(pls):
    pls.run("pool", "create", "demo")
    result = pls.run("poke", "demo", "-i", "jsonl", "-e", "skip", input=b'{"x":1}\nnot-json\n{"x":2}\n')
    assert result.returncode == 1 and len(result.stdout.splitlines()) == 2
    notices = [json.loads(line)["notice"] for line in result.stderr.splitlines()]
    assert notices[0]["kind"] == "ingest_skip" and notices[0]["details"]["snippet"] == "not-json"
    assert notices[0]["details"]["line"] == 2 and notices[0]["details"]["error_kind"] == "Parse"
    assert notices[-1]["kind"] == "ingest_summary"
    assert notices[-1]["details"] == {"failed": 1, "ok": 2, "pool_path": notices[0]["details"][
        "pool_path"], "total": 3}
    big = b'{"s":"' + b"x" * (1024 * 1024 + 1) + b'"}\n{"ok":1}\n'
    result = pls.run("poke", "demo", "-e", "skip", input=big)
    assert result.returncode == 1 and len(result.stdout.splitlines()) == 1
    assert json.loads(result.stderr.splitlines()[0])["notice"]["details"]["error_kind"] == "Oversize"
    result = pls.run("poke", "demo", "-i", "json", "-e", "skip", input=b'{"x":1')
    assert result.returncode == 1 and b"ingest_skip" in result.stderr
    code, error = pls.error("poke", "demo", "-i", "jq", "-e", "skip", input=b'{"x":1}')
    assert code == 2 and error["message"] == "skip is not supported for jq-style streams"
    code, error = pls.error("poke", "demo", input=b'{"x":1}\nnot-json\n')
    assert code == 2 and error["message"] == "invalid json input" and "-e skip" in error["hint"]
    code, error = pls.error("poke", "demo", input=b"   \n\n")
    assert code == 2 and error["message"] == "missing data input"
    before = pls.json("pool", "info", "demo", "--json")["bounds"]
    code, error = pls.error("poke", "demo", input=bytes(range(256)) * 64)
    assert code == 2 and error["kind"] == "Usage" and error["hint"]
    assert pls.json("pool", "info", "demo", "--json")["bounds"] == before


def test_a_100_mb_line_is_refused_without_loading_it(pls, tmp_path):
    pls.run("pool", "create", "demo")
    pls.run("poke", "demo", '{"keep": 1}')
    big = tmp_path / "big.jsonl"
    with open(big, "wb") as handle:
        handle.write(b'{"blob": "')
        chunk = b"z" * (1024 * 1024)
        for _ in range(100):
            handle.write(chunk)
        handle.write(b'"}\n{"after": 1}\n')
    with open(big, "rb") as stdin:
        process = subprocess.run(pls.command("poke", "demo", "-e", "skip"), stdin=stdin,
                                 capture_output=True, timeout=120)
    assert process.returncode == 1
    assert [json.loads(line)["data"] for line in process.stdout.splitlines()] == [{"after": 1}]
    with open(big, "rb") as stdin:
        process = subprocess.run(pls.command("poke", "demo"), stdin=stdin, capture_output=True,
                                 timeout=120)
    error = json.loads(process.stderr)["error"]
    assert process.returncode == 2 and error["message"] == "record exceeds size limit"
    assert "1 MiB" in error["hint"]
    messages = pls.run("peek", "demo", "--tail", "10", "--jsonl", "--timeout", "0ms").stdout
    assert [json.loads(line)["data"] for line in messages.splitlines()] == [{"keep": 1}, {"after": 1}]


# -- --where ----------------------------------------------------------------------------------

def test_peek_where_and_tag_filters(pls):
    pls.run("pool", "create", "demo")
    pls.run("poke", "demo", '{"x": 1, "level": "info"}', "--tag", "drop")
    pls.run("poke", "demo", '{"x": 2, "level": "error"}', "--tag", "keep")
    pls.run("poke", "demo", '{"x": 3, "level": "error", "msg": "request timeout"}', "--tag", "other")

    def xs(*args):
        result = pls.run("peek", "demo", "--tail", "10", "--jsonl", "--timeout", "0ms", *args)
        return [json.loads(line)["data"]["x"] for line in result.stdout.splitlines()]

    assert xs("--where", '.data.level == "error"') == [2, 3]
    assert xs("--where", '.data.level == "error"', "--tag", "keep") == [2]
    assert xs("--where", '.data.x > 1', "--where", '.data.msg | test("timeout")') == [3]
    assert xs("--where", '.meta.tags[]? == "keep"') == [2]
    assert xs("--tag", "keep", "--tag", "other") == []
    result = pls.run("peek", "demo", "--since", "1h", "--where", ".data.x == 1", "--jsonl",
                     "--timeout", "0ms")
    assert [json.loads(line)["data"]["x"] for line in result.stdout.splitlines()] == [1]
    result = pls.run("peek", "demo", "-n", "5", "--data-only", "--jsonl", "--timeout", "0ms",
                     "--where", '.meta.tags[]? == "keep"')
    assert result.stdout == b'{"level":"error","x":2}\n'


def test_peek_where_errors(pls):
    pls.run("pool", "create", "demo")
    pls.run("poke", "demo", '{"x": 1}')
    code, error = pls.error("peek", "demo", "--where", "not valid jq (")
    assert code == 2 and error["kind"] == "Usage" and error["message"] == "invalid filter expression"
    assert error["hint"].startswith("Failed to parse/compile `not valid jq (`.") and "^" in error["hint"]
    code, error = pls.error("peek", "demo", "-n", "1", "--where", ".data")
    assert code == 2 and error["kind"] == "Usage"
    result = pls.run("peek", "demo", "-n", "1", "--jsonl", "--timeout", "0ms",
                     "--where", ".data.x.y == 1")  # a runtime error: no match, not a failure
    assert result.returncode == 124 and result.stdout == b""
