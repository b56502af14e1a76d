"""lm-evaluation-harness task files over local data, for comparing lm-eval with ``fanlora evaluate`` item for item.

lm-eval's stock COPA and BoolQ tasks read the hub; these read a local JSONL file through lm-eval's ``json``
dataset builder (offline) and keep its stock prompts — COPA through lm-eval's own ``super_glue`` utility
functions, BoolQ's template as its YAML writes it — with ``acc_norm`` beside ``acc``. Used by
``benchmarks/lm_eval_parity.py`` (lm-eval's HF model) and ``tests/test_lm_eval_server.py`` (lm-eval's
``local-completions`` against ``fanlora serve``). Writes text only: lm-eval itself is imported by the caller.
"""

from __future__ import annotations

from pathlib import Path

TASK_YAML = """task: fanlora_{name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
output_type: multiple_choice
test_split: test
{prompt}
metric_list:
  - metric: acc
  - metric: acc_norm
"""
# each task's prompt as lm-eval's stock config writes it (COPA through lm-eval's own utils functions)
PROMPTS = {
    "copa": "doc_to_text: !function copa_utils.doc_to_text\n"
    "doc_to_target: !function copa_utils.doc_to_target\n"
    "doc_to_choice: !function copa_utils.doc_to_choice",
    "boolq": 'doc_to_text: "{{passage}}\\nQuestion: {{question}}?\\nAnswer:"\n'
    "doc_to_target: label\n"
    'doc_to_choice: ["no", "yes"]',
}
COPA_UTILS = "from lm_eval.tasks.super_glue.copa.utils import doc_to_choice, doc_to_target, doc_to_text  # noqa\n"


def write_tasks(workdir: Path, files: dict[str, Path]) -> list[str]:
    """Task files in ``workdir`` (pass it as ``TaskManager(include_path=...)``), one per ``files`` entry (task
    name → JSONL of its records); returns lm-eval's task names."""
    (workdir / "copa_utils.py").write_text(COPA_UTILS)
    for name, data in files.items():
        (workdir / f"fanlora_{name}.yaml").write_text(TASK_YAML.format(name=name, data=data, prompt=PROMPTS[name]))
    return [f"fanlora_{name}" for name in files]
