"""The exception types every layer may raise and the one run entry maps to exit codes.

Anything the user can fix (a config typo, a missing file, a bad value) raises ``ConfigError`` with a
message that names the problem and the fix: printed as one line, exit code 2. A non-finite loss under
``train.nan_policy=abort`` raises ``NonFiniteLossError``: exit code 3. Programming errors keep their
traceback (exit code 1). Nothing here imports torch.
"""


class ConfigError(ValueError):
    """A user-fixable problem: bad config, bad input file, impossible combination."""


class NonFiniteLossError(RuntimeError):
    """A non-finite loss or gradient under ``train.nan_policy=abort``; the last checkpoint is the last good state."""


EXIT_OK = 0
EXIT_FAILURE = 1  # a programming error or a crash: the traceback is printed
EXIT_USER_ERROR = 2  # ConfigError
EXIT_NAN_ABORT = 3  # NonFiniteLossError
EXIT_INTERRUPTED = 130
