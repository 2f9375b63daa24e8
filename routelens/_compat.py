"""Dependency checks that must fail with one line rather than deep inside a forward."""
from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from .errors import VersionError

MIN_TRANSFORMERS = (5, 15)


def _parse(v: str) -> tuple[int, ...]:
    parts = []
    for p in v.split(".")[:3]:
        digits = "".join(ch for ch in p if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def check_transformers(installed: str | None = None) -> str:
    """Refuse transformers < 5.15: before it, routers of some families return probabilities or
    only indices (algorithms.md §8.1), so captured 'logits' would silently mean different things."""
    if installed is None:
        try:
            installed = version("transformers")
        except PackageNotFoundError as exc:
            raise VersionError("transformers is not installed; run `pip install -c constraints.txt -e .`") from exc
    if _parse(installed) < MIN_TRANSFORMERS:
        raise VersionError(
            f"transformers {installed} is too old: routelens needs >= {'.'.join(map(str, MIN_TRANSFORMERS))} "
            "(v5 routers return (logits, weights, indices)); run `pip install -c constraints.txt 'transformers>=5.15,<6'`"
        )
    return installed
