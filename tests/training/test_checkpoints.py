"""Checkpoint folders under kills: a run killed while it prunes an old checkpoint leaves a
temporary (removed at the next start), never a ``checkpoint-N`` missing its ``state.json``,
which nothing would prune (the killed-run test once found ``checkpoint-1`` left that way)."""
from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch

from instantstyle.training import checkpoints as ckpt


class Killed(BaseException):
    """A SIGKILL stand-in: not an Exception, so nothing on the way catches it."""


def _save(out, step, keep=1):
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    accelerator = SimpleNamespace(distributed_type=None, is_main_process=True, wait_for_everyone=lambda: None, scaler=None)
    return ckpt.save_checkpoint(str(out), step, model, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: 1.0),
                                accelerator, {"samples": step}, keep)


def _names(out):
    return sorted(os.listdir(out / ckpt.FOLDER))


def test_a_kill_while_pruning_leaves_a_temporary_that_the_next_start_removes(tmp_path, monkeypatch):
    _save(tmp_path, 1)
    original = ckpt.shutil.rmtree

    def killed_midway(path, *args, **kwargs):  # the old checkpoint's state.json goes first, then the kill
        os.remove(os.path.join(path, ckpt.STATE))
        raise Killed

    monkeypatch.setattr(ckpt.shutil, "rmtree", killed_midway)
    with pytest.raises(Killed):
        _save(tmp_path, 2)
    monkeypatch.setattr(ckpt.shutil, "rmtree", original)
    names = _names(tmp_path)
    assert "checkpoint-2" in names and "checkpoint-1" not in names  # retired by rename before the delete
    assert [n for n in names if n != "checkpoint-2"] and all(n.startswith(ckpt.TEMP_PREFIX) for n in names
                                                             if n != "checkpoint-2")
    ckpt.remove_temporaries(str(tmp_path))
    assert _names(tmp_path) == ["checkpoint-2"]
    assert [step for step, _ in ckpt.complete_checkpoints(str(tmp_path))] == [2]


def test_the_next_start_removes_a_checkpoint_an_older_version_half_deleted(tmp_path):
    for step in (1, 2):
        _save(tmp_path, step, keep=2)
    os.remove(tmp_path / ckpt.FOLDER / "checkpoint-1" / ckpt.STATE)  # what an in-place delete cut short left
    ckpt.remove_temporaries(str(tmp_path))
    assert _names(tmp_path) == ["checkpoint-2"]
    _save(tmp_path, 3, keep=1)
    assert _names(tmp_path) == ["checkpoint-3"]
