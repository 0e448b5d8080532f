"""Launch posenet_node (PoseNet camera relocalisation) with config/posenet.yaml, optionally RViz.

    ros2 launch ros2_posenet relocalize.launch.py checkpoint:=/path/model.pt image_topic:=/camera/image_raw

Launch arguments override the params file; every other parameter comes from
``params_file`` (default: the installed config/posenet.yaml).
"""
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument
from launch.conditions import IfCondition
from launch.substitutions import LaunchConfiguration, PathJoinSubstitution
from launch_ros.actions import Node
from launch_ros.parameter_descriptions import ParameterValue
from launch_ros.substitutions import FindPackageShare


def generate_launch_description() -> LaunchDescription:
    config_dir = PathJoinSubstitution([FindPackageShare("ros2_posenet"), "config"])
    arguments = [
        DeclareLaunchArgument("checkpoint", description="PoseNet checkpoint (.pt) written by `train`"),
        DeclareLaunchArgument("image_topic", default_value="/camera/image_raw", description="camera image topic"),
        DeclareLaunchArgument(
            "compressed", default_value="false", choices=["true", "false"], description="subscribe to sensor_msgs/CompressedImage"
        ),
        DeclareLaunchArgument(
            "params_file", default_value=PathJoinSubstitution([config_dir, "posenet.yaml"]), description="posenet_node parameters"
        ),
        DeclareLaunchArgument(
            "tf_mode",
            default_value="map_to_camera",
            choices=["map_to_camera", "map_to_odom", "none"],
            description="map_to_camera: standalone camera; map_to_odom: robot (REP-105); none: robot_localization publishes map->odom",
        ),
        DeclareLaunchArgument("use_sim_time", default_value="false", choices=["true", "false"], description="use /clock (bag replay)"),
        DeclareLaunchArgument("rviz", default_value="false", choices=["true", "false"], description="start RViz with config/posenet.rviz"),
    ]
    posenet = Node(
        package="ros2_posenet",
        executable="posenet_node",
        name="posenet_node",
        output="screen",
        emulate_tty=True,
        parameters=[
            LaunchConfiguration("params_file"),
            {
                "checkpoint": LaunchConfiguration("checkpoint"),
                "image_topic": LaunchConfiguration("image_topic"),
                "compressed": ParameterValue(LaunchConfiguration("compressed"), value_type=bool),
                "tf_mode": LaunchConfiguration("tf_mode"),
                "use_sim_time": ParameterValue(LaunchConfiguration("use_sim_time"), value_type=bool),
            },
        ],
    )
    rviz = Node(
        package="rviz2",
        executable="rviz2",
        name="rviz2",
        arguments=["-d", PathJoinSubstitution([config_dir, "posenet.rviz"])],
        parameters=[{"use_sim_time": ParameterValue(LaunchConfiguration("use_sim_time"), value_type=bool)}],
        condition=IfCondition(LaunchConfiguration("rviz")),
    )
    return LaunchDescription([*arguments, posenet, rviz])
