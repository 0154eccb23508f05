"""Output files that never lose work: checked before any model loads, written atomically.

* :func:`check_output` runs before minutes of model loading, so an unwritable path, a folder,
  a missing extension or ``x.json`` are one-line errors, not a lost image.
* Each image's sidecar is ``<image>.json`` (``a.png.json``): ``--out a.png`` and ``--out a.jpg``
  never share, and so never overwrite, one sidecar.
* Files are written to a temporary name in the same folder and renamed into place
  (``os.replace`` is atomic on one file system), so a killed run leaves whole files or none:
  ``stylize-batch`` relies on that to resume.
* Files get the mode any program's new file gets: 0o666 less the umask (0644 by default), so a
  shared output folder stays readable.  The temporary file is created with mode 0o666 and the
  kernel applies the umask (and a folder's default ACL), as ``open()`` does; nothing reads or
  changes the process-wide umask (``mkstemp`` would give 0600).
* A folder is checked by creating and removing a real file in it: ``os.access`` says yes for
  root on read-only mounts and pseudo file systems (``/sys``), and the image would be lost
  after generation.
* PNGs carry their settings in text chunks (``instantstyle`` JSON, plus a readable
  ``parameters`` line as other tools write it).
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import secrets
from typing import Iterable, List, Optional

from .errors import UserError

#: Pillow format per extension the CLI writes
IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}
TEMP_PREFIX = ".instantstyle-tmp-"


def sidecar_path(image_path: str) -> str:
    """``a.png`` -> ``a.png.json``: one sidecar per image file, whatever its extension."""
    return os.fspath(image_path) + ".json"


def writable_folder(folder: str, flag: str) -> str:
    """Create ``folder`` if needed and check it can take new files."""
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as exc:
        raise UserError(f"{flag}: can't create folder {folder!r}: {exc.strerror or exc}") from None
    if not os.path.isdir(folder):
        raise UserError(f"{flag}: {folder!r} is not a folder")
    try:
        fd, probe = _create_temp(folder, "probe")
    except OSError as exc:
        raise UserError(f"{flag}: expected a folder that takes new files, got {folder!r}: can't create a file "
                        f"there ({exc.strerror or exc})") from None
    os.close(fd)
    with contextlib.suppress(OSError):  # another process's cleanup of temporaries may be first
        os.unlink(probe)
    return folder


def _create_temp(folder: str, suffix: str):
    """``(fd, path)`` of a new, empty file in ``folder`` named ``TEMP_PREFIX...suffix``.

    Mode 0o666 is filtered by the umask in the kernel, as for any ``open()``; O_EXCL never
    follows a symlink planted at the name, and a name already taken is just drawn again."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0) | getattr(os, "O_CLOEXEC", 0)
    suffix = suffix[-60:]  # the tail (its extension) is for people; a long name must not pass NAME_MAX
    for _ in range(100):
        path = os.path.join(folder, f"{TEMP_PREFIX}{secrets.token_hex(6)}-{suffix}")
        try:
            return os.open(path, flags, 0o666), path
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name in {folder!r}")


def check_output(out: str, flag: str = "--out", paths: Optional[Iterable[str]] = None) -> List[str]:
    """Validate an output image path (and the per-image ``paths`` derived from it) before any work."""
    if not out:
        raise UserError(f"{flag}: expected a file name, got an empty string")
    if os.path.isdir(out):
        raise UserError(f"{flag}: {out!r} is a folder; give a file name such as {os.path.join(out, 'out.png')!r}")
    ext = os.path.splitext(out)[1].lower()
    if ext == ".json":
        raise UserError(f"{flag}: {out!r} is a .json name; sidecars are written next to the image, give an image "
                        f"name ({', '.join(IMAGE_FORMATS)})")
    if ext not in IMAGE_FORMATS:
        raise UserError(f"{flag}: {out!r} needs an image extension ({', '.join(IMAGE_FORMATS)})")
    paths = [os.path.abspath(p) for p in (paths or [out])]
    for path in paths:
        if os.path.isdir(path):
            raise UserError(f"{flag}: {path!r} is a folder; give a file name such as {os.path.join(path, 'out.png')!r}")
        writable_folder(os.path.dirname(path), flag)
        for existing in (path, sidecar_path(path)):
            if os.path.exists(existing) and not os.access(existing, os.W_OK):
                raise UserError(f"{flag}: {existing!r} exists and is not writable")
    return paths


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write to a temporary file in the same folder, fsync, then rename into place."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = _create_temp(folder, os.path.basename(path))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def write_json(path: str, record: dict) -> None:
    """Strict JSON (NaN would make the file unreadable to other tools), atomically."""
    atomic_write_bytes(path, (json.dumps(record, indent=1, default=str, allow_nan=False) + "\n").encode())


def png_text(settings: dict) -> dict:
    """Text chunks for a PNG: the settings as JSON, and a one-line summary other tools show."""
    summary = settings.get("prompt")
    summary = summary if isinstance(summary, str) else "; ".join(summary or [])
    keys = ("negative_prompt", "steps", "guidance", "seed", "scale", "method", "model", "scheduler", "backend")
    rest = ", ".join(f"{k}: {settings[k]}" for k in keys if settings.get(k) is not None)
    return {"instantstyle": json.dumps(settings, default=str, allow_nan=False), "parameters": f"{summary}\n{rest}"}


def encode_image(image, path: str, text: Optional[dict] = None) -> bytes:
    """The file's bytes in the format of its extension; PNGs get ``text`` as tEXt chunks."""
    fmt = IMAGE_FORMATS[os.path.splitext(path)[1].lower()]
    buf = io.BytesIO()
    kwargs = {}
    if fmt == "PNG" and text:
        from PIL.PngImagePlugin import PngInfo

        info = PngInfo()
        for key, value in text.items():
            info.add_itxt(key, value)  # iTXt: UTF-8 prompts survive
        kwargs["pnginfo"] = info
    image = image.convert("RGB") if fmt == "JPEG" and image.mode != "RGB" else image
    image.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def save_image(image, path: str, text: Optional[dict] = None) -> None:
    atomic_write_bytes(path, encode_image(image, path, text))
