"""The Lite3 codec against the C library's vectors, upstream's pools and random input.

The vectors in tests/fixtures/lite3 were produced by the Lite3 C library vendored in
plasmite 0.1.0 (see tests/fixtures/README.md).
"""
from __future__ import annotations

import glob
import json
import math
import os
import random
import struct
import time

from conftest import FIXTURES
from plasmite import (  # noqa: E402
    ObjectPairs, PlasmiteError, decode_lite3, decode_message, encode_lite3,
    encode_lite3_json_text, encode_message, parse_json_value, validate_lite3_message)

# The v0.1.0 bug of spec §9.2 (a last entry shorter than 4 bytes fails to render) is
# deliberately not reproduced: this buffer decodes.
V010_SHORT_LAST_ENTRY = {"key_empty_null_last": {"": None}}
# Oracle pools whose frames are damaged on purpose; pool code tests those.
DAMAGED_POOL_PREFIXES = ("bad_", "corrupt_", "missing_", "writing_")


def load_jsonl(name):
    with open(os.path.join(FIXTURES, "lite3", name), encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


VECTORS = load_jsonl("vectors.jsonl")
INVALID = load_jsonl("invalid.jsonl")


def vector_input(vector):
    """Return a vector's JSON input: its text, or the raw bytes when they are not UTF-8."""
    return vector["json"] if vector["json"] is not None else bytes.fromhex(vector["json_hex"])


def assert_identical(actual, expected, where="$"):
    """Assert equal values with equal types (int vs float, -0.0) and equal dict key order."""
    assert type(actual) is type(expected), "%s: %r is not %r" % (where, actual, expected)
    if isinstance(expected, dict):
        assert list(actual) == list(expected), "%s: keys %r != %r" % (where, list(actual), list(expected))
        for key in expected:
            assert_identical(actual[key], expected[key], "%s.%s" % (where, key))
    elif isinstance(expected, list):
        assert len(actual) == len(expected), "%s: length %d != %d" % (where, len(actual), len(expected))
        for index, (left, right) in enumerate(zip(actual, expected)):
            assert_identical(left, right, "%s[%d]" % (where, index))
    elif isinstance(expected, float):
        assert struct.pack("<d", actual) == struct.pack("<d", expected), "%s: %r != %r" % (where, actual, expected)
    else:
        assert actual == expected, "%s: %r != %r" % (where, actual, expected)


def sorted_keys(value):
    """Return ``value`` with every dict's keys in sorted order (for order-free comparison)."""
    if isinstance(value, dict):
        return {key: sorted_keys(value[key]) for key in sorted(value)}
    if isinstance(value, list):
        return [sorted_keys(item) for item in value]
    return value


def raises(kind, function, *arguments):
    """Assert that ``function(*arguments)`` raises PlasmiteError of ``kind``; return it."""
    try:
        result = function(*arguments)
    except PlasmiteError as error:
        assert error.kind == kind, "expected %s, got %s: %s" % (kind, error.kind, error.message)
        return error
    raise AssertionError("expected PlasmiteError %s, got %r" % (kind, result))


def plasmite_verdict(buffer):
    try:
        validate_lite3_message(buffer)
    except PlasmiteError as error:
        assert error.kind == "Corrupt"
        return error.message
    return "ok"


# -- vectors.jsonl ----------------------------------------------------------------

def test_vectors_encode_from_text():
    count = 0
    for vector in VECTORS:
        if vector.get("lite3_hex") is not None:
            actual = encode_lite3_json_text(vector_input(vector)).hex()
            assert actual == vector["lite3_hex"], vector["name"]
            count += 1
    assert count == 105


def test_vectors_encode_from_values():
    def reject_duplicates(pairs):
        keys = [key.split("\0")[0] for key, _ in pairs]
        if len(set(keys)) < len(keys):
            raise KeyError("duplicate")
        return dict(pairs)
    count = 0
    for vector in VECTORS:
        if vector.get("lite3_hex") is None or vector["json"] is None:
            continue
        try:
            document = json.loads(vector["json"], object_pairs_hook=reject_duplicates)
        except KeyError:
            continue
        assert encode_lite3(document).hex() == vector["lite3_hex"], vector["name"]
        count += 1
    assert count >= 95


def test_vectors_rejected():
    failing = [vector for vector in VECTORS if vector.get("error") is not None]
    for vector in failing:
        error = raises("Usage", encode_lite3_json_text, vector_input(vector))
        assert error.message == "failed to encode json as lite3" and error.hint, vector["name"]
    assert len(failing) == 12


def test_scalar_roots():
    roots = [vector for vector in VECTORS if vector.get("lite3_hex") == ""]
    for vector in roots:
        assert encode_lite3_json_text(vector["json"]) == b""
        assert encode_lite3(json.loads(vector["json"])) == b""
        raises("Corrupt", decode_lite3, b"")
    assert len(roots) == 3


def test_vectors_decode():
    count = 0
    for vector in VECTORS:
        if not vector.get("lite3_hex"):
            continue
        buffer = bytes.fromhex(vector["lite3_hex"])
        if vector["name"] in V010_SHORT_LAST_ENTRY:
            assert_identical(decode_lite3(buffer), V010_SHORT_LAST_ENTRY[vector["name"]])
        elif vector.get("json_out") is not None:
            assert_identical(decode_lite3(buffer), json.loads(vector["json_out"]), vector["name"])
            assert_identical(decode_lite3(memoryview(bytearray(buffer))), json.loads(vector["json_out"]))
        else:
            raises("Corrupt", decode_lite3, buffer)
        count += 1


def test_vectors_plasmite_valid():
    for vector in VECTORS:
        if vector.get("lite3_hex") is not None:
            verdict = plasmite_verdict(bytes.fromhex(vector["lite3_hex"]))
            assert verdict == vector["plasmite_valid"], (vector["name"], verdict)


def test_message_vectors():
    messages = [vector for vector in VECTORS if "plasmite" in vector]
    for vector in messages:
        envelope = vector["plasmite"]
        buffer = bytes.fromhex(vector["lite3_hex"])
        if envelope["version"] == "0.1.0":
            assert encode_message(envelope["tags"], envelope["data"]) == buffer, vector["name"]
        tags, data = decode_message(buffer)
        assert tags == envelope["tags"]
        assert_identical(sorted_keys(data), sorted_keys(stored_value(envelope["data"])), vector["name"])
    assert len(messages) == 20


# -- invalid.jsonl ----------------------------------------------------------------

def test_invalid_buffers():
    for case in INVALID:
        buffer = bytes.fromhex(case["lite3_hex"])
        if case["verdict"] == "rejected":
            raises("Corrupt", decode_lite3, buffer)
        else:
            assert_identical(decode_lite3(buffer), json.loads(case["json_out"]), case["name"])
        assert plasmite_verdict(buffer) == case["plasmite_valid"], case["name"]
    assert len(INVALID) == 23


def test_decode_message_errors():
    valid = bytes.fromhex(next(case for case in INVALID if case["name"] == "plasmite_valid_reference")["lite3_hex"])
    assert decode_message(valid) == (["t"], {"x": 1})
    flipped = bytes([valid[0] ^ 0xFF]) + valid[1:]
    assert raises("Corrupt", decode_message, flipped).message == "missing meta"
    missing_meta = bytes.fromhex(next(case for case in INVALID if case["name"] == "plasmite_missing_meta")["lite3_hex"])
    assert raises("Corrupt", decode_message, missing_meta).message == "missing meta"
    not_strings = bytes.fromhex(next(case for case in INVALID if case["name"] == "plasmite_tags_not_strings")["lite3_hex"])
    assert raises("Corrupt", decode_message, not_strings).message == "meta.tags must be string array"
    no_data = encode_lite3({"meta": {"tags": []}})
    assert raises("Corrupt", decode_message, no_data).message == "missing data"
    for name in ("empty_buffer", "eight_zero_bytes", "zero_node"):
        buffer = bytes.fromhex(next(case for case in INVALID if case["name"] == name)["lite3_hex"])
        assert raises("Corrupt", decode_message, buffer).message == "missing meta"
    raises("Corrupt", decode_lite3, "not bytes")
    raises("Corrupt", validate_lite3_message, 12)


# -- encoding errors -----------------------------------------------------------

def test_encode_usage_errors():
    deep = []
    for _ in range(32):
        deep = [deep]
    assert encode_lite3(deep[0]) != b""                          # 32 containers are fine
    collision = next(vector for vector in VECTORS if vector["name"] == "hash_collision_tag_size_mismatch")
    cases = [
        (encode_lite3, deep),                                   # 33 containers
        (encode_lite3, {"x": float("nan")}),
        (encode_lite3, [float("inf")]),
        (encode_lite3, {"s": "\ud800"}),
        (encode_lite3, {"\udc00": 1}),
        (encode_lite3, [10 ** 400]),
        (encode_lite3, {1: 2}),
        (encode_lite3, {"x": object()}),
        (encode_lite3, json.loads(collision["json"])),
        (encode_lite3_json_text, '{"a":1e400}'),
        (encode_lite3_json_text, "[" * 40 + "]" * 40),
        (encode_lite3_json_text, "[" * 5000 + "]" * 5000),
        (encode_lite3_json_text, '{"a":1}\x00'),
        (encode_lite3_json_text, 1234),
        (encode_message, ["t"], [1, 2]),
        (encode_message, "t", {}),
        (encode_message, ["t"], {"x": {"y": float("nan")}}),
    ]
    for function, *arguments in cases:
        raises("Usage", function, *arguments)
    assert raises("Usage", encode_message, ["t"], [1]).message == "data must be object"
    assert encode_lite3([10 ** 300]) == encode_lite3([float(10 ** 300)])
    assert encode_lite3({"n": 2 ** 64 - 1}) == encode_lite3_json_text('{"n":18446744073709551615}')


def test_duplicate_pairs():
    text = '{"a":"x","a":"longer string","b":{"c":1},"b":[1,2,3,4,5,6,7,8]}'
    pairs = ObjectPairs([("a", "x"), ("a", "longer string"), ("b", ObjectPairs([("c", 1)])),
                         ("b", [1, 2, 3, 4, 5, 6, 7, 8])])
    assert encode_lite3(pairs) == encode_lite3_json_text(text)
    assert decode_lite3(encode_lite3(pairs)) == {"a": "longer string", "b": [1, 2, 3, 4, 5, 6, 7, 8]}
    assert encode_lite3({"a\0b": 1}) == encode_lite3({"a": 1})


def test_shortcut_matches_insertion(iterations=400):
    """Objects of up to 7 keys skip the C insertion algorithm; it must not change a byte."""
    import plasmite
    generator = random.Random(7)
    documents = [{random_key(generator): random_scalar(generator) for _ in range(generator.randint(0, 7))}
                 for _ in range(iterations)]
    documents += [{"@c": 1, "AB": "x" * 90, "B!": [1, {"Ab": None}]}, {"a": 1, "a\0b": 2}]
    expected = [encode_lite3(document) for document in documents]
    shortcut = plasmite._small_object_layout
    plasmite._small_object_layout = lambda keys: None
    try:
        for document, buffer in zip(documents, expected):
            assert encode_lite3(document) == buffer, document
    finally:
        plasmite._small_object_layout = shortcut
    assert encode_lite3({"a": 1, "a\0b": 2}) == encode_lite3(ObjectPairs([("a", 1), ("a", 2)]))


# -- serde_json emulation ----------------------------------------------------------

def test_serde_numbers():
    serde_1_2345678901234567e_7 = float(12345678901234567) / 1e23   # spec §10.2 by hand
    assert serde_1_2345678901234567e_7 != 1.2345678901234567e-7
    cases = {
        "1.5e-300": 1.4999999999999998e-300,
        "1.2345678901234567e-7": serde_1_2345678901234567e_7,
        "-0": -0.0,
        "-0.0": -0.0,
        "0": 0,
        "18446744073709551615": 18446744073709551615,
        "18446744073709551616": 18446744073709551616.0,
        "-9223372036854775808": -9223372036854775808,
        "-9223372036854775809": -9223372036854775809.0,
        "123456789012345678901234567890": 1.2345678901234568e29,
        "1e-400": 0.0,
        "-1e-400": -0.0,
        "1e308": 1e308,
        "0.1": 0.1,
        "2.5E-3": 0.0025,
        "5e-324": 5e-324,
        "1.7976931348623157e308": 1.7976931348623157e308,
        "9007199254740993": 9007199254740993,
        "1e99999999999": None,
        "0e99999999999": 0.0,
        "1e-99999999999": 0.0,
        "1e400": None,
    }
    for literal, expected in cases.items():
        if expected is None:
            error = raises("Usage", parse_json_value, literal)
            assert "number out of range at line 1 column %d" % len(literal) in error.message, error.message
        else:
            assert_identical(parse_json_value(literal), expected, literal)


def test_serde_parsing():
    assert_identical(parse_json_value('{"z":1,"a":{"y":1,"b":2},"a":{"d":[{"k":1,"c":2}]}}'),
                     {"a": {"d": [{"c": 2, "k": 1}]}, "z": 1})
    assert_identical(parse_json_value(b' {"\\ud83d\\ude00":"\xc3\xa9"} '), {"\U0001F600": "\u00e9"})
    assert parse_json_value("[" * 127 + "]" * 127) is not None
    assert "recursion limit exceeded at line 1 column 128" in \
        raises("Usage", parse_json_value, "[" * 128 + "]" * 128).message
    bad = ["NaN", '{"x":NaN}', "Infinity", "-Infinity", '"\\ud800"', '["\\udc00x"]',
           '{"a":"\\ud83dA"}', "{}x", "[1,]", "", " ", "\ufeff{}", "01", "1.", ".5", "+1",
           "[1 2]", '{"a" 1}', '"\x01"', b'{"s":"\xff"}', b"\xef\xbb\xbf{}", "\ud800",
           b'"\xed\xa0\x80"', 42, "tru", "[1]]"]
    for text in bad:
        error = raises("Usage", parse_json_value, text)
        assert error.message.startswith("invalid json: "), error.message
    assert "expected value at line 1 column 6" in raises("Usage", parse_json_value, '{"x":NaN}').message
    assert "trailing characters at line 2 column 1" in raises("Usage", parse_json_value, "{}\nx").message


def test_edge_poke_inputs():
    """The raw CLI inputs of edge_payloads_256k re-encode to the stored payloads only with
    serde_json's number rules (1.5e-300 in case "floats")."""
    with open(os.path.join(FIXTURES, "pools", "edge_payloads_256k.expected.json"), encoding="utf-8") as handle:
        expected = json.load(handle)
    payloads = {seq: payload for seq, payload in pool_payloads("edge_payloads_256k", expected)}
    messages = {message["seq"]: message for message in expected["messages"]}
    seq = 0
    for attempt in expected["poke_attempts"]:
        if attempt["rc"] != 0:
            if attempt["case"] in ("array_top", "string_top"):
                data = parse_json_value(attempt["input"])
                assert raises("Usage", encode_message, ["edge", attempt["case"]], data).message == "data must be object"
            else:
                raises("Usage", parse_json_value, attempt["input"])
            continue
        seq += 1
        if attempt["input"].startswith("<"):
            data = messages[seq]["data"]
        else:
            data = parse_json_value(attempt["input"])
        assert encode_message(["edge", attempt["case"]], data) == payloads[seq], attempt["case"]
    assert seq == 7


# -- oracle pools ----------------------------------------------------------------

def pool_payloads(name, expected):
    """Yield (seq, payload) of the committed frames of an oracle pool (pool-format.md §4)."""
    ring_offset = expected["raw_pool_header"]["ring_offset"]
    with open(os.path.join(FIXTURES, "pools", name + ".plasmite"), "rb") as handle:
        contents = handle.read()
    for frame in expected["raw_frames"]:
        if frame["state"] == 2:
            start = ring_offset + frame["ring_off"] + 64
            yield frame["seq"], contents[start:start + frame["payload_len"]]


def test_oracle_pools():
    count = 0
    for path in sorted(glob.glob(os.path.join(FIXTURES, "pools", "*.expected.json"))):
        name = os.path.basename(path)[:-len(".expected.json")]
        if name.startswith(DAMAGED_POOL_PREFIXES):
            continue
        with open(path, encoding="utf-8") as handle:
            expected = json.load(handle)
        messages = {}
        for line in expected.get("messages_jsonl_raw") or []:
            message = parse_json_value(line)
            messages[message["seq"]] = message
        for seq, payload in pool_payloads(name, expected):
            if seq not in messages:
                continue
            message = messages[seq]
            assert encode_message(message["meta"]["tags"], message["data"]) == payload, (name, seq)
            validate_lite3_message(payload)
            tags, data = decode_message(payload)
            assert tags == message["meta"]["tags"]
            assert_identical(sorted_keys(data), message["data"], "%s#%d" % (name, seq))
            count += 1
    assert count >= 140, count


# -- random input ----------------------------------------------------------------

def random_key(generator):
    choice = generator.random()
    if choice < 0.1:
        return generator.choice(["@c", "AB", "B!", "Ab", "data", "meta", "", "k" * 70])
    if choice < 0.2:
        return "".join(generator.choice("aé中😀") for _ in range(generator.randint(1, 5)))
    return "k%d" % generator.randint(0, 60)


def random_scalar(generator):
    choice = generator.randint(0, 9)
    if choice == 0:
        return None
    if choice == 1:
        return generator.random() < 0.5
    if choice == 2:
        return generator.randint(-2 ** 63, 2 ** 63 - 1)
    if choice == 3:
        return generator.choice([2 ** 63, 2 ** 64 - 1, 2 ** 70, -2 ** 63 - 1, 0, -1])
    if choice == 4:
        value = struct.unpack("<d", generator.getrandbits(64).to_bytes(8, "little"))[0]
        return value if math.isfinite(value) else 0.5
    if choice == 5:
        return generator.choice([0.0, -0.0, 1.5, 1e300, 5e-324])
    if choice == 6:
        return "x" * generator.choice([0, 1, 89, 90, 91, 200])
    return "".join(generator.choice("ab\0é\n\"\\😀") for _ in range(generator.randint(0, 12)))


def random_document(generator, budget, depth=1):
    """Return a random JSON-like value of at most ``budget[0]`` values (decremented) and
    at most 6 levels of containers."""
    budget[0] -= 1
    if budget[0] <= 0 or depth > 6 or generator.random() < 0.3:
        return random_scalar(generator)
    size = min(generator.choice([0, 1, 3, 7, 8, 15, 40]), max(budget[0], 0))
    if generator.random() < 0.5:
        return [random_document(generator, budget, depth + 1) for _ in range(size)]
    return {random_key(generator): random_document(generator, budget, depth + 1) for _ in range(size)}


def stored_value(value):
    """What decoding an encoded value gives back, apart from key order."""
    if isinstance(value, dict):
        return {key: stored_value(item) for key, item in value.items()}
    if isinstance(value, list):
        return [stored_value(item) for item in value]
    if isinstance(value, int) and not isinstance(value, bool) and not -2 ** 63 <= value < 2 ** 63:
        return float(value)
    return value


def has_inexact_numbers(value):
    """Tell whether serde_json could parse the JSON of ``value`` to other numbers (§10.2)."""
    if isinstance(value, dict):
        return any(has_inexact_numbers(item) for item in value.values())
    if isinstance(value, list):
        return any(has_inexact_numbers(item) for item in value)
    return isinstance(value, float) or (isinstance(value, int) and not -2 ** 63 <= value < 2 ** 64)


def test_round_trip(iterations=600):
    generator = random.Random(1234)
    for _ in range(iterations):
        document = random_document(generator, [generator.choice([5, 50, 300])])
        if not isinstance(document, (dict, list)):
            document = [document]
        buffer = encode_lite3(document)
        assert_identical(sorted_keys(decode_lite3(buffer)), sorted_keys(stored_value(document)))
        assert encode_lite3_json_text(json.dumps(document)) == buffer
        data = document if isinstance(document, dict) else {"list": document}
        tags = [random_key(generator) for _ in range(generator.choice([0, 1, 2, 9]))]
        payload = encode_message(tags, data)
        validate_lite3_message(payload)
        decoded_tags, decoded_data = decode_message(payload)
        assert decoded_tags == tags
        assert_identical(sorted_keys(decoded_data), sorted_keys(stored_value(data)))
        if not has_inexact_numbers(data):
            assert payload == encode_message(tags, parse_json_value(json.dumps(data)))


def test_fuzz(iterations=4000, time_limit=60.0):
    generator = random.Random(99)
    seeds = [bytes.fromhex(vector["lite3_hex"]) for vector in VECTORS if vector.get("lite3_hex")]
    seeds = [seed for seed in seeds if len(seed) < 30000]
    seeds += [bytes.fromhex(case["lite3_hex"]) for case in INVALID]
    started = time.monotonic()
    slowest = 0.0
    for iteration in range(iterations):
        buffer = bytearray(generator.choice(seeds))
        mutation = iteration % 4
        if mutation == 0 and buffer:
            for _ in range(generator.randint(1, 4)):
                buffer[generator.randrange(len(buffer))] ^= 1 << generator.randrange(8)
        elif mutation == 1:
            del buffer[max(0, len(buffer) - generator.randint(1, 40)):]
        elif mutation == 2 and buffer:
            for _ in range(generator.randint(1, 3)):
                position = generator.randrange(max(1, len(buffer) - 4))
                buffer[position:position + 4] = generator.getrandbits(32).to_bytes(4, "little")
        else:
            buffer = bytearray(generator.getrandbits(8) for _ in range(generator.choice([96, 200, 500])))
            buffer[0] = generator.choice([6, 7])
            buffer[64:96] = bytes(32)       # a leaf root, so the entries get decoded
        for function in (decode_lite3, validate_lite3_message, decode_message):
            call_started = time.monotonic()
            try:
                function(bytes(buffer))
            except PlasmiteError as error:
                assert error.kind == "Corrupt", error.kind
            slowest = max(slowest, time.monotonic() - call_started)
        assert time.monotonic() - started < time_limit, "fuzzing took too long"
    assert slowest < 1.0, slowest
