"""What a run exports to `model/`, and when it pushes: DeepSpeed bf16 runs export the fp32
master weights (not the bf16 copy the engine computes with), `mlmjob evaluate` loads fp32
weights and computes in its config's precision, and the Hub push runs on rank 0 after the
process group has ended (the other ranks exit, not wait for it in a collective)."""

import json
import threading
import time

import psutil
import pytest
import torch
from safetensors.torch import load_file
from support.cli import mlmjob
from support.hub import FakeHub, hub_env, serve_hub
from support.training import config, launch

from job.train.evaluate import result_name

pytestmark = pytest.mark.slow

BF16_RUN = (
    "train.precision=bf16",
    "train.max_steps=4",
    "train.eval_every_steps=4",
    "train.checkpoint_every_steps=4",  # the run's last step is checkpointed: the reference
)


def master_weights(run, step: int) -> dict:
    """The fp32 master weights in the run's last checkpoint, as DeepSpeed's own
    zero_to_fp32 consolidates them (accelerate's save_state tags it `pytorch_model`)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    folder = run / "checkpoints" / f"step-{step}"
    state = get_fp32_state_dict_from_zero_checkpoint(str(folder), tag="pytorch_model")
    return {k.removeprefix("model."): v for k, v in state.items()}


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_bf16_run_exports_its_fp32_master_weights(synthetic, tmp_path, data_dir, stage):
    """Before: every tensor of model/ was bf16 (the engine's compute copy) and config.json
    said `dtype: bfloat16`, so every later load (evaluate, fill-mask, a fine-tune) got bf16.
    On 2 processes, so that each rank holds part of the masters (ZeRO-2: a fragment of the
    flat partition, ZeRO-3: of every parameter) and the gathering is a real collective."""
    from transformers import AutoModelForMaskedLM, pipeline

    cfg = config(synthetic, tmp_path, data_dir)
    ds = f"train.deepspeed=configs/deepspeed/zero{stage}.json"
    proc = launch(cfg, ds, *BF16_RUN, nproc=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "run"
    exported = load_file(run / "model" / "model.safetensors")
    assert {str(t.dtype) for t in exported.values()} == {"torch.float32"}
    assert json.loads((run / "model" / "config.json").read_text())["dtype"] == "float32"
    master = master_weights(run, 4)
    # the decoder shares the embedding matrix and the head's bias: stored once, tied on load
    assert set(master) - set(exported) == {"lm_head.decoder.weight", "lm_head.decoder.bias"}
    for name, tensor in exported.items():
        assert torch.equal(tensor, master[name]), name
    # fp32 values, not bf16 ones widened: most weights moved off the bf16 grid in 4 steps
    emb = exported["roberta.embeddings.word_embeddings.weight"]
    assert (emb.bfloat16().float() != emb).float().mean() > 0.5

    model, info = AutoModelForMaskedLM.from_pretrained(run / "model", output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched keys
    assert model.dtype == torch.float32
    assert model.lm_head.decoder.weight is model.roberta.embeddings.word_embeddings.weight
    loaded = model.state_dict()
    assert set(loaded) == set(master)
    for name, tensor in loaded.items():  # the tied ones included
        assert torch.equal(tensor, master[name]), name
    out = pipeline("fill-mask", model=str(run / "model"), top_k=2)("The sky is <mask>.")
    assert len(out) == 2


def evaluate(cfg, run, model, precision: str) -> dict:
    """`mlmjob evaluate` of `model` in `precision` (results in `run`/eval): its record."""
    sets = (f"infer.model={model}", f"train.precision={precision}")
    proc = mlmjob("evaluate", "-c", cfg, *[a for s in sets for a in ("--set", s)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((run / "eval" / f"{result_name(str(model))}.json").read_text())


def test_evaluate_loads_fp32_weights_and_computes_in_its_precision(
    synthetic, tmp_path, data_dir, reference
):
    """Before: a model folder holding bf16 weights was evaluated with bf16 weights (dtype
    "auto"), so `train.precision=fp32` computed in bf16. Now the weights are widened to fp32
    on load: a bf16 folder evaluates exactly as an fp32 folder holding the same values,
    in fp32, and in bf16 (autocast over those fp32 weights)."""
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(reference / "model")
    bf16, wide = tmp_path / "bf16", tmp_path / "wide"
    AutoModelForMaskedLM.from_pretrained(reference / "model", dtype=torch.bfloat16).save_pretrained(
        bf16
    )
    AutoModelForMaskedLM.from_pretrained(bf16, dtype=torch.float32).save_pretrained(wide)
    for folder in (bf16, wide):
        tok.save_pretrained(folder)
    assert json.loads((bf16 / "config.json").read_text())["dtype"] == "bfloat16"
    run = tmp_path / "run"
    cfg = config(synthetic, tmp_path, data_dir, run=run)
    fp32 = evaluate(cfg, run, bf16, "fp32")
    assert fp32["precision"] == "fp32"
    assert fp32["eval_loss"] == evaluate(cfg, run, wide, "fp32")["eval_loss"]
    mixed = evaluate(cfg, run, bf16, "bf16")
    assert mixed["precision"] == "bf16"
    assert mixed["eval_tokens"] == fp32["eval_tokens"]
    # autocast computes the matrix products in bf16: close to fp32, not equal to it
    assert mixed["eval_loss"] != fp32["eval_loss"]
    assert mixed["eval_loss"] == pytest.approx(fp32["eval_loss"], rel=1e-2)


class RankGoneHub(FakeHub):
    """The Hub mock, whose first request waits (up to 90 s) for the run's rank 1 to have
    exited, and records whether it did: a push that rank 1 waits for never sees that."""

    def do_POST(self):
        hub = self.server.hub
        with hub["lock"]:
            if "rank_1_gone" not in hub:
                hub["rank_1_gone"] = _wait_until_gone("1", 90)
        super().do_POST()


def _wait_until_gone(rank: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(_rank_of(p) == rank for p in psutil.Process().children(recursive=True)):
            return True
        time.sleep(0.2)
    return False


def _rank_of(proc) -> str | None:
    """A torchrun worker's RANK; None for other processes and those that have exited."""
    try:
        return proc.environ().get("RANK") if proc.status() != psutil.STATUS_ZOMBIE else None
    except psutil.Error:
        return None


@pytest.fixture
def rank_gone_hub():
    with serve_hub(RankGoneHub) as record:
        record["lock"] = threading.Lock()
        yield record


def test_the_push_runs_after_the_other_ranks_have_exited(
    synthetic, tmp_path, data_dir, rank_gone_hub
):
    """Before: rank 0 pushed while the others waited in a barrier, under the collective
    timeout (NCCL's, 30 minutes by default): a slow upload failed the run. Now rank 0 pushes
    after the process group has ended and the other ranks have exited."""
    hub = rank_gone_hub
    cfg = config(synthetic, tmp_path, data_dir)
    sets = ("train.max_steps=2", "train.eval_every_steps=2", "train.push_to_hub={repo_id: me/m}")
    proc = launch(cfg, *sets, nproc=2, env=hub_env(hub))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert hub["rank_1_gone"] is True
    (commit,) = hub["commits"]
    model = tmp_path / "run" / "model"
    assert commit["files"]["model.safetensors"] == (model / "model.safetensors").read_bytes()
