"""Package verbs imported on first use, so importing a package's light modules (``errors``) stays light."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

__all__ = ["lazy_exports"]


def lazy_exports(package: str, home: dict[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` that imports ``home[name]`` (a submodule of ``package``) when ``name`` is first used.

    Example:
        >>> getattr_ = lazy_exports("utils.hub", {"redact": "errors"})
        >>> getattr_("redact").__module__
        'utils.hub.errors'
    """

    def __getattr__(name: str) -> Any:
        if name in home:
            return getattr(importlib.import_module(f"{package}.{home[name]}"), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
