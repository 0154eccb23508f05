"""Arguments of quick ``instantstyle stylize`` / ``stylize-batch`` runs on the tiny SDXL folder
(``tiny_sdxl``), and an output image's pixels for comparing runs."""
import numpy as np
from PIL import Image


def stylize_args(root, out, *extra):
    """``stylize`` on ``root``'s model, adapter, encoder and style image: 2 steps at 32x32, seed 7."""
    return [
        "stylize", "--model", str(root / "model"), "--ip-adapter", str(root / "ip-adapter.safetensors"),
        "--image-encoder", str(root / "image_encoder"), "--style", str(root / "style.png"),
        "--prompt", "a dog on a bench", "--content-prompt", "a cat", "--steps", "2",
        "--height", "32", "--width", "32", "--seed", "7", "--out", str(out), *extra,
    ]


def batch_args(root, manifest, out, *extra):
    """``stylize-batch`` of ``manifest`` on ``root``'s model and adapter: 2 steps at 32x32, seed 11."""
    return ["stylize-batch", str(manifest), "--out", str(out), "--model", str(root / "model"),
            "--ip-adapter", str(root / "ip-adapter.safetensors"), "--steps", "2", "--height", "32", "--width", "32",
            "--seed", "11", "--threads", "1", *extra]


def pixels(path):
    """An 8-bit image as int16, so differences between two runs don't wrap."""
    return np.asarray(Image.open(path), dtype=np.int16)
