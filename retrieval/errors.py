"""The project's exceptions. Library code raises these; only ``cli.py`` turns them into messages."""


class RetrieveError(Exception):
    """Base class: a failure the user can act on, described in one line."""


class ImageError(RetrieveError):
    """A single image could not be read or decoded (the caller decides whether that is fatal)."""

    def __init__(self, path: object, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class WeightsUnavailable(RetrieveError):
    """A backbone's weights are neither on disk nor downloadable."""


class UnknownModel(RetrieveError):
    """A model name the registry does not know."""


class IndexError_(RetrieveError):
    """The index cannot be used as asked (missing, damaged, settings mismatch)."""


class IndexLocked(IndexError_):
    """Another process is writing this index."""


class SettingsMismatch(IndexError_):
    """The command asks for settings that differ from the ones the index was built with."""
