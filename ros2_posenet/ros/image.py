"""ROS image messages -> HxWx3 uint8 RGB numpy arrays, the input of the Relocalizer.

``sensor_msgs/Image`` buffers are unpacked by cv_bridge when it is importable (a
full ROS install) and otherwise by :func:`raw_image_to_array`, which honours
``step`` padding and ``is_bigendian``. Either way the pixels are then turned into
RGB by the same :func:`to_rgb8`, so both set-ups feed the network identically.
``sensor_msgs/CompressedImage`` (jpeg/png) is decoded by OpenCV.

Every malformed message raises :class:`ImageConversionError` (a ``ValueError``)
whose message says what is wrong; the node counts and drops such frames.
"""
from __future__ import annotations

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


class ImageConversionError(ValueError):
    """The message cannot be turned into an RGB image; the text says why.

    ``reason`` is a short key for counting: ``unsupported_encoding``, ``empty_image``,
    ``truncated_image`` or ``corrupt_compressed``.
    """

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


def cv_bridge_available() -> bool:
    return _BRIDGE is not None


def raw_image_to_array(msg) -> np.ndarray:
    """Unpack a ``sensor_msgs/Image`` buffer to (H, W) or (H, W, C) without copying pixels twice.

    Checks the encoding, the size, ``step`` (row stride, may include padding) and
    that ``data`` holds ``step · height`` bytes.
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


def image_msg_to_rgb(msg) -> np.ndarray:
    """``sensor_msgs/Image`` -> HxWx3 uint8 RGB (cv_bridge unpacks the buffer when available)."""
    if _BRIDGE is not None and msg.encoding in RAW_ENCODINGS and msg.height and msg.width:
        try:
            pixels = _BRIDGE.imgmsg_to_cv2(msg, desired_encoding="passthrough")
        except (CvBridgeError, TypeError, ValueError) as err:
            raise ImageConversionError(f"cv_bridge cannot read the {msg.encoding} image: {err}", "truncated_image") from None
    else:
        pixels = raw_image_to_array(msg)
    return to_rgb8(pixels, msg.encoding)


def compressed_msg_to_rgb(msg) -> np.ndarray:
    """``sensor_msgs/CompressedImage`` (jpeg or png) -> HxWx3 uint8 RGB via OpenCV.

    ``format`` may be plain (``jpeg``) or image_transport's ``"bgr8; jpeg compressed bgr8"``;
    OpenCV detects the codec from the bytes, so the format string is only checked.
    """
    fmt = msg.format.lower()
    if fmt and not any(name in fmt for name in COMPRESSED_FORMATS):
        raise ImageConversionError(f"unsupported compressed format {msg.format!r}; use jpeg or png", "unsupported_encoding")
    buffer = np.frombuffer(msg.data, dtype=np.uint8)
    if buffer.size == 0:
        raise ImageConversionError("empty compressed image", "empty_image")
    decoded = cv2.imdecode(buffer, cv2.IMREAD_UNCHANGED)
    if decoded is None or decoded.size == 0:
        raise ImageConversionError(f"corrupt compressed image ({buffer.size} bytes could not be decoded as {msg.format or 'jpeg/png'})", "corrupt_compressed")
    if decoded.ndim == 2:
        encoding = "mono8" if decoded.dtype == np.uint8 else "mono16"
    else:
        encoding = "bgr8" if decoded.shape[2] == 3 else "bgra8"
        if decoded.dtype != np.uint8:  # 16-bit colour png
            decoded = (decoded.astype(np.float32) * (255.0 / 65535.0) + 0.5).astype(np.uint8)
    return to_rgb8(decoded, encoding)


def msg_to_rgb(msg) -> np.ndarray:
    """Either image message type -> HxWx3 uint8 RGB; raises :class:`ImageConversionError`."""
    if hasattr(msg, "format"):
        return compressed_msg_to_rgb(msg)
    return image_msg_to_rgb(msg)
