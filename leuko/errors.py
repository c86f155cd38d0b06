"""The base of leuko's own errors.

A LeukoError says what in the user's input (a file, a field, a value, an option) is wrong and how to
fix it; the `leuko` command prints it as one line. Any other exception is a fault in leuko or a
library and keeps its traceback. The subclasses also derive from ValueError where they did before,
so `except ValueError` in user code keeps working.
"""


class LeukoError(Exception):
    """An input error: the message names the bad file, key or value and what would fix it."""


class ConfigError(LeukoError, ValueError):
    """A config value (a model, data or net setting) that cannot be used; the message names it and the fix."""
