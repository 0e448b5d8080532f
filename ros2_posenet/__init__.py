"""ros2_posenet: camera relocalisation with PoseNet (Kendall & Cipolla, CVPR 2017) for ROS 2.

The ROS-free core (geometry, model, losses, data, training, evaluation, inference)
imports without rclpy; only :mod:`ros2_posenet.ros` needs ROS.
"""
__version__ = "0.1.0"
