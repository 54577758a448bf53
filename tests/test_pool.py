"""Reading and writing upstream's own pool files (fixtures made by plasmite 0.1.0)."""

import hashlib
import json
import os
import time

import pytest

import plasmite
from conftest import POOL_FIXTURES, load_expected, pool_fixture_names
from plasmite import PlasmiteError

# Fixtures whose history starts at seq 1 and is undamaged: rewriting their
# messages with the same timestamps must reproduce the file byte for byte.
REBUILDABLE = ["base3_clean_64k", "edge_payloads_256k", "empty_1m", "five_tagged_1m",
               "noindex_64k"]


def read_all(pool, start=1, limit=100000):
    """Read every message from ``start`` with a cursor; return the message dicts."""
    cursor = pool.cursor(start)
    messages = []
    for _ in range(limit):
        frame = cursor.next_frame()
        if frame is None:
            return messages
        messages.append(plasmite.message_fields(frame))
    raise AssertionError("cursor did not stop")


def expected_messages(expected):
    return expected.get("messages_expected_correct_reader", expected["messages"])


@pytest.mark.parametrize("name", pool_fixture_names())
def test_fixture_messages(name, fixture_pool):
    expected = load_expected(name)
    started = time.monotonic()
    if expected["messages_rc"] == 7 and expected["info_rc"] == 7:
        with pytest.raises(PlasmiteError) as caught:
            plasmite.LocalPool.open(fixture_pool(name))
        assert caught.value.kind == "Corrupt"
        assert caught.value.message == json.loads(expected["messages_stderr"])["error"]["message"]
        return
    with plasmite.LocalPool.open(fixture_pool(name)) as pool:
        if expected["messages_rc"] == 124 or "messages_expected_correct_reader" in expected:
            messages = read_all(pool)
            assert messages == expected_messages(expected)
            if expected["messages_rc"] == 124:
                lines = [plasmite.dump_json(message) for message in messages]
                assert lines == expected["messages_jsonl_raw"]
        else:
            # Upstream hung or failed on a damaged frame: we must say Corrupt.
            with pytest.raises(PlasmiteError) as caught:
                read_all(pool)
            assert caught.value.kind == "Corrupt"
            assert caught.value.seq in (2, 3)
    assert time.monotonic() - started < 5


@pytest.mark.parametrize("name", pool_fixture_names())
def test_fixture_get(name, fixture_pool):
    expected = load_expected(name)
    try:
        pool = plasmite.LocalPool.open(fixture_pool(name))
    except PlasmiteError as err:
        assert all(entry["rc"] == err.exit_code for entry in expected["get"])
        return
    with pool:
        for entry in expected["get"]:
            if entry["rc"] == 0:
                frame = pool.get(entry["seq"])
                assert plasmite.dump_json(plasmite.message_fields(frame)) + "\n" == entry["stdout"]
            elif entry["rc"] == 3:
                with pytest.raises(PlasmiteError) as caught:
                    pool.get(entry["seq"])
                assert caught.value.kind == "NotFound" and caught.value.seq == entry["seq"]
            else:  # upstream printed Corrupt or hung: a damaged frame
                with pytest.raises(PlasmiteError) as caught:
                    plasmite.message_fields(pool.get(entry["seq"]))
                assert caught.value.kind == "Corrupt"


@pytest.mark.parametrize("name", pool_fixture_names())
def test_fixture_info(name, fixture_pool):
    expected = load_expected(name)
    if expected["info_rc"] not in (0, "timeout(killed after 5s)"):
        return
    with plasmite.LocalPool.open(fixture_pool(name)) as pool:
        info = pool.info()
    if expected["info_rc"] == 0:
        wanted = dict(expected["info"])
    else:  # upstream hung here; compute what it should have said from the header
        header = expected["raw_pool_header"]
        wanted = {"bounds": {"oldest": header["oldest_seq"], "newest": header["newest_seq"]}}
        info = {"bounds": info["bounds"]}
    wanted.pop("name", None)
    wanted.pop("path", None)
    if "metrics" in wanted:
        for key in ("oldest_age_ms", "newest_age_ms"):
            assert (info["metrics"]["age"][key] is None) == (wanted["metrics"]["age"][key] is None)
            info["metrics"]["age"][key] = wanted["metrics"]["age"][key]
    assert info == wanted


@pytest.mark.parametrize("name", pool_fixture_names())
def test_fixture_doctor(name, fixture_pool):
    expected = load_expected(name)
    report = plasmite.diagnose_pool(fixture_pool(name), name)
    wanted = expected["doctor"]["reports"][0]
    report["path"] = wanted["path"]
    if name in ("corrupt_payload_64k", "missing_commit_marker_64k"):
        # Upstream's doctor misses these; ours must catch them.
        assert wanted["status"] == "ok"
        assert report["status"] == "corrupt"
        assert report["issues"][0]["seq"] in (2, 3)
        assert report["last_good_seq"] in (1, 2)
        return
    assert report == wanted


@pytest.mark.parametrize("name", REBUILDABLE)
def test_rewriting_fixture_messages_is_byte_identical(name, tmp_path):
    expected = load_expected(name)
    header = expected["raw_pool_header"]
    timestamps = {frame["seq"]: frame["timestamp_ns"] for frame in expected["raw_frames"]}
    client = plasmite.Client(str(tmp_path))
    with client:
        pool = client.create_pool(name, header["file_size"], header["index_capacity"])
        if "poke_attempts" in expected:
            inputs = [attempt for attempt in expected["poke_attempts"] if attempt["rc"] == 0]
            by_seq = {message["seq"]: message for message in expected["messages"]}
            for seq, attempt in enumerate(inputs, 1):
                text = attempt["input"]
                if text.startswith("<"):  # the 20 KB blob is recorded only in messages
                    text = json.dumps(by_seq[seq]["data"])
                tags = ["edge", attempt["case"]]
                raw = pool.append_json(text.encode(), tags, plasmite.Durability.FAST,
                                       timestamp_ns=timestamps[seq])
                assert raw.decode() + "\n" == attempt["poke_stdout"]
        else:
            for message in expected["messages"]:
                pool.append_json(json.dumps(message["data"]), message["meta"]["tags"],
                                 timestamp_ns=timestamps[message["seq"]])
    digest = hashlib.sha256((tmp_path / (name + ".plasmite")).read_bytes()).hexdigest()
    assert digest == expected["file_sha256"]


def test_appending_to_wrapped_upstream_pools_keeps_them_valid(fixture_pool):
    """Our writer continues upstream's rings: planning, eviction and tail_next agree."""
    for name in ("wrapped_64k", "noindex_wrapped_64k", "noindex_wrapped_hang_64k"):
        path = fixture_pool(name)
        with plasmite.LocalPool.open(path) as pool:
            oldest, newest = pool.bounds()
            for number in range(400):
                payload = plasmite.encode_message(["more"], {"n": number, "pad": "p" * (number % 37)})
                assert pool.append(payload)[0] == newest + 1 + number
            issues, last_good, _warnings = plasmite.validate_pool(pool)
            assert issues == [] and last_good == newest + 400
            messages = read_all(pool)
            assert messages[-1]["data"] == {"n": 399, "pad": "p" * (399 % 37)}
            assert [m["seq"] for m in messages] == list(range(messages[0]["seq"], newest + 401))


def test_list_pools_reports_unreadable_entries(tmp_path, fixture_pool):
    for name in ("base3_clean_64k", "bad_magic_64k", "empty_1m"):
        os.replace(fixture_pool(name), tmp_path / (name + ".plasmite"))
    (tmp_path / "notes.txt").write_text("not a pool")
    entries = plasmite.list_pools(tmp_path)
    assert [entry["name"] for entry in entries] == ["bad_magic_64k", "base3_clean_64k", "empty_1m"]
    assert entries[0]["error"]["error"]["kind"] == "Corrupt"
    assert entries[0]["error"]["error"]["hint"] == plasmite.CORRUPT_HINT
    assert entries[1]["bounds"] == {"oldest": 1, "newest": 3}
    assert entries[1]["file_size"] == 65536 and entries[1]["mtime"].endswith("Z")
    assert entries[2]["bounds"] == {}
    assert plasmite.list_pools(tmp_path / "missing") == []


def test_delete_pool_file(tmp_path):
    path = str(tmp_path / "d.plasmite")
    plasmite.LocalPool.create(path, 64 * 1024).close()
    plasmite.delete_pool_file(path)
    assert not os.path.exists(path)
    with pytest.raises(PlasmiteError) as caught:
        plasmite.delete_pool_file(path)
    assert caught.value.kind == "NotFound" and caught.value.message == "pool not found"


def test_fixture_files_are_the_shared_originals():
    """The copies in tests/fixtures must stay byte-identical to what upstream made."""
    for name in pool_fixture_names():
        expected = load_expected(name)
        with open(os.path.join(POOL_FIXTURES, name + ".plasmite"), "rb") as handle:
            assert hashlib.sha256(handle.read()).hexdigest() == expected["file_sha256"]
