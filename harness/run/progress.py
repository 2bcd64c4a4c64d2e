"""Progress of a run on the driver: an overall bar, one bar per running cell, a cost-weighted ETA.

Workers report :class:`ShardProgress` while a shard runs (after every
attack step, throttled), so a bar moves within seconds even on a robust
model whose examples all run to the last step. The ETA weights every cell
by its own measured cost: a cell's seconds per example come from its
finished shards and from the running ones, counted as the fraction of their
steps already taken (an attack never runs more than its schedule's steps,
so that fraction is a lower bound on the work done); cells not started yet
are charged the mean cost of the started ones.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field

from tqdm.auto import tqdm

from .cells import Cell, Shard
from .runner import ShardOutcome, ShardProgress

__all__ = ["RunProgress"]


@dataclass
class _CellCost:
    examples: int
    label: str
    finished: int = 0  # examples of finished (or skipped) shards
    seconds: float = 0.0  # compute time of finished shards
    running: dict = field(default_factory=dict)  # shard id -> latest ShardProgress
    bar: tqdm | None = None

    def done_equivalent(self) -> float:
        """Examples' worth of work done: finished shards, plus running shards by their share of steps."""
        running = 0.0
        for progress in self.running.values():
            share = max(progress.decided / progress.examples, progress.step / max(progress.steps, 1))
            running += min(share, 1.0) * progress.examples
        return self.finished + running

    def spent(self) -> float:
        return self.seconds + sum(progress.seconds for progress in self.running.values())

    def cost_per_example(self) -> float | None:
        done = self.done_equivalent()
        return self.spent() / done if done > 0 and self.spent() > 0 else None


class RunProgress:
    """Bars for a run: overall examples, and the cells running now.

    Parameters
    ----------
    cells : list of Cell
    shards : list of Shard
    workers : int
        Shards running at once (the ETA divides the remaining cost by it).
    stream : file, default standard error
    """

    def __init__(self, cells: list[Cell], shards: list[Shard], workers: int = 1, stream=sys.stderr):
        self.workers = max(1, workers)
        self.stream = stream
        per_cell = {}
        for shard in shards:
            per_cell[shard.cell.cell_id] = per_cell.get(shard.cell.cell_id, 0) + shard.stop - shard.start
        self.cells = {
            cell.cell_id: _CellCost(per_cell[cell.cell_id], f"{cell.model} {cell.label}")
            for cell in cells
            if cell.cell_id in per_cell
        }
        self.total = sum(cost.examples for cost in self.cells.values())
        self.overall = tqdm(
            total=self.total, desc="examples", unit="ex", file=stream, mininterval=0.5, dynamic_ncols=True,
            bar_format="{desc} {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]",
        )
        self.started = time.perf_counter()

    def _bar(self, cell_id: str) -> tqdm:
        cost = self.cells[cell_id]
        if cost.bar is None:
            cost.bar = tqdm(
                total=cost.examples, desc=cost.label, unit="ex", file=self.stream, leave=False, mininterval=0.5,
                dynamic_ncols=True, bar_format="  {desc} {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt}{postfix}",
            )
        return cost.bar

    def eta_seconds(self) -> float | None:
        """Remaining cost over the workers: each cell's remaining examples times its measured cost per example."""
        measured = [c for c in (cost.cost_per_example() for cost in self.cells.values()) if c is not None]
        if not measured:
            return None
        fallback = sum(measured) / len(measured)
        remaining = 0.0
        for cost in self.cells.values():
            per_example = cost.cost_per_example() or fallback
            remaining += max(cost.examples - cost.done_equivalent(), 0.0) * per_example
        return remaining / self.workers

    def status(self, text: str) -> None:
        """What the run is doing before any shard reports (starting workers, loading data)."""
        self.overall.set_postfix_str(text, refresh=False)
        self.overall.refresh()

    def _refresh(self) -> None:
        decided = sum(
            cost.finished + sum(p.decided for p in cost.running.values()) for cost in self.cells.values()
        )
        self.overall.n = min(decided, self.total)
        eta = self.eta_seconds()
        self.overall.set_postfix_str(f"ETA {_clock(eta)}" if eta is not None else "ETA ?", refresh=False)
        self.overall.refresh()

    def shard_progress(self, progress: ShardProgress) -> None:
        """A running shard's latest state (examples decided, step, radius)."""
        cost = self.cells[progress.cell_id]
        cost.running[progress.shard_id] = progress
        bar = self._bar(progress.cell_id)
        bar.n = min(cost.finished + sum(p.decided for p in cost.running.values()), cost.examples)
        where = f"{progress.stage} ({progress.step + 1}/{progress.steps})" if progress.stage else f"step {progress.step}/{progress.steps}, eps {progress.eps:.3g}"
        bar.set_postfix_str(where, refresh=False)
        bar.refresh()
        self._refresh()

    def shard_done(self, cell_id: str, outcome: ShardOutcome) -> None:
        cost = self.cells[cell_id]
        cost.running.pop(outcome.shard_id, None)
        cost.finished += outcome.examples
        cost.seconds += outcome.seconds
        if cost.finished >= cost.examples:
            if cost.bar is not None:
                cost.bar.close()
                cost.bar = None
        else:
            bar = self._bar(cell_id)
            bar.n = cost.finished
            bar.refresh()
        self._refresh()

    def close(self) -> None:
        for cost in self.cells.values():
            if cost.bar is not None:
                cost.bar.close()
        self.overall.close()


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes:02d}:{seconds:02d}"
