"""The training loop (accelerate; DDP by default, DeepSpeed on request) over the parts
job.train.build makes: each step hands its evaluation to the Validator, its checkpoint to
the Checkpointer and its reports to the Reporter.

Restartable by construction: everything that decides what happens next (weights,
optimizer, RNG, the TrainState) is in the checkpoint, and masks and sample order are pure
functions of (seed, epoch, sample), so a resubmitted job continues exactly where the last
committed checkpoint left it, on the same or another number of processes.
"""

from __future__ import annotations

import time
from contextlib import nullcontext

from job import launch, storage
from job.config import dump_yaml
from job.errors import EXIT_OK, EXIT_PREEMPTED
from job.log import log
from job.train import outputs
from job.train.build import Parts
from job.train.state import advance, next_epoch

PREEMPTION_CHECK_STEPS = 10


def should_check_preemption(step: int, log_every: int) -> bool:
    """Ranks agree on a SIGTERM with a collective, which waits for the step to finish: only
    every few steps (and at log steps, which synchronise anyway), so that plain steps
    never block the host. At most 10 steps pass between the signal and the checkpoint."""
    return step % PREEMPTION_CHECK_STEPS == 0 or step % log_every == 0


def train(parts: Parts) -> int:
    """The run: start-up checks, the initial evaluation, the steps, the last evaluation and
    the outputs. Exit 0, or 3 when preempted (a checkpoint committed once training runs)."""
    try:
        return run(parts)
    except BaseException:
        parts.checkpointer.abandon()  # an upload that will never be committed
        raise


def run(parts: Parts) -> int:
    if stopped_in_startup(parts):
        return EXIT_PREEMPTED
    parts.validator.initial(parts.state)
    if stopped_in_startup(parts):
        return EXIT_PREEMPTED
    begin(parts)
    while not finished(parts):
        if iteration(parts):
            return preempted(parts)
    parts.reporter.close()
    parts.batches.close()
    if (parts.state.last_eval or {}).get("step") != parts.state.step:
        parts.validator.validate(parts.state)
    parts.checkpointer.wait()  # the last checkpoint's upload went on during that evaluation
    outputs.finish(parts)
    return EXIT_OK


def iteration(parts: Parts) -> bool:
    """A step and what follows it; True when the ranks agree to stop for a SIGTERM."""
    st, t, gb = parts.state, parts.cfg.train, parts.data.global_batch
    after = parts.schedule.turn(st.epoch, st.sample + gb, gb)[:2]  # where the next one starts
    lr = step(parts, parts.batches.get((st.epoch, st.sample), ahead=after))
    advance(st, gb, parts.data.block, parts.clock.step_seconds())
    parts.reporter.stepped()
    last = finished(parts)
    parts.reporter.log(st, lr, last, parts.checkpointer.settled)
    epoch_end = not last and next_epoch(st, parts.schedule, gb)
    parts.clock.phases.add("train_s", parts.clock.step_seconds())  # with its batch, its log
    if parts.validator.should_validate(st.step, epoch_end):
        parts.validator.validate(st)  # eval_s
    parts.checkpointer.save(st, epoch_end)  # checkpoint_blocking_s
    stop = should_check_preemption(st.step, t.log_every_steps) and agreed(parts)
    parts.clock.lap()
    return stop


def agreed(parts: Parts) -> bool:
    """The preemption check: whether the ranks agree to stop for a SIGTERM. Its all-reduce
    also commits a checkpoint every node has uploaded (Checkpointer.poll). Its time is the
    step's (on a GPU it waits for the step's kernels) but for that commit's, which is the
    checkpoint's."""
    blocked = parts.clock.phases.seconds
    began, committing = time.perf_counter(), blocked["checkpoint_blocking_s"]
    stop = parts.checkpointer.poll(parts.preemption.requested)
    committed = blocked["checkpoint_blocking_s"] - committing
    parts.clock.phases.add("train_s", time.perf_counter() - began - committed)
    return stop


def step(parts: Parts, batches: list) -> float:
    """One optimizer step; returns its learning rate. Nothing in it waits for the
    accelerator: shapes are known on the host, sums stay on the device (the LossWindow),
    and the next batch is built meanwhile."""
    acc, t = parts.accelerator, parts.cfg.train
    wrapper, optimizer = parts.model.wrapper, parts.model.optimizer
    lr = parts.schedule.lr(parts.state.samples_seen)
    for group in optimizer.param_groups:
        group["lr"] = lr
    accumulate = t.gradient_accumulation_steps > 1
    for batch in batches:
        with acc.accumulate(wrapper) if accumulate else nullcontext():
            loss_sum = wrapper(*batch.to(acc.device).tensors())
            acc.backward(loss_sum / max(batch.n, 1))
            if acc.sync_gradients and acc.distributed_type.name != "DEEPSPEED":
                acc.clip_grad_norm_(wrapper.parameters(), t.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        parts.window.add(loss_sum, batch.n)
    return lr


def finished(parts: Parts) -> bool:
    st = parts.state
    return parts.schedule.finished(st.samples_seen, st.epoch, st.sample, parts.data.global_batch)


def begin(parts: Parts) -> None:
    """The first step's set-up: config.yaml (a new run), metrics and trackers, the clock."""
    cfg, st, acc, restored = parts.cfg, parts.state, parts.accelerator, parts.restored
    if not restored and acc.is_main_process:
        storage.write_text(storage.join(cfg.run.output, "config.yaml"), dump_yaml(cfg))
    s, gb = parts.schedule, parts.data.global_batch
    left = max(0, s.total_samples - st.samples_seen) // gb
    parts.reporter.begin(st, st.step if restored else None, st.step + left)
    if not finished(parts):
        next_epoch(st, s, gb)  # resumed with a larger batch than the epoch has left
    parts.clock.begin(st.wall_seconds)
    how = f"{s.epochs} epochs" if s.epochs else "max_steps"
    ds = f", DeepSpeed {cfg.train.deepspeed}" if cfg.train.deepspeed else ""
    log.info(
        "training %s: %d processes, global batch %d x %d tokens, %d samples in all "
        "(%s of %d), precision %s%s",
        cfg.run.name,
        acc.num_processes,
        gb,
        parts.data.block,
        s.total_samples,
        how,
        s.epoch_samples,
        parts.model.precision,
        ds,
    )


def stopped_in_startup(parts: Parts) -> bool:
    """A SIGTERM before the first step (the ranks agree on it): stop with nothing to
    checkpoint. A resubmission starts over, or continues from the checkpoint this run
    resumed from, exactly as this one would have."""
    if not parts.preemption.agreed(parts.accelerator):
        return False
    again = f"continues from {parts.restored.uri}" if parts.restored else "starts over"
    startup_preempted(f"nothing to checkpoint yet (a resubmission {again})")
    parts.batches.close()
    parts.accelerator.end_training()
    return True


def startup_preempted(how: str) -> None:
    done = f"preempted during start-up, before the first step: {how}"
    log.warning("%s, exiting %d", done, EXIT_PREEMPTED)
    launch.explain(f"mlmjob: {done}; exit {EXIT_PREEMPTED}")  # job.launch's last line


def preempted(parts: Parts) -> int:
    parts.checkpointer.save(parts.state, force=True)
    parts.checkpointer.wait()  # committed before exit 3
    parts.batches.close()
    uri = parts.checkpointer.saved_uri
    done = f"preempted at step {parts.state.step}: checkpoint committed ({uri})"
    log.warning("%s, exiting %d", done, EXIT_PREEMPTED)
    launch.explain(f"mlmjob: {done}; exit {EXIT_PREEMPTED}")  # job.launch's last line
    parts.reporter.finish()
    parts.accelerator.end_training()
    return EXIT_PREEMPTED
