"""`mlmjob evaluate`: perplexity of a masked LM (`infer.model`, default the run's `model/`)
on the config's test split, by the function training evaluates with
(job.train.evaluate.masked_lm_loss), so the figures compare exactly."""

from __future__ import annotations

import math

from job import jsonio, storage
from job.config import Config
from job.data.blocks import load_tokenizer, tokenizer_sha256
from job.data.manifest import dataset_manifest
from job.errors import EXIT_OK, BadInput
from job.log import log
from job.train.batch import Masker
from job.train.evaluate import masked_lm_loss, result_name
from job.train.masking import EVAL_STREAM


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
    optimizer state to partition. With bf16 the forward is autocast over fp32 weights, as
    DDP trains; DeepSpeed's training-time evaluation runs its bf16 copy of the module, so
    the two agree to bf16's precision, not exactly (README, Precision)."""
    from job.train.accel import build_accelerator

    plain = cfg.model_copy(deep=True)
    plain.train.deepspeed = None
    return build_accelerator(plain)


def main(cfg: Config) -> int:
    """`mlmjob evaluate`: perplexity of `infer.model` (default: the run's `model/`) on the
    config's test split; writes `{run.output}/eval/<name>.json` and prints one line."""
    import torch
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
        # fp32 weights whatever the folder holds; train.precision bf16 autocasts them
        model = load_pretrained(
            AutoModelForMaskedLM,
            uri,
            cfg.cache_dir / "models",
            "infer.model",
            attn_implementation="sdpa",
            dtype=torch.float32,
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
