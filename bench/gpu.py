"""One-GPU benchmark: mlmjob against the HF Trainer and pipeline, distilroberta-base size.

    python bench/gpu.py [--steps 50] [--warmup 10] [--batch 128]
                        [--only train,compiled,zero2,infer,e2e] [--e2e-steps 200]
                        [--out FILE] [--tokenizer DIR] [--eli5 FILE] [--smoke]

Prints one JSON object (and writes it with --out). Every part runs in its own process, so
that accelerate's and DeepSpeed's global state, CUDA caches and peak-memory counters of one
part never leak into another. Data are random token ids (no dataset or weights needed);
the model is the distilroberta-base architecture (6 x 768, vocab 50,265), randomly
initialised from one seed, so mlmjob and the Trainer start from the same weights.

train   (a) mlmjob's step as job/train/loop.py runs it: SparseMLM, MaskedBatch built on the
        host from mask_tokens and prepared ahead by Prefetcher (pinned, copied non_blocking),
        the job's fused AdamW, accelerate's bf16 autocast, clip 1.0, no .item() per step.
        (b) transformers.Trainer + DataCollatorForLanguageModeling, configured carefully
        (gpu_trainer.py). Both train warmup + timed + profiled steps on the same blocks with
        the same schedule, then are evaluated by one procedure on one fixed masked set.
compiled (a) with train.compile's static batch layout (job.train.batch.Buckets) and the whole
        forward compiled by job.train.model.compile_step, mode="reduce-overhead" on CUDA (CUDA
        graphs); the same steps, timed after the warm-up (compile and capture) steps.
zero2   (a) again, but through accelerate + DeepSpeed ZeRO-2 as job.train.accel builds it.
infer   job.infer.fill_mask.FillMask (run_part, the CLI's code) against pipeline("fill-mask").
e2e     the job as the pods run it (gpu_e2e.py): `mlmjob preprocess` of the shared ELI5 file,
        `python -m job.launch train` (torchrun, one GPU; train.compile, bf16, a checkpoint
        every quarter of the run), `mlmjob infer`; figures from summary.json (its `phases`),
        metrics.jsonl and the job's log.

How each figure is measured is in the JSON's "methods". --smoke runs every code path on
the CPU with a tiny model; its figures mean nothing.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import subprocess
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from job.config import Config  # noqa: E402
from job.train.batch import Buckets, MaskedBatch  # noqa: E402
from job.train.masking import EVAL_STREAM, mask_tokens  # noqa: E402
from job.train.model import SparseMLM, compile_step, flops_per_token  # noqa: E402
from job.train.summary import peak_flops  # noqa: E402

DISTILROBERTA = {
    "vocab_size": 50265,
    "hidden_size": 768,
    "num_hidden_layers": 6,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
    "max_position_embeddings": 514,
    "type_vocab_size": 1,
}
SMOKE_MODEL = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 256,
}
SEQ, SEED, LR, WEIGHT_DECAY, MLM_PROBABILITY = 128, 42, 1e-4, 0.01, 0.15
ZERO2 = ROOT / "configs" / "deepspeed" / "zero2.json"
SHARED = ROOT.parent / "shared" / "data"  # as bench/common.py, which exits when it is absent

METHODS = {
    "tokens_per_s_per_gpu": "timed_steps x batch x 128 / wall seconds of the timed steps, "
    "after the warm-up steps; torch.cuda.synchronize() at both ends. Host work between steps "
    "(batch building, data loading) is inside the window.",
    "mfu": "tokens/s x FLOPs per token / dense bf16 peak of the GPU "
    "(job.train.summary.PEAK_BF16_FLOPS). FLOPs per token = job.train.model.flops_per_token "
    "(6 FLOPs per weight multiply-add: 2 per MAC, x3 for forward + backward): encoder weights "
    "and attention at all 128 positions, vocabulary projection at the masked 15% "
    "(mask_fraction 0.15); this slightly over-counts SparseMLM, whose last layer runs its "
    "queries and MLP at masked positions only. 'mfu_computed_flops' (Trainer) "
    "uses mask_fraction 1.0: the head at every position, which is what RobertaForMaskedLM "
    "computes; 'mfu_useful_flops' uses 0.15, the FLOPs the loss needs, as mlmjob's 'mfu'.",
    "peak_memory_gib": "torch.cuda.max_memory_allocated() at the end of the profiled steps "
    "(its own process: model, optimizer state, activations; not the CUDA context or the "
    "caching allocator's reserve).",
    "gpu_idle_fraction": "over the profiled steps (run after the timed ones, so profiler "
    "overhead does not touch tokens/s): 1 - (union of CUDA kernel intervals recorded by "
    "torch.profiler, CUDA activity only) / host wall time between two synchronize() calls. "
    "Copies and memsets do not count as busy; profiler overhead can only raise it.",
    "eval": "after the same number of steps, each final model wrapped in SparseMLM, eval "
    "mode, bf16 autocast, on the same held-out random blocks with the same fixed masks "
    "(mask_tokens(stream=EVAL_STREAM)); loss = summed cross-entropy / masked tokens. On "
    "random tokens both perplexities sit near the vocabulary size; compare the ratio.",
    "compiled": "the same step and timing as train.mlmjob, with train.compile's static batch "
    "layout (masked positions padded to buckets fixed by batch, block and masking probability, "
    "padded rows ignored by the loss) and job.train.model.compile_step (torch.compile of the "
    "whole forward, dynamic=False; mode='reduce-overhead', i.e. CUDA graphs, on CUDA; "
    "torch.compiler.cudagraph_mark_step_begin() before each step). Compilation and graph "
    "capture fall in the warm-up steps; 'recompiles' counts the graphs compiled after the "
    "first step (0: one shape throughout).",
    "zero2": "the same step and timing as train.mlmjob, in-process, through the accelerator "
    "job.train.accel.build_accelerator makes for train.deepspeed=configs/deepspeed/zero2.json "
    "(its deepspeed_config fills the file in; DeepSpeed clips, so the loop's clip is skipped "
    "as the loop skips it); one process, rendezvous from MASTER_ADDR/PORT, RANK=0, "
    "WORLD_SIZE=1, LOCAL_RANK=0. Chosen over running `mlmjob train`: its tokens_per_second "
    "averages over every step including the first (start-up), and it reports no peak memory.",
    "e2e": "the real job in fresh processes on a config written to a temporary folder "
    "(gpu_e2e.py): the same architecture with random weights (model.from_scratch), ELI5 "
    "blocks of 128, --batch per GPU, --e2e-steps steps, a checkpoint every quarter of them "
    "to the run's local output folder. 'train' is summary.json's figures: tokens_per_second "
    "over every step (the first, with compilation, included), mfu from it, phases; "
    "'steady_tokens_per_second' over metrics.jsonl's log windows after the first, "
    "'steady_mfu' scaled from mfu by it; checkpoint total/blocking seconds from the log line "
    "at each commit. 'infer' is mlmjob infer's own lines/s (after its model is loaded), "
    "on the run's model/; 'command_seconds' each command's wall time, process start included.",
    "infer_lines_per_s": "lines / wall seconds after the model is loaded and one warm-up "
    "batch has run; FillMask through job.infer.fill_mask.run_part (read, encode, sort by length, "
    "batch 64, top-k, describe), the pipeline one call per line or batch_size=64.",
}


# ---- shared by every part ----------------------------------------------------------------


def model_config(args):
    from transformers import RobertaConfig

    config = RobertaConfig(
        **{**DISTILROBERTA, **(SMOKE_MODEL if args.smoke else {})},
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
    )
    config._attn_implementation = "sdpa"
    return config


def new_model(args):
    """Random weights from one seed: mlmjob and the Trainer start from the same model."""
    from transformers import AutoModelForMaskedLM

    torch.manual_seed(SEED)
    return AutoModelForMaskedLM.from_config(model_config(args), attn_implementation="sdpa")


def total_steps(args) -> int:
    return args.warmup + args.steps + args.profile_steps


def random_blocks(n: int, seed: int, tok) -> np.ndarray:
    """n blocks of 128 random non-special ids, <s> first as in a tokenized text."""
    ids = np.random.default_rng(seed).integers(4, tok.mask_token_id, size=(n, SEQ))
    ids[:, 0] = tok.bos_token_id
    return ids


def masked_batch(
    tok, blocks: np.ndarray, sample_ids: np.ndarray, stream: int, static: bool = False
) -> MaskedBatch:
    """As job.train.batch.Masker lays a batch out; `static`: with train.compile's buckets."""
    inputs, labels = mask_tokens(
        blocks[sample_ids],
        sample_ids,
        seed=SEED,
        stream=stream,
        special_ids=np.asarray(sorted(tok.all_special_ids)),
        mask_id=tok.mask_token_id,
        vocab_size=len(tok),
        probability=MLM_PROBABILITY,
    )
    buckets = Buckets.of(*inputs.shape, MLM_PROBABILITY) if static else None
    return MaskedBatch.build(inputs, labels, buckets)


def compile_mode(device: torch.device) -> str | None:
    """CUDA graphs ("reduce-overhead") where there are any; inductor's default elsewhere."""
    return "reduce-overhead" if device.type == "cuda" else None


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def kernel_busy_ns(events) -> int:
    """Length of the union of the kernels' intervals: kernels on several streams overlap,
    so a plain sum could exceed the wall time."""
    spans = sorted((e.start_ns(), e.end_ns()) for e in events if e.activity_type() == "kernel")
    busy, end = 0, None
    for start, stop in spans:
        if end is None or start > end:
            busy, end = busy + stop - start, stop
        elif stop > end:
            busy, end = busy + stop - end, stop
    return busy


class Phases:
    """Steps 1..warmup warm up, the next `steps` are timed, the next `profile_steps` run under
    torch.profiler. `at(done)` is called with the number of steps done: at 0 before the
    first, then after each (by the mlmjob loop, or by a TrainerCallback)."""

    def __init__(self, args, device: torch.device):
        self.device, self.warmup, self.steps = device, args.warmup, args.steps
        self.total, self.tokens = total_steps(args), args.steps * args.batch * SEQ
        self.result: dict = {}

    def at(self, done: int) -> None:
        if done == self.warmup:
            sync(self.device)
            self.start = time.perf_counter()
        if done == self.warmup + self.steps:
            sync(self.device)
            seconds = time.perf_counter() - self.start
            self.result["tokens_per_s_per_gpu"] = round(self.tokens / seconds, 1)
            self.result["step_ms"] = round(1000 * seconds / max(self.steps, 1), 2)
            self._start_profile()
        if done == self.total:
            self._stop_profile()

    def _start_profile(self) -> None:
        from torch.profiler import ProfilerActivity, profile

        # CUDA activity only: CPU-op tracing would slow the host and inflate the idle share.
        cuda = self.device.type == "cuda"
        self.prof = profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU])
        self.prof.start()
        sync(self.device)
        self.prof_start = time.perf_counter()

    def _stop_profile(self) -> None:
        sync(self.device)
        wall_ns = (time.perf_counter() - self.prof_start) * 1e9
        self.prof.stop()
        busy = kernel_busy_ns(self.prof.profiler.kineto_results.events())
        self.result["gpu_idle_fraction"] = round(1.0 - busy / wall_ns, 4)
        self.result["peak_memory_gib"] = peak_memory_gib(self.device)


def peak_memory_gib(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 2)


def mfu(args, tokens_per_s: float, mask_fraction: float, device: torch.device) -> float | None:
    peak = peak_flops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    if peak is None:
        return None
    return round(flops_per_token(model_config(args), SEQ, mask_fraction) * tokens_per_s / peak, 4)


def heldout_eval(args, tok, model, device: torch.device) -> dict:
    """One procedure for both trainers' final models: fixed blocks, fixed masks."""
    blocks = random_blocks(args.eval_blocks, SEED + 1, tok)  # never trained on
    wrapper = SparseMLM(model).eval()
    total, count = torch.zeros((), dtype=torch.float64, device=device), 0
    cuda = device.type == "cuda"
    with torch.inference_mode(), torch.autocast(device.type, torch.bfloat16, enabled=cuda):
        for i in range(0, len(blocks), args.batch):
            ids = np.arange(i, min(i + args.batch, len(blocks)))
            batch = masked_batch(tok, blocks, ids, EVAL_STREAM)
            total += wrapper(*batch.to(device).tensors()).double()
            count += batch.n
    loss = total.item() / count
    return {
        "eval_loss": round(loss, 4),
        "eval_perplexity": round(math.exp(loss), 1),
        "eval_masked_tokens": count,
    }


# ---- mlmjob's step -----------------------------------------------------------------------


def job_config(args, deepspeed: Path | None) -> Config:
    """The job's configuration for this run, so that the job's own builders (accelerator,
    DeepSpeed config, optimizer, schedule) make what `mlmjob train` would make."""
    cfg = Config()
    cfg.run.seed = SEED
    t = cfg.train
    t.per_device_batch_size, t.max_steps = args.batch, total_steps(args)
    t.warmup_steps = args.warmup
    t.learning_rate, t.weight_decay, t.max_grad_norm = LR, WEIGHT_DECAY, 1.0
    t.mlm_probability = MLM_PROBABILITY
    t.precision = "bf16" if torch.cuda.is_available() else "fp32"  # as `auto` picks
    t.deepspeed = str(deepspeed) if deepspeed else None
    return cfg


class MlmjobSteps:
    """job/train/loop.py's step() without its bookkeeping (one micro-batch per
    step, as with gradient_accumulation_steps 1)."""

    def __init__(self, acc, wrapper, optimizer, schedule, build, total: int, compiled=False):
        from job.train.prefetch import Prefetcher

        self.acc, self.wrapper, self.optimizer, self.schedule = acc, wrapper, optimizer, schedule
        self.compiled = compiled
        self.total, self.prefetch = total, Prefetcher(build)
        self.prefetch.ahead(0)
        self.window_loss = torch.zeros((), dtype=torch.float64, device=acc.device)
        self.window_tokens = 0

    def step(self, i: int, batch_size: int) -> None:
        acc = self.acc
        batch = self.prefetch.get(i)
        if i + 1 < self.total:
            self.prefetch.ahead(i + 1)
        for group in self.optimizer.param_groups:
            group["lr"] = self.schedule.lr(i * batch_size)
        if self.compiled:  # a new step: CUDA graphs may reuse the last step's output memory
            torch.compiler.cudagraph_mark_step_begin()
        loss_sum = self.wrapper(*batch.to(acc.device).tensors())
        acc.backward(loss_sum / max(batch.n, 1))
        if acc.distributed_type.name != "DEEPSPEED":  # DeepSpeed clips by its config
            acc.clip_grad_norm_(self.wrapper.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.window_loss += loss_sum.detach().double()  # stays on the device: no sync
        self.window_tokens += batch.n


def graphs_compiled() -> int:
    """Graphs torch.compile has compiled in this process so far."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def run_mlmjob(args, tok, deepspeed: Path | None = None, compiled: bool = False) -> dict:
    from job.train.accel import build_accelerator
    from job.train.optim import build_optimizer
    from job.train.schedule import Schedule

    cfg = job_config(args, deepspeed)
    acc, precision = build_accelerator(cfg)
    total = total_steps(args)
    blocks = random_blocks(total * args.batch, SEED, tok)
    cuda = acc.device.type == "cuda"

    def build(i: int) -> MaskedBatch:  # as job.train.batches: epoch 0's masks, pinned on a GPU
        ids = np.arange(i * args.batch, (i + 1) * args.batch)
        batch = masked_batch(tok, blocks, ids, 0, static=compiled)
        return batch.pin() if cuda else batch

    wrapper = SparseMLM(new_model(args))
    if compiled:
        compile_step(wrapper, compile_mode(acc.device))
    optimizer, _ = build_optimizer(wrapper, cfg.train)
    wrapper, optimizer = acc.prepare(wrapper, optimizer)
    schedule = Schedule.build(cfg.train, len(blocks), args.batch)
    steps = MlmjobSteps(acc, wrapper, optimizer, schedule, build, total, compiled)
    phases = Phases(args, acc.device)
    phases.at(0)
    for i in range(total):
        steps.step(i, args.batch)
        if i == 0:
            first_graphs = graphs_compiled()
        phases.at(i + 1)
    steps.prefetch.close()
    tps = phases.result["tokens_per_s_per_gpu"]
    loss = steps.window_loss.item() / max(1, steps.window_tokens)  # the one sync, at the end
    out = {
        **phases.result,
        "precision": precision,
        "mfu": mfu(args, tps, MLM_PROBABILITY, acc.device),
        "prefetch_hidden_fraction": round(steps.prefetch.stats.hidden_fraction, 3),
        "train_loss": round(loss, 4),
    }
    if compiled:
        out["compile_mode"] = compile_mode(acc.device) or "default"
        out["recompiles"] = graphs_compiled() - first_graphs
    if deepspeed is None:
        out.update(heldout_eval(args, tok, acc.unwrap_model(wrapper).model, acc.device))
    return out


def run_zero2(args, tok) -> dict:
    """One process, no launcher: torch.distributed's rendezvous comes from the environment."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_RANK": "0",
        "LOCAL_WORLD_SIZE": "1",
    }
    os.environ.update(env)
    result = run_mlmjob(args, tok, deepspeed=ZERO2)
    return {**result, "deepspeed_config": str(ZERO2.relative_to(ROOT))}


# ---- inference ---------------------------------------------------------------------------

WORDS = (
    "the a of and to in is that it for on with as was by people water because light "
    "energy small large different system body time when they can make would like more "
    "other than what about which heat cells earth money work power sound years made "
    "space air reason much some very"
)


def make_lines(n: int) -> list[str]:
    """n sentences of 8 to 48 words, one or two of them <mask>."""
    rng = np.random.default_rng(SEED)
    lines = []
    for _ in range(n):
        words = list(rng.choice(WORDS.split(), size=int(rng.integers(8, 49))))
        for pos in rng.choice(len(words), size=int(rng.integers(1, 3)), replace=False):
            words[pos] = "<mask>"
        lines.append(" ".join(words).capitalize() + ".")
    return lines


def time_fillmask(model_dir: str, lines_file: Path, precision: str, device: str) -> dict:
    from tqdm import tqdm

    from job.infer.fill_mask import FillMask, run_part
    from job.infer.lines import read_lines

    cfg = Config()
    cfg.infer.top_k, cfg.infer.batch_size = 5, 64
    fill = FillMask(model_dir, lines_file.parent / "cache", 5, device, precision)
    # One batch first, as the pipeline's first call: CUDA kernels load, the allocator grows.
    fill.predict([ids for ids in fill.encode(read_lines(str(lines_file), "text")[:64]) if ids])
    start = time.perf_counter()
    results, errors = run_part(fill, str(lines_file), cfg, tqdm(disable=True))
    seconds = time.perf_counter() - start
    assert errors == 0, f"{errors} lines failed"
    return {"lines_per_s": round(len(results) / seconds, 1), "seconds": round(seconds, 3)}


def time_pipeline(model_dir: str, lines: list[str], device: str, batched: bool, dtype) -> dict:
    from transformers import pipeline

    fill = pipeline("fill-mask", model=model_dir, device=device, top_k=5, dtype=dtype)
    fill(lines[0])  # warm-up
    start = time.perf_counter()
    if batched:
        fill(lines, batch_size=64)
    else:
        for line in lines:
            fill(line)
    seconds = time.perf_counter() - start
    return {"lines_per_s": round(len(lines) / seconds, 1), "seconds": round(seconds, 3)}


def run_infer(args, tok) -> dict:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    lines = make_lines(args.lines)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = f"{tmp}/model"
        new_model(args).save_pretrained(model_dir)
        tok.save_pretrained(model_dir)
        lines_file = Path(tmp, "lines.txt")
        lines_file.write_text("\n".join(lines) + "\n")
        out = {
            "lines": len(lines),
            "masks": sum(line.count("<mask>") for line in lines),
            "top_k": 5,
            "batch_size": 64,
            "mlmjob_fillmask_bf16": time_fillmask(model_dir, lines_file, "bf16", device),
            "mlmjob_fillmask_fp32": time_fillmask(model_dir, lines_file, "fp32", device),
            "pipeline_one_by_one_fp32": time_pipeline(model_dir, lines, device, False, None),
            "pipeline_batched_fp32": time_pipeline(model_dir, lines, device, True, None),
            "pipeline_batched_bf16": time_pipeline(model_dir, lines, device, True, torch.bfloat16),
        }
    rate = {k: v["lines_per_s"] for k, v in out.items() if isinstance(v, dict)}
    out["speedup_bf16_vs_pipeline_one_by_one"] = round(
        rate["mlmjob_fillmask_bf16"] / rate["pipeline_one_by_one_fp32"], 2
    )
    out["speedup_fp32_vs_pipeline_batched_fp32"] = round(
        rate["mlmjob_fillmask_fp32"] / rate["pipeline_batched_fp32"], 2
    )
    out["speedup_bf16_vs_pipeline_batched_bf16"] = round(
        rate["mlmjob_fillmask_bf16"] / rate["pipeline_batched_bf16"], 2
    )
    return out


# ---- driver ------------------------------------------------------------------------------

PARTS = {
    "train": ("mlmjob", "trainer"),
    "compiled": ("mlmjob_compiled",),
    "zero2": ("zero2",),
    "infer": ("infer",),
    "e2e": ("e2e",),
}


def run_child(name: str, args) -> None:
    """Runs one part in this (child) process and writes its result to --child-out."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    if name == "trainer":
        import gpu_trainer

        result = gpu_trainer.run_trainer(args, tok)
    elif name == "e2e":
        import gpu_e2e

        result = gpu_e2e.run_e2e(args)
    else:
        runs = {"mlmjob": run_mlmjob, "zero2": run_zero2, "infer": run_infer}
        runs["mlmjob_compiled"] = lambda args, tok: run_mlmjob(args, tok, compiled=True)
        result = runs[name](args, tok)
    Path(args.child_out).write_text(json.dumps(result))


def spawn(name: str, tmp: str) -> dict:
    """A part in its own process; its stdout goes to our stderr, keeping stdout for the JSON."""
    out = Path(tmp, f"{name}.json")
    cmd = [sys.executable, __file__, *sys.argv[1:], "--child", name, "--child-out", str(out)]
    start = time.perf_counter()
    proc = subprocess.run(cmd, stdout=sys.stderr, check=False)
    print(f"bench/gpu.py: {name} done in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    if proc.returncode != 0:
        return {"error": f"exit status {proc.returncode} (traceback above, on stderr)"}
    return json.loads(out.read_text())


def header(args, cuda: bool) -> dict:
    name = torch.cuda.get_device_name(0) if cuda else "cpu (smoke)"
    config = model_config(args)

    def flops(mask_fraction: float) -> float:
        return flops_per_token(config, SEQ, mask_fraction)

    return {
        "device": name,
        "peak_bf16_flops": peak_flops(name) if cuda else None,
        "versions": {p: version(p) for p in ("torch", "transformers", "accelerate", "deepspeed")},
        "model": f"distilroberta-base architecture, random init: {config.num_hidden_layers} x "
        f"{config.hidden_size}, vocab {config.vocab_size}",
        "seq_len": SEQ,
        "batch_per_gpu": args.batch,
        "precision": "bf16" if cuda else "fp32",
        "steps": {"warmup": args.warmup, "timed": args.steps, "profiled": args.profile_steps},
        "flops_per_token": {
            "useful (mask_fraction 0.15)": round(flops(0.15)),
            "full head (mask_fraction 1.0)": round(flops(1.0)),
        },
        "methods": METHODS,
    }


def train_section(parts: dict) -> dict:
    ours, theirs = parts["mlmjob"], parts["trainer"]
    section = {"mlmjob": ours, "trainer": theirs}
    if "error" not in ours and "error" not in theirs:
        section["speedup_tokens_per_s"] = round(
            ours["tokens_per_s_per_gpu"] / theirs["tokens_per_s_per_gpu"], 2
        )
        section["perplexity_ratio_mlmjob_over_trainer"] = round(
            ours["eval_perplexity"] / theirs["eval_perplexity"], 4
        )
    return section


def compiled_section(parts: dict) -> dict:
    """The compiled static step beside the eager one (train.mlmjob), when both ran."""
    compiled, eager = parts["mlmjob_compiled"], parts.get("mlmjob", {"error": "not run"})
    section = {"mlmjob_compiled": compiled}
    if "error" not in compiled and "error" not in eager:
        section["speedup_tokens_per_s_vs_eager"] = round(
            compiled["tokens_per_s_per_gpu"] / eager["tokens_per_s_per_gpu"], 2
        )
        section["eval_loss_compiled_minus_eager"] = round(
            compiled["eval_loss"] - eager["eval_loss"], 4
        )
    return section


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, help="timed steps (default 50; smoke 3)")
    p.add_argument("--warmup", type=int, help="untimed steps first (default 10; smoke 2)")
    p.add_argument("--profile-steps", type=int, help="profiled steps (default 10; smoke 2)")
    p.add_argument("--batch", type=int, help="per-GPU batch (default 128; smoke 8)")
    p.add_argument("--lines", type=int, help="fill-mask lines (default 2000; smoke 32)")
    p.add_argument("--eval-blocks", type=int, help="held-out blocks (default 2048; smoke 16)")
    p.add_argument("--e2e-steps", type=int, help="e2e training steps (default 200; smoke 8)")
    p.add_argument("--only", default=",".join(PARTS), help="comma-separated parts")
    p.add_argument("--out", help="also write the JSON here")
    p.add_argument(
        "--tokenizer",
        default=str(SHARED / "roberta-base-tokenizer"),
        help="roberta-base tokenizer folder (default ../shared/data/...)",
    )
    p.add_argument(
        "--eli5",
        default=str(SHARED / "eli5/eli5-category-validation-2.json.gz"),
        help="the ELI5 file e2e trains on (default ../shared/data/eli5/...)",
    )
    p.add_argument("--smoke", action="store_true", help="CPU, tiny model: checks code paths")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--child-out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    defaults = {
        "steps": (50, 3),
        "warmup": (10, 2),
        "profile_steps": (10, 2),
        "batch": (128, 8),
        "lines": (2000, 32),
        "eval_blocks": (2048, 16),
        "e2e_steps": (200, 8),
    }
    for key, (full, smoke) in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, smoke if args.smoke else full)
    unknown = set(args.only.split(",")) - set(PARTS)
    if unknown:
        p.error(f"--only: unknown part(s) {sorted(unknown)}; choose from {sorted(PARTS)}")
    return args


def main() -> int:
    args = parse_args()
    if args.child:
        run_child(args.child, args)
        return 0
    cuda = torch.cuda.is_available()
    if not cuda and not args.smoke:
        print(
            "bench/gpu.py needs a CUDA GPU (use --smoke to check its code paths on the CPU)",
            file=sys.stderr,
        )
        return 2
    if not Path(args.tokenizer, "tokenizer_config.json").exists():
        print(f"bench/gpu.py: no tokenizer at {args.tokenizer} (--tokenizer)", file=sys.stderr)
        return 2
    if "e2e" in args.only.split(",") and not Path(args.eli5).is_file():
        print(f"bench/gpu.py: no ELI5 file at {args.eli5} (--eli5)", file=sys.stderr)
        return 2
    results = header(args, cuda)
    with tempfile.TemporaryDirectory() as tmp:
        parts = {n: spawn(n, tmp) for part in args.only.split(",") for n in PARTS[part]}
    if "mlmjob" in parts:
        results["train"] = train_section(parts)
    if "mlmjob_compiled" in parts:
        results["compiled"] = compiled_section(parts)
    for name in ("zero2", "infer", "e2e"):
        if name in parts:
            results[name] = parts[name]
    text = json.dumps(results, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 1 if any("error" in r for r in parts.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
