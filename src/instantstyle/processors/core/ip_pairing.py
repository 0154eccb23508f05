"""Image states paired one-to-one with the samples of a batch (diffusers issue 9813).

Every IP-Adapter processor projects its image states and then views them as
``(batch, -1, heads, head_dim)``.  With more state rows than samples that view does not
fail: it folds the extra rows into the token axis, so each sample attends to the
references of several samples at once.  diffusers' pipelines produce exactly that from
per-prompt embeds (they repeat the embeds once per prompt), so the processors of every
family check the row count before the view.
"""
from __future__ import annotations

import torch


def paired_ip_states(ip_states: list, batch: int) -> list:
    """Each adapter's image states with one row per query sample, or ValueError.

    A states tensor is ``[B_img, n_images, tokens, C]`` (or ``[B_img, tokens, C]``).
    ``B_img == batch`` pairs sample i with image row i; ``B_img == 1`` is one reference
    set shared by every sample (expanded, no copy).  Anything else is refused: a later
    ``.view(batch, -1, ...)`` would fold the extra rows into the token axis and silently
    blend the references of different samples (diffusers issue 9813, what its pipelines
    do with per-prompt embeds: they repeat the embeds once per prompt).
    """
    out = []
    for i, states in enumerate(ip_states):
        rows = states.shape[0] if isinstance(states, torch.Tensor) else None
        if rows == batch or rows is None:
            out.append(states)
        elif rows == 1:
            out.append(states.expand(batch, *states.shape[1:]))
        else:
            raise ValueError(
                f"ip_adapter_image_embeds[{i}]: expected image states for 1 or {batch} samples (the batch, CFG "
                f"halves included), got {rows}: they can't be paired one-to-one with the prompts (a diffusers "
                "pipeline repeats per-prompt embeds once per prompt, diffusers issue 9813; "
                "instantstyle.InstantStyle passes them paired)"
            )
    return out
