"""One fine-tuning routine for stage a and stage d, on HF Trainer.

Trainer already does what we need and does it well: AdamW, linear decay with warm-up, periodic evaluation,
early stopping, best-checkpoint reload, checkpoint resume and DDP/FSDP under ``accelerate launch``/``torchrun``.
This module only maps our :class:`TrainParams` onto it and saves the final adapter atomically in PEFT format.

What Trainer lacks is crash safety: it writes a checkpoint's files straight into ``checkpoint-N`` and resumes
from the highest N, so a process killed while a checkpoint was written leaves a folder that every later run
picks and fails on ("Can't find a valid checkpoint"). Here a checkpoint counts only once :class:`Complete`
has written its marker (after Trainer's ``on_save``, i.e. after every file of it); a resume takes the newest
complete one and removes the incomplete ones, and leftovers of an interrupted final save are cleared.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import EarlyStoppingCallback, Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from fanlora import atomic
from fanlora.config import TrainParams
from fanlora.data.collate import Collator, ExampleDataset
from fanlora.data.instruct import Example
from fanlora.dist import world_size

log = logging.getLogger(__name__)


MARKER = "fanlora-complete"  # written last into a checkpoint folder: the checkpoint is whole


class Complete(TrainerCallback):
    """Marks each checkpoint complete once Trainer has written all of it (``on_save`` follows the save)."""

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if not state.is_world_process_zero:
            return
        folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        if folder.is_dir():
            atomic.write_text(folder / MARKER, f"{state.global_step}\n")


def _complete(folder: Path) -> bool:
    """Our marker, or (checkpoints written before it existed) the trainer state Trainer writes last, whole."""
    if (folder / MARKER).is_file():
        return True
    try:
        json.loads((folder / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return False
    return True


def last_complete_checkpoint(ckpt_dir: Path, remove: bool = True) -> str | None:
    """The newest checkpoint that was written completely; newer, incomplete ones (what a kill mid-save leaves)
    are removed when ``remove`` (the main process only)."""
    if not ckpt_dir.is_dir():
        return None
    steps = []
    for folder in ckpt_dir.iterdir():
        name, _, step = folder.name.partition("-")
        if folder.is_dir() and name == PREFIX_CHECKPOINT_DIR and step.isdigit():
            steps.append((int(step), folder))
    last = None
    for _, folder in sorted(steps, reverse=True):
        if _complete(folder):
            last = last or str(folder)
        elif last is None and remove:  # newer than every complete one: a kill mid-checkpoint
            log.warning("removing incomplete checkpoint %s", folder)
            shutil.rmtree(folder, ignore_errors=True)
    return last


@dataclass
class TrainResult:
    adapter_dir: Path
    steps: int
    best_eval_loss: float | None
    train_loss: float | None
    resumed_from: str | None


def native_bf16() -> bool:
    """Whether this device computes bf16 in hardware (CUDA with bf16; a CPU with AVX512-BF16 or AMX).

    bf16 autocast is a speed-up only there. Measured on an AVX2-only 2-core EPYC: one training step of
    8 × 256 tokens took 21 s in fp32 and 510 s under bf16 autocast (emulated bf16 kernels), while a CPU with
    AVX512-BF16 ran the same batches 1.47× *faster* in bf16 (benchmarks/results/training.txt).
    """
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in checks)


def environment() -> dict[str, Any]:
    """What a run's numbers depend on beyond its config: float results are reproducible bit for bit only with
    the same torch build, thread count and instruction set (GEMM reduction orders differ otherwise), and the
    training precision follows the hardware (:func:`native_bf16`)."""
    import platform

    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        cpu = next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.processor() or platform.machine()
    return {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": cpu,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "native_bf16": native_bf16(),
    }


def use_bf16(params: TrainParams) -> bool:
    """``bf16: true`` means bf16 autocast where the hardware has it; elsewhere fp32, said once on stderr."""
    if not params.bf16:
        return False
    if native_bf16():
        return True
    global _WARNED
    if not _WARNED:
        log.warning("bf16 requested, but this CPU has no native bf16 (AVX512-BF16/AMX): training in fp32 (faster here)")
        _WARNED = True
    return False


_WARNED = False


def _arguments(params: TrainParams, output_dir: Path, n_train: int, world: int) -> TrainingArguments:
    per_step = params.batch_size * params.grad_accum * world
    steps = params.max_steps if params.max_steps > 0 else math.ceil(params.epochs * math.ceil(n_train / per_step))
    eval_steps = max(1, min(params.eval_steps, steps))
    return TrainingArguments(
        output_dir=str(output_dir),
        learning_rate=params.learning_rate,
        num_train_epochs=params.epochs,
        max_steps=params.max_steps,
        per_device_train_batch_size=params.batch_size,
        per_device_eval_batch_size=params.eval_batch_size,
        gradient_accumulation_steps=params.grad_accum,
        lr_scheduler_type="linear",
        warmup_steps=params.warmup_ratio,  # a float < 1 is a ratio of the total steps
        weight_decay=params.weight_decay,
        optim="adamw_torch",
        eval_strategy="steps",
        eval_steps=eval_steps,
        save_strategy="steps",
        save_steps=eval_steps,
        save_total_limit=2,
        load_best_model_at_end=True,
        metric_for_best_model="eval_loss",
        greater_is_better=False,
        logging_steps=params.logging_steps,
        bf16=use_bf16(params),
        use_cpu=not torch.cuda.is_available(),  # bf16 autocast on CPU needs this said explicitly
        seed=params.seed,
        data_seed=params.seed,
        report_to=[],
        remove_unused_columns=False,
        dataloader_num_workers=0,
        ddp_find_unused_parameters=False,
        disable_tqdm=False,
    )


def _portable(adapter_dir: Path, public_name: str | None) -> None:
    """Record the backbone's public name, not this machine's cache path, as the adapter's base model, so
    ``AutoPeftModelForCausalLM.from_pretrained(adapter)`` works on another machine."""
    config = adapter_dir / "adapter_config.json"
    if public_name and config.is_file():
        data = json.loads(config.read_text())
        data["base_model_name_or_path"] = public_name
        config.write_text(json.dumps(data, indent=2, sort_keys=True))


def train_adapter(
    model,
    train: Sequence[Example],
    val: Sequence[Example],
    params: TrainParams,
    output_dir: str | Path,
    pad_id: int,
    callbacks: Sequence[Any] = (),
    save: Callable[[Any, Path], None] | None = None,
) -> TrainResult:
    """Fine-tune the trainable (LoRA) parameters of ``model``; resume from the newest checkpoint if any.

    The best checkpoint by validation loss is reloaded at the end and saved to ``output_dir/adapter`` with
    ``save_pretrained``, so plain ``PeftModel.from_pretrained`` loads it; ``save`` replaces that for models
    that are not PEFT models (the Houlsby baseline). ``callbacks`` are extra Trainer callbacks (AdaLoRA).
    """
    output_dir = Path(output_dir)
    ckpt_dir = output_dir / "checkpoints"
    args = _arguments(params, ckpt_dir, len(train), world_size())
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=ExampleDataset(train),
        eval_dataset=ExampleDataset(val),
        data_collator=Collator(pad_id),
        callbacks=[EarlyStoppingCallback(early_stopping_patience=params.patience), Complete(), *callbacks],
    )
    for stale in output_dir.glob(".adapter.*"):  # a final save killed before its rename
        shutil.rmtree(stale, ignore_errors=True)
    last = last_complete_checkpoint(ckpt_dir, remove=trainer.is_world_process_zero())
    if last:
        log.info("resuming from %s", last)
    out = trainer.train(resume_from_checkpoint=last)
    best = trainer.state.best_metric
    adapter_dir = output_dir / "adapter"
    if trainer.is_world_process_zero():
        tmp = Path(tempfile.mkdtemp(prefix=".adapter.", dir=output_dir))
        try:
            if save is not None:
                save(trainer.model, tmp)
            else:
                trainer.model.save_pretrained(str(tmp))
            _portable(tmp, getattr(model, "fanlora_public_name", None))
            atomic.publish_tree(tmp)
            if adapter_dir.exists():
                shutil.rmtree(adapter_dir)
            tmp.rename(adapter_dir)
            atomic.fsync_dir(output_dir)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    trainer.accelerator.wait_for_everyone()
    return TrainResult(
        adapter_dir=adapter_dir,
        steps=trainer.state.global_step,
        best_eval_loss=float(best) if best is not None else None,
        train_loss=float(out.training_loss) if out.training_loss is not None else None,
        resumed_from=last,
    )
