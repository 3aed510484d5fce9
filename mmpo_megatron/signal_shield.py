"""Stop signals kept away from a helper process (stdlib only: a spawned process imports this to
unpickle its initializer, and should not pay for torch to do so)."""

from __future__ import annotations

import ctypes
import signal


def shield_from(signals: tuple[int, ...]) -> None:
    """Block ``signals`` in this process, and let it die with its parent (a SIGKILLed parent would
    otherwise leave it behind, deaf to SIGTERM)."""
    signal.pthread_sigmask(signal.SIG_BLOCK, set(signals))
    libc = ctypes.CDLL(None, use_errno=True)
    if hasattr(libc, "prctl"):  # Linux
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, int(signal.SIGKILL))
