"""UNets (SD1.5, SD2, SDXL, motion UNets): diffusers' ``Attention`` parsed and projected
(``layer_inputs``), the drop-in processors, the cached image projection, conversion."""
