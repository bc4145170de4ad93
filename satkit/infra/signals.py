"""Stop signals: SIGTERM and SIGINT taken as a request to stop at a safe point (StopSignals; the training
loop's own is trainer.StopRequest)."""
from __future__ import annotations

import os
import signal
import threading
from typing import Any


class StopSignals:
    """SIGTERM and SIGINT (a scheduler's preemption, Ctrl-C) only set `received`, which the training loop
    reads at a safe point (after a step, after a checkpoint), so a checkpoint is never cut mid-write and
    the run can save where it stands. A second signal interrupts at once (KeyboardInterrupt).

    Under torchrun the first two signals are one request and the third interrupts: the agent forwards
    every signal it gets to each worker, so a job signalled as a whole (a scheduler's SIGTERM to all of
    its processes) reaches every worker twice, and a forward taken as "stop at once" would lose the save.
    Only signals this process got count: `received` set from another rank (StopRequest) does not.
    """

    def __init__(self) -> None:
        self.received: str | None = None
        self.signals = 0  # signals this process got
        self.patience = 2 if "TORCHELASTIC_RUN_ID" in os.environ else 1  # signals taken as one request
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: Any) -> None:
        self.signals += 1
        if self.signals > self.patience:
            raise KeyboardInterrupt
        self.received = self.received or signal.Signals(signum).name

    @property
    def exit_code(self) -> int:
        """The shell's code for a process ended by the signal: 130 for SIGINT, 143 for SIGTERM."""
        return 128 + signal.Signals[self.received].value if self.received else 0
