"""The baseline for bench/gpu.py: transformers.Trainer as a careful user would set it up.

DataCollatorForLanguageModeling (15%), bf16, SDPA attention, fused AdamW, pinned memory
and 4 loader workers, no reporting or saving, logging too rare to cost anything; the same
model, blocks, learning rate, weight decay, warm-up and clipping as mlmjob's run. Its
steady-state throughput is timed by a TrainerCallback with gpu.Phases, the same clock and
profiler as mlmjob's loop.
"""

from __future__ import annotations

import tempfile

import gpu
import torch
from transformers import TrainerCallback


class PhaseCallback(TrainerCallback):
    """Hands the Trainer's step boundaries (after the optimizer step) to gpu.Phases."""

    def __init__(self, phases: gpu.Phases):
        self.phases = phases

    def on_train_begin(self, args, state, control, **kwargs):
        self.phases.at(0)

    def on_step_end(self, args, state, control, **kwargs):
        self.phases.at(state.global_step)


def training_arguments(args, output_dir: str):
    from transformers import TrainingArguments

    cuda = torch.cuda.is_available()
    return TrainingArguments(
        output_dir=output_dir,
        max_steps=gpu.total_steps(args),
        per_device_train_batch_size=args.batch,
        learning_rate=gpu.LR,
        weight_decay=gpu.WEIGHT_DECAY,
        warmup_steps=args.warmup,
        lr_scheduler_type="linear",
        max_grad_norm=1.0,
        bf16=cuda,
        optim="adamw_torch_fused",
        dataloader_pin_memory=True,
        dataloader_num_workers=4,
        report_to=[],
        save_strategy="no",
        eval_strategy="no",
        logging_steps=1_000_000,
        disable_tqdm=True,
        seed=gpu.SEED,
        use_cpu=not cuda,  # bf16 only on a GPU, as mlmjob's precision `auto`
    )


def run_trainer(args, tok) -> dict:
    import datasets
    from transformers import DataCollatorForLanguageModeling, Trainer

    blocks = gpu.random_blocks(gpu.total_steps(args) * args.batch, gpu.SEED, tok)
    train = datasets.Dataset.from_dict({"input_ids": blocks.tolist()})
    model = gpu.new_model(args)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    phases = gpu.Phases(args, device)
    collator = DataCollatorForLanguageModeling(tokenizer=tok, mlm_probability=gpu.MLM_PROBABILITY)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(
            model=model,
            args=training_arguments(args, tmp),
            train_dataset=train,
            data_collator=collator,
            callbacks=[PhaseCallback(phases)],
        )
        result = trainer.train()
    tps = phases.result["tokens_per_s_per_gpu"]
    return {
        **phases.result,
        "precision": "bf16" if device.type == "cuda" else "fp32",
        "mfu_computed_flops": gpu.mfu(args, tps, 1.0, device),
        "mfu_useful_flops": gpu.mfu(args, tps, gpu.MLM_PROBABILITY, device),
        "train_loss": round(result.training_loss, 4),
        **gpu.heldout_eval(args, tok, trainer.model, device),
    }
