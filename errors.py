"""One family of errors for everything a user can cause.

The CLI catches ``DsmoeError`` and prints its message as one line; anything else is a bug and
keeps its traceback.
"""


class DsmoeError(Exception):
    """Base of every error a user can cause (bad path, bad config, bad flag value)."""


class CheckpointError(DsmoeError):
    """A checkpoint is missing, incomplete, corrupted, or not a DeepSeekMoE checkpoint."""


class ConfigError(DsmoeError):
    """A ``config.json`` value is missing, of the wrong kind, or unsupported."""


class UsageError(DsmoeError):
    """A flag or argument value is wrong."""


class EvalError(DsmoeError):
    """An evaluation cannot run: unknown task, missing data file."""


class NativeLibraryError(DsmoeError):
    """dsmoe's native library cannot be used as built: it was built from another interface
    (dsmoe_native.h) than this dsmoe's, or cannot be loaded here. Rebuilding it fixes it."""
