"""`mlmjob push`: a finished run's `model/` to the Hugging Face Hub, with a model card.

The card is built with huggingface_hub's ModelCardData (the Hub's metadata header: base
model, datasets, `model-index` with the perplexity), followed by the run's figures and its
resolved config. The token is `HF_TOKEN` and the endpoint `HF_ENDPOINT` (huggingface_hub
reads both), never the config. A push that fails leaves the run as it is: the model stays
in the bucket and the command can be rerun (one commit, so a failed push leaves nothing
half-uploaded on the Hub either).
"""

from __future__ import annotations

import json
from pathlib import Path

from job import storage
from job.config import Config, dump_yaml
from job.errors import EXIT_OK, EXIT_RETRY, BadInput
from job.log import log
from job.redact import redact

FIGURES = (
    "perplexity",
    "initial_perplexity",
    "eval_loss",
    "train_tokens",
    "epochs",
    "global_step",
    "world_size",
    "tokens_per_second",
    "train_seconds",
    "gpu_hours",
    "parameters",
    "device",
    "precision",
    "dataset_id",
)


def _hub_id(name: str) -> str | None:
    """`name` when it reads as a Hub repo id (`org/name` or `name`), not a path or URI."""
    if "://" in name or name.startswith((".", "/", "~")) or Path(name).exists():
        return None
    return name if name.count("/") <= 1 else None


def _hf_datasets(cfg: Config) -> list[str]:
    return [s.hf for s in cfg.data.sources if s.hf and _hub_id(s.hf)]


def model_card(cfg: Config, summary: dict) -> str:
    """README.md for the Hub: YAML metadata header, figures, the training config."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    base = None if cfg.model.from_scratch else _hub_id(cfg.model.name_or_path)
    datasets = _hf_datasets(cfg)
    result = EvalResult(
        task_type="fill-mask",
        task_name="Masked language modeling",
        dataset_type=datasets[0] if datasets else summary["dataset_id"],
        dataset_name=summary["dataset_id"],
        dataset_split="test",
        metric_type="perplexity",
        metric_name="Perplexity",
        metric_value=summary["perplexity"],
    )
    data = ModelCardData(
        base_model=base,
        datasets=datasets or None,
        library_name="transformers",
        pipeline_tag="fill-mask",
        tags=["masked-lm", "mlmjob"],
        model_name=cfg.run.name,
        eval_results=[result],
    )
    # The card is public with `private: false`: no URL in it keeps a password or signature
    # (the config in it is redacted already; the names and figures around it too).
    return redact(str(ModelCard(f"---\n{data.to_yaml()}\n---\n{_body(cfg, summary)}")))


def _body(cfg: Config, summary: dict) -> str:
    started = summary.get("initial_perplexity")
    before = f" (before training: {started:.4g})" if started else ""
    rows = "\n".join(f"| `{k}` | {summary[k]} |" for k in FIGURES if summary.get(k) is not None)
    origin = "trained from scratch" if cfg.model.from_scratch else f"`{cfg.model.name_or_path}`"
    return (
        f"\n# {cfg.run.name}\n\nA masked language model ({origin}, fine-tuned with mlmjob) "
        f"with perplexity **{summary['perplexity']:.4g}**{before} on the test split of "
        f"`{summary['dataset_id']}`: exp of the token-weighted masked-LM loss, masks fixed by "
        f"the seed.\n\n```python\nfrom transformers import pipeline\n\n"
        f'pipeline("fill-mask", model="{cfg.train.push_to_hub.repo_id}")\n```\n\n'
        f"## Figures (summary.json)\n\n| figure | value |\n|---|---|\n{rows}\n\n"
        f"## Training config\n\n```yaml\n{dump_yaml(cfg)}```\n"
    )


def push(cfg: Config) -> int:
    """Collective-free, one process: upload `{run.output}/model` and its card."""
    hub = cfg.train.push_to_hub
    if hub is None:
        raise BadInput("train.push_to_hub: not set; give at least {repo_id: OWNER/NAME}")
    out = cfg.run.output
    try:
        summary = json.loads(storage.read_text(storage.join(out, "summary.json")))
    except FileNotFoundError:
        raise BadInput(f"run.output: '{out}' has no summary.json; train the run first") from None
    model = storage.to_local(storage.join(out, "model"), cfg.cache_dir / "push")
    try:
        url = upload(hub, Path(model), model_card(cfg, summary))
    except Exception as e:  # network, permissions, the Hub: the run is untouched, rerun
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        log.error(
            "push to %s failed (%s); the model stays in %s: rerun `mlmjob push`",
            hub.repo_id,
            first,
            storage.join(out, "model"),
        )
        return EXIT_RETRY
    log.info("pushed %s to %s", storage.join(out, "model"), url)
    print(url)
    return EXIT_OK


def upload(hub, folder: Path, card: str) -> str:
    """One commit with every file of `folder` and README.md; returns the commit's URL."""
    from huggingface_hub import CommitOperationAdd, HfApi

    api = HfApi()  # token: HF_TOKEN; endpoint: HF_ENDPOINT
    api.create_repo(hub.repo_id, private=hub.private, exist_ok=True)
    if hub.revision:
        api.create_branch(hub.repo_id, branch=hub.revision, exist_ok=True)
    ops = [
        CommitOperationAdd(p.relative_to(folder).as_posix(), str(p))
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != "README.md"
    ]
    ops.append(CommitOperationAdd("README.md", card.encode()))
    info = api.create_commit(
        hub.repo_id, ops, commit_message="mlmjob: upload model", revision=hub.revision
    )
    return info.commit_url
