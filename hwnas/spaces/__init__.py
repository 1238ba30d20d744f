"""Search-space presets by name: `spaces.get(name)`, `spaces.names()`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from hwnas.errors import ArchError
from hwnas.plugins import is_spec
from hwnas.space import SearchSpace
from hwnas.spaces.mbv3_32 import mbv3_32
from hwnas.spaces.mbv3_224 import mbv3_224
from hwnas.spaces.mbv3_224_w12 import mbv3_224_w12

_REGISTRY: dict[str, Callable[..., SearchSpace]] = {
    "mbv3-32": mbv3_32,
    "mbv3-224": mbv3_224,
    "mbv3-224-w1.2": mbv3_224_w12,
}


def names() -> list[str]:
    return sorted(_REGISTRY)


def get(name: str, **overrides: int) -> SearchSpace:
    """A preset by name, or a user's factory as `package.module:factory` (it must build an `hwnas.SearchSpace`:
    a supernet and a latency table need one); `in_channels` and `num_classes` may be overridden to fit a dataset."""
    if is_spec(name):
        from hwnas.plugins import load

        built = load(name, "search space")(**overrides)
        if not isinstance(built, SearchSpace):
            raise ArchError(f"search space '{name}' built a {type(built).__name__}, not an hwnas.SearchSpace (a "
                            "supernet and a latency table need one; search it with --evaluator and --latency)")
        return built
    try:
        factory = _REGISTRY[name]
    except KeyError:
        raise ArchError(f"unknown search space '{name}'; known: {', '.join(names())}, or package.module:factory "
                        "for a space of your own") from None
    return factory(**overrides)


def get_any(name: str) -> Any:
    """A preset, or any space a user's `package.module:factory` builds that follows `hwnas.search.protocols`."""
    if is_spec(name):
        from hwnas.plugins import call

        return call(name, "search space")
    return get(name)


def register(name: str, factory: Callable[..., Any]) -> None:
    """Make a user's own space available by name (e.g. to the CLI) without touching hwnas: an
    `hwnas.SearchSpace` factory for `get`, or any protocol space's for `get_any`."""
    _REGISTRY[name] = factory
