"""Wan-family video transformers (Wan 2.1 I2V/FLF2V, SkyReels-V2 I2V/FLF2V, ChronoEdit,
Wan-Animate): their cross-attention is natively decoupled (text keys and CLIP image keys
in two softmaxes over the same queries, summed), which is exactly the op's math.

- ``layer``: parse (diffusers' split by position, q/k RMSNorm across heads, text and
  image K/V) and project (``to_out``).
- ``processor``: the drop-in processors, one per diffusers class, each cross-attention
  layer with an image branch = ONE op call (text keys + the image branch as one stream
  with a scale); self-attention stays on diffusers' dispatcher.
- ``self_attention``: ``attn1`` with editing methods attached (StyleAligned on video),
  one op call; without methods self-attention stays on diffusers' dispatcher.
- ``context_cache``: per-run reuse of the text/image K/V inside Wan's forward (a bit-equal
  canonical context per run, one cache slot per distinct context).
- ``video_grid``: the latent frame grid of a call, for per-frame methods.
- ``conversion``: diffusers' Wan processors -> ours (``use_fused_processors`` routes here).
- ``image_scale``: :func:`set_image_scale`, per-block control and step gates of the
  native image branch (diffusers has neither).
"""
