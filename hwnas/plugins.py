"""User code named on the command line as `package.module:attribute`: a space factory, an evaluator, a latency model.

A user's own search space, accuracy evaluator or latency model lives in the user's package, not in
hwnas; the CLI takes it as `module:attribute` (importable from the working directory or the
installed packages), imports it, and calls it. Anything that cannot be imported or found is one
clear line naming the spec, never a traceback of the import machinery.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Any

from hwnas.errors import HwnasError


def is_spec(text: str) -> bool:
    """Whether `text` names user code (`module:attribute`) rather than a preset."""
    module, _, attribute = text.partition(":")
    return bool(module) and bool(attribute) and all(part.isidentifier() for part in module.split("."))


def load(spec: str, what: str) -> Any:
    """The object `module:attribute` names (`what` says what it is for, in the error)."""
    if not is_spec(spec):
        raise HwnasError(f"{what} '{spec}' is not of the form package.module:attribute")
    module_name, _, attribute = spec.partition(":")
    cwd = str(Path.cwd())
    if cwd not in sys.path:  # a user's module beside their data, as `python -m` would find it
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise HwnasError(f"{what} '{spec}': cannot import module '{module_name}' ({exc})") from None
    except Exception as exc:  # noqa: BLE001 - user code failing on import: say where, in one line
        raise HwnasError(f"{what} '{spec}': importing '{module_name}' failed ({type(exc).__name__}: {exc})") from None
    try:
        return getattr(module, attribute)
    except AttributeError:
        raise HwnasError(f"{what} '{spec}': module '{module_name}' has no attribute '{attribute}'") from None


def call(spec: str, what: str, *args: Any) -> Any:
    """`load(spec)(*args)`, with a failure of the user's factory as one line naming it."""
    factory = load(spec, what)
    if not callable(factory):
        return factory
    try:
        return factory(*args)
    except TypeError as exc:
        if args:
            try:
                return factory()
            except Exception:  # noqa: BLE001 - report the first error, with its arguments
                pass
        raise HwnasError(f"{what} '{spec}' could not be called ({exc})") from None
    except HwnasError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise HwnasError(f"{what} '{spec}' failed ({type(exc).__name__}: {exc})") from None


__all__ = ["call", "is_spec", "load"]
