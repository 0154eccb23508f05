"""Flux and SD3.5 transformers: their drop-in processors (``flux``, ``sd3``), methods on
joint attention (``joint_methods``, ``joint_observe``, ``method_rules``), conversion."""
