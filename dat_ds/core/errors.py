"""The one exception type for user mistakes.

Anything the user can fix (a config typo, a missing file, a bad value) raises ``ConfigError`` with a
message that names the problem and the fix. The CLI prints it as one line and exits with code 2;
programming errors keep their traceback.
"""


class ConfigError(ValueError):
    """A user-fixable problem: bad config, bad input file, impossible combination."""
