"""ROS 2 face of ros2_posenet: the node (``node``; managed variant ``lifecycle_node``; robot
services, /initialpose and rate cap ``robot``; console scripts ``entry``), numpy<->message
conversion (``messages``), image decoding (``image``, which needs no rclpy) and the launch
file's checks and precedence (``launch_plan``, which needs no launch). Importing this package
imports nothing.
"""
