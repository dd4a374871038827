"""The entry point of a Disco process worker (``python -m qoq_compiler.runtime.disco_worker``).

``ProcessSession`` starts workers 1..N-1 as ``python -m <entrypoint> worker_id num_workers
num_groups read_fd write_fd``; worker 0 is a thread of the controller. TVM's own entry point
(``tvm.exec.disco_worker``) would meet the wheel's half-initialised ``tvm.runtime.disco``
(``tvm_env.disco``) and registers none of the functions qoqc's workers run, so this one makes
the worker what the controller process already is: Disco importable, the collective libraries
loaded (``runtime.ccl``), qoqc's worker functions registered (``runtime.tp``), then TVM's worker
loop until the controller shuts it down or goes away.
"""

from __future__ import annotations

import signal

from ..tvm_env import disco
from . import ccl


def main() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group; the controller stops us
    disco()
    ccl.load()
    from . import tp  # noqa: F401  (registers the functions the controller calls on workers)
    from tvm.exec.disco_worker import main as worker_loop

    try:
        worker_loop()
    except (OSError, KeyboardInterrupt):  # the controller closed the pipe, or Ctrl-C reached the group
        pass


if __name__ == "__main__":
    main()
