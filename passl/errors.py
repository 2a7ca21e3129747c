"""Exceptions a user can cause. Tools print their message and exit with status 2, no traceback."""


class PasslError(Exception):
    """Base class: the message says what is wrong and how to fix it."""


class ConfigError(PasslError, ValueError):
    """A config file, override or registry entry is wrong (names the key and the file)."""


class DataError(PasslError):
    """An image, label map or dataset folder is missing or unreadable (names the file)."""


class CheckpointError(PasslError):
    """A weight or checkpoint file does not fit the model (lists the keys)."""


class ModelOutputError(PasslError, TypeError):
    """A model's training output is not what the loss reads (passl.models.outputs.TokenLabelOutput)."""


class WriteError(PasslError):
    """A file could not be written (disk full, file size limit, read-only folder, a folder in use by
    another run): names the file or folder, what happened and what to do."""
