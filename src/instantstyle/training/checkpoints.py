"""Training checkpoints: everything a run needs to continue exactly, and nothing else.

``OUT/checkpoints/checkpoint-<step>/`` holds

* ``adapter.safetensors``: the trained weights only (never the frozen UNet), by name;
* ``optimizer.pt``: the optimiser's state (AdamW moments and step counts), the LR schedule's
  and, with fp16 mixed precision, the gradient scaler's;
* ``rng.pt``: the global RNG states (torch CPU/CUDA, numpy, python).  Training draws nothing
  from them (noise, timesteps and drops come from per-sample seeds), they are kept so that
  anything else that draws continues as it would have;
* ``state.json``, written last: the step, the samples consumed (the data position) and the
  run's settings.  A folder without it is incomplete and ignored.

A checkpoint is written into a temporary folder next to the others and renamed into place
(atomic on one file system), so a killed run leaves whole checkpoints or none.  Only the
newest ``keep`` are kept; an old one is renamed to a temporary before it is deleted, so a
kill cannot leave half of one either.  Under DeepSpeed the sharded optimiser state goes through
``accelerator.save_state`` into ``accelerate/`` inside the same folder.
"""
from __future__ import annotations

import json
import os
import random
import re
import secrets
import shutil

import numpy as np
import torch

from ..pipelines.outputs import TEMP_PREFIX
from .model import load_trainable_state, trainable_state

FOLDER = "checkpoints"
_NAME = re.compile(r"^checkpoint-(\d+)$")
STATE = "state.json"


def checkpoint_root(out_dir: str) -> str:
    return os.path.join(out_dir, FOLDER)


def _fsync_tree(folder: str) -> None:
    for name in os.listdir(folder):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            with open(path, "rb") as f:
                os.fsync(f.fileno())


def complete_checkpoints(out_dir: str):
    """``[(step, path)]`` of complete checkpoints, oldest first."""
    root = checkpoint_root(out_dir)
    found = []
    for name in os.listdir(root) if os.path.isdir(root) else ():
        m = _NAME.match(name)
        if m and os.path.isfile(os.path.join(root, name, STATE)):
            found.append((int(m.group(1)), os.path.join(root, name)))
    return sorted(found)


def resolve_resume(out_dir: str, resume: str | None) -> str | None:
    """The checkpoint folder ``--resume`` names: ``latest`` (None when there is none yet, so a
    first run and its restart are one command) or a path."""
    if resume is None:
        return None
    if resume == "latest":
        found = complete_checkpoints(out_dir)
        return found[-1][1] if found else None
    path = os.path.abspath(resume)
    if not os.path.isfile(os.path.join(path, STATE)):
        raise ValueError(f"--resume: {resume!r} is not a complete checkpoint folder (no {STATE} in it)")
    return path


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if state.get("cuda") and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def _retire(path: str) -> str:
    """Rename a checkpoint to a temporary name before deleting it: a run killed mid-delete
    then leaves a temporary (removed at the next start), never a checkpoint folder whose
    ``state.json`` is gone but whose other files stay, which nothing would ever prune."""
    doomed = os.path.join(os.path.dirname(path), f"{TEMP_PREFIX}old-{secrets.token_hex(4)}")
    os.replace(path, doomed)
    return doomed


def save_checkpoint(out_dir: str, step: int, model, optimizer, lr_scheduler, accelerator, state: dict,
                    keep: int) -> str | None:
    """Write ``checkpoint-<step>`` (every rank must call it: DeepSpeed saves from all ranks);
    returns its path on rank 0."""
    from safetensors.torch import save_file

    root = checkpoint_root(out_dir)
    deepspeed = getattr(accelerator, "distributed_type", None) is not None and accelerator.distributed_type.name == "DEEPSPEED"
    main = accelerator.is_main_process
    tmp = os.path.join(root, f"{TEMP_PREFIX}checkpoint-{step}")
    if main:
        os.makedirs(root, exist_ok=True)
        if os.path.isdir(tmp):
            shutil.rmtree(tmp)
        os.makedirs(tmp)
    accelerator.wait_for_everyone()
    if deepspeed:
        accelerator.save_state(os.path.join(tmp, "accelerate"))
    final = None
    if main:
        save_file(trainable_state(model), os.path.join(tmp, "adapter.safetensors"))
        scaler = getattr(accelerator, "scaler", None)
        torch.save({"optimizer": None if deepspeed else optimizer.state_dict(), "lr_scheduler": lr_scheduler.state_dict(),
                    "scaler": scaler.state_dict() if scaler is not None else None}, os.path.join(tmp, "optimizer.pt"))
        torch.save(_rng_state(), os.path.join(tmp, "rng.pt"))
        with open(os.path.join(tmp, STATE), "w", encoding="utf-8") as f:
            json.dump(dict(state, step=step), f, indent=1, default=str)
        _fsync_tree(tmp)
        final = os.path.join(root, f"checkpoint-{step}")
        if os.path.isdir(final):  # the same step again (a resumed run repeated it): replace
            old = _retire(final)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        for _, path in complete_checkpoints(out_dir)[:-keep] if keep > 0 else ():
            shutil.rmtree(_retire(path), ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def read_state(path: str) -> dict:
    """A checkpoint's ``state.json`` (step, samples, the run's settings)."""
    with open(os.path.join(path, STATE), encoding="utf-8") as f:
        return json.load(f)


def load_checkpoint(path: str, model, optimizer, lr_scheduler, accelerator) -> dict:
    """Restore a checkpoint into the (prepared) training objects; returns its ``state.json``."""
    from safetensors.torch import load_file

    state = read_state(path)
    load_trainable_state(model, load_file(os.path.join(path, "adapter.safetensors")), path)
    saved = torch.load(os.path.join(path, "optimizer.pt"), map_location="cpu", weights_only=False)
    if saved["optimizer"] is None:  # DeepSpeed
        accelerator.load_state(os.path.join(path, "accelerate"))
    else:
        optimizer.load_state_dict(saved["optimizer"])
    lr_scheduler.load_state_dict(saved["lr_scheduler"])
    scaler = getattr(accelerator, "scaler", None)
    if scaler is not None and saved.get("scaler") is not None:
        scaler.load_state_dict(saved["scaler"])
    _set_rng_state(torch.load(os.path.join(path, "rng.pt"), map_location="cpu", weights_only=False))
    return state


def remove_temporaries(out_dir: str) -> None:
    """Half-written or half-deleted checkpoints of a killed run (rank 0, before anything
    writes).  A ``checkpoint-N`` folder without ``state.json`` is one too: checkpoints
    appear by rename with ``state.json`` inside, so only a delete cut short by an older
    version (which deleted in place) leaves one."""
    root = checkpoint_root(out_dir)
    for name in os.listdir(root) if os.path.isdir(root) else ():
        path = os.path.join(root, name)
        if name.startswith(TEMP_PREFIX) or (_NAME.match(name) and not os.path.isfile(os.path.join(path, STATE))):
            shutil.rmtree(path, ignore_errors=True)
