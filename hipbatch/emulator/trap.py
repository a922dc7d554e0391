"""A local batch server that can SIGKILL its client mid-call: for crash tests and the kill-trials benchmark."""

from __future__ import annotations

import os
import signal
import threading
from typing import Any

from hipbatch.emulator.common import Call, Reply
from hipbatch.emulator.server import CONTROL_PREFIX, LocalBatchServer


class TrapServer(LocalBatchServer):
    """The local batch server, able to SIGKILL one client process at its n-th API call or a while after its
    first one. The call that trips the trap is still processed: the client died after sending it."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._trap = threading.Lock()
        self.victim: int | None = None
        self.at_call = 0
        self.after_first: float | None = None
        self.calls = 0

    def arm(self, pid: int, at_call: int = 0, after_first: float | None = None) -> None:
        with self._trap:
            self.victim, self.at_call, self.after_first, self.calls = pid, at_call, after_first, 0

    def disarm(self) -> None:
        with self._trap:
            self.victim = None

    def kill(self, pid: int) -> None:
        """SIGKILL pid now, if it is still the armed victim."""
        with self._trap:
            if self.victim != pid:
                return
            self.victim = None
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def _respond(self, call: Call) -> Reply | None:
        if not call.path.startswith(CONTROL_PREFIX):  # control calls are not the client's
            with self._trap:
                pid = self.victim
                self.calls += 1
                first, nth = self.calls == 1, self.calls == self.at_call
            if pid is not None and nth:
                self.kill(pid)
            elif pid is not None and first and self.after_first is not None:
                threading.Timer(self.after_first, self.kill, args=(pid,)).start()
        return super()._respond(call)
