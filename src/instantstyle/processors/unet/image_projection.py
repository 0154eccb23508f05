"""diffusers' ``MultiIPAdapterImageProjection`` that projects the image embeddings once
per denoising run instead of once per step (see ``step_cache``): same modules, same
weights, same outputs, and the same output tensors while the run lasts and the inputs
are unchanged, which also lets every layer reuse its IP key/value projections.  Outside
a run (a model without ``set_caches(model, True)``, or called on its own) it projects
every call."""
from __future__ import annotations

from diffusers.models.embeddings import MultiIPAdapterImageProjection

from ..core.step_cache import OwnsStepCaches, StepCache


class CachedImageProjection(OwnsStepCaches, MultiIPAdapterImageProjection):
    def __init__(self, layers):
        super().__init__(layers)
        self.step_cache = StepCache()

    @classmethod
    def wrapping(cls, projection: MultiIPAdapterImageProjection) -> "CachedImageProjection":
        """The same projection layers (shared, not copied) behind the cache."""
        return cls(list(projection.image_projection_layers))

    def forward(self, image_embeds):
        if not isinstance(image_embeds, list):  # diffusers' deprecated tensor form: no caching
            return super().forward(image_embeds)
        keys = [*image_embeds, *self.parameters()]
        return self.step_cache.get(keys, lambda: super(CachedImageProjection, self).forward(image_embeds))
