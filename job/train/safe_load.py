"""Checkpoint files are pickles, and unpickling a file can call anything it names: the
sha256 in COMMITTED.json sits in the same bucket as the files, so whoever can write a
checkpoint can also write a matching checksum. Every checkpoint file is therefore read the
way `torch.load(weights_only=True)` reads it: tensors, containers, numbers, strings, and the
few plain-data types below, nothing else; a file that names anything else is refused before
any of it is unpickled by DeepSpeed or accelerate.

Two parts:

* `refusal(local, uri)` opens every pickle-based file of a fetched checkpoint with
  `weights_only=True` and this allowlist (`fetch` calls it on the node-local copy, before
  anything else reads it) and names the first file that needs anything else, so the run can
  exit 2 with that one line: a planted payload is not damage to fall back from silently.
* `enforced()` makes every `torch.load` in the process weights_only with this allowlist
  while DeepSpeed and accelerate read the checkpoint (`load_state`, the universal-checkpoint
  conversion). Hand-written because DeepSpeed (0.19) has no switch for it: it passes
  `weights_only=False` at each of its `torch.load` calls (checkpoint engine, ZeRO optimizer
  states, ds_to_universal). torch's own `TORCH_FORCE_WEIGHTS_ONLY_LOAD` overrides even an
  explicit `weights_only=False`, and torch reads it at every call, so setting it for the
  duration is enough; no DeepSpeed function is patched.
"""

from __future__ import annotations

import os
import pickle
import re
import zipfile
from contextlib import contextmanager
from pathlib import Path

from job import storage

FORCE, NO_FORCE = "TORCH_FORCE_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"
# What accelerate.save_state and DeepSpeed's save_checkpoint write with torch.save (and
# accelerate's random_states_N.pkl is a torch.save too); safetensors and JSON are not pickles.
PICKLED = (".pt", ".pkl", ".bin", ".pth")


def allowed() -> list:
    """The globals beyond torch's weights_only defaults (tensors, storages, OrderedDict,
    torch.Size, ...) that the checkpoints of this job hold. Found by saving real DDP and
    ZeRO-1/2/3 checkpoints (fp32 and bf16, 1 and 2 processes, and their universal
    conversions) and listing what `weights_only=True` refused in them. Each is a plain data
    type: rebuilding it sets attributes or calls a constructor that only stores values."""
    import numpy as np
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    reconstruct = np._core.multiarray._reconstruct if hasattr(np, "_core") else None
    reconstruct = reconstruct or np.core.multiarray._reconstruct
    return [
        # DeepSpeed ZeRO optimizer states (*_optim_states.pt, universal optimizer_state.pt):
        ZeroStageEnum,  # `zero_stage`, an int enum
        LossScaler,  # `loss_scaler`: a static scale, saved also in fp32 and bf16 runs
        DynamicLossScaler,  # the same under fp16, which a DeepSpeed JSON may enable
        fragment_address,  # ZeRO-1/2 `param_slice_mappings`: a (numel, start) dataclass
        # accelerate's random_states_N.pkl: numpy's MT19937 state is a uint32 array
        # (accelerate.utils.other.TORCH_SAFE_GLOBALS allows the same for it).
        reconstruct,
        (reconstruct, "numpy.core.multiarray._reconstruct"),  # as numpy 1.x names it
        np.ndarray,
        np.dtype,
        np.dtypes.UInt32DType,  # numpy >= 1.25 rebuilds the array's dtype as this type
    ]


def refusal(local: Path, uri: str) -> str | None:
    """One line naming the first pickle-based file under `local` (the fetched copy of the
    checkpoint at `uri`) that weights_only refuses, or None when every file loads."""
    import torch

    with torch.serialization.safe_globals(allowed()):
        for path in sorted(p for p in local.rglob("*") if p.suffix in PICKLED and p.is_file()):
            why = _refused(path)
            if why:
                name = storage.join(uri, path.relative_to(local).as_posix())
                return f"{name}: refused: {why}; nothing in it was run"
    return None


def _refused(path: Path) -> str | None:
    import torch

    try:
        # mmap: the tensors' bytes are mapped, not read; only the pickle is parsed.
        torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as e:
        needed = re.search(r"GLOBAL (\S+)", str(e))
        if needed:
            return f"it needs {needed.group(1)}, which a checkpoint never holds"
        boiler = ("Weights only load failed", "Please file an issue", "Check the documentation")
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        detail = [ln for ln in lines if not ln.startswith(boiler)] or [type(e).__name__]
        return f"weights_only cannot read it ({detail[0]})"
    except Exception as e:  # not a torch.save file at all (its checksum matched: made so)
        first = (str(e).splitlines() or [""])[0]
        return f"torch.load cannot read it ({type(e).__name__}: {first})"
    return None


@contextmanager
def enforced():
    """Every torch.load in this process is weights_only, with `allowed()`, inside."""
    import torch

    saved = {k: os.environ.get(k) for k in (FORCE, NO_FORCE)}
    os.environ[FORCE] = "1"
    os.environ.pop(NO_FORCE, None)  # both set: torch.load raises
    try:
        with torch.serialization.safe_globals(allowed()):
            yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
