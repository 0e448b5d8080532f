"""ROS image messages -> HxWx3 uint8 RGB numpy arrays, the input of the Relocalizer.

``sensor_msgs/Image`` buffers are unpacked by cv_bridge when it is importable (a
full ROS install) and otherwise by :func:`raw_image_to_array`, which honours
``step`` padding and ``is_bigendian``. Either way the pixels are then turned into
RGB by the same :func:`to_rgb8`, so both set-ups feed the network identically.
``sensor_msgs/CompressedImage`` (jpeg/png) is decoded by OpenCV, after its size has been
read from the PNG/JPEG header (so an oversized image is refused before it is decoded)
and its bytes checked against the ``format`` string.

Every malformed message raises :class:`ImageConversionError` (a ``ValueError``)
whose message says what is wrong; the node counts and drops such frames.
"""
from __future__ import annotations

from collections.abc import Callable

import cv2
import numpy as np

try:  # a full ROS install; the PyPI wheels have no cv_bridge
    from cv_bridge import CvBridge, CvBridgeError

    _BRIDGE: "CvBridge | None" = CvBridge()
except ImportError:  # pragma: no cover - depends on the installation
    CvBridge = None
    CvBridgeError = ValueError
    _BRIDGE = None

# encoding -> (numpy dtype, channels)
RAW_ENCODINGS: dict[str, tuple[str, int]] = {
    "rgb8": ("u1", 3),
    "bgr8": ("u1", 3),
    "rgba8": ("u1", 4),
    "bgra8": ("u1", 4),
    "mono8": ("u1", 1),
    "8UC1": ("u1", 1),
    "8UC3": ("u1", 3),  # OpenCV default order: BGR
    "mono16": ("u2", 1),
    "16UC1": ("u2", 1),
}

# Conversions from each encoding's channel order to RGB (None: already RGB).
_TO_RGB = {
    "rgb8": None,
    "bgr8": cv2.COLOR_BGR2RGB,
    "8UC3": cv2.COLOR_BGR2RGB,
    "rgba8": cv2.COLOR_RGBA2RGB,
    "bgra8": cv2.COLOR_BGRA2RGB,
    "mono8": cv2.COLOR_GRAY2RGB,
    "8UC1": cv2.COLOR_GRAY2RGB,
    "mono16": cv2.COLOR_GRAY2RGB,
    "16UC1": cv2.COLOR_GRAY2RGB,
}

COMPRESSED_FORMATS = ("jpeg", "jpg", "png")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
JPEG_SIGNATURE = b"\xff\xd8\xff"
# JPEG start-of-frame markers (they carry the image size); C4, C8 and CC are other segments.
_JPEG_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
# JPEG markers without a length field.
_JPEG_STANDALONE_MARKERS = frozenset((0x01, *range(0xD0, 0xD9)))


class ImageConversionError(ValueError):
    """The message cannot be turned into an RGB image; the text says why.

    ``reason`` is a short key for counting: ``unsupported_encoding``, ``empty_image``,
    ``truncated_image``, ``image_too_large`` or ``corrupt_compressed``.
    """

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


def check_pixel_count(width: int, height: int, max_pixels: int) -> None:
    """Refuse an image of more than ``max_pixels`` pixels (0: no limit) before any work is spent on it."""
    if max_pixels and width * height > max_pixels:
        raise ImageConversionError(
            f"{width}x{height} image has {width * height} pixels, more than max_image_pixels {max_pixels}", "image_too_large"
        )


def raw_image_to_array(msg, max_pixels: int = 0) -> np.ndarray:
    """Unpack a ``sensor_msgs/Image`` buffer to (H, W) or (H, W, C); a view of ``msg.data`` unless rows are padded.

    Checks the encoding, the size (at most ``max_pixels``, 0: no limit), ``step`` (row
    stride, may include padding) and that ``data`` holds ``step · height`` bytes.
    """
    encoding = msg.encoding
    if encoding not in RAW_ENCODINGS:
        raise ImageConversionError(
            f"unsupported image encoding {encoding!r}; supported: {', '.join(RAW_ENCODINGS)}",
            "unsupported_encoding",
        )
    height, width, step = int(msg.height), int(msg.width), int(msg.step)
    if height == 0 or width == 0:
        raise ImageConversionError(f"empty image ({width}x{height})", "empty_image")
    check_pixel_count(width, height, max_pixels)
    kind, channels = RAW_ENCODINGS[encoding]
    dtype = np.dtype(kind).newbyteorder(">" if msg.is_bigendian else "<")
    row_bytes = width * channels * dtype.itemsize
    if step < row_bytes:
        raise ImageConversionError(f"step {step} is smaller than a {encoding} row of {width} pixels ({row_bytes} bytes)", "truncated_image")
    buffer = np.frombuffer(msg.data, dtype=np.uint8)
    if buffer.size < step * height:
        raise ImageConversionError(
            f"truncated image: {buffer.size} bytes of data for {width}x{height} {encoding} with step {step} "
            f"({step * height} expected)",
            "truncated_image",
        )
    rows = buffer[: step * height].reshape(height, step)[:, :row_bytes]
    pixels = np.ascontiguousarray(rows).view(dtype).reshape(height, width, channels)
    return pixels[:, :, 0] if channels == 1 else pixels


def to_rgb8(pixels: np.ndarray, encoding: str) -> np.ndarray:
    """Pixels in ``encoding``'s layout -> HxWx3 uint8 RGB.

    16-bit mono is scaled over its full range (65535 -> 255), as image viewers do,
    so the result does not depend on the image content.
    """
    if encoding not in _TO_RGB:
        raise ImageConversionError(f"unsupported image encoding {encoding!r}; supported: {', '.join(RAW_ENCODINGS)}", "unsupported_encoding")
    if pixels.dtype != np.uint8:
        pixels = (pixels.astype(np.float32) * (255.0 / 65535.0) + 0.5).astype(np.uint8)
    code = _TO_RGB[encoding]
    rgb = pixels if code is None else cv2.cvtColor(np.ascontiguousarray(pixels), code)
    return np.ascontiguousarray(rgb)


def image_msg_to_rgb(msg, max_pixels: int = 0) -> np.ndarray:
    """``sensor_msgs/Image`` -> HxWx3 uint8 RGB (cv_bridge unpacks the buffer when available)."""
    if _BRIDGE is not None and msg.encoding in RAW_ENCODINGS and msg.height and msg.width:
        check_pixel_count(int(msg.width), int(msg.height), max_pixels)
        try:
            pixels = _BRIDGE.imgmsg_to_cv2(msg, desired_encoding="passthrough")
        except (CvBridgeError, TypeError, ValueError) as err:
            raise ImageConversionError(f"cv_bridge cannot read the {msg.encoding} image: {err}", "truncated_image") from None
    else:
        pixels = raw_image_to_array(msg, max_pixels)
    return to_rgb8(pixels, msg.encoding)


def sniff_codec(data) -> str | None:
    """``"png"`` or ``"jpeg"`` from the first bytes of compressed data, None for anything else."""
    head = bytes(data[:8])
    if head == PNG_SIGNATURE:
        return "png"
    if head[:3] == JPEG_SIGNATURE:
        return "jpeg"
    return None


def declared_codec(fmt: str) -> str | None:
    """The codec a ``format`` string names (``"jpeg"``, ``"bgr8; png compressed bgr8"``...), None if none."""
    fmt = fmt.lower()
    if "png" in fmt:
        return "png"
    if "jpeg" in fmt or "jpg" in fmt:
        return "jpeg"
    return None


def compressed_size(data, codec: str) -> tuple[int, int] | None:
    """(width, height) read from a PNG's IHDR or a JPEG's start-of-frame segment; None when not found."""
    view = memoryview(data).cast("B")
    if codec == "png":  # signature, IHDR length, "IHDR", width, height (big-endian)
        if len(view) < 24 or bytes(view[12:16]) != b"IHDR":
            return None
        return int.from_bytes(view[16:20], "big"), int.from_bytes(view[20:24], "big")
    i = 2
    while i + 9 <= len(view):  # marker segments up to the first start-of-frame
        if view[i] != 0xFF:
            return None
        marker = view[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
        elif marker in _JPEG_STANDALONE_MARKERS:
            i += 2
        elif marker in _JPEG_SOF_MARKERS:  # FF Cn, length, precision, height, width
            return int.from_bytes(view[i + 7 : i + 9], "big"), int.from_bytes(view[i + 5 : i + 7], "big")
        elif marker == 0xDA:  # scan data before any frame header
            return None
        else:
            i += 2 + int.from_bytes(view[i + 2 : i + 4], "big")
    return None


def compressed_msg_to_rgb(msg, max_pixels: int = 0, on_format_mismatch: Callable[[str], None] | None = None) -> np.ndarray:
    """``sensor_msgs/CompressedImage`` (jpeg or png) -> HxWx3 uint8 RGB via OpenCV.

    ``format`` may be plain (``jpeg``) or image_transport's ``"bgr8; jpeg compressed bgr8"``.
    The codec is recognised from the bytes; when the format string names the other one,
    ``on_format_mismatch`` is told (the image is still decoded). The size is read from the
    header first, and an image of more than ``max_pixels`` pixels (0: no limit) is refused
    without decoding it.
    """
    fmt = msg.format.lower()
    if "compresseddepth" in fmt:
        raise ImageConversionError(f"compressed depth images ({msg.format!r}) are not camera images", "unsupported_encoding")
    if fmt and not any(name in fmt for name in COMPRESSED_FORMATS):
        raise ImageConversionError(f"unsupported compressed format {msg.format!r}; use jpeg or png", "unsupported_encoding")
    buffer = np.frombuffer(msg.data, dtype=np.uint8)
    if buffer.size == 0:
        raise ImageConversionError("empty compressed image", "empty_image")
    codec = sniff_codec(buffer)
    if codec is None:
        raise ImageConversionError(
            f"corrupt compressed image: {buffer.size} bytes starting {bytes(buffer[:4]).hex()} are neither PNG nor JPEG "
            f"(format {msg.format!r})",
            "corrupt_compressed",
        )
    declared = declared_codec(fmt)
    if declared is not None and declared != codec and on_format_mismatch is not None:
        on_format_mismatch(f"compressed image format {msg.format!r} but the data is {codec.upper()}")
    size = compressed_size(buffer, codec)
    if size is None or 0 in size:
        raise ImageConversionError(f"corrupt compressed image: no valid {codec.upper()} header in {buffer.size} bytes", "corrupt_compressed")
    check_pixel_count(*size, max_pixels)
    decoded = cv2.imdecode(buffer, cv2.IMREAD_UNCHANGED)
    if decoded is None or decoded.size == 0:
        raise ImageConversionError(f"corrupt compressed image ({buffer.size} bytes could not be decoded as {codec.upper()})", "corrupt_compressed")
    if decoded.ndim == 2:
        encoding = "mono8" if decoded.dtype == np.uint8 else "mono16"
    else:
        encoding = "bgr8" if decoded.shape[2] == 3 else "bgra8"
        if decoded.dtype != np.uint8:  # 16-bit colour png
            decoded = (decoded.astype(np.float32) * (255.0 / 65535.0) + 0.5).astype(np.uint8)
    return to_rgb8(decoded, encoding)


def msg_to_rgb(msg, max_pixels: int = 0, on_format_mismatch: Callable[[str], None] | None = None) -> np.ndarray:
    """Either image message type -> HxWx3 uint8 RGB; raises :class:`ImageConversionError`.

    ``max_pixels`` (0: no limit) caps width × height, checked before decoding;
    ``on_format_mismatch(text)`` hears of compressed data whose format string names another codec.
    """
    if hasattr(msg, "format"):
        return compressed_msg_to_rgb(msg, max_pixels, on_format_mismatch)
    return image_msg_to_rgb(msg, max_pixels)
