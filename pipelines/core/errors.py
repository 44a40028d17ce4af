"""Exceptions with messages that tell the user what was wrong and what was expected."""


class InputError(ValueError):
    """Bad input (image, mask, setting): the message names the problem and what was expected."""


class WeightsError(RuntimeError):
    """A weights file or folder is missing, unreadable, unsafe or of the wrong architecture."""
