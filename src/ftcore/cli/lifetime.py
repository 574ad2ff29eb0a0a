"""How the processes of an `ftcore run --nproc_per_node N` job end together.

`ftcore run` starts torchrun, which starts the ranks. Killed processes do not take their children with
them: a `kill -9` of torchrun, or a scheduler's SIGTERM to `ftcore run`, left the ranks training on and
writing into the output folder, where a resumed job would race them. So each child asks Linux to send
it SIGTERM when its parent dies (`prctl(PR_SET_PDEATHSIG)`), `ftcore run` forwards SIGTERM and SIGHUP
to torchrun (which stops its ranks), and a rank turns SIGTERM into the same interrupt as Ctrl-C: it
logs the last complete checkpoint and ends with 130. Checkpoints are written atomically, so one cut
short leaves the previous one whole.
"""

from __future__ import annotations

import ctypes
import functools
import os
import signal
import subprocess
import sys

_PR_SET_PDEATHSIG = 1  # linux/prctl.h
FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


@functools.cache
def _libc() -> ctypes.CDLL | None:
    return ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


def stop_when_parent_dies() -> None:
    """Have the kernel send this process SIGTERM when its parent exits (Linux; elsewhere nothing).

    Also run between fork and exec (`preexec_fn`): the C library is looked up beforehand, in the parent
    (`run_launcher`), so the child only makes the call."""
    libc = _libc()
    if libc is None:
        return
    parent = os.getppid()
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # the parent died before the request was in place
        os.kill(os.getpid(), signal.SIGTERM)


def interrupt_on_sigterm() -> None:
    """A rank's SIGTERM raises KeyboardInterrupt, so the recipe reports what it kept, as on Ctrl-C."""

    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")

    signal.signal(signal.SIGTERM, interrupt)


def run_launcher(command: list[str]) -> int:
    """Run torchrun to its end, forwarding SIGTERM/SIGHUP to it; a signal's exit status as a shell's.

    Ctrl-C reaches torchrun from the terminal too; it stops its ranks and exits 1, reported here as 130."""
    _libc()  # loaded here, not in the forked child
    launcher = subprocess.Popen(command, preexec_fn=stop_when_parent_dies)
    received: list[int] = []

    def forward(signum, frame):
        received.append(signum)
        launcher.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in FORWARDED_SIGNALS}
    try:
        try:
            code = launcher.wait()
        except KeyboardInterrupt:  # wait for torchrun to stop the ranks
            received.append(signal.SIGINT)
            code = launcher.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if received:
        return 128 + received[0]
    return 128 - code if code < 0 else code  # killed by signal S: Popen says -S, a shell 128 + S
