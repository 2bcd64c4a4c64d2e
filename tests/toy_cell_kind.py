"""A kind of cell defined outside the harness: the model's clean predictions, one row per example.

It exists to show (and test) that a new kind needs only its own module: a
block dataclass, an expansion, a shard run, a store table and a summary.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa
import torch

from harness.attack.ball import Ball
from harness.run.cells import SHARED_CONFIG_COLUMNS, Cell, CellOutcome, check_cell_basics, check_setting
from harness.run.fields import setting
from harness.run.store import StoreTable, read_cell, write_shard
from harness.vocabulary import BallKind

PREDICTIONS = StoreTable("clean_predictions", pa.schema([
    pa.field("schema_version", pa.int16(), nullable=False),
    pa.field("cell_id", pa.string(), nullable=False),
    pa.field("shard_id", pa.string(), nullable=False),
    pa.field("example_index", pa.int64(), nullable=False),
    pa.field("label", pa.int16()),
    pa.field("prediction", pa.int16()),
]))


@dataclass
class CleanBlock:
    clean_predictions: bool = True
    dataset: str | None = None
    model: str | None = None
    seed: int = setting(0, at_least=0)
    n_examples: int | None = setting(None, at_least=1)


@dataclass(frozen=True)
class CleanPredictionsCell(Cell):
    """The model's predictions on clean images: its robust accuracy at radius 0."""

    marker: ClassVar[str | None] = "clean_predictions"
    block: ClassVar[type] = CleanBlock
    table: ClassVar[StoreTable] = PREDICTIONS

    @classmethod
    def from_settings(cls, settings, problems, where):
        before = len(problems)
        check_cell_basics(settings, problems, where)
        check_setting(CleanBlock, "clean_predictions", settings["clean_predictions"], problems, where)
        seed = check_setting(CleanBlock, "seed", settings["seed"], problems, where)
        n_examples = check_setting(CleanBlock, "n_examples", settings.get("n_examples"), problems, where)
        if len(problems) > before:
            return None, set()
        return cls(settings["dataset"], settings["model"], Ball(BallKind.LINF), seed, n_examples), set()

    @property
    def label(self) -> str:
        return "clean predictions"

    @property
    def final_eps(self) -> float:
        return 0.0

    def config(self) -> dict[str, Any]:
        return {"clean_predictions": True, "dataset": self.dataset, "model": self.model, "seed": self.seed,
                "n_examples": self.n_examples}

    def columns(self) -> dict[str, Any]:
        columns = dict.fromkeys(SHARED_CONFIG_COLUMNS)
        columns.update(self.ball.config(), ball_title=self.ball.title, final_eps=0.0, seed=self.seed)
        return columns

    def run_shard(self, worker, shard, on_progress) -> None:
        images, labels = worker.examples(shard)
        with torch.no_grad():
            prediction = worker.model(self.model)(images.to(worker.device)).argmax(1).cpu().numpy()
        write_shard(worker.context.results_dir, PREDICTIONS, self.dataset, self.model, shard.shard_id, {
            "cell_id": [self.cell_id] * shard.size, "shard_id": [shard.shard_id] * shard.size,
            "example_index": np.arange(shard.start, shard.stop), "label": labels.numpy(), "prediction": prediction,
        })

    def outcome(self, worker) -> CellOutcome:
        rows = read_cell(worker.context.results_dir, PREDICTIONS, self.dataset, self.model, self.cell_id, ["example_index", "label", "prediction"])
        rows = rows.drop_duplicates("example_index")
        accuracy = float((rows["label"] == rows["prediction"]).mean()) if len(rows) else None
        return CellOutcome(len(rows), 0.0, accuracy, "no attack: the clean predictions", "clean images only")
