"""Arguments of a quick ``instantstyle stylize`` run on the tiny SDXL folder (``tiny_sdxl``)."""


def stylize_args(root, out, *extra):
    """``stylize`` on ``root``'s model, adapter, encoder and style image: 2 steps at 32x32, seed 7."""
    return [
        "stylize", "--model", str(root / "model"), "--ip-adapter", str(root / "ip-adapter.safetensors"),
        "--image-encoder", str(root / "image_encoder"), "--style", str(root / "style.png"),
        "--prompt", "a dog on a bench", "--content-prompt", "a cat", "--steps", "2",
        "--height", "32", "--width", "32", "--seed", "7", "--out", str(out), *extra,
    ]
