"""Preemption: SIGTERM / SIGINT stop training at a step boundary, after a checkpoint.

While the training loop runs (`StopRequest.deferred`), the first signal only records itself: the
loop finishes its step (or eval, or checkpoint write), checkpoints and returns, and `segjax train`
exits with 128 + the signal number (143 SIGTERM, 130 SIGINT), so schedulers see an unfinished run.
A signal before the first step, or a second one, stops at once with the same status (`Interrupted`);
nothing new is saved. With several processes, `stop_requested` makes all of them stop at one step.
"""
from __future__ import annotations

import contextlib
import signal

import jax

from segjax import distributed
from segjax.errors import SegjaxError


class Interrupted(SegjaxError):
    """A stop signal that could not wait for a checkpoint: exit status 128 + the signal's number."""

    def __init__(self, signame: str, message: str):
        super().__init__(message)
        self.exit_status = 128 + int(signal.Signals[signame])


class StopRequest:
    """SIGTERM/SIGINT. While `deferred` the first signal only sets `signal`; before that (data, model,
    restore: nothing new to save) or on a second signal, Interrupted is raised at once. Handlers are
    restored on exit."""

    def __init__(self, workdir: str = ""):
        self.signal = None
        self.deferred = False
        self.elsewhere = None  # multi-process: a signal another process got (we stop with it)
        self.workdir = workdir

    @property
    def name(self) -> str | None:
        """The signal that stops this run, received here or by another process."""
        return self.signal or self.elsewhere

    @contextlib.contextmanager
    def installed(self):
        def handler(signum, frame):
            name = signal.Signals(signum).name
            if self.deferred and self.signal is None:
                self.signal = name
                return
            when = "again" if self.signal else "before the first step"
            self.signal = name
            raise Interrupted(name, f"{name} received {when}: stopped without saving; run the same command "
                                    f"again to resume from the last checkpoint in {self.workdir}")
        previous = {}
        try:
            for s in (signal.SIGTERM, signal.SIGINT):
                previous[s] = signal.signal(s, handler)
        except ValueError:  # not the main thread: no signal handling
            pass
        try:
            yield self
        finally:
            for s, h in previous.items():
                signal.signal(s, h)


def stop_requested(stop: StopRequest, step: int, every: int) -> bool:
    """Whether to leave the training loop now. Several processes must stop at the same step (the
    checkpoint is collective) although a signal may reach them at different steps or only some of
    them: they compare notes every `every` steps (one tiny collective that waits for the devices)."""
    if jax.process_count() == 1:
        return stop.signal is not None
    if step % every:
        return False
    signum = distributed.max_over_processes(int(signal.Signals[stop.signal]) if stop.signal else 0)
    if signum and stop.signal is None:  # not stop.signal: a later signal here must not count as a second one
        stop.elsewhere = signal.Signals(signum).name
    return bool(signum)
