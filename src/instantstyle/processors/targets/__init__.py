"""Targeting: a model's attention layers (``sites``), presets per architecture, DiT block
rules, and the registry of what is injected where."""
