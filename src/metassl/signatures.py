"""Call signatures as configuration schemas: which keys a config section may set for a builder.

Neutral ground shared by the method, regularizer and backbone registries and the config
checks, so none of them imports another just for this.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

__all__ = ["keyword_parameters"]


def keyword_parameters(fn: Callable, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """Names and defaults of ``fn``'s named parameters (no ``*args``/``**kwargs``), minus ``skip``:
    what a config section may set for a builder.  A parameter without a default maps to
    ``inspect.Parameter.empty``."""
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return {k: p.default for k, p in inspect.signature(fn).parameters.items() if k not in skip and p.kind in kinds}
