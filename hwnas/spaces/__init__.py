"""Search-space presets by name: `spaces.get(name)`, `spaces.names()`."""

from __future__ import annotations

from collections.abc import Callable

from hwnas.errors import ArchError
from hwnas.space import SearchSpace
from hwnas.spaces.mbv3_32 import mbv3_32
from hwnas.spaces.mbv3_224 import mbv3_224

_REGISTRY: dict[str, Callable[..., SearchSpace]] = {
    "mbv3-32": mbv3_32,
    "mbv3-224": mbv3_224,
}


def names() -> list[str]:
    return sorted(_REGISTRY)


def get(name: str, **overrides: int) -> SearchSpace:
    """A preset by name; `in_channels` and `num_classes` may be overridden to fit a dataset."""
    try:
        factory = _REGISTRY[name]
    except KeyError:
        raise ArchError(f"unknown search space '{name}'; known: {', '.join(names())}") from None
    return factory(**overrides)


def register(name: str, factory: Callable[..., SearchSpace]) -> None:
    """Make a user's own space available by name (e.g. to the CLI) without touching hwnas."""
    _REGISTRY[name] = factory
