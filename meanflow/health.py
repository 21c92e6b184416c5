"""What may stop a training run between two steps, read without stalling the device.

    stop, health = StopRequest(), Health(device)
    health.add(step, nonfinite)                   # every step: device tensors only
    state = health.sync(accelerator, stop, over_budget)   # at sync points: one host read

``FaultHooks`` is the test suite's fault injection. The entry point builds it from the
environment (``FaultHooks.from_env``) and passes it to the loop; nothing else reads these
variables.
"""
from __future__ import annotations

import os
import signal
from dataclasses import dataclass, field
from typing import Optional

import torch

NAN_ENV = "MEANFLOW_INJECT_NAN_STEPS"    # comma-separated optimizer steps whose loss is NaN
KILL_ENV = "MEANFLOW_KILL_AFTER_STEP"    # hard exit (as if killed) once this step is done
GRID_FAIL_ENV = "MEANFLOW_FAIL_VALIDATION_GRID"   # "1": the validation grid raises


@dataclass(frozen=True)
class FaultHooks:
    """Faults injected at known points: NaN losses, a kill after a step, a failing grid."""

    nan_steps: frozenset = frozenset()
    kill_after: Optional[int] = None
    grid_fails: bool = False

    @classmethod
    def from_env(cls, env=os.environ) -> "FaultHooks":
        def number(name: str, raw: str) -> int:
            try:
                return int(raw)
            except ValueError:
                raise ValueError(f"{name}={env.get(name)!r}: expected integers") from None
        nan = frozenset(number(NAN_ENV, s) for s in env.get(NAN_ENV, "").split(",")
                        if s.strip())
        kill = env.get(KILL_ENV, "").strip()
        return cls(nan, number(KILL_ENV, kill) if kill else None, env.get(GRID_FAIL_ENV) == "1")

    def nan(self, step: int) -> bool:
        return step in self.nan_steps

    def after_step(self, step: int) -> None:
        if step == self.kill_after:
            os._exit(137)


class StopRequest:
    """SIGTERM / SIGINT: finish the current step, checkpoint, exit 0."""

    def __init__(self):
        self.why = ""
        for s in (signal.SIGTERM, signal.SIGINT):
            signal.signal(s, self._on_signal)

    def _on_signal(self, signum, _frame) -> None:
        self.why = signal.Signals(signum).name


@dataclass
class SyncState:
    """The run's state at a sync point, the same on every process."""

    stopping: bool          # a signal, or the time budget spent
    streak: int             # consecutive non-finite steps
    skipped: int            # non-finite (skipped) steps of this session
    bad_steps: list = field(default_factory=list)   # the non-finite steps since the last sync


class Health:
    """Non-finite steps, counted on the device and read at sync points only."""

    def __init__(self, device):
        self.device = device
        self.streak = torch.zeros((), device=device)     # consecutive non-finite steps
        self.skipped = torch.zeros((), device=device)
        self.pending: list = []                          # (step, nonfinite) since last read

    def add(self, step: int, nonfinite: torch.Tensor) -> None:
        self.streak = (self.streak + 1) * nonfinite
        self.skipped = self.skipped + nonfinite
        self.pending.append((step, nonfinite))

    def sync(self, accelerator, stop: StopRequest, over_budget: bool) -> SyncState:
        """One host read (and, with several processes, one all-reduce of the maxima)."""
        dev = self.device
        state = torch.stack([torch.tensor(float(bool(stop.why)), device=dev),
                             torch.tensor(float(over_budget), device=dev),
                             self.streak, self.skipped,
                             *[nf.float() for _, nf in self.pending]])
        if accelerator.num_processes > 1:
            torch.distributed.all_reduce(state, op=torch.distributed.ReduceOp.MAX)
        signalled, over, streak, skipped, *bad = state.tolist()
        bad_steps = [at for (at, _), b in zip(self.pending, bad) if b]
        self.pending = []
        return SyncState(signalled > 0 or over > 0, int(streak), int(skipped), bad_steps)
