"""GPU training throughput: distilroberta-base architecture, random weights, bf16, seq 128.

    python bench/gpu.py [--batch 128] [--steps 50] [--compile]

Prints JSON: tokens/s per GPU and MFU (model FLOPs actually computed: the encoder, the
attention, and the vocabulary projection at the masked 15% only) for mlmjob's step
(SparseMLM, fused AdamW, bf16 autocast, SDPA) and, for reference, the same model with
the full vocabulary projection at every position (what RobertaForMaskedLM computes).
Needs no data or weights: blocks are random token ids, masked as in training.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from job.train.summary import PEAK_BF16_FLOPS  # noqa: E402
from job.train.masking import mask_tokens  # noqa: E402
from job.train.model import SparseMLM, flops_per_token  # noqa: E402

DISTILROBERTA = {"vocab_size": 50265, "hidden_size": 768, "num_hidden_layers": 6,
                 "num_attention_heads": 12, "intermediate_size": 3072,
                 "max_position_embeddings": 514, "type_vocab_size": 1}  # fmt: skip


def measure(model, step_fn, batches, warmup: int) -> float:
    for b in batches[:warmup]:
        step_fn(*b)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for b in batches[warmup:]:
        step_fn(*b)
    torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    from transformers import RobertaConfig, RobertaForMaskedLM

    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--compile", action="store_true")
    args = p.parse_args()
    assert torch.cuda.is_available(), "this benchmark needs a GPU"
    dev = torch.device("cuda")
    name = torch.cuda.get_device_name(dev)
    peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)
    config = RobertaConfig(**DISTILROBERTA)
    config._attn_implementation = "sdpa"
    rng = np.random.default_rng(0)
    n = args.steps + args.warmup
    special = np.array([0, 1, 2, 3, 50264])
    batches = []
    for i in range(n):
        ids = rng.integers(4, 50264, size=(args.batch, 128))
        ids[:, 0] = 0
        inputs, labels = mask_tokens(ids, np.arange(i * args.batch, (i + 1) * args.batch),
                                     seed=0, stream=0, special_ids=special, mask_id=50264,
                                     vocab_size=50265)  # fmt: skip
        batches.append((torch.from_numpy(inputs).to(dev), torch.from_numpy(labels).to(dev)))
    tokens = args.steps * args.batch * 128
    results = {
        "device": name,
        "batch": f"{args.batch} x 128",
        "steps": args.steps,
        "precision": "bf16",
        "model": "distilroberta-base architecture, random weights",
    }

    for variant in ("mlmjob", "full_head"):
        torch.manual_seed(0)
        model = RobertaForMaskedLM(config).to(dev)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01, fused=True)
        wrapper = SparseMLM(model)
        if args.compile:
            wrapper = torch.compile(wrapper)

        def step(inputs, labels, wrapper=wrapper, model=model, opt=opt, variant=variant):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                if variant == "mlmjob":
                    s, c = wrapper(inputs, labels)
                    loss = s / c
                else:
                    loss = model(input_ids=inputs, labels=labels).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)

        seconds = measure(model, step, batches, args.warmup)
        tps = tokens / seconds
        mask_fraction = 0.15 if variant == "mlmjob" else 1.0
        flops = flops_per_token(config, 128, mask_fraction)
        results[variant] = {
            "tokens_per_s_per_gpu": round(tps),
            "mfu": round(flops * tps / peak, 4) if peak else None,
            "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
        }
        del model, opt, wrapper
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    results["speedup_vs_full_head"] = round(
        results["mlmjob"]["tokens_per_s_per_gpu"] / results["full_head"]["tokens_per_s_per_gpu"], 2
    )
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
