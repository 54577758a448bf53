"""Stream-mode stdin framing for `pls poke` (spec/cli.md 7.5; section 9's stdin scenarios)."""

import io
import os
import queue
import random
import threading
import time
import tracemalloc

import pytest

from plasmite import (JQ_FAILURE_HINT, MAX_RECORD_BYTES, OVERSIZE_FAILURE_HINT, PARSE_FAILURE_HINT,
                      SUMMARY_NOTICE_KIND, SUMMARY_NOTICE_MESSAGE, SKIP_NOTICE_KIND,
                      IngestFailure, IngestRecord, PlasmiteError, check_stream_options,
                      read_records, skip_notice_details, summary_notice_details)

LIMIT = MAX_RECORD_BYTES


def read(data: bytes, mode="auto", errors="skip"):
    """All items read_records yields for ``data``."""
    return list(read_records(io.BytesIO(data), mode, errors))


def outline(items):
    """Items as comparable tuples: ("ok", index, data) or ("fail", index, kind, mode, line)."""
    result = []
    for item in items:
        if isinstance(item, IngestRecord):
            result.append(("ok", item.index, item.data))
        else:
            assert isinstance(item, IngestFailure)
            result.append(("fail", item.index, item.error_kind, item.mode, item.line))
    return result


class LazyRawStream(io.RawIOBase):
    """A raw binary stream whose bytes come from an iterator of pieces, made on demand."""

    def __init__(self, pieces):
        self.pieces = iter(pieces)
        self.current = b""
        self.produced = 0

    def readable(self):
        return True

    def readinto(self, buffer):
        while not self.current:
            self.current = next(self.pieces, None)
            if self.current is None:
                self.current = b""
                return 0
        count = min(len(buffer), len(self.current))
        buffer[:count] = self.current[:count]
        self.current = self.current[count:]
        self.produced += count
        return count


def lazy_stream(pieces):
    return io.BufferedReader(LazyRawStream(pieces))


def repeated(block: bytes, total: int):
    """Yield ``total`` bytes made of copies of ``block`` (without holding them all)."""
    while total > 0:
        piece = block[:total]
        total -= len(piece)
        yield piece


# -- jsonl -------------------------------------------------------------------------

def test_jsonl_verified_example():
    items = read(b'{"x":1}\nnot-json\n{"x":2}\n', "jsonl")
    assert outline(items) == [("ok", 1, {"x": 1}), ("fail", 2, "Parse", "jsonl", 2),
                              ("ok", 3, {"x": 2})]
    failure = items[1]
    assert failure.message == "invalid json input"
    assert failure.snippet == "not-json"
    assert skip_notice_details(failure, "/pools/demo.plasmite") == {
        "error_kind": "Parse", "index": 2, "line": 2, "mode": "jsonl", "snippet": "not-json",
        "pool_path": "/pools/demo.plasmite"}


def test_jsonl_blank_lines_are_skipped_but_counted_as_lines():
    items = read(b'\n{"a":1}\n   \n\t\nnope\n\n{"b":2}\n', "jsonl")
    assert outline(items) == [("ok", 1, {"a": 1}), ("fail", 2, "Parse", "jsonl", 5),
                              ("ok", 3, {"b": 2})]


def test_jsonl_crlf_and_final_line_without_newline():
    items = read(b'{"a":1}\r\n{"b":2}\r\r\n{"c":3}', "jsonl")
    assert outline(items) == [("ok", 1, {"a": 1}), ("ok", 2, {"b": 2}), ("ok", 3, {"c": 3})]


def test_jsonl_each_line_is_one_record():
    # No multi-line buffering outside auto mode.
    items = read(b'{\n"x": 1\n}\n', "jsonl")
    assert outline(items) == [("fail", 1, "Parse", "jsonl", 1), ("fail", 2, "Parse", "jsonl", 2),
                              ("fail", 3, "Parse", "jsonl", 3)]


def test_non_objects_are_records_the_append_rejects():
    items = read(b'[1]\n"s"\n3\nnull\n', "jsonl")
    assert outline(items) == [("ok", 1, [1]), ("ok", 2, "s"), ("ok", 3, 3), ("ok", 4, None)]
    assert all(item.hint is None for item in items)


def test_record_values_follow_serde():
    (item,) = read(b'{"b":1,"a":2,"b":3,"n":-0}\n', "jsonl")
    assert item.data == {"a": 2, "b": 3, "n": 0} and item.data["b"] == 3
    assert str(item.data["n"]) == "-0.0"


@pytest.mark.parametrize("mode", ["jsonl", "auto"])
def test_line_of_exactly_the_limit_is_accepted(mode):
    line = b'{"s":"' + b"a" * (LIMIT - 8) + b'"}'
    assert len(line) == LIMIT
    for ending in (b"\n", b"\r\n", b"\r\r\n"):
        items = read(line + ending + b'{"ok":1}\n', mode)
        assert outline(items) == [("ok", 1, {"s": "a" * (LIMIT - 8)}), ("ok", 2, {"ok": 1})]
    assert outline(read(line, mode))[0][:2] == ("ok", 1)
    assert outline(read(line + b" ", mode))[0][2] == "Oversize"


@pytest.mark.parametrize("mode", ["jsonl", "auto"])
def test_oversize_line_then_record(mode):
    # spec 9: -e skip with a 1 MiB+1 string line then {"ok":1}, auto and -i jsonl.
    line = b'{"s":"' + b"a" * (LIMIT + 1) + b'"}\n'
    items = read(line + b'{"ok":1}\n', mode)
    assert outline(items) == [("fail", 1, "Oversize", "jsonl", 1), ("ok", 2, {"ok": 1})]
    failure = items[0]
    assert failure.message == "record exceeds size limit"
    assert failure.hint == OVERSIZE_FAILURE_HINT
    assert failure.snippet == '{"s":"' + "a" * 191 + "..."
    assert skip_notice_details(failure, "p")["error_kind"] == "Oversize"


def test_oversize_line_of_carriage_returns_stays_small():
    # Trailing CRs do not count, but a content byte after them makes the line oversize.
    items = read(b"{}" + b"\r" * (LIMIT + 5) + b"\n" + b"x" + b"\r" * (LIMIT + 5) + b"y\n", "jsonl")
    assert outline(items) == [("ok", 1, {}), ("fail", 2, "Oversize", "jsonl", 2)]


def test_invalid_utf8_is_a_parse_failure_with_lossy_snippet():
    items = read(b'{"x":"\xff"}\n{"y":1}\n', "jsonl")
    assert outline(items) == [("fail", 1, "Parse", "jsonl", 1), ("ok", 2, {"y": 1})]
    assert items[0].snippet == '{"x":"\ufffd"}'


# -- auto: the sniff ---------------------------------------------------------------

@pytest.mark.parametrize("data", [
    b'\x1e{"x":1}\x1e{"x":2}',
    b'\x1e{"x":1}\n\x1e{"x":2}\n',
    b'\n\n  \x1e{"x":1}\x1e\n\x1e{"x":2}',
])
def test_sniff_record_separator_means_seq(data):
    assert outline(read(data)) == [("ok", 1, {"x": 1}), ("ok", 2, {"x": 2})]


def test_sniff_record_separator_anywhere_in_prefix():
    # The RS sits on the fourth line; the first three lines are then seq's first segment.
    items = read(b'{"x":1}\n{"x":2}\n{"x":3}\n\x1e{"y":1}\n')
    assert outline(items) == [("fail", 1, "Parse", "seq", None), ("ok", 2, {"y": 1})]


@pytest.mark.parametrize("first_line", [b"data: {}", b"event: tick", b"id: 7", b": comment",
                                        b"  data:{}", b"\n\n:hello", b"\r\n\t:x"])
def test_sniff_event_fields_mean_event(first_line):
    items = read(first_line + b'\n\ndata: {"x":1}\n\n')
    assert outline(items)[-1] == ("ok", len(items), {"x": 1})
    assert all(item.mode == "event" for item in items if isinstance(item, IngestFailure))


def test_sniff_otherwise_multiline_jsonl():
    # The data: line is just a bad JSON line once the first line chose jsonl.
    items = read(b'{"x":1}\ndata: {"y":2}\n\n')
    assert outline(items) == [("ok", 1, {"x": 1}), ("fail", 2, "Parse", "jsonl", 2)]
    assert outline(read(b"idle: 1\n")) == [("fail", 1, "Parse", "jsonl", 1)]


def test_sniff_stops_after_eight_lines():
    # Lines arrive one read at a time: the sniff stops at the 8th newline and so
    # never sees the RS on line 9, which then is a bad JSON line.
    lines = [b'{"n":%d}\n' % number for number in range(1, 9)] + [b'\x1e{"n":9}\n']
    items = list(read_records(lazy_stream(lines), "auto", "skip"))
    assert outline(items)[:8] == [("ok", n, {"n": n}) for n in range(1, 9)]
    assert outline(items)[8] == ("fail", 9, "Parse", "jsonl", 9)
    # The same bytes in one piece are one 8 KiB read: the RS is in the prefix.
    assert outline(read(b"".join(lines)))[0][0] == "fail"


def test_sniff_stops_after_8192_bytes():
    # An RS after the first 8192 bytes is not seen by the sniff.
    filler = b'{"pad":"' + b"p" * 9000 + b'"}\n'
    items = read(filler + b'\x1e{"x":1}\n')
    assert outline(items) == [("ok", 1, {"pad": "p" * 9000}), ("fail", 2, "Parse", "jsonl", 2)]


# -- auto: multi-line JSON ------------------------------------------------------------

def test_pretty_object_is_one_record():
    # spec 9: pretty multi-line object (auto) -> 1 message.
    items = read(b'{\n  "x": 1,\n  "y": {\n    "z": [\n      1,\n      2\n    ]\n  }\n}\n',
                 errors="stop")
    assert outline(items) == [("ok", 1, {"x": 1, "y": {"z": [1, 2]}})]


def test_pretty_objects_one_after_another():
    items = read(b'{\n  "a": 1\n}\n{\n  "b": "}{"\n}\n{"c":3}\n')
    assert outline(items) == [("ok", 1, {"a": 1}), ("ok", 2, {"b": "}{"}), ("ok", 3, {"c": 3})]


def test_multiline_verified_example_with_skip():
    items = read(b'{\n  "bad": 1,\n{"good":2}\n', errors="skip")
    assert outline(items) == [("fail", 1, "Parse", "jsonl", 1), ("ok", 2, {"good": 2})]
    assert items[0].snippet == '{  "bad": 1,\n'
    assert skip_notice_details(items[0], "p") == {
        "error_kind": "Parse", "index": 1, "line": 1, "mode": "jsonl",
        "snippet": '{  "bad": 1,\n', "pool_path": "p"}


def test_multiline_without_resync_under_stop():
    # --errors stop: no resync, the buffer runs to EOF and fails there (still index 1).
    items = read(b'{\n  "bad": 1,\n{"good":2}\n', errors="stop")
    assert outline(items) == [("fail", 1, "Parse", "jsonl", 1)]
    assert items[0].snippet == '{  "bad": 1,\n{"good":2}\n'
    assert items[0].to_error().kind == "Usage"


def test_resync_splits_arrays_of_objects_only_under_skip():
    document = b'{\n  "items": [\n    {\n      "a": 1\n    }\n  ]\n}\n'
    assert outline(read(document, errors="stop")) == [("ok", 1, {"items": [{"a": 1}]})]
    # Under skip, line 3 "{" fails record 1 and starts record 2 (upstream behaviour).
    assert outline(read(document, errors="skip")) == [
        ("fail", 1, "Parse", "jsonl", 1), ("ok", 2, {"a": 1}),
        ("fail", 3, "Parse", "jsonl", 6), ("fail", 4, "Parse", "jsonl", 7)]


def test_resync_on_array_start():
    items = read(b'{\n"a":\n[1]\n', errors="skip")
    assert outline(items) == [("fail", 1, "Parse", "jsonl", 1), ("ok", 2, [1])]


def test_multiline_eof_first_is_a_parse_failure():
    items = read(b'{"ok":0}\n{\n  "x": 1,\n', errors="skip")
    assert outline(items) == [("ok", 1, {"ok": 0}), ("fail", 2, "Parse", "jsonl", 2)]
    assert items[1].snippet == '{  "x": 1,\n'


def test_multiline_only_lines_starting_a_container_buffer():
    items = read(b'"open\n  more"\n', errors="skip")
    assert outline(items) == [("fail", 1, "Parse", "jsonl", 1), ("fail", 2, "Parse", "jsonl", 2)]


def test_multiline_first_line_loses_its_newline():
    # Upstream appends later lines with their endings but the first without: a string
    # broken after the first line joins up again.
    assert outline(read(b'{"msg":"hel\nlo"}\n')) == [("ok", 1, {"msg": "hello"})]
    # A later line keeps its newline, which is a control character inside a string.
    assert outline(read(b'{\n"msg":"hel\nlo"}\n', errors="stop")) == [
        ("fail", 1, "Parse", "jsonl", 1)]


def test_multiline_blank_lines_and_crlf_inside_record():
    items = read(b'{\r\n\r\n  "x": 1\r\n\r\n}\r\n{"y":2}', errors="stop")
    assert outline(items) == [("ok", 1, {"x": 1}), ("ok", 2, {"y": 2})]


def test_multiline_value_closed_but_invalid_never_parses():
    # The first line is a complete but invalid object: the buffer can only fail.
    items = read(b'{"a":01}\n}\n', errors="stop")
    assert outline(items) == [("fail", 1, "Parse", "jsonl", 1)]
    items = read(b'{\n"a": 1\n} trailing\n\n', errors="stop")
    assert outline(items) == [("fail", 1, "Parse", "jsonl", 1)]


def test_multiline_escapes_and_brackets_in_strings():
    items = read(b'{\n"a": "\\"}]\\\\",\n"b": "[{\\u0041"\n}\n', errors="stop")
    assert outline(items) == [("ok", 1, {"a": '"}]\\', "b": "[{A"})]


def test_multiline_buffer_oversize():
    big = b'  "s": "' + b"a" * LIMIT + b'",\n'
    items = read(b'{\n' + big + b'  "t": 1\n}\n{"ok":1}\n', errors="skip")
    # The buffer fails at line 1; its remaining lines are then ordinary (bad) lines.
    assert outline(items) == [("fail", 1, "Oversize", "jsonl", 1), ("fail", 2, "Parse", "jsonl", 3),
                              ("fail", 3, "Parse", "jsonl", 4), ("ok", 4, {"ok": 1})]
    assert items[0].snippet.startswith('{  "s": "aaa') and items[0].snippet.endswith("...")


def test_multiline_big_pretty_document_is_linear():
    members = b",\n".join(b'  "key%06d": [%d, "v"]' % (n, n) for n in range(30000))
    document = b"{\n" + members + b"\n}\n"
    assert len(document) < LIMIT
    started = time.monotonic()
    (item,) = read(document, errors="stop")
    assert len(item.data) == 30000
    # Re-parsing after every line (30000 parses of up to 900 KB) takes minutes.
    assert time.monotonic() - started < 10


# -- json -------------------------------------------------------------------------

def test_json_pretty_document():
    # spec 9: -i json pretty doc -> 1.
    items = read(b'{\n  "x": 1,\n  "y": [\n    2\n  ]\n}\n', "json")
    assert outline(items) == [("ok", 1, {"x": 1, "y": [2]})]


def test_json_invalid_document():
    # spec 9: -i json -e skip with {"x":1 -> an ingest_skip.
    items = read(b'{"x":1', "json")
    assert outline(items) == [("fail", 1, "Parse", "json", None)]
    assert items[0].snippet == '{"x":1'
    details = skip_notice_details(items[0], "p")
    assert "line" not in details and details["mode"] == "json"


def test_json_two_documents_are_one_bad_record():
    assert outline(read(b'{"x":1}\n{"x":2}\n', "json")) == [("fail", 1, "Parse", "json", None)]


@pytest.mark.parametrize("data", [b"", b"  \n\t\r\n "])
@pytest.mark.parametrize("mode", ["auto", "jsonl", "json", "seq", "jq"])
def test_empty_and_blank_input_give_no_records(mode, data):
    assert read(data, mode, "stop") == []


def test_json_oversize_is_counted_not_held():
    stream = lazy_stream(repeated(b'{"s":"' + b"a" * 65530, 5 * LIMIT))
    (item,) = read_records(stream, "json")
    assert (item.error_kind, item.index, item.line) == ("Oversize", 1, None)


def test_json_limit_counts_the_whole_input():
    document = b'{"s":"' + b"a" * (LIMIT - 8) + b'"}'
    assert outline(read(document, "json")) == [("ok", 1, {"s": "a" * (LIMIT - 8)})]
    # The trailing newline makes the input one byte too long.
    assert outline(read(document + b"\n", "json")) == [("fail", 1, "Oversize", "json", None)]


# -- seq --------------------------------------------------------------------------

def test_seq_mode_records():
    # spec 9: \x1e{"x":1}\x1e{"x":2} with -i seq -> 2.
    items = read(b'\x1e{"x":1}\x1e{"x":2}', "seq")
    assert outline(items) == [("ok", 1, {"x": 1}), ("ok", 2, {"x": 2})]


def test_seq_blank_segments_and_failures():
    items = read(b'\x1e\n\x1e{"x":1}\n\x1e \x1ebad\n\x1e{"y":[\n1]}', "seq")
    assert outline(items) == [("ok", 1, {"x": 1}), ("fail", 2, "Parse", "seq", None),
                              ("ok", 3, {"y": [1]})]
    assert items[1].snippet == "bad\n"


def test_seq_without_separator_is_one_segment():
    assert outline(read(b'{"x":1}', "seq")) == [("ok", 1, {"x": 1})]


def test_seq_decodes_lossily():
    items = read(b'\x1e{"x":"\xff\xc3"}\n', "seq")
    assert outline(items) == [("ok", 1, {"x": "\ufffd\ufffd"})]


def test_seq_oversize_fails_early_and_skips_to_next_separator():
    stream = LazyRawStream([b'\x1e{"s":"'] + list(repeated(b"a" * 65536, 100 * LIMIT))
                           + [b'"}\n\x1e{"ok":1}\n'])
    items = read_records(io.BufferedReader(stream), "seq")
    first = next(items)
    assert (first.error_kind, first.index, first.mode, first.line) == ("Oversize", 1, "seq", None)
    # Reported once the segment passed the limit, long before the next RS.
    assert stream.produced < 2 * LIMIT
    assert outline(items) == [("ok", 2, {"ok": 1})]


# -- event ------------------------------------------------------------------------

def test_event_two_events():
    # spec 9: data: {"x":1}\n\ndata: {"x":2}\n\n -> 2.
    items = read(b'data: {"x":1}\n\ndata: {"x":2}\n\n')
    assert outline(items) == [("ok", 1, {"x": 1}), ("ok", 2, {"x": 2})]


def test_event_flushed_at_eof():
    # spec 9: data: {"x":1}\n (no blank line) -> 1.
    assert outline(read(b'data: {"x":1}\n')) == [("ok", 1, {"x": 1})]
    assert outline(read(b'data: {"x":1}')) == [("ok", 1, {"x": 1})]


def test_event_data_lines_join_and_fields_are_ignored():
    stream = (b': keepalive\nevent: update\nid: 1\nretry: 10\ndata: {"a":\n'
              b'data:  [1,\ndata:2]}\nunknown line\n   \n\n'
              b'data:{"b":\ndata:"y"}\n\n')
    items = read(stream)
    assert outline(items) == [("ok", 1, {"a": [1, 2]}), ("ok", 2, {"b": "y"})]


def test_event_without_data_is_no_record():
    items = read(b'event: ping\n\n: c\n\ndata:\n\ndata:   \n\ndata: {"x":1}\n\n\n\n')
    assert outline(items) == [("ok", 1, {"x": 1})]


def test_event_parse_failure_lines():
    items = read(b'data: nope\n: c\n\ndata: {"x":1}\n\ndata: {\n: tail\n')
    assert outline(items) == [("fail", 1, "Parse", "event", 3), ("ok", 2, {"x": 1}),
                              ("fail", 3, "Parse", "event", 7)]
    assert items[2].snippet == "{"


def test_event_crlf():
    items = read(b'data: {"x":1}\r\n\r\ndata: {"x":2}\r\n\r\n')
    assert outline(items) == [("ok", 1, {"x": 1}), ("ok", 2, {"x": 2})]


def test_event_oversize_while_collecting_then_next_event():
    half = b"data: " + b"a" * (LIMIT // 2) + b"\n"
    items = read(b'data: {"x":1}\n\n' + half + b"data: ok\n" + half + half + b"data: more\n\n"
                 + b'data: {"y":2}\n\n')
    # Q10 (not copied): after the oversize event, the next event is read normally.
    assert outline(items) == [("ok", 1, {"x": 1}), ("fail", 2, "Oversize", "event", 5),
                              ("ok", 3, {"y": 2})]
    assert items[1].snippet == "a" * 197 + "..."


def test_event_data_of_exactly_the_limit():
    value = b'"' + b"a" * (LIMIT - 2) + b'"'
    assert outline(read(b"data: " + value + b"\n\n")) == [("ok", 1, "a" * (LIMIT - 2))]
    assert outline(read(b"data:" + value + b"\n\n")) == [("ok", 1, "a" * (LIMIT - 2))]
    assert outline(read(b"data: " + value + b"a\n\n"))[0][2] == "Oversize"
    # Two lines joined with "\n" make LIMIT + 1 bytes.
    half = b"a" * (LIMIT // 2)
    assert outline(read(b"data: " + half + b"\ndata: " + half + b"\n\n"))[0][2] == "Oversize"


# -- jq ---------------------------------------------------------------------------

def test_jq_values():
    items = read(b'{"a":1}{"b":2}\n[3] "s"1 2\ttrue null\n{"c":\n  4}', "jq", "stop")
    assert outline(items) == [("ok", 1, {"a": 1}), ("ok", 2, {"b": 2}), ("ok", 3, [3]),
                              ("ok", 4, "s"), ("ok", 5, 1), ("ok", 6, 2), ("ok", 7, True),
                              ("ok", 8, None), ("ok", 9, {"c": 4})]
    assert all(item.hint == JQ_FAILURE_HINT for item in items)


@pytest.mark.parametrize("data", [b'{"a":1} x {"b":2}', b'{"a":1}, {"b":2}', b'{"a":1} 1x',
                                  b'{"a":1} nul', b'{"a":1} {"b":', b'{"a":1} "abc',
                                  b'{"a":1}\xef\xbb\xbf{}', b'{"a":1} -', b'{"a":1}]'])
def test_jq_first_failure_is_fatal(data):
    items = read(data, "jq", "stop")
    assert outline(items) == [("ok", 1, {"a": 1}), ("fail", 2, "Parse", "jq", None)]
    assert items[1].hint == JQ_FAILURE_HINT
    assert items[1].to_error().hint == JQ_FAILURE_HINT


def test_jq_has_no_size_limit():
    value = b'{"s":"' + b"a" * (2 * LIMIT) + b'"}'
    assert outline(read(value + value, "jq", "stop")) == [("ok", 1, {"s": "a" * (2 * LIMIT)}),
                                                          ("ok", 2, {"s": "a" * (2 * LIMIT)})]


def test_jq_skip_is_rejected_before_reading():
    # spec 9: -i jq -e skip -> exit 2 Usage.
    class Unreadable(io.RawIOBase):
        def readinto(self, buffer):
            raise AssertionError("stdin was read")

    with pytest.raises(PlasmiteError) as caught:
        read_records(Unreadable(), "jq", "skip")
    assert caught.value.kind == "Usage"
    assert caught.value.message == "skip is not supported for jq-style streams"
    assert caught.value.hint == "Use --in jsonl or --in auto for resyncable streams."
    with pytest.raises(PlasmiteError):
        check_stream_options("jq", "skip")
    check_stream_options("jq", "stop")
    for mode, errors in (("event", "stop"), ("auto", "ignore")):
        with pytest.raises(ValueError):
            check_stream_options(mode, errors)


# -- scenarios from spec 9 not covered above ------------------------------------------

def test_two_lines_without_final_newline_in_order():
    # {"x":1}\n{"x":2} -> 2 messages in order (auto and jsonl).
    for mode in ("auto", "jsonl"):
        assert outline(read(b'{"x":1}\n{"x":2}', mode)) == [("ok", 1, {"x": 1}),
                                                            ("ok", 2, {"x": 2})]


def test_summary_details():
    assert summary_notice_details(3, 2, 1, "/p/demo.plasmite") == {
        "total": 3, "ok": 2, "failed": 1, "pool_path": "/p/demo.plasmite"}
    assert (SKIP_NOTICE_KIND, SUMMARY_NOTICE_KIND) == ("ingest_skip", "ingest_summary")
    assert SUMMARY_NOTICE_MESSAGE == "ingestion completed with skipped records"


def test_stop_errors_and_hints():
    parse, oversize = read(b'nope\n' + b"x" * (LIMIT + 1) + b"\n", "jsonl")
    error = parse.to_error()
    assert (error.kind, error.message, error.hint) == ("Usage", "invalid json input",
                                                      PARSE_FAILURE_HINT)
    error = oversize.to_error()
    assert (error.kind, error.message, error.hint) == ("Usage", "record exceeds size limit",
                                                       OVERSIZE_FAILURE_HINT)


def test_read_error_is_io():
    class Broken(io.RawIOBase):
        def readable(self):
            return True

        def readinto(self, buffer):
            raise OSError(5, "Input/output error")

    with pytest.raises(PlasmiteError) as caught:
        list(read_records(io.BufferedReader(Broken()), "jsonl"))
    assert caught.value.kind == "Io" and caught.value.message == "failed to read stdin"
    assert caught.value.causes == ["Input/output error (os error 5)"]


# -- snippets ---------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("a" * 200, "a" * 200),
    ("a" * 201, "a" * 197 + "..."),
    ("a" * 196 + "\u00e9" + "b" * 10, "a" * 196 + "..."),  # é would need bytes 197-198
    ("a" * 195 + "\u00e9" + "b" * 10, "a" * 195 + "\u00e9" + "..."),
    ("a" * 194 + "\U0001F600" + "b" * 10, "a" * 194 + "..."),
    ("\u00e9" * 100, "\u00e9" * 100),  # 200 bytes: whole
    ("\u00e9" * 101, "\u00e9" * 98 + "..."),
])
def test_snippet_truncation(text, expected):
    (failure,) = read(text.encode("utf-8") + b"\n", "jsonl")
    assert failure.snippet == expected
    assert len(failure.snippet.encode("utf-8")) <= 200


def test_snippet_of_invalid_utf8():
    (failure,) = read(b"\xff" * 50 + b"\n", "jsonl")
    assert failure.snippet == "\ufffd" * 50
    (failure,) = read(b"\xff" * 100 + b"\n", "jsonl")
    assert failure.snippet == "\ufffd" * 65 + "..."


# -- robustness -------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["auto", "jsonl", "json", "seq", "jq"])
def test_binary_garbage_gives_failures_not_exceptions(mode):
    generator = random.Random(1234)
    for _ in range(30):
        data = bytes(generator.getrandbits(8) for _ in range(generator.randrange(1, 3000)))
        for item in read(data, mode, "stop"):
            assert isinstance(item, (IngestRecord, IngestFailure))
    items = read(b"\x00\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe{[\"", mode, "stop")
    assert items and isinstance(items[0], IngestFailure)


@pytest.mark.parametrize("mode, head, expected", [
    ("jsonl", b'{"s":"', [("fail", 1, "Oversize", "jsonl", 1), ("ok", 2, {"ok": 1})]),
    ("auto", b'{"s":"', [("fail", 1, "Oversize", "jsonl", 1), ("ok", 2, {"ok": 1})]),
    ("auto", b'data: {"s":"', [("fail", 1, "Oversize", "event", 1), ("ok", 2, {"ok": 1})]),
    ("seq", b'\x1e{"s":"', [("fail", 1, "Oversize", "seq", None), ("ok", 2, {"ok": 1})]),
])
def test_hundred_megabyte_record_in_small_memory(mode, head, expected):
    if head.startswith(b"{"):
        tail = b'"}\n{"ok":1}\n'
    elif head.startswith(b"data"):
        tail = b'"}\n\ndata: {"ok":1}\n\n'
    else:
        tail = b'"}\x1e{"ok":1}'
    pieces = [head] + list(repeated(b"a" * 65536, 100 * 1024 * 1024)) + [tail]
    # Each piece is the same 64 KiB object, so building the list costs no memory.
    tracemalloc.start()
    try:
        items = list(read_records(lazy_stream(pieces), mode, "skip"))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert outline(items) == expected
    assert peak < 8 * 1024 * 1024, peak


# -- live pipes -------------------------------------------------------------------

class PipeFeed:
    """A pipe whose writer thread sends lines on request; read_records runs on the read end."""

    def __init__(self, mode, errors="skip"):
        read_fd, write_fd = os.pipe()
        self.writer = os.fdopen(write_fd, "wb", buffering=0)
        self.reader = os.fdopen(read_fd, "rb")
        self.items = queue.Queue()
        self.consumer = threading.Thread(target=self._consume, args=(mode, errors), daemon=True)
        self.consumer.start()

    def _consume(self, mode, errors):
        for item in read_records(self.reader, mode, errors):
            self.items.put(item)
        self.items.put(None)

    def send(self, data):
        self.writer.write(data)

    def close(self):
        self.writer.close()
        self.consumer.join(5)
        self.reader.close()


@pytest.mark.parametrize("mode, template", [("jsonl", b'{"n":%d}\n'), ("jq", b'{"n":%d} '),
                                            ("seq", b'\x1e{"n":%d}\n')])
def test_live_pipe_yields_each_record_before_eof(mode, template):
    feed = PipeFeed(mode, "stop")
    try:
        for number in range(1, 5):
            feed.send(template % number)
            # The write end stays open: each record must come out now, not at EOF.
            # (A seq record ends only at the next RS.)
            ready = number - 1 if mode == "seq" else number
            if ready:
                assert outline([feed.items.get(timeout=5)]) == [("ok", ready, {"n": ready})]
    finally:
        feed.close()


def test_live_pipe_auto_mode_waits_for_eight_lines():
    feed = PipeFeed("auto")
    try:
        for number in range(1, 8):
            feed.send(b'{"n":%d}\n' % number)
        # Q9 (copied): the sniff is still waiting for its 8th line.
        time.sleep(0.2)
        assert feed.items.empty()
        feed.send(b'{"n":8}\n')
        for number in range(1, 9):
            assert outline([feed.items.get(timeout=5)]) == [("ok", number, {"n": number})]
        feed.send(b'{\n  "n": 9\n}\n')
        assert outline([feed.items.get(timeout=5)]) == [("ok", 9, {"n": 9})]
        assert feed.items.empty()
    finally:
        feed.close()
    assert feed.items.get(timeout=5) is None


def test_live_pipe_event_stream():
    feed = PipeFeed("auto")
    try:
        feed.send(b"".join(b": hello %d\n" % n for n in range(8)))
        feed.send(b'data: {"n":1}\n')
        time.sleep(0.1)
        assert feed.items.empty()  # the event has not ended yet
        feed.send(b"\n")
        assert outline([feed.items.get(timeout=5)]) == [("ok", 1, {"n": 1})]
    finally:
        feed.close()
