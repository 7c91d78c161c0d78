"""streamconv's version: the split-run fingerprint hashes it, `--version` prints it."""

from __future__ import annotations

__version__ = "0.1.0"


def version() -> str:
    """The installed distribution's version, else the package's own (run from a source tree)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed("streamconv")
    except PackageNotFoundError:
        return __version__
