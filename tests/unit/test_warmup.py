"""train.warmup_ratio: the Trainer's warm-up (ceil(ratio x the run's steps)), then its
linear decay, step for step; `train.warmup_steps` wins when set."""

from __future__ import annotations

import pytest
import torch
from support.data import ROOT

from job.config import TrainConfig
from job.train.schedule import Schedule, total_steps, warmup_steps

LR = 1e-3


def trainer_warmup(ratio: float, steps: int) -> int:
    """The Trainer's own count (TrainingArguments.get_warmup_steps; in transformers 5 a
    `warmup_steps` below 1 is the ratio)."""
    from transformers import TrainingArguments

    args = TrainingArguments(output_dir="unused", warmup_steps=ratio, report_to=[])
    return args.get_warmup_steps(steps)


def reference_lrs(warmup: int, steps: int) -> list[float]:
    """get_linear_schedule_with_warmup's learning rate at each step 0..steps-1."""
    from transformers import get_linear_schedule_with_warmup

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=LR)
    sched = get_linear_schedule_with_warmup(opt, warmup, steps)
    lrs = []
    for _ in range(steps):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    return lrs


@pytest.mark.parametrize(
    "t, n_train, batch, steps, warmup",
    [
        # 37 steps x 0.1 = 3.7: the Trainer rounds up to 4
        (TrainConfig(max_steps=37, warmup_ratio=0.1, learning_rate=LR), 10_000, 8, 37, 4),
        # 3 epochs of 100 // 16 = 6 steps (drop_last) = 18 steps; 0.25 x 18 = 4.5 -> 5
        (TrainConfig(epochs=3, warmup_ratio=0.25, learning_rate=LR), 100, 16, 18, 5),
        # eli5-full's shape: 520 steps at 6% -> 31.2 -> 32
        (TrainConfig(max_steps=520, warmup_ratio=0.06, learning_rate=LR), 10**7, 2048, 520, 32),
    ],
)
def test_warmup_ratio_is_the_trainers_schedule_step_for_step(t, n_train, batch, steps, warmup):
    s = Schedule.build(t, n_train, batch)
    assert total_steps(t, n_train, batch) == steps
    assert warmup_steps(t, steps) == warmup == trainer_warmup(t.warmup_ratio, steps)
    assert (s.warmup_samples, s.total_samples) == (warmup * batch, steps * batch)
    ours = [s.lr(step * batch) for step in range(steps)]
    assert ours == pytest.approx(reference_lrs(warmup, steps), rel=1e-12, abs=1e-18)
    assert s.lr(steps * batch) == 0.0


def test_warmup_steps_win_over_the_ratio():
    t = TrainConfig(max_steps=40, warmup_steps=3, warmup_ratio=0.5, learning_rate=LR)
    s = Schedule.build(t, 1000, 4)
    assert s.warmup_samples == 3 * 4
    assert [s.lr(i * 4) for i in range(40)] == pytest.approx(reference_lrs(3, 40), rel=1e-12)


def test_no_warmup_by_default():
    s = Schedule.build(TrainConfig(max_steps=10, learning_rate=LR), 100, 4)
    assert s.warmup_samples == 0 and s.lr(0) == LR


# ---- what `mlmjob validate --preflight` says about it ----------------------------------


def demo_preflight(tmp_path, **train):
    from job.config import load_config
    from job.preflight import preflight

    sets = [f"{k}={tmp_path}/{k}" for k in ("run.output", "data.output", "infer.output")]
    sets += [f"data.cache_dir={tmp_path}/cache", *(f"train.{k}={v}" for k, v in train.items())]
    report = preflight(load_config(ROOT / "configs" / "demo.yaml", sets))
    assert report.problems == []
    starts = ("train: warm-up", "train: no warm-up", "warning:")
    return [line for line in report.plan if line.startswith(starts)]


def test_preflight_prints_the_warmup_share(tmp_path):
    assert demo_preflight(tmp_path, max_steps=200, warmup_steps=20) == [
        "train: warm-up 20 of 200 steps (10%)"
    ]
    assert demo_preflight(tmp_path, warmup_steps=0, warmup_ratio=0.06) == [
        "train: warm-up 6% of the steps"  # the dataset is not built: its steps are unknown
    ]
    assert demo_preflight(tmp_path, warmup_steps=10) == [
        "train: warm-up 10 steps (its share: once the dataset exists)"
    ]
    assert demo_preflight(tmp_path, warmup_steps=0) == ["train: no warm-up"]


def test_preflight_warns_above_a_fifth_of_the_run(tmp_path):
    assert demo_preflight(tmp_path, max_steps=100, warmup_steps=21) == [
        "train: warm-up 21 of 100 steps (21%)",
        "warning: train: the warm-up is 21% of the run (above 20%): most steps run below the "
        "peak learning rate; lower train.warmup_steps",
    ]
    assert demo_preflight(tmp_path, max_steps=100, warmup_steps=20) == [
        "train: warm-up 20 of 100 steps (20%)"  # at 20%: no warning
    ]
    assert demo_preflight(tmp_path, warmup_steps=0, warmup_ratio=0.3)[1].startswith(
        "warning: train: the warm-up is 30% of the run (above 20%)"
    )


def test_the_full_config_warms_up_for_6_percent():
    """configs/eli5-full.yaml at its scale (about 520 steps of 2,048 blocks): the old 500
    warm-up steps are warned about, its warmup_ratio is not."""
    from job.config import load_config
    from job.preflight import _warmup_plan

    t = load_config(ROOT / "configs" / "eli5-full.yaml").train
    assert (t.warmup_steps, t.warmup_ratio) == (0, 0.06)
    assert _warmup_plan(t, 520) == ["train: warm-up 32 of 520 steps (6%)"]
    old = t.model_copy(update={"warmup_steps": 500})
    assert _warmup_plan(old, 520)[0] == "train: warm-up 500 of 520 steps (96%)"
    assert _warmup_plan(old, 520)[1].startswith("warning: train: the warm-up is 96% of the run")
