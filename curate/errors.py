"""Exception hierarchy. The CLI turns any CurateError into one clear line (exit code 2)."""


def failure_code(error: str) -> str:
    """The code of a per-sample failure recorded as ``"code: detail"``."""
    return error.split(":", 1)[0].strip() or "unknown"


class CurateError(Exception):
    """Base class for errors a user can act on; the message is shown as one line."""


class InputError(CurateError):
    """A path, shard spec or file given by the user is missing or malformed."""


class ModelLoadError(CurateError):
    """A model, its weights or its config could not be loaded."""


class RunFolderError(CurateError):
    """A run folder is inconsistent with the current request (other model, corrupt files)."""


class ShardOpenError(CurateError):
    """A shard could not be opened at all (missing, unreadable, not a tar)."""
