"""The Python API (shape of the official binding): scenarios end to end."""

import json
import threading
import time

import pytest

import plasmite
from plasmite import Client, Durability, ErrorKind, PlasmiteError, parse_message


@pytest.fixture
def client(tmp_path):
    with Client(str(tmp_path)) as opened:
        yield opened


def test_append_and_get_round_trip(client):
    pool = client.create_pool("events", 1024 * 1024)
    raw = pool.append_json(b'{"x": 1, "b": [true, null, 2.5]}', ["tag"], Durability.FAST)
    message = parse_message(raw)
    assert message["seq"] == 1 and message["meta"] == {"tags": ["tag"]}
    assert message["data"] == {"b": [True, None, 2.5], "x": 1}
    assert message["time"].endswith("Z")
    assert pool.get_json(1) == raw
    assert raw.startswith(b'{"data":{"b":[true,null,2.5],"x":1},"meta":{"tags":["tag"]},"seq":1,')


def test_large_payloads(client):
    pool = client.create_pool("big", 8 * 1024 * 1024)
    blob = "x" * (3 * 1024 * 1024)
    raw = pool.append_json(json.dumps({"blob": blob}).encode(), [], Durability.FLUSH)
    assert parse_message(pool.get_json(parse_message(raw)["seq"]))["data"]["blob"] == blob
    with pytest.raises(PlasmiteError) as caught:
        pool.append_json(json.dumps({"blob": "y" * (9 * 1024 * 1024)}), [])
    assert caught.value.kind == ErrorKind.USAGE and caught.value.hint


def test_big_strings_render_exactly_as_small_ones(client):
    # get_json escapes strings of 1 MiB and more on their own (to save memory); the
    # bytes must be those of the ordinary rendering, wherever the strings sit.
    pool = client.create_pool("huge", 32 * 1024 * 1024)
    big = "\u00e9\"\\\n\u2603 " * (300 * 1024)
    data = {"z": big, "a": [{"deep": big[::-1]}, 1.5e-7, "small"], "m": {"n": "x" * (1 << 20)}}
    seq = parse_message(pool.append_json(json.dumps(data).encode(), ["t"]))["seq"]
    raw = pool.get_json(seq)
    expected = plasmite.dump_json(plasmite.message_fields(pool._local().get(seq))).encode()
    assert raw == expected
    assert parse_message(raw)["data"] == data


def test_explicit_timestamp(client):
    pool = client.create_pool("t", 64 * 1024)
    message = parse_message(pool.append_json(b"{}", [], timestamp_ns=1700000000123456789))
    assert message["time"] == "2023-11-14T22:13:20.123456789Z"


def test_tail_with_timeout_and_close(client):
    pool = client.create_pool("tail", 1024 * 1024)
    started = time.monotonic()
    assert list(pool.tail(timeout_ms=100)) == []
    assert 0.08 <= time.monotonic() - started < 2
    stream = pool.open_stream(timeout_ms=None)
    results = []
    reader = threading.Thread(target=lambda: results.append(stream.next_json()))
    reader.start()
    time.sleep(0.05)
    pool.append_json(b'{"n": 1}', [])
    reader.join(5)
    assert parse_message(results[0])["data"] == {"n": 1}
    blocked = threading.Thread(target=lambda: results.append(stream.next_json()))
    blocked.start()
    time.sleep(0.05)
    stream.close()
    blocked.join(5)
    assert not blocked.is_alive() and results[1] is None
    with pytest.raises(PlasmiteError):
        stream.next_json()


def test_tag_filters_apply_before_max_messages(client):
    pool = client.create_pool("tags", 1024 * 1024)
    for number in range(10):
        pool.append_json(json.dumps({"n": number}), ["even" if number % 2 == 0 else "odd", "all"])
    picked = [parse_message(raw)["data"]["n"]
              for raw in pool.tail(since_seq=1, max_messages=3, timeout_ms=50, tags=["odd"])]
    assert picked == [1, 3, 5]
    both = [parse_message(raw)["data"]["n"]
            for raw in pool.tail(since_seq=1, timeout_ms=50, tags=["even", "all"])]
    assert both == [0, 2, 4, 6, 8]
    replayed = [parse_message(raw)["data"]["n"]
                for raw in pool.replay(speed=0, max_messages=2, tags=["even"])]
    assert replayed == [0, 2]


def test_replay_paces_by_original_timing(client):
    pool = client.create_pool("replay", 64 * 1024)
    base = time.time_ns()
    for number in range(3):
        pool.append_json(json.dumps({"n": number}), [], timestamp_ns=base + number * 100_000_000)
    started = time.monotonic()
    assert len(list(pool.replay(speed=2.0))) == 3
    assert 0.08 <= time.monotonic() - started < 3.0


def test_stream_iteration_and_since_seq(client):
    pool = client.create_pool("s", 1024 * 1024)
    for number in range(5):
        pool.append_json(json.dumps({"n": number}), [])
    with pool.open_stream(since_seq=3, max_messages=10, timeout_ms=30) as stream:
        assert [parse_message(raw)["seq"] for raw in stream] == [3, 4, 5]
    with pool.open_stream(since_seq=0, max_messages=1, timeout_ms=30) as stream:
        assert parse_message(stream.next_json())["seq"] == 1
        assert stream.next_json() is None


def test_lite3_round_trip_and_stream(client):
    pool = client.create_pool("lite", 1024 * 1024)
    pool.append_json(b'{"k": "v"}', ["a", "b"])
    frame = pool.get_lite3(1)
    assert isinstance(frame, plasmite.Lite3Frame) and frame.seq == 1
    raw = pool.append_lite3(frame.payload, Durability.FAST)
    copy = parse_message(raw)
    assert copy["seq"] == 2 and copy["data"] == {"k": "v"} and copy["meta"]["tags"] == ["a", "b"]
    assert pool.get_lite3(2).payload == frame.payload
    with pool.open_lite3_stream(since_seq=1, timeout_ms=30) as stream:
        frames = list(stream)
    assert [item.seq for item in frames] == [1, 2]
    assert frames[0].payload == frames[1].payload


@pytest.mark.parametrize("payload", [b"", b"\x00" * 8, b"not lite3 at all" * 10,
                                     bytes.fromhex("07" + "00" * 95)])
def test_invalid_lite3_is_rejected(client, payload):
    pool = client.create_pool("bad", 64 * 1024)
    with pytest.raises(PlasmiteError) as caught:
        pool.append_lite3(payload)
    assert caught.value.kind == "Corrupt"
    assert pool._local().bounds() is None


@pytest.mark.parametrize("payload, message", [
    (b"[1, 2]", "data must be object"),
    (b"42", "data must be object"),
    (b'{"a": 1', "invalid json"),
    (b"{'a': 1}", "invalid json"),
    (b'{"a": NaN}', "invalid json"),
    (b"\xff\xfe", "invalid json"),
])
def test_bad_data_gives_usage_and_leaves_pool_untouched(client, payload, message):
    pool = client.create_pool("p", 64 * 1024)
    pool.append_json(b'{"keep": 1}', [])
    before = open(pool.path, "rb").read()
    with pytest.raises(PlasmiteError) as caught:
        pool.append_json(payload, [])
    assert caught.value.kind == "Usage" and caught.value.message.startswith(message)
    assert open(pool.path, "rb").read() == before


def test_nesting_deeper_than_upstream_allows(client):
    pool = client.create_pool("deep", 64 * 1024)
    ok_depth = 29  # root, meta... data is depth 2; 32 containers in all
    pool.append_json(("[" * ok_depth + "]" * ok_depth).join(['{"a":', "}"]), [])
    with pytest.raises(PlasmiteError) as caught:
        pool.append_json(("[" * 40 + "]" * 40).join(['{"a":', "}"]), [])
    assert caught.value.kind == "Usage"
    with pytest.raises(PlasmiteError) as caught:
        pool.append_json("[" * 100000, [])
    assert caught.value.kind == "Usage"


def test_argument_types_and_values(client):
    pool = client.create_pool("args", 64 * 1024)
    with pytest.raises(TypeError):
        pool.append_json({"x": 1}, [])
    with pytest.raises(TypeError):
        pool.append_json(b"{}", "tag")
    with pytest.raises(TypeError):
        pool.append_json(b"{}", [1])
    with pytest.raises(ValueError):
        pool.append_json(b"{}", [], "slow")
    with pytest.raises(TypeError):
        pool.append_json(b"{}", [], 3)
    with pytest.raises(ValueError):
        pool.append_json(b"{}", [], timestamp_ns=-1)
    with pytest.raises(TypeError):
        pool.get_json("1")
    with pytest.raises(ValueError):
        pool.get_json(-1)
    with pytest.raises(ValueError):
        pool.open_stream(timeout_ms=-5)
    with pytest.raises(TypeError):
        pool.open_stream(since_seq=1.5)
    with pytest.raises(ValueError):
        list(pool.replay(speed=-1))
    with pytest.raises(TypeError):
        client.create_pool(7, 1024)
    with pytest.raises(ValueError):
        client.create_pool("", 1024)
    with pytest.raises(TypeError):
        client.create_pool("x", "1M")
    with pytest.raises(TypeError):
        pool.append_lite3("text")


def test_errors_carry_kind_path_and_seq(client):
    with pytest.raises(PlasmiteError) as caught:
        client.open_pool("missing")
    assert caught.value.kind == ErrorKind.NOT_FOUND and caught.value.kind == "NotFound"
    assert caught.value.path.endswith("missing.plasmite") and caught.value.exit_code == 3
    pool = client.create_pool("e", 64 * 1024)
    with pytest.raises(PlasmiteError) as caught:
        pool.get_json(9)
    assert caught.value.kind == "NotFound" and caught.value.seq == 9
    with pytest.raises(PlasmiteError) as caught:
        client.create_pool("e", 64 * 1024)
    assert caught.value.kind == "AlreadyExists" and caught.value.exit_code == 4


def test_closed_handles_raise(tmp_path):
    client = Client(str(tmp_path))
    pool = client.create_pool("c", 64 * 1024)
    pool.append_json(b"{}", [])
    pool.close()
    pool.close()
    for call in (lambda: pool.get_json(1), lambda: pool.append_json(b"{}", []),
                 lambda: pool.open_stream(), lambda: pool.info_json()):
        with pytest.raises(PlasmiteError):
            call()
    other = client.open_pool("c")
    client.close()
    with pytest.raises(PlasmiteError):
        other.get_json(1)
    with pytest.raises(PlasmiteError):
        client.open_pool("c")


def test_context_managers_close(tmp_path):
    with Client(str(tmp_path)) as client:
        with client.create_pool("m", 64 * 1024) as pool:
            pool.append_json(b"{}", [])
        with pytest.raises(PlasmiteError):
            pool.get_json(1)
        kept = client.open_pool("m")
    with pytest.raises(PlasmiteError):
        kept.get_json(1)


def test_info_list_and_delete(client):
    pool = client.create_pool("alpha", 64 * 1024, index_capacity=0)
    client.create_pool("beta", 64 * 1024)
    pool.append_json(b'{"a": 1}', [])
    info = json.loads(client.pool_info_json("alpha"))
    assert info["name"] == "alpha" and info["index_capacity"] == 0
    assert info["bounds"] == {"newest": 1, "oldest": 1}
    assert info["metrics"]["message_count"] == 1
    names = [entry["name"] for entry in json.loads(client.list_pools_json())["pools"]]
    assert names == ["alpha", "beta"]
    client.delete_pool("beta")
    with pytest.raises(PlasmiteError) as caught:
        client.delete_pool("beta")
    assert caught.value.kind == "NotFound"


def test_dropped_count_when_lapped(client):
    pool = client.create_pool("lap", 16 * 1024, index_capacity=0)
    stream = pool.open_stream(since_seq=1, timeout_ms=20)
    for number in range(200):
        pool.append_json(json.dumps({"n": number, "pad": "x" * 40}), [])
    seqs = [parse_message(raw)["seq"] for raw in stream]
    assert seqs == list(range(seqs[0], 201))
    assert stream.dropped_count == seqs[0] - 1 > 0


def _rendering(frame, render):
    try:
        return render(frame), None
    except plasmite.PlasmiteError as err:
        return None, (err.kind, err.message)


def test_message_json_equals_the_general_rendering():
    # message_json builds common messages' JSON straight from the buffer; whatever the
    # message (or the damage), it must answer exactly as dump_json(message_fields()).
    import random

    generator = random.Random(7)

    def value(depth=0):
        if depth < 2 and generator.random() < 0.15:
            if generator.random() < 0.5:
                return {"k%d" % generator.randrange(9): value(depth + 1) for _ in range(generator.randrange(8))}
            return [value(depth + 1) for _ in range(generator.randrange(8))]
        return generator.choice([None, True, False, 0, -1, 2 ** 63 - 1, -2 ** 63, 2 ** 64 - 1, 1.5, -0.0,
                                 1e-7, 1e16, 1e300, "", "é\"\\\n\t\x01", "\u2028", "k" * 70])

    def general(frame):
        return plasmite.dump_json(plasmite.message_fields(frame))

    fast = 0
    for number in range(3000):
        data = {generator.choice(["a", "id", "é", "", "k" * generator.randrange(1, 80)]): value()
                for _ in range(generator.randrange(9))}
        tags = [generator.choice(["t", "é", "", "x" * 70]) for _ in range(generator.randrange(9))]
        payload = bytearray(plasmite.encode_message(tags, data))
        plasmite.message_fields(plasmite.Frame(1, 0, bytes(payload)))  # the decoder learns the keys
        if number % 2:
            for _ in range(generator.randrange(1, 4)):
                payload[generator.randrange(len(payload))] = generator.randrange(256)
        frame = plasmite.Frame(number + 1, 1795000000123456789 + number, bytes(payload))
        fast += plasmite.flat_message_json(frame.payload) is not None
        assert _rendering(frame, plasmite.message_json) == _rendering(frame, general), (number, data, tags)
    assert fast > 500   # the buffer path did most of the common shapes
