"""The one run entry: every command and every rank runs under ``run_entry``.

It maps exceptions to exit codes (``ConfigError`` 2, ``NonFiniteLossError`` 3, ``PeerLostError`` 4,
``RankFailure`` the launcher's code, ``Interrupted`` and ``core.stop.Stopped`` 128 + the signal, anything else 1 with its traceback), prints the reason
once (``error: ...`` on stderr, from rank 0 only when the error is one every rank sees), and, in a rank
started by ``launch()``, writes the rank's exit report that names the culprit when a run fails and
watches the launching ``dat-ds`` process (the rank exits once it is gone). Nothing here imports torch.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Callable

from ..core.errors import (
    EXIT_FAILURE,
    EXIT_INTERRUPTED,
    EXIT_NAN_ABORT,
    EXIT_OK,
    EXIT_PEER_LOST,
    EXIT_USER_ERROR,
    ConfigError,
    NonFiniteLossError,
    PeerLostError,
)
from ..core.stop import Stopped
from .launcher import Interrupted, RankFailure
from .status import STATUS_ENV, TERMINATED, install_signal_status, watch_cli, write_rank_status


def _is_rank() -> bool:
    return bool(os.environ.get(STATUS_ENV)) or "LOCAL_RANK" in os.environ


def _say(message: str, *, every_rank_sees_it: bool) -> None:
    """One line on stderr; errors that every rank raises alike are printed by rank 0 only."""
    if every_rank_sees_it and _is_rank() and int(os.environ.get("RANK", 0)) != 0:
        return
    sys.stderr.write(f"error: {message}\n")
    sys.stderr.flush()


def run_entry(main: Callable[[], Any]) -> int:
    """Run ``main()`` and return the process exit code; see the module docstring."""
    install_signal_status()
    watch_cli()
    try:
        rc = main()
    except ConfigError as e:
        _say(str(e), every_rank_sees_it=True)
        write_rank_status(EXIT_USER_ERROR, e)
        return EXIT_USER_ERROR
    except NonFiniteLossError as e:  # the check is reduced over ranks: every rank raises it at the same step
        _say(str(e), every_rank_sees_it=True)
        write_rank_status(EXIT_NAN_ABORT, e)
        return EXIT_NAN_ABORT
    except PeerLostError as e:  # launch() prints the line from the rank's report; a rank without one says it itself
        if not os.environ.get(STATUS_ENV):
            _say(str(e), every_rank_sees_it=False)
        write_rank_status(EXIT_PEER_LOST, e)
        _exit_now(EXIT_PEER_LOST)
        return EXIT_PEER_LOST
    except RankFailure as e:
        if str(e):  # empty: every rank failed alike and rank 0 has printed the reason
            _say(str(e), every_rank_sees_it=False)
        write_rank_status(e.code, e)
        return e.code
    except Interrupted as e:  # the user's signal, forwarded to every rank: no rank is blamed for it
        sys.stderr.write(f"{e}\n")
        sys.stderr.flush()
        write_rank_status(e.code, str(e))
        return e.code
    except Stopped as e:  # a launched rank that stopped on the forwarded signal: the dat-ds command says so
        write_rank_status(e.code, TERMINATED)
        return e.code
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        write_rank_status(EXIT_INTERRUPTED, "interrupted")
        return EXIT_INTERRUPTED
    except SystemExit as e:  # argparse's own exit (usage errors: code 2)
        write_rank_status(e.code if isinstance(e.code, int) else EXIT_FAILURE, "exited")
        raise
    except BaseException as e:
        write_rank_status(EXIT_FAILURE, e)
        raise
    code = rc if isinstance(rc, int) else EXIT_OK
    _close_process_group()
    write_rank_status(code)
    return code


def _exit_now(code: int) -> None:
    """A rank whose peer is gone ends here, without Python's teardown: that destroys a process group whose peer
    never answers, which took 7 s on gloo (measured, loaded 2-core machine) and can block for good on NCCL.
    Files are written unbuffered or atomically and the run lock is released by now; only output is flushed.
    Only in a world of several ranks, each its own process (a world of one has no peer to lose)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    import logging

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _close_process_group() -> None:
    """Tear torch.distributed down in order: a rank that exits with gloo's threads running can abort.

    Only in a world of several ranks, each its own process that ends here. The in-process world of one
    rank (``--nproc 1``, tests) stays: DeepSpeed caches its groups, so destroying it would leave the next
    run in that process with dead groups."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    tdist = sys.modules.get("torch.distributed")
    if tdist is not None and tdist.is_available() and tdist.is_initialized():
        tdist.destroy_process_group()
