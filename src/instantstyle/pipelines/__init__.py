"""InstantStyle end to end: content subtraction, a pipeline helper, and ``instantstyle stylize``.

Names are imported on first use: they pull in diffusers and transformers (seconds), which
``instantstyle --help`` and the other subcommands should not pay for.
"""
from ..kernels.lazy import lazy_exports

_LAZY = {
    "InstantStyle": "instantstyle.pipelines.instantstyle",
    "ContentSubtractionError": "instantstyle.pipelines.content",
    "encode_images": "instantstyle.pipelines.content",
    "encode_text": "instantstyle.pipelines.content",
    "style_image_embeds": "instantstyle.pipelines.content",
    "subtract_content": "instantstyle.pipelines.content",
}
__all__ = list(_LAZY)


__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
