#!/usr/bin/env bash
# Generate and install the ROS 2 message package tf2_msgs (TFMessage only) into a
# Python venv. tf2_msgs is not on PyPI, but the Kilted ROS 2 wheels are, and they
# ship the rosidl generators and the cmake configs needed to build it ourselves.
#
# Usage: scripts/build_tf2_msgs.sh [VENV_DIR]   (default: .venv at the repo root)
# Needs: the venv with requirements.txt installed, cmake >= 3.20, a C/C++ compiler, make.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${1:-$REPO/.venv}"
VENV="$(cd "$VENV" 2>/dev/null && pwd)" || { echo "build_tf2_msgs: no venv at '${1:-$REPO/.venv}'" >&2; exit 1; }
PY="$VENV/bin/python"

log() { echo "[build_tf2_msgs] $*"; }
die() { echo "[build_tf2_msgs] ERROR: $*" >&2; exit 1; }
trap 'echo "[build_tf2_msgs] ERROR: failed at line $LINENO: $BASH_COMMAND" >&2' ERR

[ -x "$PY" ] || die "$PY not found: create the venv and install requirements.txt first"
# Import the compiled type support too, not just the .py: a bare import also works
# with a half-installed package.
CHECK='from tf2_msgs.msg import TFMessage; TFMessage.__class__.__import_type_support__()'
if "$PY" -c "$CHECK" 2>/dev/null; then
  log "tf2_msgs already installed in $VENV - nothing to do"
  exit 0
fi

"$PY" -c 'import rclpy, geometry_msgs.msg' 2>/dev/null \
  || die "rclpy/geometry_msgs missing in $VENV: pip install -r $REPO/requirements.txt first"
for tool in cmake make c++; do
  command -v "$tool" >/dev/null || die "'$tool' not found (apt-get install cmake build-essential)"
done

WORK="$(mktemp -d -t tf2_msgs.XXXXXX)"
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$WORK/src/msg" "$WORK/build"

log "installing the rosidl/ament generator wheels (requirements-build-msgs.txt)"
"$PY" -m pip install --disable-pip-version-check -r "$REPO/requirements-build-msgs.txt" >"$WORK/pip.log" 2>&1 \
  || { tail -40 "$WORK/pip.log" >&2; die "pip install -r requirements-build-msgs.txt failed (log above)"; }

# The wheels were built against /opt/python/cp311-cp311 (manylinux); their exported
# generator_py targets hard-code its Python/numpy include dirs, which do not exist here.
# Point them at this venv's. Rewriting in place is idempotent (the old path goes away).
PY_INC="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')"
NP_INC="$("$PY" -c 'import numpy; print(numpy.get_include())')"
mapfile -t EXPORTS < <(grep -rlI --include='*.cmake' '/opt/python/cp3' "$VENV/share" "$VENV/lib/cmake" 2>/dev/null || true)
if [ "${#EXPORTS[@]}" -gt 0 ]; then
  log "rewriting the wheel builder's include paths in ${#EXPORTS[@]} cmake export files"
  sed -i -E \
    -e "s#/opt/python/cp3[0-9]+-cp3[0-9]+/lib/python3\.[0-9]+/site-packages/numpy/[^;\"]*include#$NP_INC#g" \
    -e "s#/opt/python/cp3[0-9]+-cp3[0-9]+/include/python3\.[0-9]+#$PY_INC#g" \
    "${EXPORTS[@]}"
fi

# Same interface as upstream tf2_msgs/msg/TFMessage.msg, so it interoperates on the wire.
echo 'geometry_msgs/TransformStamped[] transforms' > "$WORK/src/msg/TFMessage.msg"
cat > "$WORK/src/package.xml" <<'EOF'
<?xml version="1.0"?>
<package format="3">
  <name>tf2_msgs</name>
  <version>0.0.0</version>
  <description>tf2_msgs/TFMessage, generated locally (not on PyPI).</description>
  <maintainer email="none@example.com">ros2_posenet</maintainer>
  <license>BSD-3-Clause</license>
  <buildtool_depend>ament_cmake</buildtool_depend>
  <buildtool_depend>rosidl_default_generators</buildtool_depend>
  <depend>geometry_msgs</depend>
  <exec_depend>rosidl_default_runtime</exec_depend>
  <member_of_group>rosidl_interface_packages</member_of_group>
  <export><build_type>ament_cmake</build_type></export>
</package>
EOF
cat > "$WORK/src/CMakeLists.txt" <<'EOF'
cmake_minimum_required(VERSION 3.20)
project(tf2_msgs)
find_package(ament_cmake REQUIRED)
find_package(rosidl_default_generators REQUIRED)
find_package(geometry_msgs REQUIRED)
rosidl_generate_interfaces(${PROJECT_NAME} "msg/TFMessage.msg" DEPENDENCIES geometry_msgs)
ament_package()
EOF

# The wheels put their ament prefixes (share/<pkg>/cmake, share/ament_index) and libs
# straight into the venv root, so the venv is both CMAKE_PREFIX_PATH and install prefix:
# the libs land in $VENV/lib, which the wheels' loader hook (ros_wheels_bootstrapper.pth)
# already puts on LD_LIBRARY_PATH, and the Python package in the venv's site-packages.
[ -d "$VENV/share/ament_cmake/cmake" ] || die "ament_cmake not found under $VENV/share after pip install"
log "configuring (cmake $(cmake --version | sed -n '1s/.* //p')) in $WORK"
cmake -S "$WORK/src" -B "$WORK/build" -G "Unix Makefiles" \
  -DCMAKE_BUILD_TYPE=Release \
  -DCMAKE_INSTALL_PREFIX="$VENV" \
  -DCMAKE_PREFIX_PATH="$VENV" \
  -DPython3_EXECUTABLE="$PY" \
  -DPython3_FIND_VIRTUALENV=ONLY \
  -DBUILD_TESTING=OFF >"$WORK/cmake.log" 2>&1 \
  || { tail -40 "$WORK/cmake.log" >&2; die "cmake configure failed (log above)"; }
log "building and installing into $VENV"
make -C "$WORK/build" -j"$(nproc)" install >"$WORK/make.log" 2>&1 \
  || { tail -40 "$WORK/make.log" >&2; die "build failed (log above)"; }

log "verifying: TFMessage round trip on /tf through rclpy"
ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST "$PY" - <<'EOF' || die "verification failed: tf2_msgs installed but not usable"
import time
import rclpy
from geometry_msgs.msg import TransformStamped
from tf2_msgs.msg import TFMessage

rclpy.init()
try:
    node = rclpy.create_node('build_tf2_msgs_check')
    got = []
    node.create_subscription(
        TFMessage, '/tf',
        lambda m: got.extend(t for t in m.transforms if t.child_frame_id == 'build_tf2_msgs_check'), 10)
    pub = node.create_publisher(TFMessage, '/tf', 10)
    t = TransformStamped()
    t.header.frame_id, t.child_frame_id = 'map', 'build_tf2_msgs_check'
    t.transform.translation.x, t.transform.rotation.w = 1.5, 1.0
    deadline = time.monotonic() + 10.0
    while not got and time.monotonic() < deadline:
        pub.publish(TFMessage(transforms=[t]))
        rclpy.spin_once(node, timeout_sec=0.2)
    assert got and got[0].transform.translation.x == 1.5, 'no TFMessage received on /tf within 10 s'
    node.destroy_node()
finally:
    rclpy.shutdown()
print('[build_tf2_msgs] OK: published and received a TFMessage on /tf')
EOF
"$PY" -c "$CHECK" || die "tf2_msgs not importable in a fresh interpreter"
log "done: tf2_msgs installed in $VENV"
