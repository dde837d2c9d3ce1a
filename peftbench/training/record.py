"""`RunRecord`: the one schema of a seed's result, from the run that writes it (`result.json`)
to everything that reads it back (reports, the sweep's trials, a board's committed cells).

A file that does not fit is refused with one line naming it and the field, never half-read.
Fields added after a board's cells were written are optional (None), so committed cells of
earlier versions still read back; nothing here changes a number.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt, ValidationError, model_validator

from peftbench.core.errors import UsageError
from peftbench.core.files import write_atomic

Metrics = dict[str, float]  # metric name -> value, with "main" (the task's main metric)


def read_json(path: str | Path) -> dict:
    """A run folder's JSON object, or a one-line UsageError naming the file (missing, cut, not
    JSON, not an object)."""
    path = Path(path)
    try:
        value = json.loads(path.read_text())
    except FileNotFoundError:
        raise UsageError(f"{path} is missing: the run folder is not complete (remove it, or "
                         "leave it out)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UsageError(f"{path} cannot be read ({type(err).__name__}: {str(err)[:120]}): the "
                         "run folder is damaged (remove it, or leave it out)") from None
    if not isinstance(value, dict):
        raise UsageError(f"{path} is not a JSON object: the run folder is damaged")
    return value


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Counts(_Strict):
    """Trainable entries, counted one way for every method (`modeling.sparse.count_trainable`)."""

    encoder: NonNegativeInt
    new: NonNegativeInt
    head: NonNegativeInt
    trainable: NonNegativeInt
    total: NonNegativeInt


class ConstantPredictor(_Strict):
    """The constant prediction the training set suggests, scored (`data.metrics.constant_predictor`)."""

    prediction: float | int | str  # a class id, a mean label, or a causal-LM answer
    test_rows: NonNegativeInt
    validation: Metrics
    test: Metrics


class Predictions(_Strict):
    """A seed's per-example test predictions and labels, kept with the cell so that paired
    tests over the test examples (bootstrap, McNemar) can be run later: a class id or a score
    per example, or for a causal-LM task one list per metric ({"exact_match": answers,
    "answer_loglik": values}); `num_classes` for metrics that must know every class. Scores are
    float32 values written as their shortest decimals: read them back as float32."""

    predictions: list[int] | list[float] | dict[str, list]
    labels: list[int] | list[float] | list[str]
    num_classes: int | None = None

    @model_validator(mode="after")
    def _aligned(self):
        lengths = ({len(v) for v in self.predictions.values()} if isinstance(self.predictions, dict)
                   else {len(self.predictions)})
        if lengths != {len(self.labels)}:
            raise ValueError(f"{sorted(lengths)} predictions for {len(self.labels)} labels")
        return self


class Forgetting(_Strict):
    """What a run kept, on the probe (`peftbench.training.forgetting`): its statistic before and after
    training (an encoder's Spearman, higher is better; a causal LM's next-token loss, lower is)."""

    probe: str
    statistic: Literal["spearman", "next_token_loss"] = "spearman"
    before: float
    after: float
    change: float


class PeakMemory(_Strict):
    scoring_bytes: NonNegativeInt
    training_bytes: NonNegativeInt
    kind: Literal["rss", "cuda_max_allocated"]
    since_reset: bool


class Diverged(_Strict):
    step: int
    loss: float


class Load(_Strict):
    """The machine's 1-minute load average around the run (None where the OS has none)."""

    before: float | None
    after: float | None
    cores: int | None


class RunRecord(_Strict):
    """One seed of one run: metrics at the best-validation checkpoint, counts, cost."""

    seed: int
    validation: Metrics
    test: Metrics
    best_epoch: int | None
    steps: NonNegativeInt
    trainable: Counts
    diverged: Diverged | None = None
    budget_entries: NonNegativeInt
    pretrained_entries: NonNegativeInt
    constant_predictor: ConstantPredictor
    head_init: dict = Field(default_factory=dict)
    scoring_time_s: float
    scores_from_cache: bool
    train_time_s: float
    steps_per_s: float | None = None
    peak_memory: PeakMemory | None = None
    trainable_by_tensor: dict[str, NonNegativeInt] = Field(default_factory=dict)
    load: Load | None = None
    padding: dict | None = None  # the pad token batches used (a decoder's is set: models.padding)
    test_predictions: Predictions | None = None  # None for cells written before peftbench stored them
    forgetting: Forgetting | None = None  # None: not measured (a causal LM; cells written before)
    # pre-head layers counted as head (models.untrained_pre_head), with the evidence; None: before 0.4
    untrained_as_head: dict[str, str] | None = None
    phases: list[dict] | None = None  # validation on both sides of each change of form (Selector.phases)
    reselections: list[dict] | None = None  # the mask chosen again (TrainConfig.reselect_every): step, entries, kept, seconds
    method_record: dict | None = None  # what the method reports about its own run (Selector.training_record)

    @model_validator(mode="after")
    def _counts_add_up(self):
        """Counts a run can have made: pre-trained entries trained within the model's, the
        budget within them, the trainable total their sum (a hand-edited 10**15 is refused)."""
        t = self.trainable
        if t.encoder > self.pretrained_entries or self.budget_entries > self.pretrained_entries:
            raise ValueError(f"{t.encoder:,} encoder entries trained (budget {self.budget_entries:,}) of "
                             f"{self.pretrained_entries:,} pre-trained: more than the model has")
        if t.trainable != t.encoder + t.new or t.total != t.trainable + t.head:
            raise ValueError(f"trainable {t.trainable:,} / total {t.total:,} are not encoder {t.encoder:,} "
                             f"+ new {t.new:,} (+ head {t.head:,})")
        return self

    @classmethod
    def read(cls, path: str | Path) -> "RunRecord":
        """The record in `path`, or a one-line UsageError naming the file and what is wrong."""
        path = Path(path)
        try:
            return cls.model_validate(read_json(path))
        except ValidationError as err:
            problem = err.errors()[0]
            where = ".".join(str(p) for p in problem["loc"])
            raise UsageError(f"{path} is not a run record: {where}: {problem['msg']}") from None

    def write(self, path: str | Path) -> None:
        """As `result.json` (through a temporary file: a full disk never leaves half a file)."""
        write_atomic(path, json.dumps(self.model_dump(mode="json"), indent=2))


NATURAL = "natural"  # the budget label of a method with a natural count (`uses_budget = False`)


def budget_label(method: str, budget: str) -> str:
    """A cell's budget as analyses see it: NATURAL for a method that does not use its budget
    (its count is its own), else the budget as given. The one place "natural" is decided."""
    from peftbench.contract import registry

    try:
        natural = not registry.get(method).uses_budget
    except UsageError:  # a plugin no longer installed: its runs keep their budget
        natural = False
    return NATURAL if natural else str(budget)


def analysis_row(record: RunRecord, *, task: str, method: str, budget: str, model: str,
                 metric_name: str, run_dir: str) -> dict:
    """One seed as a row of the analysis frame: the one builder, for runs read from a study's
    trials and from run folders alike (`sweep.state.trials_frame`, `analysis.frame.load_runs`)."""
    from peftbench.training.memory import mean_load, peak_memory_mb

    result = record.model_dump(mode="json")
    return {"task": task, "method": method, "budget": budget, "seed": record.seed,
            "metric": record.test["main"], "validation": record.validation["main"],
            "trainable": record.trainable.trainable, "head": record.trainable.head,
            "pretrained_entries": record.pretrained_entries,
            "constant_metric": record.constant_predictor.test.get("main", float("nan")),
            "test_rows": record.constant_predictor.test_rows,
            "metric_name": metric_name, "model": model,
            "scoring_time_s": record.scoring_time_s, "train_time_s": record.train_time_s,
            "steps_per_s": record.steps_per_s if record.steps_per_s is not None else float("nan"),
            "load_1min": mean_load(result), "peak_memory_mb": peak_memory_mb(result),
            "spend": dict(record.trainable_by_tensor), "run_dir": str(run_dir),
            "predictions": result.get("test_predictions"),
            "retention_after": record.forgetting.after if record.forgetting else float("nan"),
            "retention_change": record.forgetting.change if record.forgetting else float("nan"),
            "retention_statistic": record.forgetting.statistic if record.forgetting else None,
            "health": health_flags(record)}


def health_flags(record: RunRecord) -> list[str]:
    """What says a seed did not run the method as designed: the method's own flags
    (`Selector.training_record`), and a change of form (`Selector.phases`) reached from a model
    whose validation was at or below the constant predictor's (it learned nothing before it)."""
    flags = list((record.method_record or {}).get("flags") or [])
    floor = record.constant_predictor.validation.get("main")
    for phase in record.phases or []:
        before = (phase.get("validation_before") or {}).get("main")
        if before is not None and floor is not None and before <= floor + 1e-9:
            flags.append(f"validation before step {phase['step']} at the constant predictor "
                         f"({before:.3f} <= {floor:.3f})")
    return flags


def budget_blocks(budgets) -> list[str]:
    """The budgets an analysis compares at, in order of appearance: every budget but NATURAL,
    or NATURAL alone when no method used a budget."""
    return [b for b in dict.fromkeys(budgets) if b != NATURAL] or [NATURAL]


def at_budget(frame, budget: str):
    """The rows of an analysis frame that compete at `budget`: that budget's, and every
    natural-count method's (full fine-tuning, BitFit, LoRA, ... compete at every budget)."""
    return frame[frame.budget.isin([budget, NATURAL])]
