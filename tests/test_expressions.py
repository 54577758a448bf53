"""Tests of section 7, Expressions: the --where evaluator (spec/where.md).

Three parts: (a) the jq corpus (shared/fixtures/where/corpus.jsonl, produced
by jq 1.6) in outputs mode and in --where verdict mode; (b) the data-driven
cases of expression_cases.txt (traps, error positions, bad input); (c) unit
tests of compile_where, compile_where_all and format_expression_error.
"""

import json
import math
import os
import threading
import time

import pytest

import plasmite
from conftest import FIXTURES

HERE = os.path.dirname(os.path.abspath(__file__))
CORPUS_PATH = os.path.join(FIXTURES, "where", "corpus.jsonl")
CASES_PATH = os.path.join(HERE, "expression_cases.txt")

# NICE corpus cases this evaluator does not support, each with the reason.
# Reviewed: every NICE case passes today.  A case listed here must fail and
# every other NICE case must pass, so the count cannot change silently.
UNSUPPORTED_NICE_CASES = {}

# Generous bound for "never a hang": the slowest case takes about 50 ms.
CASE_TIME_LIMIT = 2.0


# -- jq value comparison (the rules check_where.py documents) -------------------------

def jq_equal(left, right):
    """jq equality: numbers by double value, booleans apart from numbers, key order ignored."""
    if isinstance(left, bool) or isinstance(right, bool):
        return isinstance(left, bool) and isinstance(right, bool) and left == right
    if left is None or right is None:
        return left is None and right is None
    if isinstance(left, (int, float)) or isinstance(right, (int, float)):
        if not (isinstance(left, (int, float)) and isinstance(right, (int, float))):
            return False
        try:
            return float(left) == float(right) or (math.isnan(float(left)) and math.isnan(float(right)))
        except OverflowError:
            return left == right
    if isinstance(left, str) or isinstance(right, str):
        return isinstance(left, str) and isinstance(right, str) and left == right
    if isinstance(left, list) or isinstance(right, list):
        return (isinstance(left, list) and isinstance(right, list) and len(left) == len(right)
                and all(jq_equal(a, b) for a, b in zip(left, right)))
    return (isinstance(left, dict) and isinstance(right, dict) and left.keys() == right.keys()
            and all(jq_equal(left[key], right[key]) for key in left))


def streams_equal(got, wanted):
    return len(got) == len(wanted) and all(jq_equal(a, b) for a, b in zip(got, wanted))


def run_expression(text, value):
    """Evaluate; return (outputs, error) where error is None, "syntax" or "runtime".

    Any exception that is neither ExpressionSyntaxError nor ExpressionRuntimeError
    propagates and fails the test: the evaluator must never leak others.
    """
    outputs = []
    try:
        for output in plasmite.evaluate_expression(text, value):
            outputs.append(output)
            assert len(outputs) < 100000, "runaway output stream"
    except plasmite.ExpressionSyntaxError as error:
        return outputs, "syntax", error
    except plasmite.ExpressionRuntimeError as error:
        assert not isinstance(error, plasmite.ExpressionSyntaxError)
        return outputs, "runtime", error
    return outputs, None, None


def verdict_of(outputs, error_kind):
    """The --where decision of spec/where.md section 2, derived from a run."""
    if error_kind == "syntax":
        return "usage"
    for output in outputs:
        if not isinstance(output, bool):
            return "usage"
    if error_kind == "runtime":
        return "nomatch"
    return "match" if any(output is True for output in outputs) else "nomatch"


def where_verdict(text, message):
    """What compile_where decides: match, nomatch, usage (non-boolean) or syntax."""
    try:
        predicate = plasmite.compile_where(text)
    except plasmite.ExpressionSyntaxError:
        return "syntax"
    try:
        return "match" if predicate(message) else "nomatch"
    except plasmite.PlasmiteError as error:
        assert not isinstance(error, plasmite.ExpressionRuntimeError)
        assert error.kind == "Usage"
        return "usage"


# -- (a) the jq corpus --------------------------------------------------------------------

def load_corpus():
    with open(CORPUS_PATH, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


CORPUS = load_corpus()
MUST_CASES = [case for case in CORPUS if case["level"] == "MUST"]
NICE_CASES = [case for case in CORPUS if case["level"] == "NICE"]


def corpus_failure(case):
    """Return None if the case passes in outputs and verdict modes, else the reason."""
    outputs, error_kind, error = run_expression(case["expr"], json.loads(json.dumps(case["input"])))
    wanted_kind = None
    if case["error"]:
        wanted_kind = {"compile": "syntax", "runtime": "runtime"}[case["error_kind"]]
    if error_kind != wanted_kind:
        return "error %s (%s), wanted %s" % (error_kind, error, wanted_kind)
    if not streams_equal(outputs, case["outputs"]):
        return "outputs %r, wanted %r" % (outputs, case["outputs"])
    if verdict_of(outputs, error_kind) != case["verdict"]:
        return "verdict %s, wanted %s" % (verdict_of(outputs, error_kind), case["verdict"])
    where = where_verdict(case["expr"], case["input"])
    wanted_where = "syntax" if wanted_kind == "syntax" else case["verdict"]
    if where != wanted_where:
        return "compile_where decided %s, wanted %s" % (where, wanted_where)
    return None


def test_corpus_has_the_documented_size():
    """spec/where.md section 14: 687 MUST and 113 NICE cases."""
    assert len(MUST_CASES) == 687 and len(NICE_CASES) == 113


@pytest.mark.parametrize("case", MUST_CASES, ids=[case["id"] for case in MUST_CASES])
def test_corpus_must_case(case):
    """Every MUST case: jq's outputs, jq's error class, the verdict, and compile_where agree."""
    assert corpus_failure(case) is None, corpus_failure(case)


@pytest.mark.parametrize("case", NICE_CASES, ids=[case["id"] for case in NICE_CASES])
def test_corpus_nice_case(case):
    """NICE cases pass unless listed (with a reason) in UNSUPPORTED_NICE_CASES."""
    failure = corpus_failure(case)
    if case["id"] in UNSUPPORTED_NICE_CASES:
        assert failure is not None, "%s now passes: remove it from UNSUPPORTED_NICE_CASES" % case["id"]
    else:
        assert failure is None, failure


def test_unsupported_nice_cases_exist():
    """The unsupported list names only real NICE cases."""
    assert set(UNSUPPORTED_NICE_CASES) <= {case["id"] for case in NICE_CASES}


# -- (b) expression_cases.txt ------------------------------------------------------------

class ExpressionCase:
    """One block of expression_cases.txt (format described at the top of that file)."""

    def __init__(self, line_number, program):
        self.line_number = line_number
        self.program = program
        self.input = None
        self.outputs = []
        self.error_kind = None
        self.position = None
        self.detail = ""
        self.hint = None
        self.verdict = None

    def __repr__(self):
        return "line %d: %s" % (self.line_number, self.program[:60])


def read_program(line):
    if line.startswith("json: "):
        return json.loads(line[len("json: "):])
    if line.startswith("repeat: "):
        return "".join(text * count for text, count in json.loads(line[len("repeat: "):]))
    return line


def load_expression_cases(path=CASES_PATH):
    cases = []
    current = None
    with open(path, encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, 1):
            line = line.rstrip("\n")
            if not line.strip():
                current = None
                continue
            if line.startswith("#"):
                continue
            if current is None:
                current = ExpressionCase(line_number, read_program(line))
                cases.append(current)
                continue
            marker, _, rest = line.partition(" ")
            if marker == "<":
                current.input = json.loads(rest)
            elif marker == ">":
                current.outputs.append(json.loads(rest))
            elif marker == "!":
                kind, _, location = rest.partition(" ")
                assert kind in ("syntax", "runtime"), "line %d: bad error kind" % line_number
                current.error_kind = kind
                if kind == "syntax":
                    position, _, current.detail = location.partition(" ")
                    current.position = int(position)
            elif marker == "?":
                current.hint = rest
            elif marker == "=":
                assert rest in ("match", "nomatch", "usage"), "line %d: bad verdict" % line_number
                current.verdict = rest
            else:
                raise AssertionError("line %d: unknown marker %r" % (line_number, marker))
    return cases


EXPRESSION_CASES = load_expression_cases()


@pytest.mark.parametrize("case", EXPRESSION_CASES, ids=[repr(case) for case in EXPRESSION_CASES])
def test_expression_case(case):
    """One block of expression_cases.txt: outputs, error class and position, hint, verdict, time."""
    started = time.perf_counter()
    outputs, error_kind, error = run_expression(case.program, case.input)
    elapsed = time.perf_counter() - started
    assert error_kind == case.error_kind, "error %s: %s" % (error_kind, error)
    assert streams_equal(outputs, case.outputs), "outputs %r" % (outputs,)
    if case.error_kind == "syntax":
        assert error.position == case.position, "position %d: %s" % (error.position, error.detail)
        assert case.detail in error.detail
        assert error.expression == case.program
    if case.hint is not None:
        assert error is not None and error.hint and case.hint in error.hint, error.hint
    if case.verdict is not None:
        assert where_verdict(case.program, case.input) == case.verdict
        assert verdict_of(outputs, error_kind) == case.verdict
    assert elapsed < CASE_TIME_LIMIT


def test_expression_cases_file_is_substantial():
    """Guards against a parser bug in load_expression_cases silently dropping cases."""
    assert len(EXPRESSION_CASES) > 200


# -- (c) the --where predicate and the public API -----------------------------------------

MESSAGE = {"seq": 42, "time": "2026-11-27T05:00:00.123456789Z", "meta": {"tags": ["orders", "error"]},
           "data": {"id": 123, "kind": "order", "status": "green", "amount": 12.5, "user": "alice",
                    "msg": "request timeout on host-7"}}


def test_where_matches_on_any_true_output():
    """The four predicates of the issue, on the benchmark's typical message."""
    assert plasmite.compile_where('.meta.tags[]? == "error"')(MESSAGE) is True
    assert plasmite.compile_where('.meta.tags[]? == "missing"')(MESSAGE) is False
    assert plasmite.compile_where('.data.status == "green"')(MESSAGE) is True
    assert plasmite.compile_where('.data.msg | test("timeout")')(MESSAGE) is True


def test_where_empty_stream_does_not_match():
    """No output at all is no match (spec 2, rule 3)."""
    assert plasmite.compile_where("empty")(MESSAGE) is False
    assert plasmite.compile_where(".meta.tags[]? == 1")({"meta": {"tags": []}}) is False


def test_where_runtime_error_is_no_match_even_after_true():
    """A runtime error means no match, whatever came before it (spec 2, rule 2)."""
    assert plasmite.compile_where("(true, error(\"late\"))")(MESSAGE) is False
    assert plasmite.compile_where(".data.status == \"green\"")({"data": "text"}) is False
    assert plasmite.compile_where(".data.x | test(\"(\")")({"data": {"x": "a"}}) is False


@pytest.mark.parametrize("text, type_name", [
    (".data.status", "string"), (".data", "object"), ("null", "null"), ("1, true", "number"),
    ("select(.seq == 42)", "object"), (".data.missing // 0 > 5", "number"), (".data.missing", "null"),
])
def test_where_non_boolean_output_is_a_usage_error(text, type_name):
    """A non-boolean output (null included) is a Usage PlasmiteError naming the type and the expression."""
    predicate = plasmite.compile_where(text)
    with pytest.raises(plasmite.PlasmiteError) as caught:
        predicate(MESSAGE if type_name != "number" else {"seq": 42, "data": {"missing": 3}})
    error = caught.value
    assert not isinstance(error, (plasmite.ExpressionSyntaxError, plasmite.ExpressionRuntimeError))
    assert error.kind == "Usage"
    assert error.message == "filter expression must yield booleans"  # upstream's words
    assert error.hint.startswith("Expression `%s` yielded non-boolean value: %s" % (text, type_name))
    assert error.seq == 42


def test_where_non_boolean_is_only_found_on_messages_that_produce_it():
    """Nothing is checked statically: select(...) only fails where it selects."""
    predicate = plasmite.compile_where("select(.data.amount > 100)")
    assert predicate(MESSAGE) is False  # selects nothing: no output, no match


def test_where_syntax_error_is_raised_at_compile_time():
    """A malformed --where fails before any message is read."""
    with pytest.raises(plasmite.ExpressionSyntaxError) as caught:
        plasmite.compile_where(".data.status ==")
    assert caught.value.kind == "Usage"
    assert caught.value.position == 15


def test_runtime_error_is_not_a_syntax_error():
    """The CLI tells the two apart by class (issue: not a subclass)."""
    assert not issubclass(plasmite.ExpressionRuntimeError, plasmite.ExpressionSyntaxError)
    assert issubclass(plasmite.ExpressionRuntimeError, plasmite.PlasmiteError)
    assert issubclass(plasmite.ExpressionSyntaxError, plasmite.PlasmiteError)


def test_where_all_ands_in_order_and_stops_at_first_failure():
    """compile_where_all runs predicates in command-line order and stops at the first no-match."""
    # `.data` would raise the non-boolean usage error if it were ever evaluated.
    assert plasmite.compile_where_all([".data.amount > 100", ".data"])(MESSAGE) is False
    with pytest.raises(plasmite.PlasmiteError):
        plasmite.compile_where_all([".data", ".data.amount > 100"])(MESSAGE)
    with pytest.raises(plasmite.PlasmiteError):
        plasmite.compile_where_all([".data.amount > 1", ".data"])(MESSAGE)


def test_where_all_combinations():
    """AND of several --where; an empty list matches; errors surface as for one predicate."""
    both = plasmite.compile_where_all(['.data.kind == "order"', '.data.user == "alice"'])
    assert both(MESSAGE) is True
    assert both({"data": {"kind": "order", "user": "bob"}}) is False
    assert plasmite.compile_where_all([])(MESSAGE) is True
    with pytest.raises(plasmite.ExpressionSyntaxError):
        plasmite.compile_where_all(['.data.kind == "order"', ".data.("])
    with pytest.raises(plasmite.PlasmiteError):
        plasmite.compile_where_all(['.data.kind == "order"', ".data.user"])(MESSAGE)


def test_where_sees_the_full_envelope():
    """Predicates see seq, time, meta and data."""
    assert plasmite.compile_where('.seq == 42 and (.time | startswith("2026-11-27"))')(MESSAGE)


def test_where_does_not_mutate_the_message():
    """Arithmetic, sorting and merging build new values; the message stays as it was."""
    before = json.dumps(MESSAGE)
    for text in ['.data + {"x": 1} | has("x")', '.meta.tags + ["z"] | length == 3',
                 '(.data | to_entries | length) > 0', '[.data | .. ] | length > 0',
                 '(.meta.tags | sort | first) == "error"', '.data * {"x": 1} | has("x")']:
        assert plasmite.compile_where(text)(MESSAGE) is True
    assert json.dumps(MESSAGE) == before


def test_compiled_predicate_is_thread_safe():
    # Variables live in a per-call tuple, not in the closures: threads cannot mix them up.
    predicate = plasmite.compile_where(
        '.data.id as $id | [.meta.tags[]? | select(. == "error")] | length == ($id % 2)')
    messages = [{"data": {"id": number}, "meta": {"tags": ["error"]}} for number in range(200)]
    wanted = [number % 2 == 1 for number in range(200)]
    failures = []

    def work():
        for _ in range(20):
            if [predicate(message) for message in messages] != wanted:
                failures.append(True)
    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failures


def test_evaluate_expression_raises_syntax_errors_before_iterating():
    """Syntax errors come from the call; runtime errors after the outputs before them."""
    with pytest.raises(plasmite.ExpressionSyntaxError):
        plasmite.evaluate_expression(".a ==", None)
    outputs = plasmite.evaluate_expression("1, error(\"x\")", None)
    assert next(outputs) == 1
    with pytest.raises(plasmite.ExpressionRuntimeError) as caught:
        next(outputs)
    assert caught.value.value == "x"


def test_compile_expression_runs_many_times():
    """A compiled expression is reusable across inputs."""
    run = plasmite.compile_expression(".[] | select(. > 1)")
    assert list(run([1, 2, 3])) == [2, 3]
    assert list(run([5])) == [5]


def test_runtime_error_value_is_what_catch_sees():
    """ExpressionRuntimeError.value is error(v)'s value, else jq's message text."""
    with pytest.raises(plasmite.ExpressionRuntimeError) as caught:
        list(plasmite.evaluate_expression('error({"code": 7})', None))
    assert caught.value.value == {"code": 7}
    with pytest.raises(plasmite.ExpressionRuntimeError) as caught:
        list(plasmite.evaluate_expression(".a", "text"))
    assert caught.value.message == 'Cannot index string with string "a"'


def test_deeply_nested_message_is_no_match_not_a_crash():
    """Messages deeper than Python's stack allows end as runtime errors (no match)."""
    deep = []
    for _ in range(5000):
        deep = [deep]
    message = {"data": deep}
    assert plasmite.compile_where(".data == .data")(message) is False
    assert plasmite.compile_where(".data | tostring | length > 0")(message) is False
    assert plasmite.compile_where("[..] | length > 1")(message) is True
    with pytest.raises(plasmite.ExpressionRuntimeError):
        list(plasmite.evaluate_expression(".data == .data", message))


def test_huge_integers_in_messages_are_doubles():
    """Integers beyond the double range behave as jq's infinities, never as OverflowError."""
    message = {"data": {"big": 10 ** 400, "small": -(10 ** 400)}}
    assert plasmite.compile_where(".data.big > 1e308 and .data.small < -1e308")(message)
    assert list(plasmite.evaluate_expression(".data.big | tostring", message)) == ["1.7976931348623157e+308"]


def test_regex_cache_keeps_working_past_its_size():
    """The bounded regex cache clears and refills without losing correctness."""
    for number in range(600):
        assert list(plasmite.evaluate_expression('test("a%d")' % number, "a%d" % number)) == [True]


# -- error text ------------------------------------------------------------------------

def test_syntax_error_carries_location():
    """position, line, column and detail, like json.JSONDecodeError."""
    with pytest.raises(plasmite.ExpressionSyntaxError) as caught:
        plasmite.compile_where('.a == 1 and\n  .b ==== 2')
    error = caught.value
    assert (error.position, error.line, error.column) == (19, 2, 8)
    assert error.detail == "unexpected '=='"
    assert error.message == "invalid expression: unexpected '==' at line 2, column 8"
    assert str(error) == error.message


def test_format_expression_error_puts_a_caret_under_the_fault():
    """The CLI's rendering: message, expression, caret."""
    with pytest.raises(plasmite.ExpressionSyntaxError) as caught:
        plasmite.compile_where('.data.code == 503)')
    assert plasmite.format_expression_error(caught.value) == (
        "invalid expression: unexpected ')' at column 18\n"
        "  .data.code == 503)\n"
        "                   ^")


def test_format_expression_error_shows_the_faulty_line_only():
    """Multi-line expressions show the faulty line; tabs become spaces so the caret lines up."""
    with pytest.raises(plasmite.ExpressionSyntaxError) as caught:
        plasmite.compile_where('.a == 1\n\tand .b == "x')
    text = plasmite.format_expression_error(caught.value)
    assert text.splitlines()[1:] == ['   and .b == "x', "             ^"]


def test_format_expression_error_windows_long_expressions():
    """Long expressions are cut to a window around the fault."""
    expression = " or ".join(".data.id == %d" % number for number in range(200)) + " or ]"
    with pytest.raises(plasmite.ExpressionSyntaxError) as caught:
        plasmite.compile_where(expression)
    message, line, caret = plasmite.format_expression_error(caught.value).splitlines()
    assert line.startswith("  ...") and len(line) < 90
    assert line[len(caret) - 1] == "]"


def test_format_expression_error_of_other_errors_is_the_message():
    """Errors without a position render as their message."""
    error = plasmite.ExpressionRuntimeError("Cannot iterate over null (null)")
    assert plasmite.format_expression_error(error) == "Cannot iterate over null (null)"


def test_non_string_expression_is_a_usage_error():
    """A non-string expression is a PlasmiteError, not a TypeError."""
    with pytest.raises(plasmite.PlasmiteError):
        plasmite.compile_where(None)
