"""ROS 2 face of ros2_posenet: the node (``node``), numpy<->message conversion (``messages``)
and image decoding (``image``, which needs no rclpy). Importing this package imports nothing.
"""
