"""Tasks: examples, splits, a prompt format, a metric, and the training pair for stage d.

A task is one file in ``fanlora/tasks`` that defines a :class:`Task` subclass and decorates it with
:func:`register`. Two kinds exist:

- :class:`MCTask` — multiple choice. Scored by log-likelihood as lm-evaluation-harness does (a choice's
  log-likelihood is the summed log-probability of its tokens after the context; ``acc`` takes the argmax,
  ``acc_norm`` divides by the choice's length in characters first), or by generation (the answer generated
  after the context is matched to a choice).
- :class:`GenTask` — free generation, scored by the task's own :meth:`GenTask.score`.

Every split's data can be replaced with ``--data SPLIT=SOURCE`` (a local JSONL/JSONL.gz file or an HF
dataset name while online, see :func:`fanlora.data.records.read_source`); a replaced split is used whole.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from fanlora.config import MC_FORMATS  # one definition: evaluate.mc_format's values
from fanlora.data.records import BUNDLED_PREFIX, read_source
from fanlora.errors import UserError
from fanlora.registry import Registry

Rows = list[tuple[str, dict[str, Any]]]  # (file:line, record)


@dataclass
class MCExample:
    id: str
    context: str
    choices: list[str]  # continuations, each starting with the delimiter (" yes")
    label: int
    group: str = ""  # e.g. the MMLU subject: accuracy is also reported per group and macro-averaged
    delimiter: str = ""  # put between context and choice when scoring; acc_norm divides by len(choice) only
    cluster: str = ""  # items that share it are not independent (a passage); empty: the group, else the id


@dataclass
class GenExample:
    id: str
    prompt: str  # text the model continues (or, for chat tasks, the first user turn)
    target: str  # what stage d trains on after the prompt
    references: list[str] = field(default_factory=list)  # what the metric compares against
    meta: dict[str, Any] = field(default_factory=dict)  # task-specific (gold SQL, later turns, category…)
    cluster: str = ""  # items that share it are not independent (a question template, an article); empty: the id


class Task:
    """Base class: subclasses set ``name``/``description`` and implement :meth:`load_split`."""

    name: str = ""
    description: str = ""
    kind: str = ""  # "mc" or "generate"
    splits: tuple[str, ...] = ("train", "dev", "test")
    metric: str = "acc"  # the headline metric in metrics.json (what tables and plots compare)
    shown: tuple[str, ...] = ()  # other metrics.json keys the evaluate line prints after the headline
    item_key: str | None = "correct"  # the per-example score in a prediction record (None: no such score)

    def __init__(self, data: dict[str, str] | None = None) -> None:
        self.data = dict(data or {})
        unknown = sorted(set(self.data) - set(self.splits))
        if unknown:
            raise UserError(
                f"task {self.name} has no split {unknown[0]!r} to replace with --data: "
                f"use one of {', '.join(self.splits)}"
            )

    def load_split(self, split: str) -> list[Any]:
        raise NotImplementedError

    def item_value(self, prediction: dict[str, Any]) -> float | None:
        """One example's score (1/0 for right/wrong, F1 for SQuAD), from its prediction record."""
        if self.item_key is None:
            return None
        return float(prediction[self.item_key])

    @staticmethod
    def cluster_key(example: Any) -> str:
        """The unit a paired comparison resamples (:mod:`fanlora.experiments.stats`): items with one key share a
        source."""
        return example.cluster or getattr(example, "group", "") or str(example.id)

    def clusters(self, split: str) -> dict[str, str]:
        """item id → cluster key for every example of ``split``."""
        return {str(ex.id): self.cluster_key(ex) for ex in self.examples(split)}

    def check(self, examples: Sequence[Any]) -> None:
        """Refuse examples that cannot be scored (e.g. a gold SQL query that fails), before any model work."""

    def examples(self, split: str, limit: int | None = None) -> list[Any]:
        if split not in self.splits:
            raise UserError(f"task {self.name} has no split {split!r}: use one of {', '.join(self.splits)}")
        rows = self.load_split(split)
        if not rows:
            raise UserError(f"task {self.name} split {split} has no examples: check its data source")
        return rows[:limit] if limit else rows

    def rows(self, split: str, bundled: str, hf_split: str | None = None) -> tuple[Rows, bool]:
        """Records of a split: the ``--data`` replacement if given (True), else the bundled file (False)."""
        if split in self.data:
            return read_source(self.data[split], hf_split or split), True
        return read_source(BUNDLED_PREFIX + bundled), False

    @staticmethod
    def field(record: dict[str, Any], key: str, typ: type | tuple[type, ...], where: str) -> Any:
        value = record.get(key)
        if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
            name = typ.__name__ if isinstance(typ, type) else " or ".join(t.__name__ for t in typ)
            raise UserError(f"{where}: field {key!r} missing or not {name}; fix or remove that line")
        return value


class MCTask(Task):
    """Multiple choice, in one of two text formats (``--mc-format``):

    - ``clean`` (the default): the choice follows the context after exactly one space (" yes", " the man
      left"), and acc_norm divides by the length of that continuation. This is the text a tuned model is
      trained on in stage d and what a reader would write.
    - ``lm-eval``: item for item what lm-evaluation-harness 0.4 scores with its stock task configs: its
      ``target_delimiter`` " " is put before each ``doc_to_choice`` string, and acc_norm divides by the length
      of that string without the delimiter. For BoolQ that only changes acc_norm ("no"/"yes" are 2/3
      characters, not 3/4); for COPA, whose lm-eval choices already start with a space, every choice is scored
      after *two* spaces — which moves the untuned backbone's accuracy by several points.
    """

    kind = "mc"
    shown = ("acc_norm",)
    lm_eval_choice_has_space = False  # COPA: lm-eval's doc_to_choice keeps the leading space

    def training_pair(self, ex: MCExample) -> tuple[str, str]:
        return ex.context, ex.choices[ex.label]

    def item_value(self, prediction: dict[str, Any]) -> float | None:
        return float(prediction["pred"] == prediction["label"])

    def formatted(self, examples: Sequence[MCExample], fmt: str) -> list[MCExample]:
        if fmt not in MC_FORMATS:
            raise UserError(f"unknown multiple-choice format {fmt!r}: use one of {', '.join(MC_FORMATS)}")
        if fmt == "clean":
            return list(examples)
        out = []
        for ex in examples:
            choices = [c if self.lm_eval_choice_has_space else c.removeprefix(" ") for c in ex.choices]
            out.append(replace(ex, choices=choices, delimiter=" "))
        return out


class GenTask(Task):
    """Generation tasks: subclasses also set decoding defaults and implement :meth:`score`."""

    kind = "generate"
    max_new_tokens: int = 64
    stop: tuple[str, ...] = ("\n",)  # generation is cut at the first of these
    chat: bool = False  # prompts go through the tokenizer's chat template (multi-turn tasks)

    def training_pair(self, ex: GenExample) -> tuple[str, str]:
        return ex.prompt, ex.target

    def outputs(
        self,
        model: Any,
        tokenizer: Any,
        examples: Sequence[GenExample],
        decoding: Any,
        batch_size: int,
        max_length: int | None,
        progress: bool,
    ) -> list[Any]:
        """What the model says for each example (multi-turn tasks override this)."""
        from fanlora.generate import generate  # torch: only when a task generates

        return generate(
            model,
            tokenizer,
            [ex.prompt for ex in examples],
            decoding,
            decoding.max_new_tokens or self.max_new_tokens,
            stop=self.stop,
            batch_size=batch_size,
            max_length=max_length,
            progress=progress,
            desc=f"{self.name}: generating",
        )

    def score(self, examples: Sequence[GenExample], outputs: Sequence[Any]) -> tuple[dict[str, Any], list[dict]]:
        """(metrics, one prediction record per example)."""
        raise NotImplementedError


#: the tasks by name; :func:`fanlora.tasks.get_task` reads it once the package has imported every task file
REGISTRY: Registry[type[Task]] = Registry("task", "unknown task {name}: known tasks are {known}")


def register(cls: type[Task]) -> type[Task]:
    """Class decorator: the task is known by ``cls.name``."""
    return REGISTRY.register(cls.name, cls)


def halve(rows: list[Any], split: str) -> list[Any]:
    """A labelled set split in file order: first half dev, second half test (the paper's BoolQ/COPA rule)."""
    half = len(rows) // 2
    return rows[:half] if split == "dev" else rows[half:]
