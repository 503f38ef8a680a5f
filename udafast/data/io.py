"""Reading images and raw label maps.

Label PNGs are read as their stored values, never as colours: palette ("P") PNGs give their
indices, grey PNGs their values, and 16-bit PNGs all 16 bits. Pillow decodes 16-bit RGB PNGs
to 8 bits, so those go through `read_png16`: Pillow's own decoder run twice, once keeping the high
and once the low byte of each sample, with a pure numpy decoder as the fallback.

A file that is there but does not decode raises `BadSampleError` naming it; a missing one,
FileNotFoundError.
"""
import os
import struct
import zlib

import numpy as np
import torch
from PIL import Image


class BadSampleError(ValueError):
    """A sample that cannot be trained on: an image or label file that does not decode, a label
    of another size than its image, label ids outside the dataset's table. `path` is the file at
    fault, `reason` what is wrong with it; the message is `"{path}: {reason}"`."""

    def __init__(self, path, reason):
        self.path, self.reason = os.fspath(path), str(reason)
        super().__init__(f"{self.path}: {self.reason}")

    def __reduce__(self):  # pickles with both arguments (to and from loader workers)
        return type(self), (self.path, self.reason)


def _require_file(path):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such file: {path}")


def _undecodable(path, exc):
    return BadSampleError(path, f"cannot be decoded ({type(exc).__name__}: {exc})")


def load_image(path) -> torch.Tensor:
    """An image file -> float32 [3, H, W] RGB in [0, 1]."""
    _require_file(path)
    try:
        with Image.open(path) as im:
            arr = np.asarray(im.convert("RGB"))
    except MemoryError:
        raise
    except Exception as exc:  # Pillow fails in many ways (OSError, SyntaxError, zlib.error, ...)
        raise _undecodable(path, exc) from exc
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous().to(torch.float32).div_(255.0)


def image_size(path):
    """(H, W) of an image file, from its header."""
    _require_file(path)
    with Image.open(path) as im:
        w, h = im.size
    return h, w


def read_label(path, channel=0) -> np.ndarray:
    """The raw values of a label PNG as a 2-D integer array.

    Palette PNGs give their indices, grey PNGs (8 or 16 bits) their values, and colour PNGs
    (8 or 16 bits per channel) the values of channel `channel` (0 = red) at full depth.
    """
    _require_file(path)
    try:
        arr = _read_label_array(path)
    except MemoryError:
        raise
    except Exception as exc:
        raise _undecodable(path, exc) from exc
    if arr.ndim == 2:
        return arr.astype(np.int64)
    if channel >= arr.shape[2]:
        raise BadSampleError(path, f"label channel {channel} asked of an image with {arr.shape[2]} channels")
    return arr[..., channel].astype(np.int64)


def _read_label_array(path):
    with Image.open(path) as im:
        mode = im.mode
        if mode in ("P", "L", "1"):
            return np.asarray(im.convert("L") if mode == "1" else im)
        if mode.startswith("I"):
            return np.asarray(im)
        rawmode = _png_rawmode(im)
    if rawmode is not None and rawmode.endswith(";16B"):
        return read_png16(path)
    with Image.open(path) as im:
        return np.asarray(im)


def _png_rawmode(im):
    if getattr(im, "format", None) != "PNG" or not im.tile:
        return None
    args = im.tile[0][3]
    return args if isinstance(args, str) else (args[0] if args else None)


def read_png16(path) -> np.ndarray:
    """A PNG with 16-bit samples -> uint16 [H, W, C] (C = 3 or 4) or [H, W], all 16 bits kept."""
    _require_file(path)
    try:
        return _read_png16_pillow(path)
    except Exception:
        return _read_png16_numpy(path)


def _read_png16_pillow(path):
    planes = []
    for byte in ("B", "L"):  # the high byte, then the low byte (Pillow reads ";16L" little-endian)
        with Image.open(path) as im:
            rawmode = _png_rawmode(im)
            if rawmode not in ("RGB;16B", "RGBA;16B"):
                raise ValueError(f"{path}: not a 16-bit RGB(A) PNG (raw mode {rawmode})")
            tile = im.tile[0]
            new_raw = rawmode[:-1] + byte
            im.tile = [tile._replace(args=new_raw) if hasattr(tile, "_replace")
                       else (tile[0], tile[1], tile[2], new_raw)]
            im.load()
            planes.append(np.asarray(im).astype(np.uint16))
    return (planes[0] << 8) | planes[1]


def _paeth(a, b, c):
    p = a + b - c
    pa, pb, pc = np.abs(p - a), np.abs(p - b), np.abs(p - c)
    return np.where((pa <= pb) & (pa <= pc), a, np.where(pb <= pc, b, c))


def _read_png16_numpy(path):
    """Pure numpy decoder for non-interlaced 16-bit grey / RGB / grey+alpha / RGBA PNGs."""
    with open(path, "rb") as f:
        data = f.read()
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError(f"{path}: not a PNG file")
    pos, idat, header = 8, [], None
    while pos + 8 <= len(data):
        length, ctype = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        if ctype == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif ctype == b"IDAT":
            idat.append(body)
        elif ctype == b"IEND":
            break
        pos += 12 + length
    if header is None:
        raise ValueError(f"{path}: PNG without IHDR")
    width, height, depth, colour, _, _, interlace = header
    channels = {0: 1, 2: 3, 4: 2, 6: 4}.get(colour)
    if depth != 16 or channels is None or interlace != 0:
        raise ValueError(f"{path}: unsupported PNG (bit depth {depth}, colour type {colour}, interlace {interlace})")
    bpp = 2 * channels
    stride = width * bpp
    raw = np.frombuffer(zlib.decompress(b"".join(idat)), dtype=np.uint8)
    if raw.size != height * (stride + 1):
        raise ValueError(f"{path}: truncated PNG data")
    rows = raw.reshape(height, stride + 1)
    out = np.zeros((height, stride), dtype=np.int32)
    prev = np.zeros(stride, dtype=np.int32)
    for y in range(height):
        ftype, line = rows[y, 0], rows[y, 1:].astype(np.int32)
        if ftype == 0:
            cur = line
        elif ftype == 2:
            cur = (line + prev) & 0xFF
        elif ftype in (1, 3, 4):
            cur = line.copy()
            for x in range(0, stride, bpp):  # sequential in x: each pixel needs the decoded left one
                left = cur[x - bpp:x] if x else np.zeros(bpp, np.int32)
                up = prev[x:x + bpp]
                if ftype == 1:
                    pred = left
                elif ftype == 3:
                    pred = (left + up) >> 1
                else:
                    upleft = prev[x - bpp:x] if x else np.zeros(bpp, np.int32)
                    pred = _paeth(left, up, upleft)
                cur[x:x + bpp] = (cur[x:x + bpp] + pred) & 0xFF
        else:
            raise ValueError(f"{path}: bad PNG filter type {ftype} in row {y}")
        out[y] = cur
        prev = cur
    values = (out[:, 0::2] << 8) | out[:, 1::2]
    values = values.astype(np.uint16).reshape(height, width, channels)
    return values[..., 0] if channels == 1 else values


def _filter_row(ftype, line, prev, bpp):
    left = np.concatenate([np.zeros(bpp, np.int32), line[:-bpp]])
    upleft = np.concatenate([np.zeros(bpp, np.int32), prev[:-bpp]])
    pred = {0: 0, 1: left, 2: prev, 3: (left + prev) >> 1, 4: _paeth(left, prev, upleft)}[ftype]
    return ((line - pred) & 0xFF).astype(np.uint8)


def write_png16(path, array, filters=(0,)):
    """Write uint16 [H, W, 3 or 4] or [H, W] as a 16-bit PNG (a small writer for fixtures and
    tools). Row y uses PNG filter type `filters[y % len(filters)]` (0 none .. 4 Paeth)."""
    arr = np.asarray(array)
    if arr.ndim == 2:
        arr = arr[..., None]
    h, w, c = arr.shape
    colour = {1: 0, 2: 4, 3: 2, 4: 6}[c]
    rows = np.frombuffer(arr.astype(">u2").tobytes(), dtype=np.uint8).reshape(h, w * c * 2).astype(np.int32)
    raw, prev = [], np.zeros(w * c * 2, np.int32)
    for y in range(h):
        ftype = int(filters[y % len(filters)])
        raw.append(bytes([ftype]) + _filter_row(ftype, rows[y], prev, 2 * c).tobytes())
        prev = rows[y]

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n")
        f.write(chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, colour, 0, 0, 0)))
        f.write(chunk(b"IDAT", zlib.compress(b"".join(raw))))
        f.write(chunk(b"IEND", b""))
