"""Named fail points: a role stops itself (SIGSTOP) at one exact place in its code, so a fault
injector can SIGKILL it there deterministically instead of by luck of timing
(`splitfed demo --kill ROLE@POINT`).

A point is armed by ``SPLITFED_FAILPOINT=NAME`` in the role's environment, read once at import;
unarmed, a point costs one comparison. A stopped process holds its sockets, so nothing it would
have sent after the point leaves it: the injector sees it stopped (state ``T``), kills it and
starts it again without the variable.
"""

from __future__ import annotations

import logging
import os
import signal

ENV = "SPLITFED_FAILPOINT"

# name -> (role, where it stops). The demo refuses names not listed here.
POINTS = {
    "uncommitted-hello": ("broker", "the first round is aggregated and checkpointed by some silos but not "
                          "committed, and a silo's HELLO for the next round has been acknowledged by the trunk"),
    "round-end-unsaved": ("trunk", "the first round's steps are all applied and its ROUND_END has arrived, "
                          "but the round is not checkpointed yet"),
}

_ARMED = os.environ.get(ENV, "")


def armed(name: str) -> bool:
    return _ARMED == name


def stop_here(name: str) -> None:
    """Log, flush, and stop this process until someone SIGKILLs (or SIGCONTs) it."""
    logging.getLogger("failpoint").warning("fail point %s reached: stopping here for the fault injector", name)
    for handler in logging.getLogger().handlers:
        handler.flush()
    os.kill(os.getpid(), signal.SIGSTOP)
