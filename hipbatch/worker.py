"""A second process for CPU work that can overlap the caller's own: a generator run in a forked child, its items
sent back through a pipe as they come (collect: results parsed and extracted while the ledger is written).

Only where it pays and is safe: Linux (fork: the child starts at once, with what the parent has loaded, and
needs no pickling of its work), at least two CPUs for this process; else the generator runs in the caller's
process, item for item the same. The child writes nothing anywhere: it reads and computes, and its items and
its error (re-raised in the caller) are all it gives back; a child that dies, or a caller that stops early,
ends the child.
"""

from __future__ import annotations

import os
import pickle
import signal
import sys
import warnings
from collections.abc import Callable, Generator, Iterable
from multiprocessing.connection import Connection
from typing import Any, TypeVar

from hipbatch.errors import HipbatchError

T = TypeVar("T")


def usable() -> bool:
    """Whether a forked child can run beside this process here."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        return len(os.sched_getaffinity(0)) >= 2
    except (AttributeError, OSError):  # pragma: no cover - Linux has it
        return (os.cpu_count() or 1) >= 2


AHEAD = 8  # items the child may run ahead of the caller (received by a thread here, so the pipe never stalls it)


def items(produce: Callable[[], Iterable[T]], child: bool = True) -> Generator[T, None, None]:
    """produce()'s items, in order; produced in a forked child process when `child` and usable(), else here.
    An exception produce() raises is raised here (a HipbatchError as itself)."""
    if not (child and usable()):
        yield from produce()
        return
    import multiprocessing
    import queue
    import threading

    ctx = multiprocessing.get_context("fork")
    receive, send = ctx.Pipe(duplex=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # 3.12+: fork while other threads run (they stay here)
        proc = ctx.Process(target=_child, args=(produce, send, receive), daemon=True)
        proc.start()
    send.close()
    # A pipe holds 64 KB: a thread takes the child's messages as they come (the read releases the GIL), so the
    # child keeps working while this process is busy, up to AHEAD items ahead (memory stays bounded).
    inbox: queue.Queue[bytes | None] = queue.Queue(maxsize=AHEAD)

    def pump() -> None:
        try:
            while True:
                inbox.put(receive.recv_bytes())
        except (EOFError, OSError):
            inbox.put(None)

    thread = threading.Thread(target=pump, name="hipbatch-worker-inbox", daemon=True)
    thread.start()
    try:
        while True:
            data = inbox.get()
            if data is None:
                proc.join(5)
                raise HipbatchError(f"the reading process stopped unexpectedly (exit code {proc.exitcode})")
            kind, value = pickle.loads(data)
            if kind == "item":
                yield value
            elif kind == "error":
                raise value
            else:
                return
    finally:
        if proc.is_alive():
            proc.kill()  # the caller stopped early (or the child is ending anyway): nothing of it is wanted
        while thread.is_alive():  # let the thread see the end of the pipe
            try:
                inbox.get(timeout=0.05)
            except queue.Empty:
                pass
        receive.close()
        proc.join()


def _child(produce: Callable[[], Iterable[Any]], send: Connection, receive: Connection) -> None:
    receive.close()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it ends this child
    try:
        for item in produce():
            send.send(("item", item))
    except BrokenPipeError:  # the parent stopped reading
        return
    except BaseException as e:  # noqa: BLE001 - every failure goes back to the parent, which raises it
        try:
            send.send(("error", e))
        except (pickle.PicklingError, TypeError, AttributeError):
            send.send(("error", HipbatchError(f"{type(e).__name__}: {e}")))
        return
    send.send(("done", None))
