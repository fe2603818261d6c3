"""One reporting rule for every command: a user's mistake is one line, a bug a traceback."""

import pytest

from jaxgpt2.errors import (CheckpointError, ConfigError, DataError, InputError, NonFiniteError,
                            NotFoundError, UserError, WeightsError, report_errors)


@pytest.mark.parametrize("error", [ConfigError, DataError, InputError, WeightsError,
                                   NotFoundError, CheckpointError, NonFiniteError])
def test_a_user_error_prints_one_line_and_exits_1(error, capsys):
    def body():
        raise error("what went wrong; what to do")
    assert report_errors(body) == 1
    captured = capsys.readouterr()
    assert captured.err == "error: what went wrong; what to do\n"
    assert captured.out == ""


def test_a_bug_keeps_its_traceback():
    def body():
        raise ZeroDivisionError("a bug")
    with pytest.raises(ZeroDivisionError):
        report_errors(body)


def test_errors_are_also_the_builtins_library_callers_catch():
    assert issubclass(ConfigError, ValueError) and issubclass(InputError, ValueError)
    assert issubclass(NotFoundError, FileNotFoundError)
    assert all(issubclass(e, UserError) for e in (CheckpointError, NonFiniteError, WeightsError))
    assert report_errors(lambda: None) == 0
