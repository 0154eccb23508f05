"""InstantStyle end to end: content subtraction, a pipeline helper, and ``instantstyle stylize``."""
from .content import ContentSubtractionError, encode_images, encode_text, style_image_embeds, subtract_content
from .instantstyle import InstantStyle

__all__ = [
    "InstantStyle",
    "ContentSubtractionError",
    "encode_images",
    "encode_text",
    "style_image_embeds",
    "subtract_content",
]
