"""Checkpoints on any storage, committed atomically, the last K kept.

`{run.output}/checkpoints/step-{N}/` holds what `accelerator.save_state` wrote (model,
optimizer, every rank's RNG state; with DeepSpeed, every rank's ZeRO partition) plus
`train_state.json`. Every node stages its ranks' files on local disk (`stage`) and uploads
them (`upload`, on a background thread: job.train.upload); once every node is done, rank 0
writes `COMMITTED.json` listing every file with its size and sha256 (`commit`). A
checkpoint without that marker, or with a file missing or of the wrong size, is skipped
for the previous one with a warning.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from job import jsonio, storage
from job.errors import BadInput
from job.log import log
from job.train import safe_load
from job.train.dist import any_rank


class _TiedWeightsNote(logging.Filter):
    """accelerate's "Removed shared tensor ... while saving" at every checkpoint: the MLM
    decoder shares the embedding matrix, safetensors stores it once, and loading re-ties
    it (the resume tests compare every weight). Expected, so not repeated in the log."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Removed shared tensor" not in record.getMessage()


logging.getLogger("accelerate.utils.other").addFilter(_TiedWeightsNote())

COMMIT = "COMMITTED.json"
STATE = "train_state.json"
# The checkpoint folder of a listed file: the last match, so that a run folder that itself
# sits under some ".../checkpoints/step-N/" does not confuse it.
_STEP = re.compile(r"(?:^|/)checkpoints/step-(\d+)/")


def root(run_output: str) -> str:
    return storage.join(run_output, "checkpoints")


def _steps(run_output: str) -> dict[int, list[str]]:
    found: dict[int, list[str]] = {}
    for uri in storage.list_files(root(run_output)):
        matches = _STEP.findall(uri)
        if matches:
            found.setdefault(int(matches[-1]), []).append(uri)
    return found


def _has_marker(files: list[str], step: int) -> bool:
    """Compared by the path's tail: a local listing may spell the run folder otherwise
    than `run.output` does (`file://`, `./`)."""
    return any(f.endswith(f"step-{step}/{COMMIT}") for f in files)


def committed(run_output: str) -> list[tuple[int, str]]:
    """Committed checkpoints whose files are all there at their sizes, newest first."""
    found = []
    for step, files in sorted(_steps(run_output).items(), reverse=True):
        uri = step_uri(run_output, step)
        marker = storage.join(uri, COMMIT)
        if not _has_marker(files, step):
            log.warning("checkpoint %s was never committed; skipping it", uri)
            continue
        problem = _verify_sizes(uri, json.loads(storage.read_text(marker))["files"])
        if problem:
            log.warning("checkpoint %s is damaged (%s); skipping it", uri, problem)
            continue
        found.append((step, uri))
    return found


def latest(run_output: str) -> tuple[int, str] | None:
    """The newest complete checkpoint as (step, uri), or None."""
    found = committed(run_output)
    return found[0] if found else None


def _verify_sizes(uri: str, files: dict) -> str | None:
    for rel, info in files.items():
        try:
            actual = storage.size(storage.join(uri, rel))
        except FileNotFoundError:
            return f"{rel} is missing"
        if actual != info["size"]:
            return f"{rel} has {actual} bytes, expected {info['size']}"
    return None


def _describe(local: Path) -> dict:
    out = {}
    for p in sorted(local.rglob("*")):
        if p.is_file():
            out[p.relative_to(local).as_posix()] = {
                "size": p.stat().st_size,
                "sha256": storage.sha256_file(p),
            }
    return out


def step_uri(run_output: str, step: int) -> str:
    return storage.join(root(run_output), f"step-{step}")


def stage(accelerator, step: int, state: dict, staging: Path) -> Path:
    """Collective: every rank writes its part of checkpoint `step` (accelerate's state; rank
    0 also train_state.json) into the node-local staging folder, which it returns. Local
    disk only: this is the part of a checkpoint that blocks training (job.train.upload
    hashes and uploads it in the background)."""
    local = staging / f"step-{step}"
    if accelerator.is_local_main_process:
        shutil.rmtree(local, ignore_errors=True)
    accelerator.wait_for_everyone()
    local.mkdir(parents=True, exist_ok=True)
    accelerator.save_state(str(local))
    if accelerator.is_main_process:
        (local / STATE).write_text(jsonio.dumps(state, indent=2))
    accelerator.wait_for_everyone()
    return local


def upload(local: Path, uri: str, cancelled=None) -> dict:
    """A node's local main process: hash and upload a staged checkpoint's files, then free
    the staging folder. Returns the files as COMMITTED.json lists them. `cancelled` (an
    Event) stops it between two files (the run is failing anyway)."""
    files = _describe(local)
    for rel in files:
        if cancelled is not None and cancelled.is_set():
            raise RuntimeError(f"{uri}: upload abandoned")
        storage.upload_file(local / rel, storage.join(uri, rel))
    shutil.rmtree(local, ignore_errors=True)
    return files


def commit(accelerator, run_output: str, step: int, files: dict, keep: int) -> str:
    """Collective, once every node has uploaded its files (`files`: this node's, empty on
    the other ranks): rank 0 writes COMMITTED.json with all of them (fenced by the lease)
    and prunes. Returns the committed checkpoint's URI."""
    from accelerate.utils import gather_object

    uri = step_uri(run_output, step)
    merged: dict = {}
    for part in gather_object([files]):
        merged.update(part)
    if accelerator.is_main_process:
        storage.commit(storage.join(uri, COMMIT), jsonio.dumps({"step": step, "files": merged}))
        prune(run_output, keep, saved=step)
    accelerator.wait_for_everyone()
    return uri


def prune(run_output: str, keep: int, saved: int | None = None) -> None:
    """Keep the newest `keep` committed checkpoints up to the one just `saved`; drop older
    and abandoned ones. Checkpoints newer than `saved` belong to a history this run left
    (it resumed from an older one because they were damaged): they go too, so they can
    neither outrank the checkpoint just written nor be resumed from later."""
    steps = _steps(run_output)
    committed = sorted(s for s, files in steps.items() if _has_marker(files, s))
    if saved is not None:
        committed = [s for s in committed if s <= saved]
    survivors = set(committed[-keep:]) if keep > 0 else set()
    newest = committed[-1] if committed else -1
    for step in steps:
        if step not in survivors and (step <= newest or saved is not None):
            uri = step_uri(run_output, step)
            storage.delete(storage.join(uri, COMMIT))  # uncommit first, then remove
            storage.delete_prefix(uri)


@dataclass
class Restored:
    """A verified checkpoint in the node-local staging folder, ready for `restore`."""

    step: int
    uri: str
    local: Path
    state: dict


def fetch(accelerator, run_output: str, staging: Path) -> Restored | None:
    """Collective: the newest checkpoint that every node downloads intact, or None.

    One process per node downloads and checks every sha256; a checksum that does not match
    on any node makes all ranks fall back to the previous checkpoint, as a missing marker
    does: a retried pod must never fail again on the same damaged files.

    A file that would need more than tensors and plain data to unpickle (safe_load) is no
    damage but a planted payload: every rank raises BadInput naming it, before anything
    reads it; its checksum proves nothing, as it sits in the same bucket."""
    local = staging / "resume"
    for step, uri in committed(run_output):
        problem = None
        if accelerator.is_local_main_process:
            problem = _download_verified(uri, local)
        if any_rank(accelerator, problem is not None):
            log.warning(
                "checkpoint %s is damaged (%s); falling back to the previous one",
                uri,
                problem or "on another node",
            )
            continue
        _refuse_unsafe(accelerator, uri, local)
        return Restored(step, uri, local, json.loads((local / STATE).read_text()))
    return None


def _refuse_unsafe(accelerator, uri: str, local: Path) -> None:
    """Collective: BadInput on every rank when a node's copy holds a file that
    weights_only refuses (the first such file, as that node named it)."""
    from accelerate.utils import gather_object

    refusal = safe_load.refusal(local, uri) if accelerator.is_local_main_process else None
    refusals = [r for r in gather_object([refusal]) if r]
    if refusals:
        if accelerator.is_local_main_process:
            shutil.rmtree(local, ignore_errors=True)
        raise BadInput(refusals[0])


def _download_verified(uri: str, local: Path) -> str | None:
    shutil.rmtree(local, ignore_errors=True)
    files = json.loads(storage.read_text(storage.join(uri, COMMIT)))["files"]
    for rel in files:
        storage.download_file(storage.join(uri, rel), local / rel)
    actual = _describe(local)
    for rel, info in files.items():
        if actual[rel]["sha256"] != info["sha256"]:
            return f"{rel}: checksum mismatch"
    return None


def restore(accelerator, restored: Restored) -> None:
    """Collective: load model, optimizer and RNG states from a fetched checkpoint, every
    file weights_only (DeepSpeed's own loads included: safe_load.enforced)."""
    with safe_load.enforced():
        accelerator.load_state(str(restored.local))
    accelerator.wait_for_everyone()
    if accelerator.is_local_main_process:
        shutil.rmtree(restored.local, ignore_errors=True)


def to_universal(local: Path) -> None:
    """Rewrite a fetched DeepSpeed ZeRO checkpoint as a universal checkpoint, which
    DeepSpeed loads on any number of processes (`checkpoint.load_universal`).

    Node-local main process only. DeepSpeed's own converter does the resharding; its
    command line is the documented interface, called here in-process."""
    from argparse import Namespace

    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    source, target = local / "pytorch_model", local / "pytorch_model.universal"
    shutil.rmtree(target, ignore_errors=True)
    args = Namespace(
        input_folder=str(source),
        output_folder=str(target),
        num_extract_workers=1,  # in this process: safe_load.enforced holds here only
        num_merge_workers=1,
        keep_temp_folder=False,
        strict=True,
        inject_missing_state=True,
    )
    with safe_load.enforced():  # the converter's own loads say weights_only=False
        ds_to_universal(args)
    shutil.rmtree(source)
    target.rename(source)
