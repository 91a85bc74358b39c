"""``retrieve serve``: a local web app over one index (search page, pair page, JSON API).

Needs the ``serve`` extra (Starlette and uvicorn); :func:`require` names it when it is missing.
"""
from __future__ import annotations

from retrieval.errors import RetrieveError

EXTRA_HINT = "retrieve serve needs the serve extra: pip install -e '.[serve]' (in the retrieve checkout)"


def require() -> None:
    """Raise a one-line :class:`RetrieveError` naming the extra when Starlette or uvicorn is missing."""
    try:
        try:
            import python_multipart  # noqa: F401  (python-multipart: Starlette's form parser)
        except ImportError:
            import multipart  # noqa: F401  (its name before 0.0.13)
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise RetrieveError(f"{EXTRA_HINT} ({e.name} is not installed)") from None
