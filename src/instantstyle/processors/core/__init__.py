"""The generic per-layer engine, shared by every model family: the contributor protocol,
the one op call (``engine.attend``), step gates, the model state and its step hook,
per-run caches, projections, IP-Adapter's streams and the explicit diffusers patches.
Nothing here knows a family or how layers are named."""
