"""The exception types every layer may raise and the one run entry maps to exit codes.

Anything the user can fix (a config typo, a missing file, a bad value) raises ``ConfigError`` with a
message that names the problem and the fix: printed as one line, exit code 2. A non-finite loss under
``train.nan_policy=abort`` raises ``NonFiniteLossError``: exit code 3. A full disk (ENOSPC, or a quota)
while writing a checkpoint or a run file raises ``DiskFullError``: the user fixes it by freeing space, so it
is a ``ConfigError`` (one line, exit code 2) and the run entry needs no case of its own. A collective that
failed because a peer stopped answering (its link went down, its node died or hung) raises ``PeerLostError``,
whose message is the one line naming that peer and the last checkpoint: exit code 4. Programming errors
keep their traceback (exit code 1). Nothing here imports torch.
"""


class ConfigError(ValueError):
    """A user-fixable problem: bad config, bad input file, impossible combination."""


class DiskFullError(ConfigError):
    """No space left where a checkpoint or run file was being written. A checkpoint save that hits it on any
    rank fails on every rank, after its temporary folder is removed: the last complete checkpoint stays as it was."""


class NonFiniteLossError(RuntimeError):
    """A non-finite loss or gradient under ``train.nan_policy=abort``; the last checkpoint is the last good state."""


class PeerLostError(RuntimeError):
    """A rank stopped answering within the collective timeout (``dist.timeout_s``); the message is the whole line
    (who, where in the run, why, the last checkpoint). Raised by every rank that noticed, after the check-in
    that tells the ranks still in contact from the lost ones (``core.dist.lost_contact``)."""


class Interrupted(Exception):
    """The user stopped a launched run (or a tune) with a signal; every process of it is gone. Printed as one
    line; raised by ``launch.launcher`` and by ``tune.run``, which sits below it."""

    def __init__(self, signum: int, line: str):
        super().__init__(line)
        self.signum = signum
        self.code = 128 + signum  # what a shell reports for a process the signal ended: 143 TERM, 130 INT, 138 USR1


EXIT_OK = 0
EXIT_FAILURE = 1  # a programming error or a crash: the traceback is printed
EXIT_USER_ERROR = 2  # ConfigError, DiskFullError
EXIT_NAN_ABORT = 3  # NonFiniteLossError
EXIT_PEER_LOST = 4  # PeerLostError: fix the network (or the node), then --resume auto
EXIT_INTERRUPTED = 130
