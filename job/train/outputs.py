"""What a finished run leaves: `model/` (save_pretrained: pipeline("fill-mask") loads it),
summary.json (its figures; DESIGN's contract), the trackers' copies, and, with
`train.push_to_hub`, the model on the Hub.

`model/` holds fp32 weights whatever the run computed in. Under DeepSpeed with bf16 the
engine casts the module to bf16 and keeps the fp32 master weights in its optimizer
partitions; accelerate's `get_state_dict` returns the bf16 copy (ZeRO-1/2) or its 16-bit
gather (ZeRO-3), which would drop the masters and make every later load bf16
(transformers loads `dtype="auto"`). So the weights come from DeepSpeed's fp32
consolidation instead (`fp32_state_dict`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from job import storage
from job.log import log
from job.train.metrics import write_summary
from job.train.optim import count_parameters
from job.train.summary import device_name, mfu

if TYPE_CHECKING:
    from job.train.build import Parts


def finish(parts: Parts) -> None:
    """Collective: every rank gathers the weights; rank 0 writes the outputs. The Hub push,
    which may take long, runs on rank 0 after the process group has ended: the other ranks
    exit instead of waiting for it in a collective (under NCCL's timeout)."""
    acc, st, cfg, phases = parts.accelerator, parts.state, parts.cfg, parts.clock.phases
    with phases.timed("save_s"):
        state_dict = fp32_state_dict(acc, parts.model.wrapper)
        if acc.is_main_process:
            export_model(parts, state_dict)
    st.wall_seconds = parts.clock.wall_seconds()
    if acc.is_main_process:
        figures = summary(parts)
        for row in phases.table(st.wall_seconds):
            log.info("%s", row)
        png = parts.reporter.final_plot()
        write_summary(cfg.run.output, figures)
        parts.reporter.track_summary(figures, png, st.step)
        log.info(
            "done: perplexity %s after %d steps, %.0f tokens/s -> %s",
            figures["perplexity"],
            st.step,
            figures["tokens_per_second"],
            cfg.run.output,
        )
    acc.wait_for_everyone()
    parts.reporter.finish()
    end_process_group(acc)
    if acc.is_main_process and cfg.train.push_to_hub:
        from job.push import push

        push(cfg)  # a failure is logged; the run is complete either way


def end_process_group(acc) -> None:
    """accelerate 1.15's `end_training` destroys the default process group, except in a
    notebook (fork) launch; nothing here may wait on the other ranks after this."""
    import torch.distributed as dist

    acc.end_training()
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def fp32_state_dict(acc, wrapper) -> dict:
    """Collective: the wrapper's full state dict in fp32 on rank 0 (empty on the others).
    Without DeepSpeed the module is fp32 (bf16 is autocast), so accelerate's is."""
    if acc.distributed_type.name != "DEEPSPEED":
        return acc.get_state_dict(wrapper)
    import torch

    module = acc.unwrap_model(wrapper)
    keep = acc.is_main_process
    masters = {}
    # Every rank, every parameter, in the same order: each call is a collective (an
    # all-reduce of the partitions under ZeRO-1/2, an all-gather under ZeRO-3).
    for param in module.parameters():
        full = _fp32_master(param)
        if keep:
            masters[id(param)] = full.detach().to("cpu", torch.float32)
    if not keep:
        return {}
    state = {}
    # Every key of the module's own state dict (the tied decoder weight too, which
    # save_pretrained stores once); buffers, which ZeRO does not partition, as they are
    # (floating ones back in fp32: the engine cast them to bf16 with the module).
    for name, t in module.state_dict(keep_vars=True).items():
        if id(t) in masters:
            state[name] = masters[id(t)]
        else:
            t = t.detach().cpu()
            state[name] = t.float() if t.is_floating_point() else t
    return state


def _fp32_master(param):
    """DeepSpeed's fp32 master of `param`, or, for one the optimizer does not hold (frozen,
    or ZeRO-0 without bf16), the module's own copy, gathered under ZeRO-3."""
    from deepspeed.utils import safe_get_full_fp32_param

    full = safe_get_full_fp32_param(param)
    if full is not None:
        return full
    if hasattr(param, "ds_id"):  # a ZeRO-3 partition: gathered (collective)
        from deepspeed.zero import GatheredParameters

        with GatheredParameters([param]):
            return param.detach().clone()
    return param


def export_model(parts: Parts, state_dict: dict) -> None:
    """`{run.output}/model/`: the weights (from the gathered `state_dict`) and tokenizer.
    config.json says `dtype: float32`, the weights' dtype (save_pretrained would write the
    dtype of the module, bf16 under DeepSpeed, and transformers loads what it says)."""
    out = parts.cfg.run.output
    local = parts.staging / "model"
    model = parts.accelerator.unwrap_model(parts.model.wrapper).model
    model.save_pretrained(
        local, state_dict={k.removeprefix("model."): v for k, v in state_dict.items()}
    )
    model.config.dtype = "float32"
    model.config.save_pretrained(local)
    parts.data.tokenizer.save_pretrained(local)
    storage.delete_prefix(storage.join(out, "model"))
    storage.upload_dir(local, storage.join(out, "model"))


def summary(parts: Parts) -> dict:
    """summary.json's figures (rank 0)."""
    st, cfg, acc, data = parts.state, parts.cfg, parts.accelerator, parts.data
    device, world = acc.device, acc.num_processes
    ev = st.last_eval or {}
    tps = st.tokens / max(st.train_seconds, 1e-9)
    model = acc.unwrap_model(parts.model.wrapper).model
    stats = parts.batches.stats
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
        "world_size": world,
        "global_step": st.step,
        "epochs": round(st.samples_seen / parts.schedule.epoch_samples, 4),
        "dataset_id": data.manifest.data["dataset_id"],
        "final_train_loss": parts.reporter.last_loss,
        "device": device_name(device),
        "precision": parts.model.precision,
        "parameters": count_parameters(model),
        "mfu": mfu(model.config, data.block, cfg.train.mlm_probability, tps, world, device),
        "gpu_hours": round(st.wall_seconds * world / 3600, 4) if device.type == "cuda" else 0.0,
        "model": storage.join(cfg.run.output, "model"),
        # This attempt's batch building (a resumed run counts from its restart).
        "input_hidden_fraction": round(stats.hidden_fraction, 4),
        "input_wait_seconds": round(stats.wait_seconds, 3),
        "phases": parts.clock.phases.summary(),
    }
