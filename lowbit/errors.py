"""The one exception users see."""


class LowbitError(Exception):
    """A problem the user can fix: the message says what is wrong and what to do.

    The CLI prints it as one line and exits with status 2; anything else escaping
    is a bug in lowbit and keeps its traceback.
    """
