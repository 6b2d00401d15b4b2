"""One JSON helper shared by the model zoo and timm's adapter (a module of its own so neither imports the other)."""
from __future__ import annotations

from typing import Any


def jsonable(v: Any) -> Any:
    """``v`` as its JSON round trip gives it back (tuples become lists), so recorded kwargs compare equal."""
    if isinstance(v, dict):
        return {k: jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [jsonable(x) for x in v]
    return v
