"""serve/errors.py: the server's exceptions and the HTTP status each is answered with (``STATUS``; an
``HTTPException`` carries its own)."""

from __future__ import annotations

from lorablend.serve import errors


def test_the_statuses_a_client_relies_on():
    s = errors.STATUS
    assert (s[errors.UnknownLora], s[errors.NameTaken], s[errors.Forbidden], s[errors.QueueFull],
            s[errors.ServerStopping]) == (404, 409, 403, 503, 503)
    assert all(400 <= status < 600 for status in s.values())
    assert errors.BodyTooLarge("too large").status_code == 413


def test_the_errors_keep_the_builtin_kinds_callers_catch():
    assert issubclass(errors.UnknownLora, LookupError) and issubclass(errors.Forbidden, PermissionError)
    assert issubclass(errors.NameTaken, ValueError) and issubclass(errors.PromptTokenError, ValueError)
