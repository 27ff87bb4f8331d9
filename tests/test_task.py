import pytest
from pydantic import ValidationError

from model.settings import Settings
from model.task import Limits, Query, Task, validate_task

LIMITS = Limits(max_demonstrations=3, max_options=4, max_text_tokens=5, max_text_chars=100)


def words(s: str) -> int:
    return len(s.split())


def check(data, message: str, loc: tuple | None = None):
    with pytest.raises(ValidationError) as e:
        validate_task(data, LIMITS, words)
    errors = e.value.errors()
    assert any(message in err["msg"] for err in errors), errors
    if loc is not None:
        assert any(tuple(err["loc"][: len(loc)]) == loc for err in errors), errors


def demo(i="good film", o="pos"):
    return {"input": i, "output": o}


def test_valid_task_passes_and_knows_its_kind():
    t = validate_task({"demonstrations": [demo()], "options": ["pos", "neg"]}, LIMITS, words)
    assert not t.is_generation and t.options_for(Query(input="x")) == ["pos", "neg"]
    assert validate_task({"demonstrations": [demo()]}, LIMITS, words).is_generation


def test_no_demonstrations():
    check({"demonstrations": []}, "at least one demonstration", ("demonstrations",))


def test_too_many_demonstrations():
    check({"demonstrations": [demo()] * 4}, "4 demonstrations; the limit is 3", ("demonstrations",))


def test_output_not_an_option():
    check({"demonstrations": [demo(o="meh")], "options": ["pos", "neg"]}, "demonstrations[0].output 'meh' is not one of")


def test_output_not_in_own_options():
    check({"demonstrations": [{"input": "q", "output": "c", "options": ["a", "b"]}]}, "output 'c' is not one of the options")


def test_fewer_than_two_options():
    check({"demonstrations": [demo()], "options": ["pos"]}, "at least 2 entries", ("options",))


def test_too_many_options():
    check({"demonstrations": [demo(o="a")], "options": list("abcde")}, "5 entries; the limit is 4", ("options",))


def test_duplicate_options():
    check({"demonstrations": [demo()], "options": ["pos", "neg", "pos"]}, "'pos' is given twice", ("options",))


@pytest.mark.parametrize("field", ["input", "output"])
def test_empty_strings(field):
    d = demo()
    d[field] = "   "
    check({"demonstrations": [d]}, f"{field} must not be empty", ("demonstrations", 0, field))


def test_empty_option_and_instruction():
    check({"demonstrations": [demo()], "options": ["pos", ""]}, "option 1 must not be empty")
    check({"demonstrations": [demo()], "instruction": ""}, "instruction must not be empty", ("instruction",))


def test_text_over_token_limit():
    check({"demonstrations": [demo(i="one two three four five six")]}, "input has 6 tokens; the limit is 5",
          ("demonstrations", 0, "input"))


def test_text_over_char_limit():
    check({"demonstrations": [demo(i="x" * 101)]}, "input has 101 characters; the limit is 100")


def test_unknown_field_rejected():
    check({"demonstrations": [demo()], "optoins": ["a", "b"]}, "Extra inputs are not permitted")


def test_validate_task_applies_the_default_settings_limits_and_a_bare_parse_only_the_shape():
    # model/ reads no settings: its default Limits() must be the service's default ones
    assert Limits() == Limits.of(Settings.model_construct())
    with pytest.raises(ValidationError, match="5001 demonstrations; the limit is 5000"):
        validate_task({"demonstrations": [demo()] * 5001})
    # without limits in the context (a request body's first parse, a stored record) sizes are not
    # checked, so an operator's raised limits are not refused before the one check that has them
    assert len(Task(demonstrations=[demo()] * 5001).demonstrations) == 5001
    with pytest.raises(ValidationError, match="at least one demonstration"):
        Task(demonstrations=[])
