"""How far a long command (``check``, ``keys rotate``) got: a progress bar (tqdm) when stderr is a
terminal, plain lines otherwise (logs, CI, pipes), where a bar's carriage returns would be noise.

A ``ProgressReport`` is the ``progress(phase, done, total)`` callback the core and the keyring
take; it only ever writes to its stream (stderr), so stdout stays the command's result.
"""

from __future__ import annotations

import sys
from typing import TextIO

from tqdm import tqdm

PLAIN_STEPS = 10  # plain lines per phase: at 0, every tenth of the way, and at the end


class ProgressReport:
    def __init__(self, command: str, stream: TextIO | None = None, *, bar: bool | None = None) -> None:
        self.command = command
        self.stream = stream if stream is not None else sys.stderr
        self.bar = _is_terminal(self.stream) if bar is None else bar
        self._phase: str | None = None
        self._tqdm: tqdm | None = None
        self._shown = -1  # the last plain step written

    def __call__(self, phase: str, done: int, total: int) -> None:
        if phase != self._phase:
            self._end_phase()
            self._phase, self._shown = phase, -1
            if self.bar:
                self._tqdm = tqdm(total=total, desc=f"{self.command}: {phase}", file=self.stream,
                                  unit=" " + phase.split()[-1], dynamic_ncols=True, leave=True)
        if self._tqdm is not None:
            self._tqdm.update(done - self._tqdm.n)
            return
        step = PLAIN_STEPS if total == 0 else done * PLAIN_STEPS // total
        if step > self._shown:
            self._shown = step
            percent = 100 if total == 0 else done * 100 // total
            print(f"{self.command}: {phase} {done}/{total} ({percent}%)", file=self.stream, flush=True)

    def _end_phase(self) -> None:
        if self._tqdm is not None:
            self._tqdm.close()
            self._tqdm = None

    def close(self) -> None:
        self._end_phase()

    def __enter__(self) -> "ProgressReport":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
