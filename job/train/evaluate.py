"""Perplexity of a masked LM on a dataset's test split: training's evaluations and
`mlmjob evaluate` run this one function, so their figures compare exactly.

Masks are fixed by the seed (EVAL_STREAM) and the loss is token-weighted over the whole
split and every rank: exp(total masked-token loss / total masked tokens), not a mean of
per-batch means.
"""

from __future__ import annotations

import math
import re
import sys
from collections.abc import Callable

import numpy as np

from job import env, jsonio, storage
from job.config import Config
from job.data import shards
from job.data.blocks import load_tokenizer, tokenizer_sha256
from job.data.shards import read_manifest
from job.errors import EXIT_OK, BadInput
from job.log import log
from job.train.batch import MaskedBatch, Masker
from job.train.masking import EVAL_STREAM


def dataset_manifest(cfg: Config, tok):
    """The config's dataset (waiting for it as a Job applied before preprocess does),
    refused when it was made with another tokenizer than `tok`."""
    data_uri = cfg.data.dataset or shards.dataset_uri(cfg, tok)
    storage.wait_for(storage.join(data_uri, "manifest.json"), env.wait_seconds(), "the dataset")
    manifest = read_manifest(data_uri)
    if manifest.data["tokenizer_sha256"] != tokenizer_sha256(tok):
        raise BadInput(
            f"model.tokenizer: '{cfg.tokenizer}' differs from the dataset's tokenizer "
            f"'{manifest.data['tokenizer']}' ({manifest.uri})"
        )
    return manifest


def masked_lm_loss(
    accelerator,
    wrapper,
    n_samples: int,
    make_batch: Callable[[np.ndarray], MaskedBatch],
    batch_size: int,
) -> dict:
    """Token-weighted masked-LM loss of `wrapper` (a SparseMLM, prepared or not) over
    samples 0..n_samples-1, rank r taking every world-th sample from r."""
    import torch

    rank, world = accelerator.process_index, accelerator.num_processes
    mine = np.arange(rank, n_samples, world)
    # Every rank runs the same number of forwards (ZeRO-3 gathers weights in lockstep).
    n_batches = math.ceil(math.ceil(n_samples / world) / batch_size)
    dev = accelerator.device
    loss_sum, count = torch.zeros((), dtype=torch.float64, device=dev), 0
    was_training = wrapper.training
    wrapper.eval()
    # no_grad, not inference_mode: ZeRO-3 gathers parameters inside the forward, and a
    # tensor it creates in inference mode cannot take part in a later backward (the
    # evaluation before the first step is ZeRO-3's first gather).
    with torch.no_grad():
        for i in range(n_batches):
            ids = mine[i * batch_size : (i + 1) * batch_size]
            real = len(ids) > 0
            batch = make_batch(ids if real else np.array([0]))
            s = wrapper(*batch.to(dev).tensors())
            if real:  # sums stay on the device: one synchronisation, at the end
                loss_sum += s.double()
                count += batch.n
    wrapper.train(was_training)
    totals = torch.tensor([loss_sum.item(), count], dtype=torch.float64, device=dev)
    if world > 1:
        totals = accelerator.reduce(totals, reduction="sum")
    loss_total, count = totals.tolist()
    eval_loss = loss_total / max(count, 1.0)
    return {"eval_loss": eval_loss, "perplexity": perplexity(eval_loss), "eval_tokens": int(count)}


# exp(709.78...) is the largest double: above it math.exp raises OverflowError.
_MAX_LOG = math.log(sys.float_info.max)


def perplexity(eval_loss: float) -> float:
    """exp(eval_loss), capped at the largest double (1.8e308) where it would overflow (an
    eval loss above 709.78: a diverged model). Capped rather than null or Infinity: every
    reader of metrics.jsonl, summary.json and the trackers gets a number, and strict JSON
    has no Infinity; eval_loss keeps the real figure. NaN stays NaN (callers refuse it)."""
    return eval_loss if math.isnan(eval_loss) else math.exp(min(eval_loss, _MAX_LOG))


def result_name(model_uri: str) -> str:
    """`eval/<name>.json` for a model URI: the URI without its scheme, `/` as `--` (as the
    Hub cache names repos), other characters outside [A-Za-z0-9._-] as `_`. Unambiguous,
    so that two runs' `model/` folders evaluated into one run never overwrite each other."""
    bare = re.sub(r"^[a-z0-9]+://", "", str(model_uri)).strip("/")
    return re.sub(r"[^A-Za-z0-9._-]", "_", bare.replace("/", "--"))


def _model_tokenizer(uri: str, cfg: Config):
    """The tokenizer saved with the model: what decides whether the dataset's ids mean to
    this model what they meant to the one trained on them."""
    from transformers import AutoTokenizer

    from job.pretrained import load_pretrained

    tok = load_pretrained(AutoTokenizer, uri, cfg.cache_dir / "models", "infer.model")
    if tok.mask_token is None:
        raise BadInput(f"infer.model: '{uri}' has no mask token; masked-LM perplexity needs one")
    if not getattr(tok, "is_fast", False):
        raise BadInput(f"infer.model: '{uri}' has no fast (Rust) tokenizer")
    return tok


def _check_same_tokenizer(uri: str, tok, manifest) -> None:
    if tokenizer_sha256(tok) != manifest.data["tokenizer_sha256"]:
        raise BadInput(
            f"infer.model: the tokenizer of '{uri}' differs from the dataset's "
            f"'{manifest.data['tokenizer']}' ({manifest.uri}); preprocess with model.tokenizer "
            "set to the model's tokenizer"
        )


def _eval_accelerator(cfg: Config):
    """Plain data parallel even when the run trained with DeepSpeed: evaluation holds no
    optimizer state to partition, and the forward is the same."""
    from job.train.accel import build_accelerator

    plain = cfg.model_copy(deep=True)
    plain.train.deepspeed = None
    return build_accelerator(plain)


def evaluate(cfg: Config) -> int:
    """`mlmjob evaluate`: perplexity of `infer.model` (default: the run's `model/`) on the
    config's test split; writes `{run.output}/eval/<name>.json` and prints one line."""
    from transformers import AutoModelForMaskedLM

    from job.data.loader import BlockData
    from job.pretrained import load_pretrained
    from job.train.model import SparseMLM

    uri = cfg.infer.model or storage.join(cfg.run.output, "model")
    acc, precision = _eval_accelerator(cfg)
    # One process per node downloads (model, shards) into the node's cache; the others
    # wait, then read the same files.
    with acc.local_main_process_first():
        tok = _model_tokenizer(uri, cfg)
        manifest = dataset_manifest(cfg, load_tokenizer(cfg.tokenizer, cfg.cache_dir))
        _check_same_tokenizer(uri, tok, manifest)
        if not manifest.blocks("test"):
            raise BadInput(f"{manifest.uri}: the test split is empty (data.test_size is 0)")
        data = BlockData(manifest, "test", cfg.cache_dir, acc.is_local_main_process)
        model = load_pretrained(
            AutoModelForMaskedLM,
            uri,
            cfg.cache_dir / "models",
            "infer.model",
            attn_implementation="sdpa",
        )
    wrapper = acc.prepare_model(SparseMLM(model), evaluation_mode=True)
    masker = Masker.of(tok, cfg.run.seed, cfg.train.mlm_probability, acc.device.type == "cuda")
    bs = cfg.train.eval_batch_size or cfg.train.per_device_batch_size
    result = masked_lm_loss(
        acc, wrapper, len(data), lambda ids: masker.batch(data, ids, EVAL_STREAM), bs
    )
    if not math.isfinite(result["eval_loss"]):  # all-reduced: every rank raises
        raise BadInput(
            f"infer.model: '{uri}' gives eval loss {result['eval_loss']} on the test split of "
            f"{manifest.uri}: its weights or outputs are not finite"
        )
    if acc.is_main_process:
        _report(cfg, uri, manifest, result, acc.num_processes, precision)
    acc.wait_for_everyone()
    acc.end_training()
    return EXIT_OK


def _report(cfg: Config, uri: str, manifest, result: dict, world: int, precision: str) -> None:
    out = storage.join(cfg.run.output, "eval", f"{result_name(uri)}.json")
    record = {
        "model": uri,
        "dataset_id": manifest.data["dataset_id"],
        "split": "test",
        **result,
        "eval_blocks": manifest.blocks("test"),
        "seed": cfg.run.seed,
        "mlm_probability": cfg.train.mlm_probability,
        "world_size": world,
        "precision": precision,
    }
    storage.write_text(out, jsonio.dumps(record, indent=2) + "\n")
    log.info("wrote %s", out)
    ppl, loss, n = result["perplexity"], result["eval_loss"], result["eval_tokens"]
    ds = manifest.data["dataset_id"]
    print(f"{uri}: perplexity {ppl:.6g} (eval loss {loss:.6g}, {n} masked tokens of {ds} test)")
