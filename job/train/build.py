"""Everything a training run is made of, built once, in order (`build`): the dataset and
tokenizer, the accelerator, the checkpoint to resume from, the TrainState, the model and
optimizer, and the parts the loop hands its work to.

The order is the contract: a SIGTERM is kept from the first line on (Preemption), the
checkpoint is fetched before the model is prepared (DeepSpeed reads a converted one), and
nothing is written to `run.output` here (a run stopped in start-up leaves nothing).
"""

from __future__ import annotations

import hashlib
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from job.config import Config
from job.data.blocks import load_tokenizer
from job.data.loader import BlockData
from job.data.manifest import dataset_manifest
from job.data.shards import Manifest
from job.errors import BadInput
from job.log import log
from job.train import checkpoint, dist
from job.train.accel import Preemption, build_accelerator, load_universal
from job.train.batch import Masker
from job.train.batches import Batches
from job.train.checkpointer import Checkpointer
from job.train.model import SparseMLM, compile_step, load_model
from job.train.optim import build_optimizer
from job.train.reporter import Reporter
from job.train.schedule import Schedule
from job.train.state import Clock, LossWindow, TrainState
from job.train.tracking import tensorboard_dir
from job.train.validator import Validator


@dataclass
class Data:
    """What the steps and the evaluations read."""

    tokenizer: object
    manifest: Manifest
    train: BlockData
    eval: BlockData | None  # None: the dataset has no test split
    masker: Masker
    global_batch: int  # samples a step, over every rank and micro-batch

    @property
    def block(self) -> int:  # tokens a sample
        return self.manifest.block_size


@dataclass
class Model:
    wrapper: SparseMLM  # prepared by the accelerator (DDP or DeepSpeed)
    optimizer: object
    precision: str


@dataclass
class Parts:
    cfg: Config
    accelerator: object
    preemption: Preemption
    staging: Path  # node-local: checkpoints and the model are staged here, then uploaded
    restored: checkpoint.Restored | None  # the checkpoint this run resumes from
    state: TrainState
    window: LossWindow  # the train loss since the last log step, on the device
    data: Data
    schedule: Schedule
    model: Model
    clock: Clock
    batches: Batches
    reporter: Reporter
    checkpointer: Checkpointer
    validator: Validator


def build(cfg: Config) -> Parts:
    import torch

    preemption = Preemption.install()  # train() did: a SIGTERM from then on is kept
    t = cfg.train
    if t.num_threads:
        torch.set_num_threads(t.num_threads)
    clock = Clock()  # its phases time the rest of start-up
    with clock.phases.timed("data_s"), preemption.interruptible():  # may wait for preprocessing
        tok = load_tokenizer(cfg.tokenizer, cfg.cache_dir)
        manifest = dataset_manifest(cfg, tok)
    run_key = hashlib.sha256(cfg.run.output.encode()).hexdigest()[:16]
    staging = cfg.cache_dir / "staging" / run_key
    tb_dir = tensorboard_dir(cfg.run.output, staging)
    acc, precision = build_accelerator(cfg, tracking_dir=tb_dir if t.report_to else None)
    world = acc.num_processes
    global_batch = t.per_device_batch_size * world * t.gradient_accumulation_steps
    with clock.phases.timed("model_s"):  # the checkpoint it resumes from with the model
        restored = checkpoint.fetch(acc, cfg.run.output, staging)
        state = build_state(cfg, acc, restored, global_batch)
    # the earlier attempts' phases, saved beside the TrainState (Checkpointer.save)
    clock.phases.load_state_dict(restored.state.get("phases") if restored else None)
    with clock.phases.timed("data_s"):
        data = build_data(cfg, acc, tok, manifest, state.base_batch, global_batch)
    schedule = Schedule.build(t, len(data.train), state.base_batch)
    with clock.phases.timed("model_s"):
        model = build_model(cfg, acc, tok, manifest.block_size, restored, precision)
    # the train loss restored to rank 0 only (LossWindow)
    window = LossWindow.restored(state, acc.device, acc.process_index, partial(dist.sum_ranks, acc))
    run = _run_parts(cfg, acc, data, model, state, window, restored, staging, tb_dir, clock)
    return Parts(
        cfg, acc, preemption, staging, restored, state, window, data, schedule, model, *run
    )


def build_state(cfg: Config, acc, restored, global_batch: int) -> TrainState:
    state = TrainState(base_batch=global_batch, world_size=acc.num_processes)
    if restored:
        state.load_state_dict(restored.state)
        rescale(state, acc.num_processes, acc, restored, cfg.train.deepspeed)
    return state


def rescale(st: TrainState, world: int, accelerator, restored, deepspeed: str | None) -> None:
    """A checkpoint written by another number of processes: the schedule is in samples,
    so only DeepSpeed's partitioned optimizer state needs converting."""
    if st.world_size == world:
        return
    log.warning(
        "process count changed from %d to %d: continuing at global sample %d of epoch %d",
        st.world_size,
        world,
        st.sample,
        st.epoch,
    )
    if deepspeed:
        if accelerator.is_local_main_process:
            log.info("converting %s to a universal checkpoint", restored.uri)
            checkpoint.to_universal(restored.local)
        accelerator.wait_for_everyone()
        load_universal(accelerator)
    st.world_size = world


def build_data(cfg: Config, acc, tok, manifest, base_batch: int, global_batch: int) -> Data:
    cache = cfg.cache_dir
    # One process per node downloads and verifies the shards; the others wait, then
    # map the same files.
    with acc.local_main_process_first():
        verify = acc.is_local_main_process
        train = BlockData(manifest, "train", cache, verify)
        has_test = bool(manifest.blocks("test"))
        eval_data = BlockData(manifest, "test", cache, verify) if has_test else None
    if len(train) < base_batch:
        raise BadInput(
            f"{manifest.uri}: {len(train)} train blocks are fewer than one "
            f"global batch of {base_batch}; lower train.per_device_batch_size"
        )
    t = cfg.train
    masker = Masker.of(tok, cfg.run.seed, t.mlm_probability, acc.device.type == "cuda", t.compile)
    return Data(tok, manifest, train, eval_data, masker, global_batch)


def build_model(cfg: Config, acc, tok, block: int, restored, precision: str) -> Model:
    from accelerate.utils import set_seed

    set_seed(cfg.run.seed)  # the same initial weights (and dropout stream) in every run
    with _full_weights(acc):
        model = load_model(cfg.model, tok, cfg.cache_dir, block)
    wrapper = compile_step(SparseMLM(model)) if cfg.train.compile else SparseMLM(model)
    optimizer, groups = build_optimizer(wrapper, cfg.train)
    log.info("optimizer: AdamW, %s", groups.describe())
    wrapper, optimizer = acc.prepare(wrapper, optimizer)
    if restored:
        log.info("resuming from %s", restored.uri)
        checkpoint.restore(acc, restored)
    return Model(wrapper, optimizer, precision)


@contextmanager
def _full_weights(accelerator):
    """Build the model whole, also under ZeRO-3, and let DeepSpeed partition it in
    `prepare`: under `zero.Init` the random initialisation draws differently, so the
    same seed would give ZeRO-3 other initial weights than DDP. The masked LMs this job
    trains fit in one process's memory many times over. (accelerate's
    `zero3_init_context_manager` leaves transformers' ZeRO-3 switch on, hence this.)"""
    plugin = accelerator.state.deepspeed_plugin
    if plugin is None:
        yield
        return
    from transformers.integrations import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        plugin.set_deepspeed_weakref()


def _run_parts(
    cfg: Config, acc, data: Data, model: Model, state, window, restored, staging, tb, clock
):
    """The clock, batches, reporter, checkpointer and validator, in Parts' order. Nothing
    here writes: metrics and trackers start with the first step (Reporter.begin)."""
    t, rank = cfg.train, acc.process_index
    batches = Batches(
        data.train,
        data.masker,
        rank,
        acc.num_processes,
        t.per_device_batch_size,
        t.gradient_accumulation_steps,
    )
    reporter = Reporter(acc, cfg, tb, window, data.global_batch, data.block)
    resume_step = state.step if restored else None
    saved_uri = restored.uri if restored else None
    checkpointer = Checkpointer(acc, cfg, staging, window, clock, reporter, resume_step, saved_uri)
    validator = Validator(
        acc, model.wrapper, data.eval, data.masker, cfg, reporter, checkpointer, clock.phases
    )
    return clock, batches, reporter, checkpointer, validator
