"""One training step: frozen encoders -> noisy latents -> the UNet with the adapter (or LoRA) -> loss.

* **Loss**: MSE against the scheduler's target: ε (``epsilon``), v (``v_prediction``,
  ``scheduler.get_velocity``) or the clean latents (``sample``), per the model's scheduler
  config; timesteps uniform in ``[0, num_train_timesteps)``; an optional noise offset
  (``noise += offset * N(0, 1)`` per sample and channel).
* **Drops** (trains the unconditional branch CFG uses): with probability ``drop_image`` the
  image is dropped (zero CLIP embeds for ``base``, zero pixels into CLIP for ``plus``), with
  ``drop_text`` the caption becomes "", with ``drop_both`` both; 0.05 each by default.
* **Per-sample randomness**: sample ``g`` of the run draws its drop, timestep, noise, noise
  offset and VAE sample from its own generator seeded by ``(seed, g)``, in that order.
  Nothing depends on which process or micro-batch holds it, so the same global batch gives
  the same weights for any number of processes (up to float summation order).
* **Sharding**: step ``s`` takes global samples ``s*B ... s*B + B - 1``; micro-batch ``a`` of
  ``A`` (gradient accumulation) takes its ``B/A`` block of them and process ``p`` of ``P`` its
  contiguous ``B/(A*P)`` slice.  The loss is the mean over the local micro-batch; accelerate
  divides by ``A`` and DDP averages over ``P``, so each step's gradient is the mean over the
  global batch.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .data import sample_seed


@dataclass
class Drops:
    image: float = 0.05
    text: float = 0.05
    both: float = 0.05

    def check(self) -> None:
        for name, p in (("image", self.image), ("text", self.text), ("both", self.both)):
            if not 0 <= p <= 1:
                raise ValueError(f"drop rate {name}: expected a probability in [0, 1], got {p}")
        if self.image + self.text + self.both > 1:
            raise ValueError(f"drop rates: image + text + both must be <= 1, got {self.image + self.text + self.both}")

    def decide(self, u: float):
        """``(drop image, drop text)`` for a uniform draw ``u``."""
        if u < self.image:
            return True, False
        if u < self.image + self.text:
            return False, True
        if u < self.image + self.text + self.both:
            return True, True
        return False, False


def shard(step: int, micro: int, global_batch: int, accumulation: int, rank: int, world: int) -> range:
    """Global sample indices of micro-batch ``micro`` of ``step`` on process ``rank``."""
    per_micro = global_batch // accumulation
    local = per_micro // world
    start = step * global_batch + micro * per_micro + rank * local
    return range(start, start + local)


@dataclass
class Draws:
    drop_image: bool
    drop_text: bool
    timestep: int
    noise: torch.Tensor
    offset: torch.Tensor
    vae_eps: torch.Tensor


def draw(seed: int, global_index: int, drops: Drops, train_steps: int, latent_shape) -> Draws:
    g = torch.Generator().manual_seed(sample_seed(seed, global_index))
    u = float(torch.rand((), generator=g))
    t = int(torch.randint(0, train_steps, (), generator=g))
    noise = torch.randn(latent_shape, generator=g)
    offset = torch.randn((latent_shape[0], 1, 1), generator=g)
    vae_eps = torch.randn(latent_shape, generator=g)
    drop_image, drop_text = drops.decide(u)
    return Draws(drop_image, drop_text, t, noise, offset, vae_eps)


class Conditioner:
    """The frozen models of a pipeline, turning samples into UNet inputs (no grad anywhere).
    ``image_encoder`` None: text only (LoRA training)."""

    def __init__(self, pipe, image_encoder, image_processor, fmt: str, device, weight_dtype=torch.float32):
        self.pipe, self.encoder, self.processor, self.format = pipe, image_encoder, image_processor, fmt
        self.device, self.weight_dtype = torch.device(device), weight_dtype
        self.sdxl = getattr(pipe, "text_encoder_2", None) is not None
        vae = pipe.vae
        self.scaling = vae.config.scaling_factor
        self.shift = getattr(vae.config, "shift_factor", None) or 0.0
        self.vae_scale = getattr(pipe, "vae_scale_factor", 8)

    def latent_shape(self, resolution: int):
        return (self.pipe.vae.config.latent_channels, resolution // self.vae_scale, resolution // self.vae_scale)

    @torch.no_grad()
    def text(self, captions: list[str]):
        """``(prompt_embeds, pooled or None)`` through the pipeline's own ``encode_prompt``."""
        if self.sdxl:
            embeds, _, pooled, _ = self.pipe.encode_prompt(prompt=captions, device=self.device, num_images_per_prompt=1,
                                                           do_classifier_free_guidance=False)
            return embeds, pooled
        embeds, _ = self.pipe.encode_prompt(captions, self.device, 1, False)
        return embeds, None

    @torch.no_grad()
    def image_embeds(self, images, drop: torch.Tensor) -> torch.Tensor:
        """``[B, 1, D]`` (base) or ``[B, 1, S, H]`` (plus); ``drop`` [B] bool."""
        pixels = self.processor(images=images, return_tensors="pt").pixel_values
        pixels = pixels.to(self.device, dtype=next(self.encoder.parameters()).dtype)
        keep = (~drop).to(self.device).view(-1, 1, 1, 1)
        if self.format == "plus":
            pixels = pixels * keep.to(pixels.dtype)  # a dropped image is zero pixels (the original recipe)
            states = self.encoder(pixels, output_hidden_states=True).hidden_states[-2]
            return states.unsqueeze(1).float()
        embeds = self.encoder(pixels).image_embeds
        return (embeds * keep.view(-1, 1).to(embeds.dtype)).unsqueeze(1).float()  # a dropped image is zero embeds

    @torch.no_grad()
    def latents(self, pixels: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        vae = self.pipe.vae
        dist = vae.encode(pixels.to(self.device, dtype=vae.dtype)).latent_dist
        sample = dist.mean + dist.std * eps.to(self.device, dtype=dist.mean.dtype)
        return ((sample - self.shift) * self.scaling).float()


def prediction_target(scheduler, latents, noise, timesteps) -> torch.Tensor:
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    if kind == "sample":
        return latents
    raise ValueError(f"scheduler prediction_type {kind!r} is not supported (epsilon, v_prediction, sample)")


@dataclass
class MicroBatch:
    loss: torch.Tensor  # the mean over the local samples (what backward sees)
    loss_sum: torch.Tensor  # detached sum of the per-sample losses (for logging)
    count: int


def micro_step(model, conditioner: Conditioner, scheduler, samples, seed: int, drops: Drops,
               noise_offset: float, resolution: int) -> MicroBatch:
    """Forward of one local micro-batch (``samples`` from ``data.Loader``); returns its loss."""
    device = conditioner.device
    train_steps = scheduler.config.num_train_timesteps
    shape = conditioner.latent_shape(resolution)
    draws = [draw(seed, s.global_index, drops, train_steps, shape) for s in samples]
    drop_image = torch.tensor([d.drop_image for d in draws])
    captions = ["" if d.drop_text else s.row.text for s, d in zip(samples, draws)]
    pixels = torch.stack([s.pixels for s in samples])
    latents = conditioner.latents(pixels, torch.stack([d.vae_eps for d in draws]))
    noise = torch.stack([d.noise for d in draws]).to(device)
    if noise_offset:
        noise = noise + noise_offset * torch.stack([d.offset for d in draws]).to(device)
    timesteps = torch.tensor([d.timestep for d in draws], device=device, dtype=torch.long)
    noisy = scheduler.add_noise(latents, noise, timesteps)
    target = prediction_target(scheduler, latents, noise, timesteps)
    prompt_embeds, pooled = conditioner.text(captions)
    added = {}
    if conditioner.encoder is not None:  # LoRA training has no image branch
        added["image_embeds"] = [conditioner.image_embeds([s.clip_image for s in samples], drop_image)]
    if pooled is not None:
        added["text_embeds"] = pooled
        added["time_ids"] = torch.stack([s.time_ids for s in samples]).to(device, dtype=prompt_embeds.dtype)
    pred = model(noisy.to(conditioner.weight_dtype), timesteps, encoder_hidden_states=prompt_embeds,
                 added_cond_kwargs=added, return_dict=False)[0]
    per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    return MicroBatch(per_sample.mean(), per_sample.detach().sum(), len(samples))


def train_step(step: int, model, accelerator, optimizer, lr_scheduler, conditioner, scheduler, load, *, seed: int,
               global_batch: int, accumulation: int, drops: Drops, noise_offset: float, resolution: int,
               max_grad_norm: float | None = None) -> float:
    """One optimiser step over the global batch of ``step``; returns the global mean loss."""
    total = torch.zeros((), device=accelerator.device)
    for micro in range(accumulation):
        indices = shard(step, micro, global_batch, accumulation, accelerator.process_index, accelerator.num_processes)
        samples = [load(g) for g in indices]
        with accelerator.accumulate(model):
            out = micro_step(model, conditioner, scheduler, samples, seed, drops, noise_offset, resolution)
            accelerator.backward(out.loss)
            if accelerator.sync_gradients and max_grad_norm:
                accelerator.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        total = total + out.loss_sum.to(total.device)
    lr_scheduler.step()
    return float(accelerator.reduce(total, reduction="sum")) / global_batch
