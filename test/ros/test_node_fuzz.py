"""posenet_node against hostile input, with the real rclpy over Fast DDS: nothing may stop it.

In-process tests pin the worker's failure handling (bad stamps after a warning, an
internal error first, a worker that dies and is restarted); the fuzz test drives the
node as a separate process, the way a camera driver would, with every kind of
malformed message, and checks after each that the next good image is answered and
that the node's counters (read from /diagnostics) add up.

The model is an untrained tiny resnet18: these tests are about the node, not accuracy.
"""
import contextlib
import os
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import ros_fixtures
from ros_fixtures import Probe, RunningNode, compressed_msg, image_msg, ros_context, stamp_key, wait_for, wait_for_log

ros_fixtures.isolate_ros_domain()

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from builtin_interfaces.msg import Time  # noqa: E402
from sensor_msgs.msg import CompressedImage, Image  # noqa: E402

from ros2_posenet.checkpoint import save_checkpoint  # noqa: E402
from ros2_posenet.model import ModelConfig, PoseNet  # noqa: E402
from ros2_posenet.ros import messages  # noqa: E402
from ros2_posenet.ros.image import PNG_SIGNATURE  # noqa: E402
from ros2_posenet.ros.node import DROP_REASONS, EXIT_WORKER_FAILED, WORKER_RESTART_LIMIT  # noqa: E402

GOOD = np.random.default_rng(0).integers(0, 120, (72, 96, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = PoseNet(ModelConfig(backbone="resnet18", hidden_dim=16, dropout=0.0, pretrained=False))
    return save_checkpoint(tmp_path_factory.mktemp("fuzz") / "untrained.pt", model, ros_fixtures.PREPROCESS, map_frame="map")




_last_ns = [0]


def now_stamp(clock) -> Time:
    """Now on ``clock``, unique within the session (stamps key the answers)."""
    ns = max(clock.now().nanoseconds, _last_ns[0] + 1000)
    _last_ns[0] = ns
    return Time(sec=ns // 10**9, nanosec=ns % 10**9)


def shifted(stamp: Time, seconds: int) -> Time:
    return Time(sec=stamp.sec + seconds, nanosec=stamp.nanosec)


def settled(counts: dict) -> bool:
    """received = processed + every drop reason (no frame in flight, none counted twice)."""
    drops = sum(n for key, n in counts.items() if key.startswith("dropped_") or key in DROP_KEYS)
    return counts.get("received", 0) == counts.get("processed", 0) + drops


DROP_KEYS = tuple(DROP_REASONS)


# ----------------------------------------------------------------------------- the worker cannot die


def test_negative_stamp_after_a_warning_is_dropped_and_the_worker_lives(start, checkpoint, capfd):
    r = start("negative", checkpoint=str(checkpoint), log_throttle=0.0)
    clock = r.node.get_clock()
    stale = shifted(now_stamp(clock), -30)
    assert r.probe.send(image_msg(GOOD, stale), answered=lambda: r.node.counters().get("stale", 0) >= 1)  # a warning first
    negative = Time(sec=-5, nanosec=0)
    assert r.probe.send(image_msg(GOOD, negative), answered=lambda: sum(r.node.counters().get(k, 0) for k in DROP_KEYS if k != "stale") >= 1)
    stamp = now_stamp(clock)
    assert r.probe.send(image_msg(GOOD, stamp)), f"no answer after a negative stamp: {r.node.counters()}"
    assert r.node._worker.is_alive()
    counts = r.node.counters()
    assert counts.get("negative_stamp") == 1 and counts.get("internal_error", 0) == 0, counts
    assert wait_for(lambda: settled(r.node.counters()))
    err = capfd.readouterr().err
    assert "Logger severity cannot be changed" not in err and "Traceback" not in err, err
    assert "negative" in err


def test_an_internal_error_first_neither_double_counts_nor_hides_later_warnings(start, checkpoint, capfd):
    r = start("internal_first", checkpoint=str(checkpoint), log_throttle=0.0)
    clock = r.node.get_clock()
    real_predict = r.node.relocalizer.predict
    calls = []

    def failing_once(rgb):  # fault injection: one unexpected exception inside the frame pipeline
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("injected fault")
        return real_predict(rgb)

    r.node.relocalizer.predict = failing_once
    assert r.probe.send(image_msg(GOOD, now_stamp(clock)), answered=lambda: r.node.counters().get("internal_error", 0) >= 1)
    for i in range(3):
        stale = shifted(now_stamp(clock), -30)
        assert r.probe.send(image_msg(GOOD, stale), answered=lambda: r.node.counters().get("stale", 0) >= i + 1)
    assert r.probe.send(image_msg(GOOD, now_stamp(clock)))
    assert wait_for(lambda: settled(r.node.counters())), r.node.counters()
    counts = r.node.counters()
    assert counts["internal_error"] == 1 and counts["stale"] == 3, counts
    err = capfd.readouterr().err
    assert "injected fault" in err and err.count("image older than max_image_age") == 3, err
    assert "Logger severity cannot be changed" not in err, err


def test_a_dead_worker_is_restarted_and_the_restart_reported(start, checkpoint, capfd):
    r = start("restart", checkpoint=str(checkpoint), diagnostics_period=0.1, log_period=0.3)
    clock, real_predict = r.node.get_clock(), r.node.relocalizer.predict

    def die_once(rgb):  # fault injection: an exception no per-frame handler may swallow ends the thread
        r.node.relocalizer.predict = real_predict
        raise SystemExit("injected worker death")

    r.node.relocalizer.predict = die_once
    assert r.probe.send(image_msg(GOOD, now_stamp(clock)), answered=lambda: r.node.counters().get("worker_restarts", 0) >= 1)
    assert r.probe.send(image_msg(GOOD, now_stamp(clock))), f"no answer after the restart: {r.node.counters()}"
    assert wait_for(lambda: settled(r.node.counters())), r.node.counters()

    def restart_status():
        for array in list(r.probe.diagnostics):
            for status in array.status:
                values = {kv.key: kv.value for kv in status.values}
                if status.name == "posenet_node: relocalization" and values.get("worker_restarts") == "1":
                    return status, values
        return None

    assert wait_for(lambda: restart_status() is not None, 5.0)
    status, values = restart_status()
    assert status.level == messages.DIAGNOSTIC_WARN and "restarted 1 times" in status.message and "injected worker death" in values["last_worker_restart"]
    err = wait_for_log(capfd, r"relocalised [1-9].*inference worker restarted 1 times")  # the summary line
    assert "injected worker death" in err


def test_a_worker_that_keeps_dying_makes_the_node_exit_non_zero(checkpoint):
    # Giving up shuts the node's context down: keep it away from the other tests.
    with ros_context() as own, contextlib.closing(RunningNode(own, "give_up", checkpoint=str(checkpoint), diagnostics_period=3600.0)) as r:
        # diagnostics_period: the test plays the supervisor's timer
        node, clock = r.node, r.node.get_clock()

        def die(rgb):
            raise SystemExit("injected worker death")

        node.relocalizer.predict = die
        for attempt in range(WORKER_RESTART_LIMIT + 1):
            assert r.probe.send(image_msg(GOOD, now_stamp(clock)), answered=lambda: not node._worker.is_alive()), attempt
            if attempt < WORKER_RESTART_LIMIT:
                assert node._supervise_worker() and node._worker.is_alive()
        assert node.exit_code == 0 and own.ok()
        assert node._supervise_worker() is False
        assert node.exit_code == EXIT_WORKER_FAILED and not own.ok()  # main() returns exit_code once spin ends
        assert node.counters()["worker_restarts"] == WORKER_RESTART_LIMIT


# ----------------------------------------------------------------------------- fuzz: the node as a process


def huge_png(width: int, height: int) -> bytes:
    """A valid black greyscale PNG of width×height, built row by row (the pixels are never held in memory)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    compressor, row = zlib.compressobj(1), bytes(width + 1)  # filter byte 0 + the row
    idat = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    return PNG_SIGNATURE + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


class NodeProcess:
    """``posenet_node`` as a separate process (as a camera driver sees it), its counters read from /diagnostics."""

    def __init__(self, name: str, checkpoint: Path, script: str | None = None, **parameters):
        self.name = name
        parameters = {"checkpoint": str(checkpoint), "device": "cpu", "cpu_threads": 1, "image_topic": "camera/image_raw",
                      "max_image_age": 5.0, "diagnostics_period": 0.2, "log_throttle": 0.0, **parameters}
        args = [f"{key}:={str(value).lower() if isinstance(value, bool) else value}" for key, value in parameters.items()]
        entry = ["-c", script] if script else ["-m", "ros2_posenet.ros.node"]
        command = [sys.executable, *entry, "--ros-args", "-r", f"__node:={name}", "-r", f"__ns:=/{name}"]
        for arg in args:
            command += ["-p", arg]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                        env={**os.environ, "OMP_NUM_THREADS": "1"})

    def counters(self, probe: Probe) -> dict | None:
        """The newest counters this node published on /diagnostics (None before the first)."""
        for array in reversed(list(probe.diagnostics)):
            for status in array.status:
                if status.name == f"{self.name}: relocalization":
                    return {kv.key: int(kv.value) for kv in status.values if kv.value.lstrip("-").isdigit()}
        return None

    def settles(self, probe: Probe, processed: int) -> bool:
        """At least ``processed`` frames relocalised, and every received frame accounted for."""
        counts = self.counters(probe)
        return counts is not None and counts.get("processed", 0) >= processed and settled(counts)

    def wait_until_up(self, probe: Probe, timeout: float = 120.0) -> None:
        """Until the node subscribes (imports take seconds, much longer on a loaded machine)."""
        up = lambda: probe.image_pub.get_subscription_count() > 0 and self.counters(probe) is not None  # noqa: E731
        wait_for(lambda: up() or self.process.poll() is not None, timeout, 0.1)
        if self.process.poll() is not None:
            raise AssertionError(f"{self.name} exited with {self.process.returncode}: {self.process.stderr.read()[-3000:]}")
        assert up(), f"{self.name} did not subscribe and publish diagnostics within {timeout} s"

    def stop(self) -> str:
        """SIGINT, then kill if it lingers; returns its stderr."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        return self.process.stderr.read()


def raw_cases(clock) -> list[tuple[str, object]]:
    """(counter that must grow, message) for every kind of malformed sensor_msgs/Image."""
    def raw(**fields):
        msg = Image(**{"height": 72, "width": 96, "encoding": "rgb8", "step": 288, "data": bytes(288 * 72), **fields})
        msg.header.stamp = now_stamp(clock)
        return msg

    def stamped(stamp):
        return image_msg(GOOD, stamp)

    now = now_stamp(clock)
    return [
        ("dropped_unsupported_encoding", raw(encoding="yuv422")),
        ("dropped_unsupported_encoding", raw(encoding="")),
        ("dropped_truncated_image", raw(data=bytes(1000))),  # short data
        ("dropped_truncated_image", raw(data=b"")),  # empty data
        ("dropped_truncated_image", raw(step=100)),  # step shorter than a row
        ("dropped_empty_image", raw(height=0, width=0, step=0, data=b"")),  # zero declared size
        ("dropped_image_too_large", raw(height=100_000, width=100_000, step=300_000, data=bytes(64))),  # huge declared size
        ("dropped_image_too_large", raw(height=640, width=800, encoding="mono8", step=800, data=bytes(512_000))),  # > max_image_pixels
        ("dropped_bad_image", raw(height=1, width=1, step=3, data=bytes(3))),
        ("dropped_negative_stamp", stamped(Time(sec=-5, nanosec=0))),
        ("dropped_zero_stamp", stamped(Time(sec=0, nanosec=0))),
        ("dropped_future_stamp", stamped(shifted(now, 60))),
        ("dropped_stale", stamped(shifted(now, -30))),
        ("dropped_future_stamp", stamped(Time(sec=2**31 - 1, nanosec=4_000_000_000))),  # beyond any stamp once normalised
    ]


def compressed_cases(clock) -> list[tuple[str, object]]:
    """(counter that must grow, message) for every kind of malformed sensor_msgs/CompressedImage."""
    def compressed(fmt: str, data: bytes):
        msg = CompressedImage(format=fmt, data=data)
        msg.header.stamp = now_stamp(clock)
        return msg

    jpeg = bytes(compressed_msg(GOOD, now_stamp(clock), "jpeg").data)
    png = bytes(compressed_msg(GOOD, now_stamp(clock), "png").data)
    return [
        ("dropped_empty_image", compressed("jpeg", b"")),
        ("dropped_corrupt_compressed", compressed("jpeg", bytes(np.random.default_rng(1).integers(0, 256, 5000, dtype=np.uint8)))),
        ("dropped_corrupt_compressed", compressed("jpeg", jpeg[: len(jpeg) // 2])),  # truncated
        ("dropped_corrupt_compressed", compressed("png", png[: len(png) // 2])),
        ("dropped_corrupt_compressed", compressed("png", png[:20])),  # truncated inside the header
        ("dropped_unsupported_encoding", compressed("theora", jpeg)),
        ("dropped_unsupported_encoding", compressed("16UC1; compressedDepth png", png)),
        ("dropped_image_too_large", compressed("png", huge_png(10_000, 10_000))),  # refused from its header, not decoded
    ]


def fuzz(node: NodeProcess, probe: Probe, cases, good) -> None:
    """Each bad message is counted under its reason, then the next good image is answered and the books balance."""
    answered = 0
    for reason, bad in cases:
        before = (node.counters(probe) or {}).get(reason, 0)
        assert probe.send(bad, answered=lambda: (node.counters(probe) or {}).get(reason, 0) > before), (reason, node.counters(probe))
        assert probe.send(good(now_stamp(probe.node.get_clock()))), f"no answer after {reason}: {node.counters(probe)}"
        answered += 1
        assert wait_for(lambda: node.settles(probe, answered), 5.0), (reason, node.counters(probe))
    assert node.process.poll() is None, "the node exited"


def test_fuzz_the_node_process_with_malformed_images_stamps_and_bursts(context, checkpoint):
    # Reliable image QoS: best-effort delivery of 0.5-1 MB messages is lossy on a loaded machine.
    raw_node = NodeProcess("fuzz_raw", checkpoint, max_image_pixels=500_000, image_qos="reliable")
    compressed_node = NodeProcess("fuzz_compressed", checkpoint, compressed=True)
    raw_probe = Probe(context, "fuzz_raw")
    compressed_probe = Probe(context, "fuzz_compressed", compressed=True)
    try:
        raw_node.wait_until_up(raw_probe)
        compressed_node.wait_until_up(compressed_probe)
        clock = raw_probe.node.get_clock()
        fuzz(raw_node, raw_probe, raw_cases(clock), lambda stamp: image_msg(GOOD, stamp))
        fuzz(compressed_node, compressed_probe, compressed_cases(clock), lambda stamp: compressed_msg(GOOD, stamp, "png"))

        # A JPEG labelled png: counted and warned about, and still relocalised.
        mislabelled = compressed_msg(GOOD, now_stamp(clock), "jpeg")
        mislabelled.format = "png"
        assert compressed_probe.send(mislabelled)
        assert wait_for(lambda: (compressed_node.counters(compressed_probe) or {}).get("format_mismatch", 0) >= 1, 5.0)

        # A stamp with nanosec >= 1e9 is normalised identically on every output.
        base = now_stamp(clock)
        odd = Time(sec=base.sec - 1, nanosec=base.nanosec + 1_000_000_000)
        key = stamp_key(base)
        outputs = (raw_probe.poses, raw_probe.poses_cov, raw_probe.camera_poses)
        assert raw_probe.send(image_msg(GOOD, odd), answered=lambda: all(key in out for out in outputs) and ("map", "camera_link", key) in raw_probe.tf)
        assert all(out[key].header.stamp == base for out in outputs) and raw_probe.tf[("map", "camera_link", key)].header.stamp == base

        # A very large image within max_image_pixels is relocalised (resized), then a 50-frame burst.
        large = np.random.default_rng(2).integers(0, 120, (480, 640, 3), dtype=np.uint8)
        assert raw_probe.send(image_msg(large, now_stamp(clock)))
        assert wait_for(lambda: raw_node.settles(raw_probe, 1), 5.0)
        before = raw_node.counters(raw_probe)
        burst = [now_stamp(clock) for _ in range(50)]
        for stamp in burst:
            raw_probe.image_pub.publish(image_msg(GOOD, stamp))
        assert raw_probe.send(image_msg(GOOD, burst[-1]))  # the newest frame of the burst is answered
        assert raw_probe.send(image_msg(GOOD, now_stamp(clock)))  # and the next one
        assert wait_for(lambda: raw_node.settles(raw_probe, before["processed"] + 2), 5.0), (before, raw_node.counters(raw_probe))
        counts = raw_node.counters(raw_probe)
        assert counts["received"] > before["received"] + 1, counts
        assert counts["worker_restarts"] == 0 and counts["dropped_internal_error"] == 0, counts
    finally:
        raw_probe.close()
        compressed_probe.close()
        logs = raw_node.stop() + compressed_node.stop()
    assert "Traceback" not in logs and "Logger severity" not in logs, logs[-3000:]


# Fault injection in the node process: every frame ends the worker thread (SystemExit passes every handler).
DYING_WORKER = """
import sys
from ros2_posenet.ros import node

def die(self, msg):
    raise SystemExit("injected worker death")

node.PoseNetNode._process = die
sys.exit(node.main())
"""


def test_a_node_whose_worker_keeps_dying_exits_with_code_3_for_respawn(context, checkpoint):
    dying = NodeProcess("dying", checkpoint, script=DYING_WORKER)
    probe = Probe(context, "dying")
    try:
        dying.wait_until_up(probe)
        deadline = time.monotonic() + 60
        while dying.process.poll() is None and time.monotonic() < deadline:
            probe.image_pub.publish(image_msg(GOOD, now_stamp(probe.node.get_clock())))
            wait_for(lambda: dying.process.poll() is not None, 0.3)  # the supervisor (0.2 s timer) restarts the worker in between
        counts = dying.counters(probe)
    finally:
        probe.close()
        logs = dying.stop()
    assert dying.process.returncode == EXIT_WORKER_FAILED, logs[-3000:]
    assert counts["worker_restarts"] == WORKER_RESTART_LIMIT, counts
    assert "restarted it [1 restarts so far]" in logs and f"exiting with code {EXIT_WORKER_FAILED}" in logs, logs[-3000:]
