"""`mlmjob train`: the training loop (accelerate; DDP by default, DeepSpeed on request).

Restartable by construction: everything that decides what happens next (weights,
optimizer, RNG, step, epoch, position in the epoch, the loss window being logged) is in
the checkpoint, and masks and sample order are pure functions of (seed, epoch, sample),
so a resubmitted job continues exactly where the last committed checkpoint left it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import signal
import time
from contextlib import nullcontext

import numpy as np

from job import storage
from job.config import Config, dump_yaml
from job.errors import EXIT_OK, EXIT_PREEMPTED, BadInput
from job.log import bar, log

PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12,
                   "L4": 121e12, "A10G": 125e12, "V100": 125e12}  # fmt: skip


class Preemption:
    """SIGTERM sets a flag; ranks agree on it with an all-reduce at each step's end."""

    def __init__(self):
        self.requested = False
        signal.signal(signal.SIGTERM, self._handler)

    def _handler(self, signum, frame):
        if not self.requested:
            log.warning("SIGTERM: finishing this step, then checkpointing")
        self.requested = True

    def agreed(self, accelerator) -> bool:
        import torch

        flag = torch.tensor([1.0 if self.requested else 0.0], device=accelerator.device)
        if accelerator.num_processes > 1:
            flag = accelerator.reduce(flag, reduction="sum")
        return bool(flag.item() > 0)


def _accelerator(cfg: Config):
    import torch
    from accelerate import Accelerator
    from accelerate.utils import DeepSpeedPlugin, InitProcessGroupKwargs

    t = cfg.train
    cuda = torch.cuda.is_available()
    precision = t.precision if t.precision != "auto" else ("bf16" if cuda else "fp32")
    if precision not in ("bf16", "fp32"):
        raise BadInput(f"train.precision must be auto, bf16 or fp32, got '{t.precision}'")
    kwargs = {
        "mixed_precision": "bf16" if precision == "bf16" else "no",
        "gradient_accumulation_steps": t.gradient_accumulation_steps,
        # cpu=True would make accelerate skip DeepSpeed; on a CPU-only machine it picks the
        # CPU by itself (DS_ACCELERATOR=cpu, gloo below).
        "cpu": not cuda and not t.deepspeed,
    }
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1 or t.deepspeed
    if not cuda and distributed:  # gloo: else DeepSpeed on CPU thinks each process is alone
        kwargs["kwargs_handlers"] = [InitProcessGroupKwargs(backend="gloo")]
    if t.deepspeed:
        kwargs["deepspeed_plugin"] = DeepSpeedPlugin(hf_ds_config=_deepspeed_config(cfg, precision))
    return Accelerator(**kwargs), precision


def _deepspeed_config(cfg: Config, precision: str) -> dict:
    t = cfg.train
    try:
        ds = json.loads(storage.read_text(t.deepspeed))
    except FileNotFoundError:
        raise BadInput(f"train.deepspeed: '{t.deepspeed}' does not exist") from None
    except json.JSONDecodeError as e:
        raise BadInput(f"{t.deepspeed}:{e.lineno}: invalid JSON: {e.msg}") from None
    world = int(os.environ.get("WORLD_SIZE", "1"))
    ds["train_micro_batch_size_per_gpu"] = t.per_device_batch_size
    ds["gradient_accumulation_steps"] = t.gradient_accumulation_steps
    ds["train_batch_size"] = t.per_device_batch_size * t.gradient_accumulation_steps * world
    ds["gradient_clipping"] = t.max_grad_norm
    ds["bf16"] = {"enabled": precision == "bf16"}
    ds["zero_allow_untested_optimizer"] = True  # torch's (fused) AdamW as the client optimizer
    return ds


def _optimizer(model, cfg: Config):
    import torch

    # As the Trainer in the tutorial: no weight decay on biases and LayerNorm weights.
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or "LayerNorm" in name else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.train.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]  # fmt: skip
    # Fused AdamW: one kernel per step on GPU, and ~7x faster than foreach on CPU too.
    return torch.optim.AdamW(groups, lr=cfg.train.learning_rate, fused=True)


def lr_at(step: int, cfg: Config, total_steps: int) -> float:
    """Linear warmup, then linear decay to 0: get_linear_schedule_with_warmup, as the Trainer
    applies it (`step` optimizer steps done so far, so the first step runs at 0 with warmup)."""
    warmup = cfg.train.warmup_steps
    if step < warmup:
        return cfg.train.learning_rate * step / warmup
    return cfg.train.learning_rate * max(0.0, (total_steps - step) / max(1, total_steps - warmup))


class Trainer:
    def __init__(self, cfg: Config):
        import torch

        from job.data.blocks import load_tokenizer, tokenizer_sha256
        from job.data.loader import BlockData
        from job.data.preprocess import dataset_uri
        from job.data.shards import read_manifest
        from job.train.model import SparseMLM, compile_layers, load_model

        self.cfg = cfg
        t = cfg.train
        if t.num_threads:
            torch.set_num_threads(t.num_threads)
        if t.deepspeed:
            os.environ.setdefault("ACCELERATE_USE_DEEPSPEED", "true")
            if not torch.cuda.is_available():
                os.environ.setdefault("DS_ACCELERATOR", "cpu")
        self.tok = load_tokenizer(cfg.tokenizer, cfg.cache_dir)
        data_uri = cfg.data.dataset or dataset_uri(cfg, self.tok)
        storage.wait_for(storage.join(data_uri, "manifest.json"), _wait_seconds(), "the dataset")
        self.manifest = read_manifest(data_uri)
        if self.manifest.data["tokenizer_sha256"] != tokenizer_sha256(self.tok):
            raise BadInput(
                f"model.tokenizer: '{cfg.tokenizer}' differs from the dataset's tokenizer "
                f"'{self.manifest.data['tokenizer']}' ({self.manifest.uri})"
            )
        self.accelerator, self.precision = _accelerator(cfg)
        acc = self.accelerator
        self.world, self.rank = acc.num_processes, acc.process_index
        self.train_data = BlockData(self.manifest, "train", cfg.cache_dir)
        self.eval_data = (BlockData(self.manifest, "test", cfg.cache_dir)
                          if self.manifest.blocks("test") else None)  # fmt: skip
        self.block = self.manifest.block_size
        self.global_batch = t.per_device_batch_size * self.world * t.gradient_accumulation_steps
        self.steps_per_epoch = len(self.train_data) // self.global_batch
        if self.steps_per_epoch == 0:
            raise BadInput(
                f"{self.manifest.uri}: {len(self.train_data)} train blocks are fewer than one "
                f"global batch of {self.global_batch}; lower train.per_device_batch_size"
            )
        self.total_steps = t.max_steps or t.epochs * self.steps_per_epoch
        from accelerate.utils import set_seed

        set_seed(cfg.run.seed)  # the same initial weights (and dropout stream) in every run
        self.model = load_model(cfg.model, self.tok, cfg.cache_dir, self.block)
        if t.compile:
            compile_layers(self.model)
        wrapper = SparseMLM(self.model)
        self.wrapper, self.optimizer = acc.prepare(wrapper, _optimizer(wrapper, cfg))
        self.special = np.asarray(sorted(set(self.tok.all_special_ids)), dtype=np.int64)
        run_key = hashlib.sha256(cfg.run.output.encode()).hexdigest()[:16]
        self.staging = cfg.cache_dir / "staging" / run_key

    # ---- batches ---------------------------------------------------------------------

    def _batch(self, sample_ids: np.ndarray, stream: int, data):
        import torch

        from job.train.masking import mask_tokens

        inputs, labels = mask_tokens(
            data.get(sample_ids), sample_ids, seed=self.cfg.run.seed, stream=stream,
            special_ids=self.special, mask_id=self.tok.mask_token_id, vocab_size=len(self.tok),
            probability=self.cfg.train.mlm_probability,
        )  # fmt: skip
        dev = self.accelerator.device
        return torch.from_numpy(inputs).to(dev), torch.from_numpy(labels).to(dev)

    def _sum_across_ranks(self, *values: float) -> list[float]:
        import torch

        t = torch.tensor(values, dtype=torch.float64, device=self.accelerator.device)
        if self.world > 1:
            t = self.accelerator.reduce(t, reduction="sum")
        return t.tolist()

    # ---- evaluation ------------------------------------------------------------------

    def evaluate(self) -> dict:
        """Token-weighted masked-LM loss over the whole eval split and every rank."""
        import torch

        from job.train.masking import EVAL_STREAM

        bs = self.cfg.train.eval_batch_size or self.cfg.train.per_device_batch_size
        mine = np.arange(self.rank, len(self.eval_data), self.world)
        # Every rank runs the same number of forwards (ZeRO-3 gathers weights in lockstep).
        n_batches = math.ceil(math.ceil(len(self.eval_data) / self.world) / bs)
        loss_sum = count = 0.0
        self.wrapper.eval()
        with torch.inference_mode():
            for i in range(n_batches):
                ids = mine[i * bs : (i + 1) * bs]
                real = len(ids) > 0
                inputs, labels = self._batch(ids if real else np.array([0]), EVAL_STREAM,
                                             self.eval_data)  # fmt: skip
                s, n = self.wrapper(inputs, labels)
                if real:
                    loss_sum += float(s)
                    count += float(n)
        self.wrapper.train()
        loss_sum, count = self._sum_across_ranks(loss_sum, count)
        eval_loss = loss_sum / max(count, 1.0)
        return {
            "eval_loss": eval_loss,
            "perplexity": math.exp(eval_loss),
            "eval_tokens": int(count),
        }

    # ---- the loop --------------------------------------------------------------------

    def run(self) -> int:
        import torch

        from job.data.loader import batch_ids, epoch_order
        from job.train import checkpoint
        from job.train.metrics import Metrics

        cfg, acc, t = self.cfg, self.accelerator, self.cfg.train
        out = cfg.run.output
        # train_seconds counts time inside training steps only (as the Trainer's
        # train_runtime leaves out evaluation); wall_seconds counts everything.
        state = {"step": 0, "epoch": 0, "sample": 0, "tokens": 0, "train_seconds": 0.0,
                 "wall_seconds": 0.0, "window_seconds": 0.0,
                 "window_loss": 0.0, "window_tokens": 0.0, "last_eval": None}  # fmt: skip
        state["world_size"] = self.world
        found = checkpoint.latest(out)
        if found:
            log.info("resuming from %s", found[1])
            state.update(checkpoint.load(acc, found[1], self.staging))
            resumed_world, state["world_size"] = state["world_size"], self.world
            if resumed_world != self.world:
                log.warning("process count changed from %d to %d: continuing at global sample "
                            "%d of epoch %d", resumed_world, self.world, state["sample"],
                            state["epoch"])  # fmt: skip
        elif acc.is_main_process:
            storage.write_text(storage.join(out, "config.yaml"), dump_yaml(cfg))
        metrics = Metrics(out, state["step"] if found else None) if acc.is_main_process else None
        preemption = Preemption()
        B, A = t.per_device_batch_size, t.gradient_accumulation_steps
        n_train = len(self.train_data)
        progress = bar(total=self.total_steps, initial=state["step"], desc="train", unit=" step")
        start = time.perf_counter()
        wall_before = state["wall_seconds"]
        log.info(
            "training: %d processes, global batch %d x %d tokens, %d steps/epoch, %d steps, "
            "precision %s%s", self.world, self.global_batch, self.block, self.steps_per_epoch,
            self.total_steps, self.precision, ", DeepSpeed " + t.deepspeed if t.deepspeed else "",
        )  # fmt: skip

        saved_at = [state["step"] if found else None]

        def save_checkpoint():
            if saved_at[0] == state["step"]:
                return
            saved_at[0] = state["step"]
            state["wall_seconds"] = wall_before + time.perf_counter() - start
            if metrics:
                metrics.flush()
            checkpoint.save(acc, out, state["step"], state, self.staging, t.keep_checkpoints)

        def run_eval():
            if self.eval_data is None:
                return
            result = self.evaluate()
            state["last_eval"] = {**result, "step": state["step"]}
            if metrics:
                metrics.log(
                    {"event": "eval", "step": state["step"], "epoch": state["epoch"], **result}
                )
                metrics.flush()
                metrics.plot()
            log.info("step %d: eval loss %.4f, perplexity %.3f", state["step"],
                     result["eval_loss"], result["perplexity"])  # fmt: skip

        order = epoch_order(n_train, cfg.run.seed, state["epoch"])
        # Loss sums stay on the device between log steps: no host sync in a plain step.
        window = torch.tensor([state["window_loss"], state["window_tokens"]],
                              dtype=torch.float64, device=acc.device)  # fmt: skip

        def save_window():
            state["window_loss"], state["window_tokens"] = window.tolist()

        mark = time.perf_counter()  # end of the last step (or of eval/checkpoint work)

        def epoch_done() -> bool:
            """Not enough samples left for a global batch: the epoch ends (the rest dropped)."""
            return state["sample"] + self.global_batch > n_train

        def next_epoch():
            state["epoch"] += 1
            state["sample"] = 0
            return epoch_order(n_train, cfg.run.seed, state["epoch"])

        if epoch_done():  # resumed with a larger global batch than the epoch has left
            order = next_epoch()
        while state["step"] < self.total_steps:
            lr = lr_at(state["step"], cfg, self.total_steps)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            for m in range(A):
                ids = batch_ids(order, state["sample"] + m * B * self.world, self.rank, B)
                inputs, labels = self._batch(ids, state["epoch"], self.train_data)
                ctx = acc.accumulate(self.wrapper) if A > 1 else nullcontext()
                with ctx:
                    loss_sum, n = self.wrapper(inputs, labels)
                    acc.backward(loss_sum / n.clamp(min=1))
                    if acc.sync_gradients and acc.distributed_type.name != "DEEPSPEED":
                        acc.clip_grad_norm_(self.wrapper.parameters(), t.max_grad_norm)
                    self.optimizer.step()
                    self.optimizer.zero_grad(set_to_none=True)
                window += torch.stack([loss_sum.detach().double(), n.double()])
            state["step"] += 1
            state["sample"] += self.global_batch
            state["tokens"] += self.global_batch * self.block
            log_now = state["step"] % t.log_every_steps == 0 or state["step"] == self.total_steps
            if log_now:
                loss_sum_all, tokens_all = self._sum_across_ranks(*window.tolist())  # syncs
                window.zero_()
            step_seconds = time.perf_counter() - mark
            state["train_seconds"] += step_seconds
            state["window_seconds"] += step_seconds
            progress.update(1)
            if log_now:
                window_steps = (state["step"] - 1) % t.log_every_steps + 1
                rate = window_steps * self.global_batch * self.block / state["window_seconds"]
                state["window_seconds"] = 0.0
                loss = loss_sum_all / max(tokens_all, 1.0)
                progress.set_postfix(loss=f"{loss:.3f}", tok_s=f"{rate:,.0f}")
                if metrics:
                    metrics.log({"event": "train", "step": state["step"], "epoch": state["epoch"],
                                 "samples": state["sample"], "loss": loss, "lr": lr,
                                 "tokens_per_s": rate})  # fmt: skip
                    if not storage.is_s3(out):
                        metrics.flush()
            # The epoch turns over before any checkpoint of this step, so a checkpoint holds
            # the state the next step starts from.
            epoch_end = epoch_done() and state["step"] < self.total_steps
            if epoch_end:
                order = next_epoch()
            every = t.eval_every_steps
            if (every and state["step"] % every == 0) or (epoch_end and every is None):
                run_eval()
            if state["step"] % t.checkpoint_every_steps == 0 or epoch_end:
                save_window()
                save_checkpoint()
            if preemption.agreed(acc):
                save_window()
                save_checkpoint()
                log.warning("preempted at step %d: checkpoint committed, exiting %d",
                            state["step"], EXIT_PREEMPTED)  # fmt: skip
                acc.end_training()
                return EXIT_PREEMPTED
            mark = time.perf_counter()
        progress.close()
        if self.eval_data is not None and (state["last_eval"] or {}).get("step") != state["step"]:
            run_eval()
        state["wall_seconds"] = wall_before + time.perf_counter() - start
        self._finish(state, metrics)
        acc.end_training()
        return EXIT_OK

    # ---- outputs ---------------------------------------------------------------------

    def _finish(self, state: dict, metrics) -> None:
        acc, cfg = self.accelerator, self.cfg
        out = cfg.run.output
        state_dict = acc.get_state_dict(self.wrapper)  # gathers ZeRO-3 partitions
        if acc.is_main_process:
            local = self.staging / "model"
            model = acc.unwrap_model(self.wrapper).model
            model.save_pretrained(local, state_dict={k.removeprefix("model."): v
                                                     for k, v in state_dict.items()})  # fmt: skip
            self.tok.save_pretrained(local)
            storage.delete_prefix(storage.join(out, "model"))
            storage.upload_dir(local, storage.join(out, "model"))
            ev = state["last_eval"] or {}
            seconds = state["train_seconds"]
            tps = state["tokens"] / max(seconds, 1e-9)
            device = acc.device
            summary = {
                "perplexity": ev.get("perplexity"),
                "eval_loss": ev.get("eval_loss"),
                "train_tokens": state["tokens"],
                "train_seconds": round(seconds, 3),
                "wall_seconds": round(state["wall_seconds"], 3),
                "tokens_per_second": round(tps, 1),
                "world_size": self.world,
                "global_step": state["step"],
                "epochs": round(state["step"] / self.steps_per_epoch, 4),
                "dataset_id": self.manifest.data["dataset_id"],
                "final_train_loss": next(
                    (e["loss"] for e in reversed(metrics.events) if e["event"] == "train"), None
                ),  # fmt: skip
                "device": _device_name(device),
                "precision": self.precision,
                "parameters": sum(p.numel() for p in model.parameters()),
                "mfu": _mfu(
                    model.config, self.block, cfg.train.mlm_probability, tps, self.world, device
                ),  # fmt: skip
                "gpu_hours": round(state["wall_seconds"] * self.world / 3600, 4)
                if device.type == "cuda"
                else 0.0,
                "model": storage.join(out, "model"),
            }
            metrics.flush()
            metrics.plot()
            from job.train.metrics import write_summary

            write_summary(out, summary)
            log.info("done: perplexity %s after %d steps, %.0f tokens/s -> %s",
                     summary["perplexity"], state["step"], tps, out)  # fmt: skip
        acc.wait_for_everyone()


def _device_name(device) -> str:
    import torch

    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def _mfu(config, seq_len, mask_fraction, tokens_per_s, world, device) -> float | None:
    from job.train.model import flops_per_token

    name = _device_name(device)
    peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)
    if peak is None:
        return None
    achieved = flops_per_token(config, seq_len, mask_fraction) * tokens_per_s
    return round(achieved / (peak * world), 4)


def _wait_seconds() -> float:
    """MLMJOB_WAIT_SECONDS: how long a Job waits for its input (the k8s manifests set it)."""
    return float(os.environ.get("MLMJOB_WAIT_SECONDS", "0"))


def train(cfg: Config) -> int:
    summary = storage.join(cfg.run.output, "summary.json")
    if storage.exists(summary):
        log.info("run already complete, nothing to do: %s", summary)
        return EXIT_OK
    return Trainer(cfg).run()
