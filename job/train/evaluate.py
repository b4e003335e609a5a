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

from job.train.batch import MaskedBatch
from job.train.dist import sum_ranks


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
    # evaluation before the first step is ZeRO-3's first gather). Eager also when the step
    # is compiled (train.compile): the same weights, and the eval batches' shapes (eval
    # mode, another batch size, a shorter last batch) never make the step recompile.
    with torch.no_grad(), torch.compiler.set_stance("force_eager"):
        for i in range(n_batches):
            ids = mine[i * batch_size : (i + 1) * batch_size]
            real = len(ids) > 0
            batch = make_batch(ids if real else np.array([0]))
            s = wrapper(*batch.to(dev).tensors())
            if real:  # sums stay on the device: one synchronisation, at the end
                loss_sum += s.double()
                count += batch.n
    wrapper.train(was_training)
    loss_total, count = sum_ranks(accelerator, loss_sum.item(), count)
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
