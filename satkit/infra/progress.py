"""Progress: tqdm on a terminal, one plain line every ~5% of a pass in a log file."""
from __future__ import annotations

import math
import sys
import time
from typing import Any, Iterable, Iterator, TextIO

# --------------------------------------------------------------------------------------------
# Progress: tqdm on a terminal, plain lines in a log file
# --------------------------------------------------------------------------------------------
PROGRESS_LINES = 20  # lines per pass of known length when the output is not a terminal


class PlainProgress:
    """tqdm's interface (iterate, update, set_postfix, write, close) printing one whole line every
    `every` steps: in a log file, CI or nohup output, tqdm's carriage-return redraws are junk."""

    def __init__(self, iterable: Iterable[Any] | None = None, *, desc: str = "", total: int | None = None,
                 unit: str = "it", every: int | None = None, disable: bool = False, file: TextIO | None = None,
                 initial: int = 0):
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)  # type: ignore[arg-type]
        self.iterable, self.desc, self.total, self.unit, self.disable = iterable, desc, total, unit, disable
        self.every = every or (max(1, math.ceil(total / PROGRESS_LINES)) if total else 100)
        self.file = file
        self.n, self.printed_at, self.initial, self.postfix = initial, initial, initial, ""  # initial: resumed
        self.start = time.monotonic()

    def __iter__(self) -> Iterator[Any]:
        if self.iterable is None:
            raise TypeError("PlainProgress was created without an iterable")
        try:
            for item in self.iterable:
                yield item
                self.update()
        finally:
            self.close()

    def __enter__(self) -> "PlainProgress":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.n - self.printed_at >= self.every or (self.total is not None and self.n == self.total):
            self._print_line()

    def set_postfix(self, **values: Any) -> None:
        self.postfix = ", ".join(f"{key}={value}" for key, value in values.items())

    def set_postfix_str(self, text: str) -> None:
        self.postfix = text

    def write(self, text: str, file: TextIO | None = None) -> None:
        print(text, file=file or self._stream(), flush=True)

    def close(self) -> None:
        if self.n > self.printed_at:  # the last partial stretch, once
            self._print_line()

    def _stream(self) -> TextIO:
        return self.file or sys.stderr  # looked up at each write, so redirections made later still apply

    def _print_line(self) -> None:
        self.printed_at = self.n
        if self.disable:
            return
        from tqdm import tqdm

        elapsed = time.monotonic() - self.start
        rate = (self.n - self.initial) / elapsed if elapsed > 0 else 0.0
        done = f"{self.n}/{self.total} ({100 * self.n / self.total:.0f}%)" if self.total else f"{self.n}"
        eta = (f", ETA {tqdm.format_interval((self.total - self.n) / rate)}"
               if self.total and rate > 0 else "")
        postfix = f" {self.postfix}," if self.postfix else ""
        print(f"{self.desc}: {done}{postfix} {rate:.1f} {self.unit}/s, elapsed {tqdm.format_interval(elapsed)}{eta}",
              file=self._stream(), flush=True)


def progress_bar(iterable: Iterable[Any] | None = None, *, desc: str = "", total: int | None = None, unit: str = "it",
             every: int | None = None, disable: bool = False, file: TextIO | None = None, initial: int = 0) -> Any:
    """A progress bar for train.py, eval.py and packing: tqdm when `file` (default stderr) is a terminal,
    otherwise a PlainProgress printing one line every `every` steps (default: ~20 lines a pass)."""
    stream = file or sys.stderr
    isatty = getattr(stream, "isatty", None)
    if isatty is not None and isatty():
        from tqdm import tqdm

        return tqdm(iterable, desc=desc, total=total, unit=unit, disable=disable, dynamic_ncols=True, file=stream,
                    initial=initial)
    return PlainProgress(iterable, desc=desc, total=total, unit=unit, every=every, disable=disable, file=file,
                         initial=initial)
