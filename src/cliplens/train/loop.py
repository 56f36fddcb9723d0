"""The training loop every trainer here shares (CLIP, robust towers, ClipCap): epochs of
optimiser steps over an order of the data, a time limit, checkpoints and exact resume.

Written once so that the three behave alike: a run stops after `max_minutes` (or
`max_steps`) with a checkpoint; OUT/last.pt is written atomically every
`checkpoint_every` steps, at each epoch's end and when the run stops; it holds the
trained modules, the optimiser, the schedule, every random generator, the epoch's order
of the data and the position in it, so a resumed run takes the same steps, with the same
numbers, as one that never stopped. A loss that is no longer a number stops the run
before that step is applied or saved. Each step and each evaluation is a line of
OUT/log.jsonl; a resumed run first drops the lines written after its checkpoint, so the
steps it takes again appear once.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import torch
import torch.distributed as dist

from cliplens.device import Precision
from cliplens.errors import ClipLensError, InvalidInputError
from cliplens.limits import (
    MAX_EPOCHS,
    MAX_LR,
    MAX_MINUTES,
    MAX_SEED,
    MAX_TRAIN_STEPS,
    finite_number,
    whole_number,
)
from cliplens.progress import progress_bar
from cliplens.store.files import write_atomic, write_atomic_binary

CHECKPOINT = "last.pt"
LOG = "log.jsonl"
TRAINING_PRECISIONS = (Precision.FP32, Precision.BF16)


def training_precision(value: Precision | str) -> Precision:
    """The precision a run trains in: fp32, or bf16 autocast."""
    try:
        precision = Precision(value)
    except ValueError:
        precision = None
    if precision not in TRAINING_PRECISIONS:
        raise InvalidInputError(f"`precision` {value}: use bf16 or fp32")
    return precision


def check_schedule(
    lr: float, epochs: int, warmup: int, max_minutes: float | None, seed: int
) -> None:
    """The numbers every training run here shares: a learning rate that can work (finite,
    > 0, at most MAX_LR), whole epochs and warmup steps, a time limit, a seed."""
    finite_number(lr, "learning rate", 0, MAX_LR, low_open=True, example="1e-3")
    whole_number(epochs, "epochs", 1, MAX_EPOCHS)
    whole_number(warmup, "warmup steps", 0, MAX_TRAIN_STEPS)
    if max_minutes is not None:
        finite_number(max_minutes, "time limit (minutes)", 0, MAX_MINUTES, low_open=True)
    whole_number(seed, "seed", 0, MAX_SEED)


class DivergedError(ClipLensError):
    """The loss became nan or inf: the run stops before that step is applied or saved."""


def check_loss(loss: float, step: int, lr: float, out: Path) -> None:
    """Stop a run whose loss is no longer a number, before the optimiser applies the step:
    its checkpoint keeps the last good state and no model is written."""
    if not math.isfinite(loss):
        raise DivergedError(
            f"training diverged at step {step + 1} (loss {loss}): stopped before applying that "
            f"step, and no model was written. Lower the learning rate (it was {lr:g}) or train "
            f"in fp32, in a new run folder (not {out})"
        )


def warmup_cosine(warmup: int, total_steps: int) -> Callable[[int], float]:
    """LambdaLR factor: linear warmup over `warmup` steps, then cosine to 0 at total_steps."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def warmup_cosine_schedule(
    optimizer: torch.optim.Optimizer, warmup: int, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """The learning-rate schedule of every trainer here: `warmup_cosine` on `optimizer`."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(warmup, total_steps))


def rng_state() -> dict[str, Any]:
    """Every global generator a training run draws from, for an exact resume."""
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state()}
    return state | {"python": random.getstate()}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def set_seed(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def _plain(value: Any) -> Any:
    """Settings as JSON has them (tuples as lists, enums as their values): what a
    checkpoint records and is compared by."""
    return json.loads(json.dumps(value, default=str))


# ------------------------------------------------------------------ processes


@dataclass(frozen=True)
class Processes:
    """This process's place among those of a torchrun job (rank 0 of 1 without one)."""

    rank: int = 0
    size: int = 1

    @classmethod
    def join(cls) -> Processes:
        """Join torchrun's process group (gloo on CPU, nccl on GPU) when there is one."""
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        return cls()

    @property
    def main(self) -> bool:
        """The process that writes checkpoints, logs and models, and evaluates."""
        return self.rank == 0

    def any(self, flag: bool) -> bool:
        """True in every process when it is true in one (all stop at the same step)."""
        if self.size == 1:
            return flag
        t = torch.tensor(int(flag))
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t)

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()


# ------------------------------------------------------------------ the loop


@dataclass(frozen=True)
class LoopSettings:
    """How long a run goes and how often it checkpoints."""

    epochs: int
    steps_per_epoch: int
    lr: float  # named when the loss diverges
    checkpoint_every: int = 200  # optimiser steps
    max_minutes: float | None = None  # stop (checkpoint and save) after this long
    max_steps: int | None = None  # stop after this many steps in all, resumed ones included
    grad_clip: float = 0.0  # gradient norm clipping (0: none)

    @classmethod
    def of(cls, cfg: Any, steps_per_epoch: int, max_steps: int | None) -> LoopSettings:
        """The settings a trainer's config holds (epochs, lr, checkpoint_every,
        max_minutes, grad_clip): the same fields in every config here."""
        return cls(
            epochs=cfg.epochs,
            steps_per_epoch=steps_per_epoch,
            lr=cfg.lr,
            checkpoint_every=cfg.checkpoint_every,
            max_minutes=cfg.max_minutes,
            max_steps=max_steps,
            grad_clip=cfg.grad_clip,
        )


@dataclass
class LoopOutcome:
    """What a run (this call of it) did."""

    steps: int  # optimiser steps in all, those before a resume included
    epochs_done: int
    losses: list[float]  # per optimiser step of this call
    metrics: list[dict[str, Any]]  # per epoch's evaluation
    log: list[dict[str, Any]]  # the step rows of this call, as OUT/log.jsonl has them
    minutes: float
    stopped_early: bool
    finished: bool  # every epoch done, or stopped on a limit: the model is to be written


# the body of one optimiser step: (the epoch's order, batch number) -> the step's loss,
# with its gradients computed (and summed across processes)
Step = Callable[[np.ndarray, int], float]
# an epoch's evaluation: (epoch done, steps done, minutes) -> its log row
Evaluate = Callable[[int, int, float], dict[str, Any]]


@dataclass
class TrainingLoop:
    """The optimiser, its schedule and what they train, run for `settings` from OUT.

    `modules` are saved in the checkpoint by name (their state dicts at its top level);
    `identity` is what a checkpoint must have been written with to be resumed (the run's
    settings); `generator`, when the data's order and draws come from one, is saved and
    restored with it."""

    out: Path
    identity: dict[str, Any]
    modules: dict[str, torch.nn.Module]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    settings: LoopSettings
    order: Callable[[int], np.ndarray]  # epoch -> the order its steps take the data in
    generator: np.random.Generator | None = None
    processes: Processes = field(default_factory=Processes)
    step: int = 0
    epoch: int = 0
    _epoch_order: np.ndarray | None = None

    @property
    def checkpoint(self) -> Path:
        return self.out / CHECKPOINT

    def resume(self, device: str | torch.device = "cpu") -> bool:
        """Load OUT/last.pt when there is one; False when the run starts afresh."""
        if not self.checkpoint.is_file():
            if self.processes.main:  # the lines of a run killed before its first checkpoint
                _log_until(self.out / LOG, 0)
            return False
        state = torch.load(self.checkpoint, map_location=device, weights_only=False)
        if state["config"] != _plain(self.identity):
            raise InvalidInputError(
                f"{self.checkpoint} was written with other settings; use another `out_dir`"
            )
        for name, module in self.modules.items():
            module.load_state_dict(state[name])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step, self.epoch = state["step"], state["epoch"]
        set_rng_state(state["rng"])
        if self.generator is not None:
            self.generator.bit_generator.state = state["generator"]
        self._epoch_order = state.get("order")
        if self.processes.main:
            _log_until(self.out / LOG, self.step)
        return True

    def save(self) -> None:
        """Write OUT/last.pt (atomically: a crash leaves the previous one)."""
        if not self.processes.main:
            return
        state: dict[str, Any] = {name: m.state_dict() for name, m in self.modules.items()}
        state |= {
            "config": _plain(self.identity),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "step": self.step,
            "epoch": self.epoch,
            "rng": rng_state(),
            "order": self._epoch_order,
        }
        if self.generator is not None:
            state["generator"] = self.generator.bit_generator.state
        write_atomic_binary(self.checkpoint, lambda f: torch.save(state, f))

    def run(
        self,
        step: Step,
        parameters: Iterable[torch.nn.Parameter],
        evaluate: Evaluate | None = None,
        after_step: Callable[[], None] | None = None,
        label: str = "training",
        progress: bool = False,
    ) -> LoopOutcome:
        """Take the steps left: `step` computes a batch's gradients, the loop checks the
        loss, clips the gradients of `parameters`, steps the optimiser and the schedule,
        then `after_step` (a clamp, say); `evaluate` runs after each epoch."""
        s = self.settings
        run = _Run(list(parameters), step, after_step, time.perf_counter())
        outcome = LoopOutcome(self.step, self.epoch, [], [], [], 0.0, False, False)
        if self.processes.main:
            run.log = (self.out / LOG).open("a", encoding="utf-8", buffering=1)
        try:
            with progress_bar(s.steps_per_epoch * s.epochs - self.step, label, progress) as bar:
                while self.epoch < s.epochs and not outcome.stopped_early:
                    outcome.stopped_early = self._epoch(run, outcome, bar)
                    if not outcome.stopped_early:
                        self.epoch += 1
                        if evaluate is not None and self.processes.main:
                            minutes = round(run.seconds() / 60, 2)
                            metrics = evaluate(self.epoch, self.step, minutes)
                            outcome.metrics.append(metrics)
                            run.write(metrics)
                    self.save()
                    self.processes.barrier()
        finally:
            if run.log is not None:
                run.log.close()
        outcome.steps, outcome.epochs_done = self.step, self.epoch
        outcome.minutes = run.seconds() / 60
        outcome.finished = self.epoch >= s.epochs or outcome.stopped_early
        return outcome

    def _epoch(self, run: _Run, outcome: LoopOutcome, advance: Callable[[int], None]) -> bool:
        """The rest of this epoch's steps; True when a limit stopped the run."""
        s = self.settings
        first = self.step - self.epoch * s.steps_per_epoch  # resume inside an epoch
        if first == 0 or self._epoch_order is None:
            self._epoch_order = self.order(self.epoch)
        for k in range(first, s.steps_per_epoch):
            value = self._one_step(run, k)
            outcome.losses.append(value)
            advance(1)
            seconds = run.seconds()
            row = {"step": self.step, "epoch": self.epoch, "loss": round(value, 6)}
            row |= {"lr": self.scheduler.get_last_lr()[0], "seconds": round(seconds, 3)}
            outcome.log.append(row)
            run.write(row)
            # every process has the same settings: without a limit there is nothing to agree on
            out_of_time = bool(s.max_minutes) and self.processes.any(
                seconds > 60 * (s.max_minutes or 0)
            )
            if (s.max_steps and self.step >= s.max_steps) or out_of_time:
                return True
            if self.step % s.checkpoint_every == 0:
                self.save()
        return False

    def _one_step(self, run: _Run, k: int) -> float:
        assert self._epoch_order is not None
        self.optimizer.zero_grad(set_to_none=True)
        value = run.step(self._epoch_order, k)
        check_loss(value, self.step, self.settings.lr, self.out)  # every process: the same sum
        if self.settings.grad_clip:
            torch.nn.utils.clip_grad_norm_(run.parameters, self.settings.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        if run.after_step is not None:
            run.after_step()
        self.step += 1
        return value


@dataclass
class _Run:
    """One call of `TrainingLoop.run`: what it steps with, its clock and its log file."""

    parameters: list[torch.nn.Parameter]
    step: Step
    after_step: Callable[[], None] | None
    start: float
    log: TextIO | None = None

    def seconds(self) -> float:
        return time.perf_counter() - self.start

    def write(self, row: dict[str, Any]) -> None:
        if self.log is not None:
            self.log.write(json.dumps(row) + "\n")


def _log_until(log: Path, step: int) -> None:
    """OUT/log.jsonl without the rows written after the checkpoint a run resumes from (and
    a line a kill cut short): the steps taken again are logged once."""
    if not log.is_file():
        return
    lines = log.read_text(encoding="utf-8").splitlines()

    def before(line: str) -> bool:
        try:
            row = json.loads(line)
        except ValueError:
            return False
        return not isinstance(row, dict) or row.get("step", 0) <= step

    kept = [line for line in lines if before(line)]
    if len(kept) != len(lines):
        text = "".join(line + "\n" for line in kept)
        write_atomic(log, lambda tmp: tmp.write_text(text, encoding="utf-8"))
