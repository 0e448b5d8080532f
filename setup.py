"""ament_python package: `colcon build` on a robot, or `pip install -e .` in the PyPI venv."""
from glob import glob

from setuptools import find_packages, setup

PACKAGE = "ros2_posenet"

setup(
    name=PACKAGE,
    version="0.1.0",
    packages=find_packages(exclude=["test", "test.*", "bench"]),
    data_files=[
        ("share/ament_index/resource_index/packages", [f"resource/{PACKAGE}"]),
        (f"share/{PACKAGE}", ["package.xml"]),
        (f"share/{PACKAGE}/launch", glob("launch/*.launch.py")),
        (f"share/{PACKAGE}/config", glob("config/*.yaml") + glob("config/*.rviz")),
    ],
    install_requires=["setuptools"],
    zip_safe=True,
    maintainer="ros2_posenet maintainers",
    maintainer_email="maintainers@ros2-posenet.dev",
    description="PoseNet camera relocalisation for ROS 2",
    license="Apache-2.0",
    entry_points={
        "console_scripts": [
            "posenet_node = ros2_posenet.ros.entry:posenet_node",
            "posenet_lifecycle_node = ros2_posenet.ros.entry:posenet_lifecycle_node",
            "posenet-train = ros2_posenet.train:main",
            "posenet-evaluate = ros2_posenet.evaluate:main",
            "posenet-synth-scene = ros2_posenet.data.synthetic:main",
            "posenet-relocalize-bag = ros2_posenet.tools.relocalize_bag:main",
            "posenet-export = ros2_posenet.tools.export:main",
            "posenet-build-map = ros2_posenet.tools.build_map:main",
            "posenet-demo = ros2_posenet.tools.demo:main",
            "posenet-make-dataset = ros2_posenet.tools.make_dataset:main",
            # The names before the posenet- prefix, for one release: they print a deprecation line first.
            "train = ros2_posenet.tools.old_names:train",
            "evaluate = ros2_posenet.tools.old_names:evaluate",
            "synth-scene = ros2_posenet.tools.old_names:synth_scene",
            "relocalize-bag = ros2_posenet.tools.old_names:relocalize_bag",
            "export = ros2_posenet.tools.old_names:export",
            "build-map = ros2_posenet.tools.old_names:build_map",
            "demo = ros2_posenet.tools.old_names:demo",
        ],
    },
)
