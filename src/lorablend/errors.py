"""Every exception the library raises on bad input, in one place (each is a ``ValueError``, so one ``except
ValueError`` catches them all); the server's own HTTP errors are in ``serve/errors.py``, a kind's ``DeltaProblem``
in ``kinds/base.py`` (kinds/ imports nothing else). Also ``renamed_names``: how an old public name keeps working.

>>> from lorablend.errors import LoraFormatError
>>> issubclass(LoraFormatError, ValueError)
True
"""

from __future__ import annotations

import warnings
from typing import Any, Callable


class LoraFormatError(ValueError):
    """A file or state dict cannot be read as a LoRA: the message names the source and the problem.

    >>> raise LoraFormatError("x.safetensors: empty file (0 bytes); pass a LoRA .safetensors file")
    Traceback (most recent call last):
    ...
    lorablend.errors.LoraFormatError: x.safetensors: empty file (0 bytes); pass a LoRA .safetensors file
    """


class LoraCompatibilityError(ValueError):
    """An adapter does not fit a model (family, missing modules, shapes, NaN); nothing was changed."""


class WeightFileError(LoraFormatError, FileNotFoundError):
    """A folder (or a downloaded repo) has no one weight file to load: none, several, or not the one named.

    A :class:`LoraFormatError` (a ``ValueError``, as every LoRA we cannot read) and a ``FileNotFoundError`` (what
    diffusers raises when the weight file it looks for is missing), so callers of either library catch it.

    >>> issubclass(WeightFileError, ValueError) and issubclass(WeightFileError, FileNotFoundError)
    True
    """


class OutputExistsError(FileExistsError, ValueError):
    """The output exists and ``overwrite`` was not given (a ``ValueError`` and a ``FileExistsError``)."""


class InputOverwriteError(ValueError):
    """The output is one of the inputs (same file, hard link, symlink, or a folder holding an input)."""


class CapacityError(ValueError):
    """A mix needs more rank on a layer than the compiled denoiser's buffers hold (and growing is off)."""


def renamed_names(module: str, renames: dict[str, str], namespace: dict[str, Any]) -> Callable[[str], Any]:
    """A module ``__getattr__`` that still gives each OLD name of ``renames`` (old -> new), as the new object,
    with a ``DeprecationWarning`` saying it goes in 0.3 — how a public name is renamed without breaking callers.

    >>> import warnings
    >>> getter = renamed_names("m", {"OldSettings": "NewSettings"}, {"NewSettings": int})
    >>> with warnings.catch_warnings(record=True) as caught:
    ...     warnings.simplefilter("always")
    ...     getter("OldSettings"), str(caught[0].message)
    (<class 'int'>, 'm.OldSettings is deprecated and will be removed in lorablend 0.3: use m.NewSettings')
    """

    def __getattr__(name: str) -> Any:
        if name in renames:
            new = renames[name]
            warnings.warn(f"{module}.{name} is deprecated and will be removed in lorablend 0.3: use {module}.{new}",
                          DeprecationWarning, stacklevel=2)
            return namespace[new]
        raise AttributeError(f"module {module!r} has no attribute {name!r}")

    return __getattr__


class UsageError(Exception):
    """A command line that argparse (or a command) rejects; the CLI reports it as one line, exit 2.

    >>> str(UsageError("--steps 0: must be a positive integer"))
    '--steps 0: must be a positive integer'
    """
