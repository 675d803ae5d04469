"""Errors that are the user's to fix (data, configuration, files): `tools/train_net.py` reports them in one line.

Each also derives from the built-in type that code outside this package would expect (ValueError,
FileNotFoundError, FloatingPointError), so `except ValueError` keeps working.
"""


class DabDetrError(Exception):
    """A problem with the user's data, configuration or files; the message says what and where."""


class ConfigError(DabDetrError, ValueError):
    """A bad config key, value or type, detected before training starts."""


class DatasetError(DabDetrError, ValueError):
    """A dataset that cannot be used as it is (malformed json, missing files, unknown categories, ...)."""


class MissingFileError(DabDetrError, FileNotFoundError):
    """A file named by the configuration or the command line does not exist."""


class CheckpointError(DabDetrError, ValueError):
    """A checkpoint that cannot be loaded into this model."""


class NonFiniteLossError(DabDetrError, FloatingPointError):
    """Training produced a NaN/inf loss or gradient; the weights of that iteration were not applied."""


def one_line(error: BaseException) -> str:
    """The message of `error` as one line, unwrapping the text torch's DataLoader puts around worker errors."""
    text = str(error).strip()
    if text.startswith("Caught ") and "Original Traceback" in text:
        # torch re-raises a worker's exception with the worker's traceback as message; the original message is
        # on its last line, after "module.ErrorType: ".
        last = text.splitlines()[-1]
        text = last.split(": ", 1)[1] if ": " in last else last
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return " ".join(lines) if lines else type(error).__name__
