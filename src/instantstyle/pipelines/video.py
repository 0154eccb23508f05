"""Video from a Wan 2.1 I2V/FLF2V pipeline with its image branch scaled per block, written as
a GIF or an MP4 and a sidecar.

Everything that needs no model is checked first (frame count, size, output name, the MP4
writer being installed), so a mistake costs one line, not minutes of loading.  The video is
encoded in memory (GIF) or in a private temporary folder (MP4, imageio wants a path) and only
then renamed into place: a killed run never leaves a half-written file under the output name.
"""
from __future__ import annotations

import io
import math
import os
import shutil
import tempfile

from .errors import UserError
from .outputs import atomic_write_bytes, sidecar_path, writable_folder

VIDEO_EXTENSIONS = (".gif", ".mp4")
#: Wan's pipelines' own defaults (480p, 81 frames at 16 fps)
DEFAULT_HEIGHT, DEFAULT_WIDTH, DEFAULT_FRAMES, DEFAULT_FPS = 480, 832, 81, 16
#: the VAE downsamples 4x in time (the first frame alone): 4k+1 frames
TEMPORAL = 4
#: the VAE downsamples 8x in space and the transformer patches 2x2: sizes are multiples of 16
SPATIAL = 16
VIDEO_HINT = 'pip install "instantstyle[video]"'


def parse_frames(name: str, value) -> int:
    """A manifest's ``frames`` (an integer, or its digits in a CSV cell); ValueError naming ``name``."""
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    try:
        return check_frames(name, value)
    except UserError as exc:
        raise ValueError(str(exc)) from None


def check_frames(flag: str, frames) -> int:
    """A frame count Wan can make: 4k+1 (1, 5, 9, ..., 81); diffusers would round others silently."""
    if isinstance(frames, bool) or not isinstance(frames, int) or frames < 1 or frames % TEMPORAL != 1:
        raise UserError(f"{flag}: Wan makes 4k+1 frames (1, 5, 9, ..., 81; the VAE packs 4 frames after the first), "
                        f"got {frames!r}")
    return frames


def check_size(flag: str, value) -> None:
    if value is not None and (value < SPATIAL or value % SPATIAL):
        raise UserError(f"{flag}: expected a positive multiple of {SPATIAL} (Wan's VAE downsamples by 8, its "
                        f"transformer patches 2x2), got {value}")


def check_fps(flag: str, fps) -> float:
    if not (isinstance(fps, (int, float)) and 0 < fps <= 240):
        raise UserError(f"{flag}: expected frames per second in (0, 240], got {fps!r}")
    return fps


def check_mp4_writer() -> None:
    """MP4 needs imageio and its ffmpeg binary (the ``video`` extra); checked before any model loads."""
    try:
        import imageio  # noqa: F401
        import imageio_ffmpeg
    except ImportError as exc:
        raise UserError(f"--out .mp4: needs imageio and imageio-ffmpeg ({exc.name} is missing): {VIDEO_HINT}, "
                        f"or write a .gif") from None
    try:
        imageio_ffmpeg.get_ffmpeg_exe()
    except RuntimeError as exc:  # the package without its binary
        raise UserError(f"--out .mp4: imageio-ffmpeg finds no ffmpeg ({exc}): {VIDEO_HINT}, or write a .gif") from None


def check_prompt_cleaner() -> None:
    """diffusers' Wan pipelines pass every prompt through ``ftfy.fix_text`` but import ftfy only
    when it is installed, so without it the first prompt dies with ``NameError: ftfy``."""
    try:
        import ftfy  # noqa: F401
    except ImportError:
        raise UserError(f"--model: Wan's pipelines clean prompts with ftfy, which is not installed: {VIDEO_HINT}") \
            from None


def check_video_output(out: str, flag: str = "--out") -> str:
    """An absolute ``.gif``/``.mp4`` path in a folder that takes new files; MP4 also needs its writer."""
    if not out:
        raise UserError(f"{flag}: expected a file name, got an empty string")
    if os.path.isdir(out):
        raise UserError(f"{flag}: {out!r} is a folder; give a file name such as {os.path.join(out, 'out.gif')!r}")
    ext = os.path.splitext(out)[1].lower()
    if ext not in VIDEO_EXTENSIONS:
        raise UserError(f"{flag}: expected a video name ending in {' or '.join(VIDEO_EXTENSIONS)}, got {out!r}")
    path = os.path.abspath(out)
    writable_folder(os.path.dirname(path), flag)
    for existing in (path, sidecar_path(path)):
        if os.path.exists(existing) and not os.access(existing, os.W_OK):
            raise UserError(f"{flag}: {existing!r} exists and is not writable")
    if ext == ".mp4":
        check_mp4_writer()
    return path


def parse_scale(flag: str, text):
    """``"0.5"`` -> 0.5 (every targeted block); ``"1,1,0"`` -> [1.0, 1.0, 0.0] (one per block)."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        return float(text)
    parts = [p.strip() for p in str(text).split(",")]
    try:
        values = [float(p) for p in parts]
    except ValueError:
        raise UserError(f"{flag}: expected a number or a comma-separated list of numbers (one per block), "
                        f"got {text!r}") from None
    if not all(math.isfinite(v) for v in values):
        raise UserError(f"{flag}: expected finite numbers, got {text!r}")
    return values[0] if len(values) == 1 else values


def takes_last_frame(transformer_config) -> bool:
    """First-last-frame (FLF2V) checkpoints add a learned position table over both frames' CLIP
    tokens (``pos_embed_seq_len``, 2 x 257); image-to-video ones have none.  diffusers fails on a
    mismatch deep inside the transformer (a ``view`` or a ``cat`` shape error), so we ask first."""
    return transformer_config.get("pos_embed_seq_len") is not None


def check_last_frame(transformer_config, last_frame: bool, model: str, flag: str = "--last-image") -> None:
    if takes_last_frame(transformer_config) and not last_frame:
        raise UserError(f"{flag}: {model!r} is a first-last-frame (FLF2V) checkpoint; give its last frame too")
    if last_frame and not takes_last_frame(transformer_config):
        raise UserError(f"{flag}: only first-last-frame (FLF2V) checkpoints take a last frame (their transformer has "
                        f"pos_embed_seq_len); {model!r} is image-to-video")


def load_wan_pipeline(model: str, torch_dtype, hub: dict, flag: str = "--model", last_frame: bool | None = None):
    """A diffusers pipeline whose transformer has Wan's image branch (I2V/FLF2V), else one line.

    ``last_frame`` (whether the user gave one) is checked against the transformer's config before
    the weights load where that config can be read on its own, and after loading in any case."""
    check_prompt_cleaner()
    from diffusers import DiffusionPipeline, WanTransformer3DModel

    from instantstyle.processors.wan.conversion import image_branch_sites

    from .loading import from_pretrained

    if last_frame is not None:
        try:  # config.json only; the class is irrelevant, load_config just reads the file
            early = WanTransformer3DModel.load_config(model, subfolder="transformer", **hub)
        except (OSError, ValueError):
            early = None  # the full load below reports the model itself
        if early is not None:
            check_last_frame(early, last_frame, model)
    pipe = from_pretrained(flag, DiffusionPipeline.from_pretrained, model, torch_dtype=torch_dtype, **hub)
    transformer = getattr(pipe, "transformer", None)
    if transformer is None or not image_branch_sites(transformer) or getattr(pipe, "image_encoder", None) is None:
        raise UserError(f"{flag}: expected a Wan I2V/FLF2V pipeline (a transformer whose cross-attention has an image "
                        f"branch, and an image encoder), got {type(pipe).__name__} from {model!r}")
    if last_frame is not None:
        check_last_frame(transformer.config, last_frame, model)
    return pipe


def apply_image_scale(pipe, scale, target, start_at: float, end_at: float) -> dict:
    """:func:`set_image_scale` (fused processors on every image-branch layer); its ValueError/TypeError
    (wrong list length, a target that matches nothing) is one line naming the flags."""
    from instantstyle.processors.wan.image_scale import set_image_scale

    try:
        return set_image_scale(pipe, scale, target=target, start_at=start_at, end_at=end_at)
    except (ValueError, TypeError) as exc:
        raise UserError(f"--scale / --target / --start-at / --end-at: {exc}") from None


def generate_frames(pipe, image, *, prompt, negative_prompt=None, last_image=None, frames, height, width, steps,
                    guidance, seed, backend="auto") -> list:
    """The video as a list of PIL frames (diffusers' progress bar shows the steps)."""
    import torch

    from instantstyle.kernels import use_backend

    call = {"image": image, "prompt": prompt, "negative_prompt": negative_prompt, "num_frames": frames, "height": height,
            "width": width, "num_inference_steps": steps, "guidance_scale": guidance, "output_type": "pil",
            "generator": torch.Generator(device="cpu").manual_seed(seed)}
    if last_image is not None:
        call["last_image"] = last_image
    with use_backend(backend):
        return list(pipe(**call).frames[0])


def encode_gif(frames, fps: float) -> bytes:
    """A looping GIF, ``1000/fps`` ms a frame.  Pillow merges equal consecutive frames into one
    longer frame, so a still stretch has fewer frames but the same playing time."""
    buf = io.BytesIO()
    first, *rest = [f.convert("RGB") for f in frames]
    first.save(buf, format="GIF", save_all=True, append_images=rest, duration=max(1, round(1000 / fps)), loop=0,
               optimize=False)
    return buf.getvalue()


def encode_mp4(frames, fps: float) -> bytes:
    """H.264 through diffusers' ``export_to_video`` (imageio-ffmpeg), in a private temporary folder."""
    from diffusers.utils import export_to_video

    folder = tempfile.mkdtemp(prefix="instantstyle-video-")
    try:
        path = export_to_video(frames, os.path.join(folder, "video.mp4"), fps=fps)
        with open(path, "rb") as f:
            return f.read()
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def save_video(frames, path: str, fps: float) -> None:
    """The whole file or none under ``path`` (encoded first, then renamed into place)."""
    data = encode_mp4(frames, fps) if path.lower().endswith(".mp4") else encode_gif(frames, fps)
    atomic_write_bytes(path, data)
