"""`mlmjob train`: the training loop (accelerate; DDP by default, DeepSpeed on request).

Restartable by construction: everything that decides what happens next (weights,
optimizer, RNG, the TrainState) is in the checkpoint, and masks and sample order are pure
functions of (seed, epoch, sample), so a resubmitted job continues exactly where the last
committed checkpoint left it, on the same or another number of processes.
"""

from __future__ import annotations

import hashlib
import math
import threading
import time
from contextlib import contextmanager, nullcontext

import numpy as np

from job import env, jsonio, launch, lease, storage
from job.config import Config, dump_yaml
from job.data.blocks import load_tokenizer
from job.data.loader import BlockData, batch_ids, epoch_order
from job.errors import EXIT_OK, EXIT_PREEMPTED, BadInput
from job.log import bar, log
from job.train import checkpoint
from job.train.accel import Preempted, Preemption, build_accelerator, load_universal
from job.train.batch import MaskedBatch, Masker
from job.train.evaluate import dataset_manifest, masked_lm_loss
from job.train.masking import EVAL_STREAM
from job.train.metrics import Metrics, write_summary
from job.train.model import SparseMLM, compile_layers, load_model
from job.train.optim import build_optimizer, count_parameters
from job.train.prefetch import Prefetcher
from job.train.schedule import Schedule
from job.train.state import LossWindow, TrainState
from job.train.summary import device_name, mfu
from job.train.tracking import Tracking, tensorboard_dir


def should_log(step: int, every: int, last: bool) -> bool:
    return step % every == 0 or last


def should_eval(step: int, every: int | None, epoch_end: bool) -> bool:
    """Every `every` steps, or at each epoch's end when `every` is None."""
    return bool(every and step % every == 0) or (epoch_end and every is None)


def should_checkpoint(step: int, every: int, epoch_end: bool) -> bool:
    return step % every == 0 or epoch_end


PREEMPTION_CHECK_STEPS = 10


def should_check_preemption(step: int, log_every: int) -> bool:
    """Ranks agree on a SIGTERM with a collective, which waits for the step to finish: only
    every few steps (and at log steps, which synchronise anyway), so that plain steps
    never block the host. At most 10 steps pass between the signal and the checkpoint."""
    return step % PREEMPTION_CHECK_STEPS == 0 or step % log_every == 0


class Trainer:
    def __init__(self, cfg: Config):
        import torch

        self.cfg = cfg
        self.preemption = Preemption.install()  # train() did: a SIGTERM from then on is kept
        t = cfg.train
        if t.num_threads:
            torch.set_num_threads(t.num_threads)
        self.tok = load_tokenizer(cfg.tokenizer, cfg.cache_dir)
        with self.preemption.interruptible():  # may wait for preprocessing (a read loop)
            self.manifest = self._manifest()
        self.block = self.manifest.block_size
        run_key = hashlib.sha256(cfg.run.output.encode()).hexdigest()[:16]
        self.staging = cfg.cache_dir / "staging" / run_key
        self.tb_dir = tensorboard_dir(cfg.run.output, self.staging)
        tracking_dir = self.tb_dir if t.report_to else None
        self.accelerator, self.precision = build_accelerator(cfg, tracking_dir=tracking_dir)
        acc = self.accelerator
        self.world, self.rank = acc.num_processes, acc.process_index
        self.global_batch = t.per_device_batch_size * self.world * t.gradient_accumulation_steps
        self.restored = checkpoint.fetch(acc, cfg.run.output, self.staging)
        self.state = TrainState(base_batch=self.global_batch, world_size=self.world)
        if self.restored:
            self.state.load_state_dict(self.restored.state)
            self._rescale()
        self._load_data()
        self.schedule = Schedule.build(t, len(self.train_data), self.state.base_batch)
        self._build_model()
        self.masker = Masker.of(
            self.tok, cfg.run.seed, t.mlm_probability, pin=self.accelerator.device.type == "cuda"
        )
        self.orders: dict[int, np.ndarray] = {}
        self.orders_lock = threading.Lock()

    # ---- set-up ----------------------------------------------------------------------

    def _manifest(self):
        return dataset_manifest(self.cfg, self.tok)

    def _rescale(self) -> None:
        """A checkpoint written by another number of processes: the schedule is in samples,
        so only DeepSpeed's partitioned optimizer state needs converting."""
        st, acc = self.state, self.accelerator
        if st.world_size == self.world:
            return
        log.warning(
            "process count changed from %d to %d: continuing at global sample %d of epoch %d",
            st.world_size,
            self.world,
            st.sample,
            st.epoch,
        )
        if self.cfg.train.deepspeed:
            if acc.is_local_main_process:
                log.info("converting %s to a universal checkpoint", self.restored.uri)
                checkpoint.to_universal(self.restored.local)
            acc.wait_for_everyone()
            load_universal(acc)
        st.world_size = self.world

    def _load_data(self) -> None:
        acc, cache = self.accelerator, self.cfg.cache_dir
        # One process per node downloads and verifies the shards; the others wait, then
        # map the same files.
        with acc.local_main_process_first():
            verify = acc.is_local_main_process
            self.train_data = BlockData(self.manifest, "train", cache, verify)
            has_test = bool(self.manifest.blocks("test"))
            self.eval_data = BlockData(self.manifest, "test", cache, verify) if has_test else None
        if len(self.train_data) < self.state.base_batch:
            raise BadInput(
                f"{self.manifest.uri}: {len(self.train_data)} train blocks are fewer than one "
                f"global batch of {self.state.base_batch}; lower train.per_device_batch_size"
            )

    def _build_model(self) -> None:
        from accelerate.utils import set_seed

        cfg = self.cfg
        set_seed(cfg.run.seed)  # the same initial weights (and dropout stream) in every run
        with self._full_weights():
            self.model = load_model(cfg.model, self.tok, cfg.cache_dir, self.block)
        if cfg.train.compile:
            compile_layers(self.model)
        wrapper = SparseMLM(self.model)
        optimizer, groups = build_optimizer(wrapper, cfg.train)
        log.info("optimizer: AdamW, %s", groups.describe())
        self.wrapper, self.optimizer = self.accelerator.prepare(wrapper, optimizer)
        if self.restored:
            log.info("resuming from %s", self.restored.uri)
            checkpoint.restore(self.accelerator, self.restored)

    @contextmanager
    def _full_weights(self):
        """Build the model whole, also under ZeRO-3, and let DeepSpeed partition it in
        `prepare`: under `zero.Init` the random initialisation draws differently, so the
        same seed would give ZeRO-3 other initial weights than DDP. The masked LMs this job
        trains fit in one process's memory many times over. (accelerate's
        `zero3_init_context_manager` leaves transformers' ZeRO-3 switch on, hence this.)"""
        plugin = self.accelerator.state.deepspeed_plugin
        if plugin is None:
            yield
            return
        from transformers.integrations import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()
        try:
            yield
        finally:
            plugin.set_deepspeed_weakref()

    # ---- batches ---------------------------------------------------------------------

    def _masked(self, sample_ids: np.ndarray, stream: int, data) -> MaskedBatch:
        """One micro-batch, masked and laid out on the host (pinned for an async copy)."""
        return self.masker.batch(data, sample_ids, stream)

    def _order(self, epoch: int) -> np.ndarray:
        with self.orders_lock:  # the loop and the prefetch thread both ask
            if epoch not in self.orders:  # at most two epochs are in use: this and the next
                self.orders = {e: o for e, o in self.orders.items() if e >= epoch - 1}
                self.orders[epoch] = epoch_order(len(self.train_data), self.cfg.run.seed, epoch)
            return self.orders[epoch]

    def _step_batches(self, key: tuple[int, int]) -> list[MaskedBatch]:
        """This rank's micro-batches of the global batch at (epoch, sample)."""
        epoch, sample = key
        t = self.cfg.train
        B, order = t.per_device_batch_size, self._order(epoch)
        starts = [sample + m * B * self.world for m in range(t.gradient_accumulation_steps)]
        return [
            self._masked(batch_ids(order, s, self.rank, B), epoch, self.train_data) for s in starts
        ]

    def _next_key(self) -> tuple[int, int]:
        """Where the step after this one starts (a guess the prefetcher acts on)."""
        st, gb = self.state, self.global_batch
        sample = st.sample + gb
        if self.schedule.epoch_over(sample, gb):
            return st.epoch + 1, 0
        return st.epoch, sample

    def _sum_across_ranks(self, *values: float) -> list[float]:
        import torch

        t = torch.tensor(values, dtype=torch.float64, device=self.accelerator.device)
        if self.world > 1:
            t = self.accelerator.reduce(t, reduction="sum")
        return t.tolist()

    # ---- evaluation ------------------------------------------------------------------

    def evaluate(self) -> dict:
        """Token-weighted masked-LM loss over the whole eval split and every rank."""
        t = self.cfg.train
        return masked_lm_loss(
            self.accelerator,
            self.wrapper,
            len(self.eval_data),
            lambda ids: self._masked(ids, EVAL_STREAM, self.eval_data),
            t.eval_batch_size or t.per_device_batch_size,
        )

    # ---- the loop --------------------------------------------------------------------

    def run(self) -> int:
        if self._stopped_in_startup():
            return EXIT_PREEMPTED
        self.initial_eval()
        if self._stopped_in_startup():
            return EXIT_PREEMPTED
        self._begin()
        while not self.finished():
            if self.iteration():
                return self._preempted()
        self.progress.close()
        self.prefetch.close()
        if (self.state.last_eval or {}).get("step") != self.state.step:
            self.run_eval()
        self._finish()
        return EXIT_OK

    def initial_eval(self) -> None:
        """The perplexity before the first step (kept in the TrainState, so a resumed run
        still reports it). Eval mode draws no dropout and the masks are hashes, so the
        training that follows is the same as without it."""
        st = self.state
        if self.eval_data is None or st.step > 0 or st.initial_eval is not None:
            return
        st.initial_eval = self.evaluate()
        loss = st.initial_eval["eval_loss"]  # the same on every rank
        if not math.isfinite(loss):
            name = self.cfg.model.name_or_path
            raise BadInput(
                f"eval loss is {loss} before the first step: {name} gives no finite loss"
            )
        log.info(
            "before training: eval loss %.4f, perplexity %.3f",
            st.initial_eval["eval_loss"],
            st.initial_eval["perplexity"],
        )

    def iteration(self) -> bool:
        """A step and what follows it; True when the ranks agree to stop for a SIGTERM."""
        self.train_step()
        last = self.finished()
        self.maybe_log(last)
        epoch_end = not last and self.maybe_next_epoch()
        self.maybe_eval(epoch_end)
        self.maybe_checkpoint(epoch_end)
        stop = should_check_preemption(self.state.step, self.cfg.train.log_every_steps) and (
            self.preemption.agreed(self.accelerator)
        )
        self.mark = time.perf_counter()
        return stop

    def finished(self) -> bool:
        st = self.state
        return self.schedule.finished(st.samples_seen, st.epoch, st.sample, self.global_batch)

    def _begin(self) -> None:
        cfg, st, acc = self.cfg, self.state, self.accelerator
        out = cfg.run.output
        if not self.restored and acc.is_main_process:
            storage.write_text(storage.join(out, "config.yaml"), dump_yaml(cfg))
        resume_step = st.step if self.restored else None
        self.metrics = Metrics(out, resume_step) if acc.is_main_process else None
        self.tracking = Tracking(acc, out, self.tb_dir)
        if cfg.train.report_to:
            st.tracker_runs = self.tracking.start(cfg, cfg.train.report_to, st.tracker_runs)
        self.saved_at = resume_step
        self.saved_uri = self.restored.uri if self.restored else None
        if not self.finished():
            self.maybe_next_epoch()  # resumed with a larger batch than the epoch has left
        self.window = LossWindow.restored(st, acc.device, self.rank)
        self.prefetch = Prefetcher(self._step_batches)
        s = self.schedule
        left = max(0, s.total_samples - st.samples_seen) // self.global_batch
        self.progress = bar(total=st.step + left, initial=st.step, desc="train", unit=" step")
        self.start = self.mark = time.perf_counter()
        self.wall_before = st.wall_seconds
        how = f"{s.epochs} epochs" if s.epochs else "max_steps"
        ds = f", DeepSpeed {cfg.train.deepspeed}" if cfg.train.deepspeed else ""
        log.info(
            "training %s: %d processes, global batch %d x %d tokens, %d samples in all "
            "(%s of %d), precision %s%s",
            cfg.run.name,
            self.world,
            self.global_batch,
            self.block,
            s.total_samples,
            how,
            s.epoch_samples,
            self.precision,
            ds,
        )

    def train_step(self) -> None:
        """One optimizer step. Nothing in it waits for the accelerator: shapes are known on
        the host, sums stay on the device, and the next batch is built meanwhile."""
        st, t, acc = self.state, self.cfg.train, self.accelerator
        batches = self.prefetch.get((st.epoch, st.sample))
        self.prefetch.ahead(self._next_key())
        self.lr = self.schedule.lr(st.samples_seen)
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr
        accumulate = t.gradient_accumulation_steps > 1
        for batch in batches:
            with acc.accumulate(self.wrapper) if accumulate else nullcontext():
                loss_sum = self.wrapper(*batch.to(acc.device).tensors())
                acc.backward(loss_sum / max(batch.n, 1))
                if acc.sync_gradients and acc.distributed_type.name != "DEEPSPEED":
                    acc.clip_grad_norm_(self.wrapper.parameters(), t.max_grad_norm)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
            self.window.add(loss_sum, batch.n)
        st.step += 1
        st.sample += self.global_batch
        st.samples_seen += self.global_batch
        st.tokens += self.global_batch * self.block
        seconds = time.perf_counter() - self.mark
        st.train_seconds += seconds
        st.window_seconds += seconds
        self.progress.update(1)

    def maybe_log(self, last: bool) -> None:
        st, t = self.state, self.cfg.train
        if not should_log(st.step, t.log_every_steps, last):
            return
        loss_sum, tokens = self.window.total(self._sum_across_ranks)
        self.window.reset()
        window_steps = (st.step - 1) % t.log_every_steps + 1
        rate = window_steps * self.global_batch * self.block / max(st.window_seconds, 1e-9)
        st.window_seconds = 0.0
        loss = loss_sum / max(tokens, 1.0)
        self._stop_if_diverged(loss, "train loss")
        self.progress.set_postfix(loss=f"{loss:.3f}", tok_s=f"{rate:,.0f}")
        if self.metrics:
            self.metrics.log(
                {
                    "event": "train",
                    "step": st.step,
                    "epoch": st.epoch,
                    "samples": st.sample,
                    "samples_seen": st.samples_seen,
                    "loss": loss,
                    "lr": self.lr,
                    "tokens_per_s": rate,
                }
            )
            self.tracking.log(
                {"train_loss": loss, "lr": self.lr, "tokens_per_s": rate, "epoch": st.epoch},
                st.step,
            )
            if not storage.is_s3(self.cfg.run.output):
                self.metrics.flush()

    def maybe_next_epoch(self) -> bool:
        """Turn to the next epoch when this one has no room for another global batch (the
        rest is dropped). Before any checkpoint of the step: a checkpoint holds the state
        the next step starts from."""
        st = self.state
        if not self.schedule.epoch_over(st.sample, self.global_batch):
            return False
        st.epoch += 1
        st.sample = 0
        return True

    def maybe_eval(self, epoch_end: bool) -> None:
        if should_eval(self.state.step, self.cfg.train.eval_every_steps, epoch_end):
            self.run_eval()

    def run_eval(self) -> None:
        if self.eval_data is None:
            return
        st = self.state
        result = self.evaluate()
        self._stop_if_diverged(result["eval_loss"], "eval loss")
        st.last_eval = {**result, "step": st.step}
        if self.metrics:
            self.metrics.log({"event": "eval", "step": st.step, "epoch": st.epoch, **result})
            self.tracking.log(
                {
                    "eval_loss": result["eval_loss"],
                    "eval_perplexity": result["perplexity"],
                    "eval_tokens": result["eval_tokens"],
                },
                st.step,
            )
            self.metrics.flush()
            self.metrics.plot()
        log.info(
            "step %d: eval loss %.4f, perplexity %.3f",
            st.step,
            result["eval_loss"],
            result["perplexity"],
        )

    def maybe_checkpoint(self, epoch_end: bool) -> None:
        if should_checkpoint(self.state.step, self.cfg.train.checkpoint_every_steps, epoch_end):
            self.save_checkpoint()

    def save_checkpoint(self) -> None:
        st, t = self.state, self.cfg.train
        if self.saved_at == st.step:
            return
        self.saved_at = st.step
        st.window_loss, st.window_tokens = self.window.total(self._sum_across_ranks)
        self._stop_if_diverged(st.window_loss, "train loss")  # steps since the last log
        st.wall_seconds = self.wall_before + time.perf_counter() - self.start
        if self.metrics:
            self.metrics.flush()
            self.tracking.sync()
        acc, out = self.accelerator, self.cfg.run.output
        state, keep = st.state_dict(), t.keep_checkpoints
        self.saved_uri = checkpoint.save(acc, out, st.step, state, self.staging, keep)

    def _stop_if_diverged(self, value: float, what: str) -> None:
        """Exit 2 on a NaN or infinite loss, before it is logged or checkpointed. Callers
        pass a value reduced across ranks, so every rank stops here together (no hang)."""
        if math.isfinite(value):
            return
        st = self.state
        first = st.step - (st.step - 1) % self.cfg.train.log_every_steps
        mean = ""
        if what == "train loss" and first < st.step:  # the mean since the last log step
            mean = f" (the mean of steps {first}-{st.step})"
        if self.metrics:
            self.metrics.flush()  # the finite events before it
        last = getattr(self, "saved_uri", None)  # the newest committed checkpoint
        raise BadInput(
            f"{what} is {value} at step {st.step}{mean}: training diverged (lower "
            f"train.learning_rate or raise train.warmup_steps); last good checkpoint: "
            f"{last or 'none yet'}"
        )

    def _stopped_in_startup(self) -> bool:
        """A SIGTERM before the first step (the ranks agree on it): stop with nothing to
        checkpoint. A resubmission starts over, or continues from the checkpoint this run
        resumed from, exactly as this one would have."""
        if not self.preemption.agreed(self.accelerator):
            return False
        again = f"continues from {self.restored.uri}" if self.restored else "starts over"
        _startup_preempted(f"nothing to checkpoint yet (a resubmission {again})")
        self.accelerator.end_training()
        return True

    def _preempted(self) -> int:
        self.save_checkpoint()
        self.prefetch.close()
        done = f"preempted at step {self.state.step}: checkpoint committed ({self.saved_uri})"
        log.warning("%s, exiting %d", done, EXIT_PREEMPTED)
        launch.explain(f"mlmjob: {done}; exit {EXIT_PREEMPTED}")  # job.launch's last line
        self.tracking.finish()
        self.accelerator.end_training()
        return EXIT_PREEMPTED

    # ---- outputs ---------------------------------------------------------------------

    def _finish(self) -> None:
        acc, st = self.accelerator, self.state
        st.wall_seconds = self.wall_before + time.perf_counter() - self.start
        state_dict = acc.get_state_dict(self.wrapper)  # gathers ZeRO-3 partitions
        if acc.is_main_process:
            self._save_model(state_dict)
            summary = self._summary()
            self.metrics.flush()
            self.metrics.plot()
            write_summary(self.cfg.run.output, summary)
            self._track_summary(summary)
            if self.cfg.train.push_to_hub:
                from job.push import push

                push(self.cfg)  # a failure is logged; the run is complete either way
            log.info(
                "done: perplexity %s after %d steps, %.0f tokens/s -> %s",
                summary["perplexity"],
                st.step,
                summary["tokens_per_second"],
                self.cfg.run.output,
            )
        acc.wait_for_everyone()
        self.tracking.finish()
        acc.end_training()

    def _track_summary(self, summary: dict) -> None:
        """The final figures as metrics at the last step, and the run's files."""
        figures = {
            f"summary/{k}": v
            for k, v in summary.items()
            if isinstance(v, int | float) and not isinstance(v, bool)
        }
        self.tracking.log(figures, self.state.step)
        out = self.cfg.run.output
        files = {"summary.json": (jsonio.dumps(summary, indent=2) + "\n").encode()}
        if storage.exists(storage.join(out, "loss.png")):
            files["loss.png"] = storage.read_bytes(storage.join(out, "loss.png"))
        self.tracking.artifacts(files)

    def _save_model(self, state_dict: dict) -> None:
        out = self.cfg.run.output
        local = self.staging / "model"
        model = self.accelerator.unwrap_model(self.wrapper).model
        model.save_pretrained(
            local, state_dict={k.removeprefix("model."): v for k, v in state_dict.items()}
        )
        self.tok.save_pretrained(local)
        storage.delete_prefix(storage.join(out, "model"))
        storage.upload_dir(local, storage.join(out, "model"))

    def _summary(self) -> dict:

        st, cfg, device = self.state, self.cfg, self.accelerator.device
        ev = st.last_eval or {}
        tps = st.tokens / max(st.train_seconds, 1e-9)
        model = self.accelerator.unwrap_model(self.wrapper).model
        train = [e for e in self.metrics.events if e["event"] == "train"]
        return {
            "run_name": cfg.run.name,
            "perplexity": ev.get("perplexity"),
            "eval_loss": ev.get("eval_loss"),
            "initial_perplexity": (st.initial_eval or {}).get("perplexity"),
            "initial_eval_loss": (st.initial_eval or {}).get("eval_loss"),
            "train_tokens": st.tokens,
            "train_samples": st.samples_seen,
            "train_seconds": round(st.train_seconds, 3),
            "wall_seconds": round(st.wall_seconds, 3),
            "tokens_per_second": round(tps, 1),
            "world_size": self.world,
            "global_step": st.step,
            "epochs": round(st.samples_seen / self.schedule.epoch_samples, 4),
            "dataset_id": self.manifest.data["dataset_id"],
            "final_train_loss": train[-1]["loss"] if train else None,
            "device": device_name(device),
            "precision": self.precision,
            "parameters": count_parameters(model),
            "mfu": mfu(
                model.config, self.block, cfg.train.mlm_probability, tps, self.world, device
            ),
            "gpu_hours": round(st.wall_seconds * self.world / 3600, 4)
            if device.type == "cuda"
            else 0.0,
            "model": storage.join(cfg.run.output, "model"),
            # This attempt's batch building (a resumed run counts from its restart).
            "input_hidden_fraction": round(self.prefetch.stats.hidden_fraction, 4),
            "input_wait_seconds": round(self.prefetch.stats.wait_seconds, 3),
        }


def train(cfg: Config) -> int:
    """`mlmjob train`: rank 0 holds the lease on `run.output` throughout (the others
    write only into checkpoint folders that rank 0 commits, fenced, or not at all).

    A SIGTERM from here on is a preemption (exit 3), during start-up too (Preemption)."""
    Preemption.install()
    try:
        if env.rank() != 0:
            return _train(cfg)
        run = cfg.run
        with lease.hold(run.output, run.lease_wait_seconds, run.lease_ttl_seconds, "run.output"):
            return _train(cfg)
    except Preempted:  # while waiting for the dataset: nothing written yet
        _startup_preempted("while waiting for the dataset, nothing written")
        return EXIT_PREEMPTED


def _startup_preempted(how: str) -> None:
    done = f"preempted during start-up, before the first step: {how}"
    log.warning("%s, exiting %d", done, EXIT_PREEMPTED)
    launch.explain(f"mlmjob: {done}; exit {EXIT_PREEMPTED}")  # job.launch's last line


def _train(cfg: Config) -> int:
    from job.train import resume_check

    # First, before the accelerator: a resubmission that changes what the run is exits 2.
    changed = resume_check.check(cfg)
    summary = storage.join(cfg.run.output, "summary.json")
    if storage.exists(summary):
        log.info("run already complete, nothing to do: %s", summary)
        return EXIT_OK
    trainer = Trainer(cfg)
    if changed and trainer.accelerator.is_main_process:  # once the checkpoint restored
        resume_check.record(cfg, changed)
    return trainer.run()
