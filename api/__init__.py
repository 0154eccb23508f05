"""instantstyle: fused decoupled cross-attention for IP-Adapter / InstantStyle."""
__version__ = "0.1.0"
