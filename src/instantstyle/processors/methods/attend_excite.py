"""Attend-and-Excite (Chefer et al. 2023): step the latents so that every chosen subject
token gets a strong cross-attention peak somewhere in the image.

The math is that of diffusers' ``StableDiffusionAttendAndExcitePipeline``:

- maps: the text softmax of the targeted cross-attention layers that run at
  ``resolution`` (upstream 16x16 for SD at 512 px, i.e. latent size / 4), averaged over
  layers and heads (each head counts once), for the conditional rows;
- per token: drop the start token and the last text position, multiply by
  ``temperature`` (100), softmax over the remaining tokens, optionally smooth the token's
  map with upstream's 3x3 Gaussian (reflect padding; upstream's kernel formula,
  ``exp(-((x - mean) / (2 sigma))^2)``, is kept as it is), take its maximum;
- loss of a row = max over its tokens of ``max(0, 1 - max_attention)``;
- update: ``latents - step_size * d loss / d latents`` with upstream's schedule
  ``step_size = scale_factor * sqrt(linspace(1, 0.5, len(timesteps))[i])``, and, at the
  steps in ``thresholds``, upstream's iterative refinement (same loop, same stopping rule).

How it composes with any pipeline call (IP-Adapter / InstantStyle included): the method
is attached through the registry like the others (its maps come from its target layers
only) and is itself a ``callback_on_step_end``.  diffusers calls it after step ``i`` with
the stepped latents; for ``i + 1`` in ``steps`` it re-runs the UNet on the conditional
rows of the call it recorded at step ``i`` (prompt embeddings, added conditions,
IP-Adapter image embeddings, cross-attention kwargs: whatever the pipeline passed),
with the latents scaled by ``scheduler.scale_model_input`` at timestep ``i + 1`` and
with grad, and returns the updated ``latents``, which the pipeline then denoises at step
``i + 1``: upstream's order (update, then denoise), except that step 0 can't be reached
from a callback.  IP streams keep adding to the outputs in that pass; the maps are the
text softmax only.  The pass is invisible to the rest of the model's bookkeeping: step
count, run tracking and per-run caches are as if it had not happened.

Rows are independent in a plain UNet, so one batched pass gives every row its own
gradient.  Methods that pair rows across the two CFG halves see only the conditional
half in the guidance pass.  Eager mode, UNets only; not inside ``torch.inference_mode``.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from ..core import model_state
from ..core.models import transformer_family, unet_of
from ..core.validation import describe
from .attention_maps import AttentionMapCapture


class AttendAndExcite(AttentionMapCapture):
    """Attend-and-Excite latent guidance; pass the instance as ``callback_on_step_end``.

    Args:
        token_indices: prompt token positions to excite (as ``tokenizer(prompt).input_ids``
            counts them, the start token being 0); one list for every row, or one list
            per prompt (rows of a prompt are consecutive, as with ``num_images_per_prompt``).
        target: cross-attention layers whose maps count (default all).
        steps: denoising step indices whose input latents are updated (>= 1);
            upstream's ``max_iter_to_alter=25`` is ``range(1, 25)``.
        scale_factor: upstream's step-size factor (20).
        resolution: ``(h, w)`` or an int of the maps used; default latent size / 4.
        temperature: maps are multiplied by it before the softmax over tokens (100).
        smooth, kernel_size, sigma: upstream's Gaussian smoothing (on, 3, 0.5).
        thresholds: ``{step: threshold}`` where iterative refinement runs (upstream
            ``{0: 0.05, 10: 0.5, 20: 0.8}``; step 0 is not reachable here).
        max_refinement_steps: upstream's cap on refinement iterations (20).

    After a run, ``losses`` is ``{step: (B,) loss before the step's last update}``.
    """

    name = "attend_and_excite"
    kind = "cross"
    default_target = "all"

    def __init__(self, token_indices, target=None, *, steps: Iterable[int] = range(1, 25), scale_factor: float = 20.0,
                 resolution=None, temperature: float = 100.0, smooth: bool = True, kernel_size: int = 3,
                 sigma: float = 0.5, thresholds: dict[int, float] | None = None, max_refinement_steps: int = 20,
                 name=None):
        super().__init__(target, differentiable=True, name=name)
        self.token_indices = _token_lists(token_indices)
        self.steps = _step_set("steps", steps)
        self.scale_factor = _positive("scale_factor", scale_factor)
        self.resolution = _resolution(resolution)
        self.temperature = _positive("temperature", temperature)
        if not isinstance(smooth, bool):
            raise TypeError(f"smooth: expected True or False, got {describe(smooth)}")
        if isinstance(kernel_size, bool) or not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size: expected an odd positive int, got {describe(kernel_size)}")
        self.smooth, self.kernel_size, self.sigma = smooth, kernel_size, _positive("sigma", sigma)
        self.thresholds = _thresholds({10: 0.5, 20: 0.8} if thresholds is None else thresholds)
        if isinstance(max_refinement_steps, bool) or not isinstance(max_refinement_steps, int) or max_refinement_steps < 1:
            raise ValueError(f"max_refinement_steps: expected an int >= 1, got {describe(max_refinement_steps)}")
        self.max_refinement_steps = max_refinement_steps
        self.losses: dict[int, torch.Tensor] = {}
        self._calls: dict[int, tuple] = {}  # id(unet) -> (args, kwargs) of its last UNet call
        self._hooks: dict[int, object] = {}
        self._size: tuple[int, int] | None = None  # the maps' (h, w) during a guidance pass

    # -- the observer: maps only during our own guidance pass, only at the resolution ----
    def observing(self, call) -> bool:
        return self._size is not None and call.spatial == self._size

    def on_step(self, step: int, timestep) -> None:
        if step == 0 and self._size is None:  # a new run (not our pass)
            self.clear()
            self.losses.clear()

    # -- recording the pipeline's UNet call ------------------------------------------
    def patch_modules(self, unet) -> None:
        if transformer_family(unet) is not None:
            raise ValueError(f"{self.name}: expected a UNet model, got {type(unet).__name__} (DiTs are not supported)")
        if id(unet) not in self._hooks:
            self._hooks[id(unet)] = unet.register_forward_pre_hook(self._record, with_kwargs=True)

    def unpatch_modules(self, unet) -> None:
        hook = self._hooks.pop(id(unet), None)
        if hook is not None:
            hook.remove()
        self._calls.pop(id(unet), None)

    def _record(self, unet, args, kwargs):
        if self._size is None:  # the pipeline's call, not our pass
            self._calls[id(unet)] = (args, kwargs)

    # -- the callback ------------------------------------------------------------------
    def __call__(self, pipe, step: int, timestep, callback_kwargs: dict) -> dict:
        """``callback_on_step_end``: after step ``step``, update the latents of step
        ``step + 1`` if it is one of ``steps``."""
        nxt = int(step) + 1
        timesteps = pipe.scheduler.timesteps
        if nxt not in self.steps or nxt >= len(timesteps):
            return callback_kwargs
        if "latents" not in callback_kwargs:
            raise ValueError(f"{self.name}: expected 'latents' in callback_kwargs (callback_on_step_end_tensor_inputs), "
                             f"got {sorted(callback_kwargs)}")
        step_size = self.scale_factor * math.sqrt(1.0 - 0.5 * nxt / max(len(timesteps) - 1, 1))
        callback_kwargs["latents"] = self.excite(pipe, callback_kwargs["latents"], timesteps[nxt], step_size,
                                                 threshold=self.thresholds.get(nxt), step=nxt)
        return callback_kwargs

    def excite(self, pipe_or_unet, latents: torch.Tensor, timestep, step_size: float,
               threshold: float | None = None, step: int | None = None) -> torch.Tensor:
        """One Attend-and-Excite update of ``latents`` (``(B, C, h, w)``, the pipeline's
        unscaled latents) at ``timestep``, replaying the model's last recorded call
        (conditional rows); with ``threshold``, upstream's iterative refinement first."""
        unet = unet_of(pipe_or_unet)
        scheduler = getattr(pipe_or_unet, "scheduler", None)
        if id(unet) not in self._calls:
            raise ValueError(f"{self.name}: no UNet call recorded yet (apply_method the method, then call the pipeline)")
        if torch.is_inference_mode_enabled():
            raise RuntimeError(f"{self.name}: needs autograd; call the pipeline outside torch.inference_mode()")
        args, kwargs = self._calls[id(unet)]
        loss_and_grad = lambda x: self._loss_and_grad(unet, scheduler, args, kwargs, x, timestep)
        x = latents.detach()
        loss, grad = loss_and_grad(x)
        if threshold is not None and bool((loss > 1.0 - threshold).any()):
            x = self._refine(x, loss, grad, 1.0 - threshold, step_size, loss_and_grad)
            loss, grad = loss_and_grad(x)
        if step is not None:
            self.losses[step] = loss.detach()
        return (x - step_size * grad).to(latents.dtype)

    def _refine(self, x, loss, grad, target, step_size, loss_and_grad):
        """Upstream's loop per row: update with the loss just computed, stop once that
        loss was at most ``target`` (so one update follows) or after the cap."""
        active = loss > target
        for iteration in range(1, self.max_refinement_steps + 1):
            if iteration > 1:
                loss, grad = loss_and_grad(x)
            x = x - step_size * grad * active.view(-1, *([1] * (x.ndim - 1))).to(grad.dtype)
            active = active & (loss > target)
            if not bool(active.any()):
                break
        return x

    def _loss_and_grad(self, unet, scheduler, args, kwargs, x, timestep):
        rows = x.shape[0]
        sample = args[0] if args else kwargs.get("sample")
        if not isinstance(sample, torch.Tensor) or sample.shape[0] not in (rows, 2 * rows):
            raise ValueError(f"latents: expected {describe(sample)} to hold {rows} rows or {rows} conditional rows "
                             f"after as many unconditional ones, got latents {describe(x)}")
        cond = _conditional_rows(sample.shape[0], rows)
        call_args = [cond(a) for a in args[2:]]
        call_kwargs = {k: cond(v) for k, v in kwargs.items() if k not in ("sample", "timestep")}
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            model_in = scheduler.scale_model_input(x, timestep) if scheduler is not None else x
            self.clear()
            self._size = self.resolution or tuple(math.ceil(s / 4) for s in x.shape[-2:])
            try:
                with _side_pass(unet):
                    unet(model_in, timestep, *call_args, **call_kwargs)
                maps = self.aggregated_maps()
                loss = excite_loss(maps, self._indices_per_row(rows, maps.shape[1]), self.temperature,
                                   gaussian_kernel(self.kernel_size, self.sigma, maps.dtype, maps.device) if self.smooth else None)
                grad, = torch.autograd.grad(loss.sum(), [x])
            finally:
                self._size = None
                self.maps = {key: m.detach() for key, m in self.maps.items()}  # free the pass' graph
        return loss.detach(), grad

    def aggregated_maps(self) -> torch.Tensor:
        """``(B, tokens, h, w)``: the captured maps averaged over layers and heads."""
        if not self.maps:
            raise ValueError(f"resolution: no targeted cross-attention layer of {self.name} runs at {self._size}; "
                             f"pick a resolution one of them has (target {self.target!r})")
        total = sum(self.heads.values())
        return sum(m * (self.heads[key] / total) for key, m in self.maps.items())

    def _indices_per_row(self, rows: int, text_len: int) -> Sequence[Sequence[int]]:
        lists = self.token_indices
        if rows % len(lists):
            raise ValueError(f"token_indices: expected 1 list or one per prompt ({rows} rows), got {len(lists)} lists")
        top = max(max(ix) for ix in lists)
        if top > text_len - 2:
            raise ValueError(f"token_indices: expected indices in 1..{text_len - 2} (text of {text_len} tokens; "
                             f"the start and last positions are left out), got {top}")
        per = rows // len(lists)
        return [lists[r // per] for r in range(rows)]


def excite_loss(maps: torch.Tensor, indices: Sequence[Sequence[int]], temperature: float = 100.0,
                kernel: torch.Tensor | None = None) -> torch.Tensor:
    """``(B,)`` Attend-and-Excite loss of ``(B, tokens, h, w)`` maps, row ``b`` exciting
    ``indices[b]`` (prompt positions); ``kernel`` ``(k, k)`` smooths each token's map."""
    text = (maps[:, 1:-1] * temperature).softmax(dim=1)  # without the start token and the last position
    losses = []
    for row, chosen in enumerate(indices):
        peaks = []
        for index in chosen:
            heat = text[row, index - 1][None, None]
            if kernel is not None:
                pad = kernel.shape[-1] // 2
                heat = F.conv2d(F.pad(heat, (pad, pad, pad, pad), mode="reflect"), kernel[None, None])
            peaks.append(heat.max())
        losses.append((1.0 - torch.stack(peaks)).clamp_min(0).max())
    return torch.stack(losses)


def gaussian_kernel(size: int, sigma: float, dtype=torch.float32, device=None) -> torch.Tensor:
    """Upstream's ``GaussianSmoothing`` kernel (its formula as written), normalised to sum 1."""
    grid = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    one = torch.exp(-((grid / (2 * sigma)) ** 2)) / (sigma * math.sqrt(2 * math.pi))
    kernel = one[:, None] * one[None, :]
    return (kernel / kernel.sum()).to(dtype=dtype, device=device)


def _conditional_rows(batch: int, rows: int):
    """Keep the last ``rows`` rows of every ``batch``-row tensor (diffusers puts the
    unconditional half first), recursively through dicts, lists and tuples."""
    def pick(value):
        if isinstance(value, torch.Tensor):
            return value[batch - rows:] if batch != rows and value.ndim and value.shape[0] == batch else value
        if isinstance(value, dict):
            return {k: pick(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(pick(v) for v in value)
        return value
    return pick


@contextmanager
def _side_pass(unet):
    """Run a UNet call the model's bookkeeping does not count: step index, run tracking
    (and with it the per-run caches) are put back as they were."""
    state = model_state.state_of(unet, create=False)
    saved = None if state is None else (state.step, state.last_timestep, state.run, state.run_mark)
    try:
        yield
    finally:
        if state is not None:
            state.step, state.last_timestep, state.run, state.run_mark = saved


# -- argument checks ---------------------------------------------------------------------
def _token_lists(value) -> tuple[tuple[int, ...], ...]:
    bad = f"token_indices: expected a non-empty list of token positions >= 1 (or one such list per prompt), got {describe(value)}"
    if not isinstance(value, (list, tuple)) or not value:
        raise ValueError(bad)
    lists = [value] if all(isinstance(v, int) and not isinstance(v, bool) for v in value) else list(value)
    for chosen in lists:
        if (not isinstance(chosen, (list, tuple)) or not chosen
                or any(isinstance(i, bool) or not isinstance(i, int) or i < 1 for i in chosen)):
            raise ValueError(bad)
    return tuple(tuple(c) for c in lists)


def _step_set(name: str, value) -> frozenset:
    try:
        steps = list(value)
    except TypeError:
        raise TypeError(f"{name}: expected an iterable of step indices >= 1, got {describe(value)}") from None
    if not steps or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in steps):
        raise ValueError(f"{name}: expected step indices >= 1 (step 0's latents exist before any callback), got {describe(value)}")
    return frozenset(steps)


def _positive(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or not math.isfinite(value):
        raise ValueError(f"{name}: expected a positive number, got {describe(value)}")
    return float(value)


def _resolution(value) -> tuple[int, int] | None:
    if value is None:
        return None
    pair = (value, value) if isinstance(value, int) else value
    if (not isinstance(pair, (list, tuple)) or len(pair) != 2
            or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in pair)):
        raise ValueError(f"resolution: expected None, a positive int or an (h, w) pair, got {describe(value)}")
    return tuple(pair)


def _thresholds(value) -> dict[int, float]:
    if not isinstance(value, dict):
        raise TypeError(f"thresholds: expected a dict {{step: threshold}}, got {describe(value)}")
    for step, threshold in value.items():
        if isinstance(step, bool) or not isinstance(step, int) or step < 1:
            raise ValueError(f"thresholds: expected step keys >= 1, got {describe(step)}")
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 < threshold <= 1:
            raise ValueError(f"thresholds: expected thresholds in (0, 1], got {describe(threshold)} at step {step}")
    return {int(k): float(v) for k, v in value.items()}
