"""``posenet-make-dataset``: a rosbag2 recorded on the robot -> a posed dataset (7-Scenes layout) to train on and map.

    posenet-make-dataset recording/ --image-topic /camera/color/image_raw \\
        --depth-topic /camera/aligned_depth_to_color/image_raw \\
        --pose-source tf:map:camera_color_optical_frame --out data/my_site
    posenet-make-dataset recording/ --image-topic /camera/image_raw --pose-source topic:/slam/pose --out data/my_site
    posenet-make-dataset recording/ --image-topic /camera/image_raw --pose-source sfm --out data/my_site
    posenet-make-dataset --video walk.mp4 --camera-info camera.yaml --known-distance 0 12.5 3.2 --out data/my_site
    posenet-make-dataset --images photos/ --intrinsics 525 525 319.5 239.5 --known-distance 0 4 1.5 --out data/my_site

Poses (camera optical frame in the map) come from TF (``/tf`` + ``/tf_static``, looked up at
each image's header stamp), from a pose topic (``PoseStamped``, ``PoseWithCovarianceStamped``,
``Odometry``; interpolated, then carried to the camera by ``/tf_static`` or ``--camera-to-base``),
or from pycolmap SfM brought to metric scale and gravity by the bag's odometry/pose topic
(``--align-to``) or a ``--known-distance``. Interpolation (lerp + slerp) needs a sample within
the tolerance on both sides of the stamp; other frames are skipped and counted. Images are
undistorted once with the CameraInfo (the dataset is pinhole); depth is stored in millimetres
when it is registered to the colour image. Near-duplicate and blurred frames are dropped;
train/test are blocks of time (or ``--test-bag``), never interleaved frames. The dataset is
written under a temporary name and moved into place only when complete; ``dataset.yaml``
records the sources, settings and counts.

A plain video (``--video``) or a folder of images (``--images``, sorted by name) has no poses:
it goes to SfM, with the intrinsics from a ROS camera-calibration YAML (``--camera-info``) or
``--intrinsics``, metric scale from ``--known-distance`` (stamps are seconds from the first
frame: the video's frame times, or file order at ``--fps``), and the same selection, split and
staging.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable, Iterator

import cv2
import numpy as np
from rosbags.rosbag2 import Reader, ReaderError
from rosbags.typesys import Stores, get_typestore

from ..dataset_maker import bag_source, image_source, sfm
from ..dataset_maker.bag_source import PoseSourceSpec, TfPoses, seconds
from ..dataset_maker.selection import FrameSelector, SelectionConfig, SplitConfig, cap_indices, sequences_of, time_block_split
from ..dataset_maker.tf_buffer import NANOSECONDS, TransformChainError
from ..dataset_maker.writer import FrameRecord, DatasetWriter, check_output
from ..ros.camera_info import CameraInfoError, CameraIntrinsics
from ..ros.image import ImageConversionError, msg_to_rgb
from ..ros.parameters import camera_info_topic_of
from ..ros.refinement import Undistorter
from ..bag_io import ODOMETRY_TYPE, UsageError

log = logging.getLogger("make-dataset")
PROG = "posenet-make-dataset"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    s, sp = SelectionConfig(), SplitConfig()
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0].replace("``", ""))
    p.add_argument("input", nargs="?", help="rosbag2 (directory, or a .mcap/.db3 file); or --images / --video")
    plain = p.add_argument_group("plain images instead of a bag (poses from SfM)")
    plain.add_argument("--images", metavar="DIR", help="folder of image files (png, jpg, ...), taken in name order")
    plain.add_argument("--video", metavar="FILE", help="video file OpenCV can read (mp4, avi, mkv, ...)")
    plain.add_argument("--fps", type=float, default=10.0, help="--images: frames per second the stamps assume (default 10)")
    plain.add_argument("--camera-info", metavar="FILE.yaml",
                       help="ROS camera-calibration YAML (camera_calibration / camera_info_manager format); with a bag it "
                            "replaces the CameraInfo topic")
    plain.add_argument("--intrinsics", type=float, nargs=4, metavar=("FX", "FY", "CX", "CY"),
                       help="pinhole intrinsics of the images (px, no distortion) instead of --camera-info")
    p.add_argument("--out", required=True, help="dataset folder to create")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--image-topic", help="sensor_msgs/Image or CompressedImage topic (bags)")
    p.add_argument("--camera-info-topic", help="CameraInfo topic (default: beside the image topic, as image_transport names it)")
    p.add_argument("--depth-topic", help="depth image registered to the colour image (16UC1 mm or 32FC1 m; raw or compressedDepth png)")
    p.add_argument("--pose-source", help="tf:MAP_FRAME[:CAMERA_OPTICAL_FRAME], topic:/pose_topic, or sfm (the only one, and the "
                                         "default, for --images / --video)")
    p.add_argument("--camera-frame", help="the images' optical frame (default: their header frame_id)")
    p.add_argument("--pose-frame", help="frame a pose topic poses (default: Odometry's child_frame_id, else base_link)")
    p.add_argument("--camera-to-base", type=float, nargs=6, metavar=("X", "Y", "Z", "ROLL", "PITCH", "YAW"),
                   help="camera_link (REP-103 body frame) in the pose frame, as the node's camera_to_base (default: /tf_static)")
    p.add_argument("--tf-tolerance", type=float, default=0.1,
                   help="s: a pose needs a transform sample this close on both sides of the image stamp (default 0.1)")
    p.add_argument("--depth-tolerance", type=float, default=0.02, help="s between an image and its depth image (default 0.02)")
    p.add_argument("--test-bag", help="a second recording that becomes the whole test split (else: time blocks)")
    p.add_argument("--test-fraction", type=float, default=sp.test_fraction, help="share of time blocks held out for test")
    p.add_argument("--block-seconds", type=float, default=sp.block_seconds, help="length of a split block (s)")
    p.add_argument("--gap-seconds", type=float, default=sp.gap_seconds, help="frames this close to a train/test boundary are dropped")
    p.add_argument("--min-interval", type=float, default=s.min_interval, help="s between kept frames")
    p.add_argument("--min-translation", type=float, default=s.min_translation, help="m moved since the last kept frame, or ...")
    p.add_argument("--min-rotation", type=float, default=s.min_rotation, help="... degrees turned (near-duplicates are dropped)")
    p.add_argument("--blur-threshold", type=float, default=s.blur_threshold, help="drop frames whose Laplacian variance is below (0: off)")
    p.add_argument("--blur-relative", type=float, default=s.blur_relative,
                   help="drop frames below this fraction of the recent frames' median Laplacian variance (0: off)")
    p.add_argument("--max-frames", type=int, default=s.max_frames, help="at most this many frames, spread evenly (0: all)")
    sfm_group = p.add_argument_group("--pose-source sfm")
    sfm_group.add_argument("--align-to", default="auto",
                           help="metric scale and gravity from: auto (the bag's Odometry, else another pose topic), "
                                "topic:/name, tf:PARENT:CHILD, or none (then --known-distance)")
    sfm_group.add_argument("--known-distance", nargs=3, type=float, metavar=("STAMP_A", "STAMP_B", "METRES"),
                           help="distance between the frames stamped nearest STAMP_A and STAMP_B (s; for --images / --video, "
                                "seconds from the first frame)")
    sfm_group.add_argument("--matcher", choices=sfm.MATCHERS, default="auto",
                           help=f"image pairs to match: exhaustive up to {sfm.EXHAUSTIVE_UP_TO} frames, else sequential (auto)")
    sfm_group.add_argument("--mapper", choices=sfm.MAPPERS,
                           help="incremental (default for bags, whose reference catches a bent reconstruction: registers only "
                                "well-constrained frames) or global (GLOMAP: rotation averaging + global positioning; default for "
                                "--images / --video, which have no reference; right where incremental bends a walking video)")
    sfm_group.add_argument("--sfm-seed", type=int, default=0, metavar="N",
                           help="seed of SfM's random choices (default 0): with the incremental mapper the same frames give "
                                "the same poses; when a reconstruction is refused as bent, another seed (or, with the global "
                                "mapper, which varies from run to run anyway, another run) may not be")
    sfm_group.add_argument("--max-alignment-residual", type=float, default=0.25, metavar="METRES",
                           help="refuse SfM poses whose alignment to the reference leaves a larger RMS residual (default 0.25): "
                                "the reconstruction or the reference is wrong, and wrong labels are worse than none")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    try:
        args.selection = SelectionConfig(args.min_interval, args.min_translation, args.min_rotation, args.blur_threshold,
                                         args.blur_relative, s.blur_window, args.max_frames)
        args.split = SplitConfig(args.test_fraction, args.block_seconds, args.gap_seconds)
    except ValueError as err:
        p.error(str(err))
    if args.tf_tolerance < 0 or args.depth_tolerance < 0:
        p.error("tolerances must be >= 0")
    _check_input_options(p, args)
    return args


def _check_input_options(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """One input; a bag needs its topic and pose source, plain images SfM, a calibration and a known distance."""
    if args.sfm_seed < 0:
        p.error(f"--sfm-seed must be >= 0, got {args.sfm_seed}")
    given = [name for name, value in (("a bag", args.input), ("--images", args.images), ("--video", args.video)) if value]
    if len(given) != 1:
        p.error(f"give one input: a bag, --images DIR or --video FILE (got {' and '.join(given) or 'none'})")
    if args.camera_info and args.intrinsics:
        p.error("give --camera-info or --intrinsics, not both")
    if args.input:
        args.mapper = args.mapper or "incremental"
        for name in ("image_topic", "pose_source"):
            if not getattr(args, name):
                p.error(f"a bag needs --{name.replace('_', '-')}")
        if args.intrinsics:
            p.error("--intrinsics is for --images / --video; a bag's calibration is its CameraInfo (or --camera-info)")
        return
    flag = "--images" if args.images else "--video"
    args.pose_source = args.pose_source or "sfm"
    args.mapper = args.mapper or "global"
    if args.pose_source != "sfm":
        p.error(f"{flag} has no poses: --pose-source must be sfm")
    for name in ("image_topic", "depth_topic", "camera_info_topic", "test_bag"):
        if getattr(args, name):
            p.error(f"--{name.replace('_', '-')} is for bags, not {flag}")
    if not (args.camera_info or args.intrinsics):
        p.error(f"{flag} needs the camera's calibration: --camera-info FILE.yaml or --intrinsics FX FY CX CY")
    if args.known_distance is None:
        p.error(f"{flag} needs metric scale: --known-distance STAMP_A STAMP_B METRES (seconds from the first frame)")
    if args.align_to not in ("auto", "none"):
        p.error(f"--align-to is for bags; {flag} takes its scale from --known-distance")


@dataclass
class Recording:
    """What one bag contributed."""

    path: str
    role: str  # "split" (train and test blocks), "test" (--test-bag)
    records: list[FrameRecord] = field(default_factory=list)
    references: dict[int, np.ndarray] = field(default_factory=dict)  # frame index -> metric pose (SfM alignment)
    info: dict = field(default_factory=dict)


@dataclass
class Summary:
    written: dict  # frames per split
    skipped: Counter
    notes: list


class Maker:
    """One run: reads the bag(s), selects and writes frames, then lays out the dataset."""

    def __init__(self, args: argparse.Namespace, writer: DatasetWriter):
        self.args, self.writer = args, writer
        self.spec = PoseSourceSpec.parse(args.pose_source)
        self.typestore = get_typestore(Stores.LATEST)
        self.skipped: Counter = Counter()
        self.notes: list[str] = []
        self.intrinsics: CameraIntrinsics | None = None
        self.size: tuple[int, int] | None = None
        self.undistort = Undistorter()
        self.next_index = 0
        self.depth_info: dict = {"topic": args.depth_topic} if args.depth_topic else {"topic": None}
        self.reference_orients_camera = True  # False when the alignment reference is a body whose camera extrinsic is unknown

    # ------------------------------------------------------------------ reading one bag

    def read(self, path: str, role: str) -> Recording:
        recording = Recording(path, role)
        with Reader(path) as reader:
            image_frame, compressed = bag_source.first_image_frame(reader, self.typestore, self.args.image_topic)
            camera_frame = self.spec.camera_frame or self.args.camera_frame or image_frame
            info_topic = self.args.camera_info_topic or camera_info_topic_of(self.args.image_topic, compressed)
            if self.args.camera_info:
                info_topic = f"none (--camera-info {self.args.camera_info})"
                self._set_intrinsics(image_source.read_calibration_yaml(self.args.camera_info), path)
            else:
                self._set_intrinsics(bag_source.read_camera_info(reader, self.typestore, info_topic), path)
            poses, reference = self._pose_sources(reader, camera_frame)
            if self.spec.kind == "sfm" and reference is None and self.args.known_distance is None and role == "split":
                raise UsageError("SfM poses need metric scale: the bag has no odometry or pose topic to align to; "
                                 "pass --align-to topic:/name or tf:PARENT:CHILD, or --known-distance STAMP_A STAMP_B METRES")
            recording.info = {"bag": str(Path(path).resolve()), "image_topic": self.args.image_topic, "camera_info_topic": info_topic,
                              "camera_frame": camera_frame, "pose_source": self.spec.describe()}
            if poses is not None:
                recording.info["poses"] = poses.describe()
            if reference is not None:
                recording.info["alignment_reference"] = reference.describe()
            images = bag_source.read_images(reader, self.typestore, self.args.image_topic, self.skipped)
            self._select_frames(recording, ((m.stamp, partial(msg_to_rgb, m.msg)) for m in images), poses, reference)
            if self.args.depth_topic and recording.records:
                self._read_depth(reader, recording, camera_frame)
        return recording

    def read_plain(self, source: image_source.ImageInput) -> Recording:
        """An image folder or a video: no poses (SfM gives them), the calibration from the command line."""
        recording = Recording(str(source.path), "split")
        if self.args.camera_info:
            intrinsics, calibration = image_source.read_calibration_yaml(self.args.camera_info), str(Path(self.args.camera_info).resolve())
        else:
            intrinsics, calibration = image_source.intrinsics_from_values(self.args.intrinsics, source.size), "--intrinsics"
        self._set_intrinsics(intrinsics, str(source.path))
        self._select_frames(recording, ((f.stamp, f.load) for f in source.frames()), None, None)
        recording.info = {**source.describe(), "calibration": calibration, "camera_frame": "camera", "pose_source": self.spec.describe()}
        return recording

    def _set_intrinsics(self, intrinsics: CameraIntrinsics, path: str) -> None:
        if self.intrinsics is None:
            self.intrinsics = intrinsics
        elif not (np.allclose(intrinsics.K, self.intrinsics.K) and np.allclose(intrinsics.distortion, self.intrinsics.distortion)
                  and (intrinsics.width, intrinsics.height) == (self.intrinsics.width, self.intrinsics.height)):
            raise UsageError(f"{path}: its CameraInfo differs from the first recording's; one dataset needs one camera")

    def _pose_sources(self, reader, camera_frame: str):
        """(labels, reference): the pose per stamp for tf/topic sources; for SfM, the alignment reference if any."""
        args = self.args
        if self.spec.kind == "tf":
            return self._tf_poses(reader, self.spec.map_frame, camera_frame), None
        if self.spec.kind == "topic":
            return self._topic_poses(reader, self.spec.topic, camera_frame), None
        target = args.align_to
        if target == "none":
            return None, None
        if target == "auto":
            target = self._auto_reference(reader)
            if target is None:
                return None, None
        kind, _, rest = target.partition(":")
        if kind == "tf":
            parent, _, child = rest.partition(":")
            if not parent or not child:
                raise UsageError(f"--align-to {target!r}: expected tf:PARENT:CHILD")
            self.reference_orients_camera = child == camera_frame
            return None, self._tf_poses(reader, parent, child)
        if kind == "topic" and rest.startswith("/"):
            try:
                return None, self._topic_poses(reader, rest, camera_frame)
            except UsageError as err:
                if "extrinsic" not in str(err) and "/tf_static" not in str(err):
                    raise
                self.notes.append(f"alignment: no camera extrinsic for {rest}, its frame's positions used (the lever arm adds to the residual)")
                self.reference_orients_camera = False
                series, map_frame, child = bag_source.read_pose_topic(reader, self.typestore, rest, self.skipped)
                return None, bag_source.TopicPoses(series, map_frame, child or "base_link", np.eye(4), "none (unknown)", args.tf_tolerance)
        raise UsageError(f"--align-to {target!r}: expected auto, none, topic:/name or tf:PARENT:CHILD")

    def _auto_reference(self, reader) -> str | None:
        for types in ((ODOMETRY_TYPE,), bag_source.POSE_TYPES):
            topics = sorted(c.topic for c in reader.connections if c.msgtype in types)
            if topics:
                return "topic:" + topics[0]
        return None

    def _tf_poses(self, reader, parent: str, child: str) -> TfPoses:
        tree = bag_source.read_transforms(reader, self.typestore, self.skipped)
        try:
            return TfPoses(tree, parent, child, self.args.tf_tolerance)
        except TransformChainError as err:
            raise UsageError(str(err)) from None

    def _topic_poses(self, reader, topic: str, camera_frame: str):
        return bag_source.topic_poses(reader, self.typestore, topic, camera_frame, self.args.pose_frame, self.args.camera_to_base,
                                      self.args.tf_tolerance, self.skipped)

    def _select_frames(self, recording: Recording, frames: Iterator[tuple[int, Callable[[], np.ndarray]]], poses, reference) -> None:
        """Keep, undistort and write the frames ``(stamp, decode)`` that pass the selection, in recording order."""
        selector = FrameSelector(self.args.selection)
        for stamp, decode in frames:
            pose = None
            if poses is not None:
                pose = poses(stamp)
                if pose is None:
                    self.skipped["no pose within the tolerance on both sides"] += 1
                    continue
            reason = selector.duplicate(stamp, pose)
            if reason:
                self.skipped[reason] += 1
                continue
            try:
                rgb = decode()
            except ImageConversionError as err:
                self.skipped["undecodable image"] += 1
                log.warning("skipping image stamped %s: %s", seconds(stamp), err)
                continue
            if self._check_size(rgb) is False:
                continue
            reason = selector.blurred(rgb)
            if reason:
                self.skipped[reason] += 1
                continue
            index = self.next_index
            self.next_index += 1
            self.writer.write_colour(index, self.undistort(rgb, self.camera))
            recording.records.append(FrameRecord(index, stamp, pose))
            if reference is not None:
                T = reference(stamp)
                if T is not None:
                    recording.references[index] = T
            selector.keep(stamp, pose)

    @property
    def camera(self) -> CameraIntrinsics:
        return self.intrinsics.for_image(*self.size)

    def _check_size(self, rgb: np.ndarray) -> bool:
        size = (rgb.shape[1], rgb.shape[0])
        if self.size is None:
            try:
                self.intrinsics.for_image(*size)
            except CameraInfoError as err:
                raise UsageError(str(err)) from None
            self.size = size
        if size != self.size:
            self.skipped["image of another size"] += 1
            return False
        return True

    def _read_depth(self, reader, recording: Recording, camera_frame: str) -> None:
        """Depth of each selected frame, when registered to the colour image; frames without one are dropped."""
        wanted = {r.stamp: r.index for r in recording.records}
        by_index = {r.index: r for r in recording.records}
        for index, msg in bag_source.read_depth(reader, self.typestore, self.args.depth_topic, wanted, self.args.depth_tolerance, self.skipped):
            try:
                mm = bag_source.depth_to_millimetres(msg)
            except ImageConversionError as err:
                self.skipped["undecodable depth"] += 1
                log.warning("depth stamped %s: %s", seconds(bag_source.stamp_ns(msg.header.stamp)), err)
                continue
            problem = self._registration_problem(mm, msg.header.frame_id, camera_frame)
            if problem:
                self.depth_info.update(registered=False, reason=problem)
                log.warning("depth on %s is not written: %s", self.args.depth_topic, problem)
                return
            self.writer.write_depth(index, self.undistort(mm, self.camera, cv2.INTER_NEAREST))
            by_index[index].depth = True
        self.depth_info.update(registered=True, encoding="uint16 millimetres, 0 = invalid")
        missing = [r for r in recording.records if not r.depth]
        for record in missing:
            self.writer.drop(record.index)
        if missing:
            self.skipped["no depth image within the tolerance"] += len(missing)
        recording.records[:] = [r for r in recording.records if r.depth]

    def _registration_problem(self, mm: np.ndarray, frame_id: str, camera_frame: str) -> str | None:
        frame, (height, width) = frame_id.lstrip("/"), mm.shape
        if (width, height) != self.size:
            return f"its images are {width}x{height}, the colour images {self.size[0]}x{self.size[1]} (record the aligned depth topic)"
        if frame != camera_frame:
            return f"it is in frame '{frame}', the colour images in '{camera_frame}' (record the depth aligned to colour)"
        return None

    # ------------------------------------------------------------------ SfM

    def solve_sfm(self, recordings: list[Recording]) -> dict:
        records = [r for rec in recordings for r in rec.records]
        names = [self.writer.colour_path(r.index).name for r in records]
        self.writer.workspace  # created before pycolmap writes there
        log.info("SfM on %d frames (%s matching, %s mapping)...", len(names), self.args.matcher, self.args.mapper)
        sfm_poses, summary = sfm.reconstruct(self.writer.frames, names, self.camera.K, self.writer.workspace,
                                             self.args.matcher, self.args.mapper, seed=self.args.sfm_seed)
        registered = [(r, sfm_poses[n]) for r, n in zip(records, names) if n in sfm_poses]
        similarity, summary["alignment"] = self._alignment(recordings, registered)
        for record, T in registered:
            record.pose = similarity.apply_to_pose(T)
        unregistered = [r for r, n in zip(records, names) if n not in sfm_poses]
        for record in unregistered:
            self.writer.drop(record.index)
        if unregistered:
            self.skipped["not registered by SfM"] += len(unregistered)
        for rec in recordings:
            rec.records[:] = [r for r in rec.records if r.pose is not None]
        return summary

    def _alignment(self, recordings: list[Recording], registered) -> tuple[sfm.Similarity, dict]:
        references = {i: T for rec in recordings for i, T in rec.references.items()}
        pairs = [(T, references[r.index]) for r, T in registered if r.index in references]
        if self.args.known_distance is None or len(pairs) >= 3:
            if len(pairs) < 3:
                raise UsageError("SfM poses need metric scale: the bag has no odometry or pose topic to align to "
                                 f"({len(pairs)} frames with a reference pose); pass --align-to or --known-distance STAMP_A STAMP_B METRES")
            sfm_poses, metric_poses = np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs])
            if self.reference_orients_camera:
                similarity, residuals = sfm.similarity_with_rotations(sfm_poses, metric_poses)
                method = "similarity to the reference camera poses (rotation from orientations, scale from centres)"
            else:
                similarity, residuals = sfm.similarity_to(sfm_poses[:, :3, 3], metric_poses[:, :3, 3])
                method = "similarity to the reference positions"
            source = next(rec.info["alignment_reference"] for rec in recordings if "alignment_reference" in rec.info)
            rms = float(np.sqrt(np.mean(residuals ** 2)))
            if rms > self.args.max_alignment_residual:
                raise sfm.SfmError(f"the SfM poses do not fit the reference ({source.get('map_frame', '')}): alignment residual RMS "
                                   f"{rms:.3f} m over {len(pairs)} frames, more than --max-alignment-residual "
                                   f"{self.args.max_alignment_residual:g} m (SfM registered {len(registered)} frames; "
                                   f"a wrong reconstruction, or a drifting reference; try --mapper "
                                   f"{'global' if self.args.mapper == 'incremental' else 'incremental'} or another --sfm-seed)")
            return similarity, {"method": method, "reference": source, "frames": len(pairs),
                                "scale": similarity.scale, "residual_rms_m": float(np.sqrt(np.mean(residuals ** 2))),
                                "residual_median_m": float(np.median(residuals)), "residual_max_m": float(residuals.max())}
        a_stamp, b_stamp, metres = self.args.known_distance
        stamps = np.array([r.stamp for r, _ in registered], dtype=np.int64)
        a, b = (self._registered_frame_at(recordings, stamps, s) for s in (a_stamp, b_stamp))
        poses = [T for _, T in registered]
        similarity = sfm.similarity_from_distance(poses, a, b, metres)
        return similarity, {"method": "known distance (scale); gravity from the cameras' mean down axis",
                            "frames": [seconds(int(stamps[a])), seconds(int(stamps[b]))], "metres": metres, "scale": similarity.scale}

    @staticmethod
    def _registered_frame_at(recordings: list[Recording], registered_stamps: np.ndarray, seconds_: float) -> int:
        """Position among the registered frames of the selected frame stamped nearest ``seconds_``.

        The distance was measured between two particular frames: when SfM did not register the
        frame nearest a stamp, a neighbour would give a wrong scale, so that is an error.
        """
        wanted = round(seconds_ * NANOSECONDS)
        selected = np.array([r.stamp for rec in recordings for r in rec.records], dtype=np.int64)
        nearest = int(selected[np.argmin(np.abs(selected - wanted))])
        hits = np.flatnonzero(registered_stamps == nearest)
        if not hits.size:
            raise sfm.SfmError(f"--known-distance: the frame stamped {seconds(nearest)} (nearest {seconds_:g} s) was not registered by SfM; "
                               "measure the distance between two other frames")
        return int(hits[0])

    # ------------------------------------------------------------------ layout

    def lay_out(self, recordings: list[Recording], extra: dict) -> dict:
        records = [r for rec in recordings for r in rec.records]
        roles = [rec.role for rec in recordings for _ in rec.records]
        keep = cap_indices(len(records), self.args.selection.max_frames)
        if len(keep) < len(records):
            dropped = sorted(set(range(len(records))) - set(keep.tolist()))
            for i in dropped:
                self.writer.drop(records[i].index)
            self.skipped["over --max-frames"] += len(dropped)
            records, roles = [records[i] for i in keep], [roles[i] for i in keep]
        if not records:
            raise UsageError("no frame left to write (see the skip counts)")
        split_positions = [i for i, role in enumerate(roles) if role == "split"]
        labels: list[str | None] = ["test"] * len(records)
        n_blocks = 0
        if split_positions:
            split_config = SplitConfig(0.0) if self.args.test_bag else self.args.split
            try:
                block_labels, n_blocks = time_block_split(np.array([records[i].stamp for i in split_positions]), split_config)
            except ValueError as err:
                raise UsageError(str(err)) from None
            for i, label in zip(split_positions, block_labels):
                labels[i] = label
        gap = [records[i] for i, label in enumerate(labels) if label is None]
        for record in gap:
            self.writer.drop(record.index)
        if gap:
            self.skipped["within --gap-seconds of a train/test boundary"] += len(gap)
        sequences = sequences_of(labels)
        metadata = {
            "created_by": PROG,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "recordings": [rec.info for rec in recordings],
            "pose_convention": "frame-*.pose.txt: 4x4 camera-to-world (camera optical frame in the map)",
            "intrinsics": {"fx": self.camera.K[0, 0], "fy": self.camera.K[1, 1], "cx": self.camera.K[0, 2], "cy": self.camera.K[1, 2],
                           "width": self.size[0], "height": self.size[1],
                           "distortion_removed": self.camera.distortion.tolist() if np.any(self.camera.distortion) else []},
            "depth": self.depth_info,
            "tolerances_s": {"tf": self.args.tf_tolerance, "depth": self.args.depth_tolerance},
            "selection": vars(self.args.selection),
            "split": {"method": "--test-bag" if self.args.test_bag else "time blocks", **vars(self.args.split), "blocks": n_blocks},
            "skipped": dict(self.skipped),
            **extra,
        }
        return self.writer.finish(records, sequences, self.camera.K, self.size, metadata)


def run(args: argparse.Namespace) -> Summary:
    for path, flag in ((args.input, "input bag"), (args.test_bag, "--test-bag")):
        if path and not Path(path).exists():
            raise UsageError(f"{flag} {path} does not exist")
    PoseSourceSpec.parse(args.pose_source)
    plain = None if args.input else image_source.open_image_input(args.images, args.video, args.fps)
    out = check_output(args.out, args.overwrite, [p for p in (args.input, args.test_bag, args.images, args.video) if p])
    writer = DatasetWriter(out)
    try:
        maker = Maker(args, writer)
        recordings = [maker.read_plain(plain) if plain else maker.read(args.input, "split")]
        if args.test_bag:
            recordings.append(maker.read(args.test_bag, "test"))
        if not any(rec.records for rec in recordings):
            raise UsageError(f"no frame was selected (skipped: {_counts(maker.skipped) or 'the input holds no image'})")
        extra = {}
        if maker.spec.kind == "sfm":
            extra["sfm"] = maker.solve_sfm(recordings)
            maker.notes.append(_sfm_note(extra["sfm"]))
        written = maker.lay_out(recordings, extra)
    finally:
        writer.discard()
    return Summary(written, maker.skipped, maker.notes)


def _sfm_note(summary: dict) -> str:
    a = summary["alignment"]
    text = f"SfM registered {summary['registered']}/{summary['frames']} frames in {summary['seconds']} s; scale from {a['method']}"
    if "residual_rms_m" in a:
        text += f" ({a['reference']['map_frame']}, {a['frames']} frames, residual RMS {a['residual_rms_m']:.3f} m, median {a['residual_median_m']:.3f} m)"
    return text


def _counts(counter: Counter) -> str:
    return ", ".join(f"{n} {reason}" for reason, n in counter.most_common())


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(name)s: %(message)s")
    try:
        summary = run(args)
    except (UsageError, sfm.SfmError, ReaderError, OSError, ValueError) as err:
        text = " ".join(str(err).split())  # one line, whatever the library's message looked like
        print(f"{PROG}: error: {text}; no output was created", file=sys.stderr)
        return 2
    for note in summary.notes:
        print(f"{PROG}: {note}")
    skipped = f"; skipped {sum(summary.skipped.values())} ({_counts(summary.skipped)})" if summary.skipped else ""
    print(f"{PROG}: wrote {summary.written['train']} train + {summary.written['test']} test frames to {args.out}{skipped}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
