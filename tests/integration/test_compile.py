"""train.compile (issue 20.6): the whole forward compiled once, with static shapes, over the
static batch layout (job.train.batch.Buckets), through the pod's launch script.

TORCH_LOGS=recompiles,dynamic makes a compiled run log each symbolic size ("create_symbol")
and each recompilation ("Recompiling function"); TORCH_TRACE writes one "dynamo_start"
record per frame compiled (what tlparse reads). A 40-step run, with an evaluation and a
checkpoint every 10 steps, must compile one frame once, with no symbolic size (so 30 more
steps and three more evaluations compile nothing); and it must train as the eager run
does (losses, evaluations, weights)."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file
from support.training import assert_same_as, config, events, launch

# Dropout off: inductor draws dropout from its own generator, so only then can the
# compiled run's losses equal the eager run's. One layer: what inductor compiles (and its
# compile time) grows with the layers, and one exercises every kind of op the others add.
SETS = (
    "model.config_overrides={hidden_size: 64, num_hidden_layers: 1, num_attention_heads: 2, "
    "intermediate_size: 128, hidden_dropout_prob: 0.0, attention_probs_dropout_prob: 0.0}",
    "train.eval_every_steps=10",
    "train.checkpoint_every_steps=10",
    "train.log_every_steps=1",
)
# One compile thread: no pool of compile workers on the test machine's two shared cores.
ENV = {"TORCH_LOGS": "recompiles,dynamic", "TORCHINDUCTOR_COMPILE_THREADS": "1"}


def train(synthetic, data_dir, tmp_path, name: str, steps: int, compiled: bool):
    run, trace = tmp_path / name, tmp_path / f"{name}-trace"
    cfg = config(synthetic, tmp_path, data_dir, run=run, name=f"{name}.yaml")
    sets = (*SETS, f"train.max_steps={steps}", f"train.compile={str(compiled).lower()}")
    proc = launch(cfg, *sets, env={**ENV, "TORCH_TRACE": str(trace)}, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return run, proc.stderr, compiled_frames(trace)


def compiled_frames(trace) -> list[tuple[int, int]]:
    """(frame id, compile of that frame) of every compilation that TORCH_TRACE recorded."""
    frames = []
    for path in sorted(trace.glob("*.log")):
        for line in path.read_text().splitlines():
            if '"dynamo_start"' in line:
                record = json.loads(line[line.index("{") :])
                frames.append((record["frame_id"], record["frame_compile_id"]))
    return frames


@pytest.mark.slow
def test_compiled_step_has_static_shapes_compiles_once_and_trains_as_eager(
    synthetic, data_dir, tmp_path
):
    eager, _, eager_frames = train(synthetic, data_dir, tmp_path, "eager", 40, False)
    assert eager_frames == []  # nothing is compiled without train.compile

    compiled, log, frames = train(synthetic, data_dir, tmp_path, "c40", 40, True)
    assert [e["step"] for e in events(compiled, "eval")] == [10, 20, 30, 40]
    assert "produce_guards" in log  # the dynamic-shape log is on, and a frame compiled
    assert "create_symbol" not in log  # every size is static
    assert "Recompiling function" not in log
    # one frame, compiled once in the first step: the 39 steps, 4 evaluations and
    # checkpoints after it compile nothing
    assert frames == [(0, 0)]

    # the compiled step trains as the eager one: every logged loss, evaluation and weight
    assert_same_as(compiled, eager, rel=1e-4, atol=1e-5)
    # parameter names as without compile: no `_orig_mod.` in the checkpoint or the model
    keys = set(load_file(compiled / "checkpoints" / "step-40" / "model.safetensors"))
    assert keys == set(load_file(eager / "checkpoints" / "step-40" / "model.safetensors"))
    assert not any("_orig_mod" in k for k in keys)
