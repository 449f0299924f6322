"""PNG learning curves and GIF videos with numpy and the standard library only
(matplotlib draws the curve instead when it is installed)."""
from __future__ import annotations

import struct
import zlib

import numpy as np

__all__ = ["write_png", "write_gif", "plot_curve"]


def write_png(path: str, rgb: np.ndarray) -> None:
    """Write an ``(H, W, 3)`` uint8 image as a PNG."""
    rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"write_png needs an (H, W, 3) image, got shape {rgb.shape}")
    h, w, _ = rgb.shape
    raw = b"".join(b"\x00" + rgb[y].tobytes() for y in range(h))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + \
            struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n")
        f.write(chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)))
        f.write(chunk(b"IDAT", zlib.compress(raw, 6)))
        f.write(chunk(b"IEND", b""))


def _quantize(frame: np.ndarray) -> np.ndarray:
    """RGB -> indices of the fixed 3-3-2 palette."""
    f = frame.astype(np.uint16)
    return ((f[..., 0] >> 5) << 5 | (f[..., 1] >> 5) << 2 | (f[..., 2] >> 6)).astype(np.uint8)


def _palette() -> bytes:
    out = bytearray()
    for i in range(256):
        out += bytes(((i >> 5) * 255 // 7, ((i >> 2) & 7) * 255 // 7, (i & 3) * 255 // 3))
    return bytes(out)


def _lzw_uncompressed(indices: bytes) -> bytes:
    """A valid LZW stream for 8-bit codes that never grows its table: a clear
    code every 250 symbols keeps every code 9 bits wide (simple, not small)."""
    clear, end = 256, 257
    bits, nbits, out = 0, 0, bytearray()

    def emit(code: int) -> None:
        nonlocal bits, nbits
        bits |= code << nbits
        nbits += 9
        while nbits >= 8:
            out.append(bits & 0xFF)
            bits >>= 8
            nbits -= 8

    for i in range(0, len(indices), 250):
        emit(clear)
        for b in indices[i:i + 250]:
            emit(b)
    emit(end)
    if nbits:
        out.append(bits & 0xFF)
    return bytes(out)


def write_gif(path: str, frames: list, fps: int = 30) -> None:
    """Write ``(H, W, 3)`` uint8 frames as an animated GIF (3-3-2 colours)."""
    if not frames:
        raise ValueError("write_gif needs at least one frame")
    h, w = np.asarray(frames[0]).shape[:2]
    delay = max(1, round(100 / fps))
    with open(path, "wb") as f:
        f.write(b"GIF89a" + struct.pack("<HHBBB", w, h, 0xF7, 0, 0) + _palette())
        f.write(b"\x21\xFF\x0BNETSCAPE2.0\x03\x01\x00\x00\x00")  # loop forever
        for frame in frames:
            frame = np.asarray(frame, dtype=np.uint8)
            if frame.shape[:2] != (h, w) or frame.ndim != 3:
                raise ValueError(f"every frame must be ({h}, {w}, 3), got {frame.shape}")
            f.write(b"\x21\xF9\x04\x00" + struct.pack("<H", delay) + b"\x00\x00")
            f.write(b"\x2C" + struct.pack("<HHHHB", 0, 0, w, h, 0) + b"\x08")
            data = _lzw_uncompressed(_quantize(frame[..., :3]).tobytes())
            for i in range(0, len(data), 255):
                block = data[i:i + 255]
                f.write(bytes((len(block),)) + block)
            f.write(b"\x00")
        f.write(b"\x3B")


def plot_curve(path: str, x, y, *, title: str = "", xlabel: str = "", ylabel: str = "") -> None:
    """Draw y against x as a PNG at `path` (matplotlib when installed, else a
    plain raster: axes, grid and the curve, without text)."""
    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    if x.size == 0:
        raise ValueError("nothing to plot: no finite points")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:  # noqa: BLE001 - optional: fall back to the raster
        plt = None
    if plt is not None:
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(x, y)
        ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
        ax.grid(True, alpha=0.3)
        fig.tight_layout()
        fig.savefig(path)
        plt.close(fig)
        return
    w, h, m = 640, 400, 40
    img = np.full((h, w, 3), 255, np.uint8)
    x0, x1 = float(x.min()), float(x.max()) if x.max() > x.min() else float(x.min()) + 1
    y0, y1 = float(y.min()), float(y.max()) if y.max() > y.min() else float(y.min()) + 1
    for k in range(5):
        img[m + k * (h - 2 * m) // 4, m:w - m] = 220
        img[m:h - m, m + k * (w - 2 * m) // 4] = 220
    img[h - m, m:w - m] = 0
    img[m:h - m, m] = 0
    px = m + (x - x0) / (x1 - x0) * (w - 2 * m - 1)
    py = h - m - (y - y0) / (y1 - y0) * (h - 2 * m - 1)
    if px.size == 1:
        px, py = np.repeat(px, 2), np.repeat(py, 2)
    for i in range(px.size - 1):
        n = int(max(abs(px[i + 1] - px[i]), abs(py[i + 1] - py[i]), 1)) + 1
        xs = np.linspace(px[i], px[i + 1], n).round().astype(int)
        ys = np.linspace(py[i], py[i + 1], n).round().astype(int)
        for dy in (0, 1):
            img[np.clip(ys + dy, 0, h - 1), np.clip(xs, 0, w - 1)] = (31, 119, 180)
    write_png(path, img)
