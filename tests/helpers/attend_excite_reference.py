"""Attend-and-Excite written out by hand in float64, the way diffusers'
``StableDiffusionAttendAndExcitePipeline`` reads: a cross-attention processor whose text
softmax is ``exp / sum`` and that keeps every head's map at the chosen resolution, the
token loss (softmax over tokens without the start and last positions, upstream's
Gaussian, reflect padding by index), and the latent update with upstream's per-row
refinement loop."""
from __future__ import annotations

import math

import torch


def _heads(attn, x):
    b, n, _ = x.shape
    return x.view(b, n, attn.heads, -1).transpose(1, 2)  # (B, H, L, D)


def softmax_by_hand(logits):
    e = torch.exp(logits - logits.max(dim=-1, keepdim=True).values)
    return e / e.sum(dim=-1, keepdim=True)


class RefExciteCross:
    """Text cross-attention (+ one IP-Adapter stream from diffusers' processor ``ip``, as
    diffusers adds it) that keeps ``(B, H, N, Lt)`` probabilities where ``N == size``."""

    def __init__(self, size, ip=None):
        self.size, self.ip, self.probs = size, ip, []

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        ip_states = None
        if isinstance(encoder_hidden_states, tuple):
            encoder_hidden_states, (ip_states,) = encoder_hidden_states
        q = _heads(attn, attn.to_q(hidden_states))
        k, v = _heads(attn, attn.to_k(encoder_hidden_states)), _heads(attn, attn.to_v(encoder_hidden_states))
        tau = q.shape[-1] ** -0.5
        probs = softmax_by_hand(q @ k.transpose(-1, -2) * tau)
        if q.shape[2] == self.size:
            self.probs.append(probs)
        out = probs @ v
        if self.ip is not None and ip_states is not None:
            ip = ip_states.reshape(ip_states.shape[0], -1, ip_states.shape[-1])
            ik, iv = _heads(attn, self.ip.to_k_ip[0](ip)), _heads(attn, self.ip.to_v_ip[0](ip))
            out = out + self.ip.scale[0] * (softmax_by_hand(q @ ik.transpose(-1, -2) * tau) @ iv)
        b, h, n, d = out.shape
        return attn.to_out[1](attn.to_out[0](out.transpose(1, 2).reshape(b, n, h * d)))


def by_hand_processors(ref_unet, size, with_ip=False, only=("",)):
    """Put :class:`RefExciteCross` on every cross-attention layer of ``ref_unet`` (keeping the
    IP weights of diffusers' processors when ``with_ip``); returns ``{module name: processor}``
    of the layers whose names start with one of ``only`` (the others keep no maps)."""
    procs = {}
    for name, module in ref_unet.named_modules():
        if name.endswith("attn2"):
            proc = RefExciteCross(size if name.startswith(tuple(only)) else -1, ip=module.processor if with_ip else None)
            module.set_processor(proc)
            if proc.size == size:
                procs[name] = proc
    return procs


def aggregate(procs, hw):
    """upstream ``aggregate_attention``: every (layer, head) map at the resolution, averaged."""
    maps = torch.cat([p for proc in procs.values() for p in proc.probs], dim=1)  # (B, layers*heads, N, Lt)
    for proc in procs.values():
        proc.probs.clear()
    return maps.mean(dim=1).reshape(maps.shape[0], *hw, maps.shape[-1])  # (B, h, w, Lt)


def upstream_kernel(size=3, sigma=0.5):
    kernel = torch.ones(size, size, dtype=torch.float64)
    for axis in range(2):
        grid = torch.arange(size, dtype=torch.float64).view(*((-1, 1) if axis == 0 else (1, -1)))
        kernel = kernel * (1 / (sigma * math.sqrt(2 * math.pi)) * torch.exp(-(((grid - (size - 1) / 2) / (2 * sigma)) ** 2)))
    return kernel / kernel.sum()


def smooth_reflect(image, kernel):
    """``(h, w)`` image, reflect-padded by index and convolved by explicit sums."""
    h, w = image.shape
    r = kernel.shape[0] // 2
    reflect = lambda i, n: -i if i < 0 else (2 * (n - 1) - i if i >= n else i)
    rows = []
    for y in range(h):
        row = []
        for x in range(w):
            row.append(sum(kernel[dy + r, dx + r] * image[reflect(y + dy, h), reflect(x + dx, w)]
                           for dy in range(-r, r + 1) for dx in range(-r, r + 1)))
        rows.append(torch.stack(row))
    return torch.stack(rows)


def loss_by_hand(maps, indices, temperature=100.0, smooth=True):
    """upstream ``_compute_max_attention_per_index`` + ``_compute_loss`` for one row's
    ``(h, w, Lt)`` maps."""
    text = softmax_by_hand(maps[:, :, 1:-1] * temperature)
    kernel = upstream_kernel()
    peaks = []
    for index in indices:
        image = text[:, :, index - 1]
        peaks.append((smooth_reflect(image, kernel) if smooth else image).max())
    return max(torch.clamp(1.0 - p, min=0.0) for p in peaks)


def excite_by_hand(ref_unet, procs, latents, timestep, call, indices, hw, step_size, scale=1.0,
                   threshold=None, max_refinement_steps=20):
    """Upstream's per-row loop: the loss, optional iterative refinement, one update.
    ``call(sample, timestep)`` runs ``ref_unet`` on the conditional inputs of that row;
    ``scale`` is the scheduler's input scaling.  Returns ``(latents, losses)``."""
    def loss_of(latent, row):
        latent = latent.clone().detach().requires_grad_(True)
        call(latent * scale, timestep, row)
        loss = loss_by_hand(aggregate(procs, hw)[0], indices[row])
        return latent, loss

    def update(latent, loss):
        grad = torch.autograd.grad(loss, [latent])[0] if loss.requires_grad else torch.zeros_like(latent)
        return latent - step_size * grad

    out, losses = [], []
    with torch.enable_grad():
        for row in range(latents.shape[0]):
            latent, loss = loss_of(latents[row:row + 1], row)
            if threshold is not None and loss > 1.0 - threshold:
                iteration = 0
                while loss > 1.0 - threshold:
                    iteration += 1
                    latent, loss = loss_of(latent, row)
                    latent = update(latent, loss)
                    if iteration >= max_refinement_steps:
                        break
                latent, loss = loss_of(latent, row)
            out.append(update(latent, loss).detach())
            losses.append(float(loss.detach()))
    return torch.cat(out), losses
