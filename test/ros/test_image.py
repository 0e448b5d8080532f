"""Image / CompressedImage messages -> RGB arrays, with the real sensor_msgs types."""
import cv2
import numpy as np
import pytest
from sensor_msgs.msg import CompressedImage, Image

from ros2_posenet.ros.image import ImageConversionError, compressed_msg_to_rgb, msg_to_rgb, raw_image_to_array, to_rgb8

RNG = np.random.default_rng(0)
RGB = RNG.integers(0, 256, size=(5, 7, 3), dtype=np.uint8)


def image_msg(pixels: np.ndarray, encoding: str, padding: int = 0, bigendian: bool = False) -> Image:
    """Pack ``pixels`` (H, W[, C]) into a sensor_msgs/Image with ``padding`` bytes at each row end."""
    h, w = pixels.shape[:2]
    raw = pixels.astype(pixels.dtype.newbyteorder(">" if bigendian else "<"))
    rows = raw.reshape(h, -1).view(np.uint8)
    rows = np.concatenate([rows, np.full((h, padding), 0xAB, np.uint8)], axis=1)
    return Image(height=h, width=w, encoding=encoding, is_bigendian=bigendian, step=rows.shape[1], data=rows.tobytes())


def compressed_msg(rgb: np.ndarray, fmt: str) -> CompressedImage:
    ok, buf = cv2.imencode("." + fmt, cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    assert ok
    return CompressedImage(format=fmt, data=buf.tobytes())


@pytest.mark.parametrize("padding", [0, 3])
def test_colour_encodings_give_the_same_rgb(padding):
    alpha = np.full(RGB.shape[:2] + (1,), 200, np.uint8)
    variants = {
        "rgb8": RGB,
        "bgr8": RGB[..., ::-1],
        "rgba8": np.concatenate([RGB, alpha], -1),
        "bgra8": np.concatenate([RGB[..., ::-1], alpha], -1),
        "8UC3": RGB[..., ::-1],
    }
    for encoding, pixels in variants.items():
        out = msg_to_rgb(image_msg(np.ascontiguousarray(pixels), encoding, padding))
        assert out.dtype == np.uint8 and out.shape == RGB.shape, encoding
        np.testing.assert_array_equal(out, RGB, err_msg=encoding)


def test_mono8_is_replicated_to_three_channels():
    gray = RGB[..., 0].copy()
    out = msg_to_rgb(image_msg(gray, "mono8", padding=1))
    np.testing.assert_array_equal(out, np.repeat(gray[..., None], 3, axis=2))


@pytest.mark.parametrize("encoding", ["mono16", "16UC1"])
@pytest.mark.parametrize("bigendian", [False, True])
def test_16bit_mono_is_scaled_over_full_range(encoding, bigendian):
    values = np.array([[0, 257, 65535], [32896, 1000, 65000]], np.uint16)
    out = msg_to_rgb(image_msg(values, encoding, padding=2, bigendian=bigendian))
    expected = np.round(values / 257.0).astype(np.uint8)
    np.testing.assert_array_equal(out[..., 0], expected)
    np.testing.assert_array_equal(out[..., 0], out[..., 2])


def test_raw_image_to_array_honours_step_and_is_a_copy():
    msg = image_msg(RGB, "rgb8", padding=4)
    arr = raw_image_to_array(msg)
    np.testing.assert_array_equal(arr, RGB)
    assert arr.flags.c_contiguous


@pytest.mark.parametrize("fmt", ["png", "jpeg"])
def test_compressed_images_decode(fmt):
    smooth = cv2.resize(RGB, (64, 48), interpolation=cv2.INTER_LINEAR)
    out = msg_to_rgb(compressed_msg(smooth, fmt))
    assert out.shape == smooth.shape and out.dtype == np.uint8
    if fmt == "png":
        np.testing.assert_array_equal(out, smooth)
    else:  # lossy, but colours must not be swapped
        assert np.abs(out.astype(int) - smooth).mean() < 12


def test_image_transport_format_string_and_grey_png():
    gray = RGB[..., 1].copy()
    ok, buf = cv2.imencode(".png", gray)
    out = compressed_msg_to_rgb(CompressedImage(format="mono8; png compressed mono8", data=buf.tobytes()))
    np.testing.assert_array_equal(out, np.repeat(gray[..., None], 3, axis=2))


@pytest.mark.parametrize(
    "msg, reason, text",
    [
        (Image(height=2, width=2, encoding="yuv422", step=4, data=bytes(8)), "unsupported_encoding", "yuv422"),
        (Image(height=2, width=2, encoding="", step=6, data=bytes(12)), "unsupported_encoding", "encoding ''"),
        (Image(height=0, width=0, encoding="rgb8", step=0, data=b""), "empty_image", "empty image"),
        (Image(height=4, width=4, encoding="rgb8", step=12, data=bytes(47)), "truncated_image", "47 bytes"),
        (Image(height=4, width=4, encoding="rgb8", step=8, data=bytes(64)), "truncated_image", "step 8"),
        (CompressedImage(format="jpeg", data=b""), "empty_image", "empty compressed"),
        (CompressedImage(format="jpeg", data=b"\xff\xd8 not really a jpeg"), "corrupt_compressed", "corrupt"),
        (CompressedImage(format="theora", data=b"1234"), "unsupported_encoding", "theora"),
    ],
)
def test_bad_messages_raise_clear_errors(msg, reason, text):
    with pytest.raises(ImageConversionError, match=text) as info:
        msg_to_rgb(msg)
    assert info.value.reason == reason
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("fmt", ["png", "jpeg"])
def test_truncated_compressed_image_is_reported_not_half_decoded(fmt):
    big = cv2.resize(RGB, (64, 48), interpolation=cv2.INTER_LINEAR)
    msg = compressed_msg(big, fmt)
    msg.data = bytes(msg.data)[: len(msg.data) // 3]
    with pytest.raises(ImageConversionError) as info:
        msg_to_rgb(msg)
    assert info.value.reason == "corrupt_compressed"


def test_to_rgb8_rejects_unknown_encoding():
    with pytest.raises(ImageConversionError, match="bayer"):
        to_rgb8(RGB, "bayer_rggb8")


@pytest.mark.parametrize("fmt, params", [("png", []), ("jpeg", []), ("jpeg", [cv2.IMWRITE_JPEG_PROGRESSIVE, 1])])
def test_compressed_size_is_read_from_the_header(fmt, params):
    from ros2_posenet.ros.image import compressed_size, sniff_codec

    ok, buf = cv2.imencode("." + fmt, RNG.integers(0, 256, size=(37, 53, 3), dtype=np.uint8), params)
    assert sniff_codec(buf) == fmt and compressed_size(buf, fmt) == (53, 37)


def test_images_over_max_pixels_are_refused_before_decoding():
    big = np.zeros((40, 50, 3), np.uint8)
    for msg in (compressed_msg(big, "png"), compressed_msg(big, "jpeg"), image_msg(big, "rgb8")):
        assert msg_to_rgb(msg, max_pixels=2000).shape == (40, 50, 3)  # exactly at the cap
        with pytest.raises(ImageConversionError, match="50x40 image has 2000 pixels, more than max_image_pixels 1999") as info:
            msg_to_rgb(msg, max_pixels=1999)
        assert info.value.reason == "image_too_large"


def test_a_format_string_naming_the_other_codec_is_reported_and_the_bytes_win():
    smooth = cv2.resize(RGB, (64, 48), interpolation=cv2.INTER_LINEAR)
    msg = compressed_msg(smooth, "png")
    msg.format = "bgr8; jpeg compressed bgr8"
    notes = []
    np.testing.assert_array_equal(msg_to_rgb(msg, on_format_mismatch=notes.append), smooth)
    assert notes == ["compressed image format 'bgr8; jpeg compressed bgr8' but the data is PNG"]
    assert msg_to_rgb(compressed_msg(smooth, "png"), on_format_mismatch=notes.append) is not None and len(notes) == 1


@pytest.mark.parametrize(
    "msg, text",
    [
        (CompressedImage(format="png", data=b"GIF89a" + bytes(100)), "neither PNG nor JPEG"),
        (CompressedImage(format="png", data=b"\x89PNG\r\n\x1a\n" + bytes(8)), "no valid PNG header"),
        (CompressedImage(format="jpeg", data=b"\xff\xd8\xff\xe0\x00\x10JFIF"), "no valid JPEG header"),
    ],
)
def test_compressed_data_that_is_not_a_jpeg_or_png_is_corrupt(msg, text):
    with pytest.raises(ImageConversionError, match=text) as info:
        msg_to_rgb(msg)
    assert info.value.reason == "corrupt_compressed"


def test_compressed_depth_is_not_a_camera_image():
    with pytest.raises(ImageConversionError, match="compressed depth") as info:
        msg_to_rgb(CompressedImage(format="16UC1; compressedDepth png", data=b"\x00" * 12 + b"\x89PNG\r\n\x1a\n"))
    assert info.value.reason == "unsupported_encoding"


def test_an_unpadded_rgb8_image_reaches_the_network_without_a_copy():
    msg = image_msg(RGB, "rgb8")
    out = msg_to_rgb(msg)
    assert np.shares_memory(out, np.frombuffer(msg.data, np.uint8))  # a view of the message buffer
    np.testing.assert_array_equal(out, RGB)
