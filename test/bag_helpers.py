"""Bags for the relocalize-bag tests, written with rosbags: images at known stamps, extra topics, readers."""
import cv2
import numpy as np
from rosbags.rosbag2 import Reader, StoragePlugin, Writer
from rosbags.typesys import Stores, get_typestore

from ros2_posenet.geometry import matrix_to_pose, pose_to_matrix, wxyz_to_xyzw, xyzw_to_wxyz

TS = get_typestore(Stores.LATEST)
TOPIC = "/camera/image_raw"
CAMERA_FRAME = "camera_optical_frame"
N_FRAMES = 5
COV = {"position_var": [0.04, 0.09, 0.01], "rotation_var": [1e-3, 2e-3, 3e-3], "samples": 10}
EXTRINSIC = [0.2, -0.1, 0.5, 0.0, 0.3, -0.2]  # camera_link in base_link


def stamps(i: int) -> tuple[int, int, int]:
    """(bag time ns, header sec, header nanosec): the header lags the receive time by 7 ms."""
    bag_time = 1_700_000_000_000_000_000 + i * 100_000_000
    header = bag_time - 7_000_000
    return bag_time, header // 10**9, header % 10**9


def stamp_text(i: int) -> str:
    _, sec, nanosec = stamps(i)
    return f"{sec}.{nanosec:09d}"


def header(i: int, frame_id: str = CAMERA_FRAME):
    _, sec, nanosec = stamps(i)
    return TS.types["std_msgs/msg/Header"](stamp=TS.types["builtin_interfaces/msg/Time"](sec=sec, nanosec=nanosec), frame_id=frame_id)


def raw_image_msg(i: int, rgb: np.ndarray):
    bgr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
    h, w = rgb.shape[:2]
    return TS.types["sensor_msgs/msg/Image"](
        header=header(i), height=h, width=w, encoding="bgr8", is_bigendian=0, step=w * 3, data=bgr.reshape(-1)
    )


def png_msg(i: int, rgb: np.ndarray | None):
    """Lossless PNG (decodes to the same pixels); ``None`` gives a corrupt payload."""
    data = np.frombuffer(b"not a png", np.uint8) if rgb is None else cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))[1].reshape(-1)
    return TS.types["sensor_msgs/msg/CompressedImage"](header=header(i), format="png", data=data)


def odometry_msg(i: int, T_odom_base: np.ndarray):
    T = TS.types
    t, q = T_odom_base[:3, 3], xyzw_from_matrix(T_odom_base)
    pose = T["geometry_msgs/msg/Pose"](
        position=T["geometry_msgs/msg/Point"](*map(float, t)), orientation=T["geometry_msgs/msg/Quaternion"](*map(float, q))
    )
    return T["nav_msgs/msg/Odometry"](
        header=header(i, "odom"), child_frame_id="base_link",
        pose=T["geometry_msgs/msg/PoseWithCovariance"](pose=pose, covariance=np.zeros(36)),
        twist=T["geometry_msgs/msg/TwistWithCovariance"](
            twist=T["geometry_msgs/msg/Twist"](linear=T["geometry_msgs/msg/Vector3"](0.0, 0.0, 0.0), angular=T["geometry_msgs/msg/Vector3"](0.0, 0.0, 0.0)),
            covariance=np.zeros(36),
        ),
    )


def xyzw_from_matrix(T: np.ndarray) -> list[float]:
    return list(wxyz_to_xyzw(matrix_to_pose(T)[1]))


def write_bag(path, storage: StoragePlugin, msgtype: str, messages: list, extra: dict | None = None) -> None:
    """Images (or raw bytes) on TOPIC at ``stamps(i)``, a /chatter topic, and ``extra`` {topic: (msgtype, [(i, msg)])}."""
    with Writer(path, version=Writer.VERSION_LATEST, storage_plugin=storage) as writer:
        conn = writer.add_connection(TOPIC, msgtype, typestore=TS)
        writer.add_connection("/chatter", "std_msgs/msg/String", typestore=TS)
        for topic, (extra_type, items) in (extra or {}).items():
            extra_conn = writer.add_connection(topic, extra_type, typestore=TS)
            for i, msg in items:
                writer.write(extra_conn, stamps(i)[0] - 1, TS.serialize_cdr(msg, extra_type))
        for i, msg in enumerate(messages):
            writer.write(conn, stamps(i)[0], msg if isinstance(msg, bytes) else TS.serialize_cdr(msg, msgtype))


def read_topic(path, topic: str) -> list[tuple[int, object]]:
    with Reader(path) as reader:
        conns = [c for c in reader.connections if c.topic == topic]
        return [(t, TS.deserialize_cdr(raw, c.msgtype)) for c, t, raw in reader.messages(connections=conns)]


def topics(path) -> set[str]:
    with Reader(path) as reader:
        return {c.topic for c in reader.connections}


def matrix(pose) -> np.ndarray:
    """4×4 of a rosbags Pose or Transform message."""
    t = pose.position if hasattr(pose, "position") else pose.translation
    o = pose.orientation if hasattr(pose, "orientation") else pose.rotation
    return pose_to_matrix([t.x, t.y, t.z], xyzw_to_wxyz([o.x, o.y, o.z, o.w]))


def check_camera_body_frame(T_map_camera: np.ndarray, T_map_optical: np.ndarray) -> None:
    """REP-103 body axes from the optical axes: x forward = optical z, y left = −optical x, z up = −optical y."""
    R_cam, R_opt = T_map_camera[:3, :3], T_map_optical[:3, :3]
    np.testing.assert_allclose(R_cam[:, 0], R_opt[:, 2], atol=1e-5)  # batched vs single-image forwards
    np.testing.assert_allclose(R_cam[:, 1], -R_opt[:, 0], atol=1e-5)
    np.testing.assert_allclose(R_cam[:, 2], -R_opt[:, 1], atol=1e-5)
    np.testing.assert_allclose(T_map_camera[:3, 3], T_map_optical[:3, 3], atol=1e-5)


def base_args(bag, out, checkpoint, *extra):
    """Command line for one run; torch unless ``extra`` names another backend (the last flag wins)."""
    return [str(bag), "--topic", TOPIC, "--checkpoint", str(checkpoint), "--out", str(out), "--device", "cpu", "--backend", "torch",
            *map(str, extra)]


def compressed_depth_msg(header, depth: np.ndarray, encoding: str = "16UC1", depth_max: float = 10.0, depth_quantization: float = 100.0):
    """A ``sensor_msgs/CompressedImage`` as compressed_depth_image_transport publishes it (``"<enc>; compressedDepth png"``).

    12-byte header (int32 format = 0, float32 quant_a, quant_b), then a 16-bit PNG: ``depth`` (uint16 mm) itself for
    16UC1, or for 32FC1 (``depth`` in metres) the inverse depth ``quant_a / d + quant_b`` truncated to uint16, 0 at or
    beyond ``depth_max`` or NaN, with the plugin's default quantisation.
    """
    if encoding == "32FC1":
        quant_a = depth_quantization * (depth_quantization + 1.0)
        quant_b = 1.0 - quant_a / depth_max
        with np.errstate(divide="ignore", invalid="ignore"):
            pixels = np.where(depth < depth_max, quant_a / depth + quant_b, 0.0)
        pixels = np.nan_to_num(pixels, nan=0.0).astype(np.uint16)
    else:
        quant_a = quant_b = 0.0
        pixels = depth.astype(np.uint16)
    head = np.array([(0, quant_a, quant_b)], dtype=[("format", "<i4"), ("a", "<f4"), ("b", "<f4")]).view(np.uint8)
    data = np.concatenate([head, cv2.imencode(".png", pixels)[1].reshape(-1)])
    return TS.types["sensor_msgs/msg/CompressedImage"](header=header, format=f"{encoding}; compressedDepth png", data=data)
