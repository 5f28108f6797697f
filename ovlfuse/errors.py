"""The one error type users see."""


class OvlError(Exception):
    """A problem with the user's input or environment.

    The message is one line that names the problem and what to do about it;
    the CLI prints it as ``ovlfuse: <message>`` and exits non-zero.
    """
