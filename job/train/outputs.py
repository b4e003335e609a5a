"""What a finished run leaves: `model/` (save_pretrained: pipeline("fill-mask") loads it),
summary.json (its figures; DESIGN's contract), the trackers' copies, and, with
`train.push_to_hub`, the model on the Hub."""

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
    """Collective: every rank gathers the weights; rank 0 writes the outputs."""
    acc, st, cfg = parts.accelerator, parts.state, parts.cfg
    st.wall_seconds = parts.clock.wall_seconds()
    state_dict = acc.get_state_dict(parts.model.wrapper)  # gathers ZeRO-3 partitions
    if acc.is_main_process:
        export_model(parts, state_dict)
        figures = summary(parts)
        png = parts.reporter.final_plot()
        write_summary(cfg.run.output, figures)
        parts.reporter.track_summary(figures, png, st.step)
        if cfg.train.push_to_hub:
            from job.push import push

            push(cfg)  # a failure is logged; the run is complete either way
        log.info(
            "done: perplexity %s after %d steps, %.0f tokens/s -> %s",
            figures["perplexity"],
            st.step,
            figures["tokens_per_second"],
            cfg.run.output,
        )
    acc.wait_for_everyone()
    parts.reporter.finish()
    acc.end_training()


def export_model(parts: Parts, state_dict: dict) -> None:
    """`{run.output}/model/`: the weights (from the gathered `state_dict`) and tokenizer."""
    out = parts.cfg.run.output
    local = parts.staging / "model"
    model = parts.accelerator.unwrap_model(parts.model.wrapper).model
    model.save_pretrained(
        local, state_dict={k.removeprefix("model."): v for k, v in state_dict.items()}
    )
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
    }
