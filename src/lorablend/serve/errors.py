"""Every exception of the server, in one place, with the HTTP status it is answered with (``STATUS``): the app
installs one handler per row, so a new error is one class and one row here.

>>> STATUS[UnknownLora]
404
"""

from __future__ import annotations

from starlette.exceptions import HTTPException


class UnknownLora(LookupError):
    """A LoRA name the server does not know (answered 404, with the names that come close).

    >>> isinstance(UnknownLora("unknown LoRA 'x'"), LookupError)
    True
    """


class NameTaken(ValueError):
    """A registration under a name that already means a LoRA (answered 409).

    >>> isinstance(NameTaken("LoRA name 'ink' is taken"), ValueError)
    True
    """


class Forbidden(PermissionError):
    """A path that resolves outside the LoRA folder (``..``, absolute, a symlink pointing out): answered 403.

    >>> isinstance(Forbidden("path '../x': '..' is not allowed"), PermissionError)
    True
    """


class ServerStopping(RuntimeError):
    """The server is shutting down (or was interrupted) before this request's images were made: answered 503 with
    ``Retry-After`` — nothing was made, send the request again.

    >>> raise ServerStopping("the server shut down before this request ran; send it again")
    Traceback (most recent call last):
    ...
    lorablend.serve.errors.ServerStopping: the server shut down before this request ran; send it again
    """


class QueueFull(RuntimeError):
    """More requests wait than ``--max-queue`` allows: answered 503 with ``Retry-After``.

    >>> isinstance(QueueFull("the queue is full"), RuntimeError)
    True
    """


class BatchStopped(Exception):
    """Raised from the step callback to end a running batch between steps (the server halts, or every client of
    the batch left); never reaches a client: the worker answers each request of the batch for its own reason.

    >>> isinstance(BatchStopped("stopped after step 3"), Exception)
    True
    """


class ClientGone(Exception):
    """The client disconnected while its request waited or ran: nobody is left to answer (logged as 499).

    >>> ClientGone("the client disconnected").args[0]
    'the client disconnected'
    """


class PromptTokenError(ValueError):
    """A ``<lora:…>`` token that cannot be read (no name, a weight that is not a finite number): answered 422.

    >>> isinstance(PromptTokenError("<lora::1>: no LoRA name"), ValueError)
    True
    """


class CompileUnavailable(RuntimeError):
    """``--compile`` on a build of lorablend without ``DiffusionPipeline.compile_denoiser`` (the command exits 2).

    >>> isinstance(CompileUnavailable("--compile: not available"), RuntimeError)
    True
    """


class BodyTooLarge(HTTPException):
    """A request body over its limit, raised from ``receive`` so that nothing reads past the limit. An
    ``HTTPException`` (413) so that the framework's body parser passes it on instead of answering 400.

    >>> BodyTooLarge("request body over the limit").status_code
    413
    """

    def __init__(self, detail: str) -> None:
        super().__init__(status_code=413, detail=detail)


# the answer of each error raised in a handler (the app adds the 422s of the library's readers)
STATUS: dict[type, int] = {UnknownLora: 404, NameTaken: 409, Forbidden: 403, ServerStopping: 503, QueueFull: 503,
                           ClientGone: 499}

__all__ = ["BatchStopped", "BodyTooLarge", "ClientGone", "CompileUnavailable", "Forbidden", "NameTaken",
           "PromptTokenError", "QueueFull", "STATUS", "ServerStopping", "UnknownLora"]
