"""Wall time per phase of a run, kept in its record as ``phase_seconds``.

Where a run's minutes go (loading the dataset, building the stages, the encoder warm-up, training epochs,
validations, the late-fusion choice, the tests) decides what to make faster, and the speed targets and the
one-GPU-against-two table ask for it per phase. Read from the run itself, it needs no profiler and no second run.

A phase opened inside another counts towards the outer one (the warm-up's own epochs are warm-up time, not
training time), so the phases never overlap and ``other`` (the run's wall time less their sum: logging, checkpoints,
the run state) closes the account. On a GPU each phase ends with ``torch.cuda.synchronize``, so queued kernels are
charged to the phase that launched them. A resumed run counts what this process ran.
"""

from __future__ import annotations

import time
from contextlib import contextmanager, nullcontext
from contextvars import ContextVar
from typing import Optional

import torch

_active: ContextVar[Optional["PhaseTimer"]] = ContextVar("phase_timer", default=None)


def phase(name: str):
    """Time what the block runs as ``name`` on the run's timer (``PhaseTimer.active``); nothing happens outside a
    run (a trainer or a model built by hand, in a test)."""
    timer = _active.get()
    return timer.phase(name) if timer is not None else nullcontext()


class PhaseTimer:
    """Seconds per named phase, summed over every time the phase ran (``seconds``)."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self._open = None  # the phase being timed; one opened inside it is not timed apart

    @contextmanager
    def active(self):
        """This timer is the one :func:`phase` times on while the block runs (``quick_start.run``)."""
        token = _active.set(self)
        try:
            yield self
        finally:
            _active.reset(token)

    @contextmanager
    def phase(self, name: str):
        if self._open is not None:
            yield
            return
        self._open, start = name, time.perf_counter()
        try:
            yield
        finally:
            if torch.cuda.is_available() and torch.cuda.is_initialized():
                torch.cuda.synchronize()
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
            self._open = None

    def account(self, total_seconds: float) -> dict[str, float]:
        """The phases, ``other`` (``total_seconds`` less their sum) and ``total``, rounded to 0.1 s: the record's
        ``phase_seconds``."""
        phases = dict(self.seconds)
        phases["other"] = max(total_seconds - sum(phases.values()), 0.0)
        phases["total"] = total_seconds
        return {name: round(seconds, 1) for name, seconds in phases.items()}


def describe(phase_seconds: dict[str, float]) -> str:
    """``phase_seconds`` as one log line: ``dataset 3.1 s, stages 88.0 s, ..., total 412.5 s``."""
    return ", ".join(f"{name} {seconds:.1f} s" for name, seconds in phase_seconds.items())
