"""``posenet-make-dataset``: a robot's own recording (rosbag2) -> a posed dataset in the 7-Scenes layout.

* :mod:`.tf_buffer`: ``/tf`` + ``/tf_static`` and pose topics as time series, looked up at image stamps
  (interpolated, tolerance on both sides), ROS-free;
* :mod:`.selection`: near-duplicate, blur and cap selection, and the time-block train/test split, ROS-free;
* :mod:`.bag_source`: what is read from the bag (images, CameraInfo, depth incl. compressedDepth, poses);
* :mod:`.image_source`: the same from a plain video or image folder and a calibration YAML (no poses: SfM);
* :mod:`.writer`: the staged 7-Scenes output with ``dataset.yaml``;
* :mod:`.sfm`: poses from pycolmap when the bag has none, brought to metric scale and gravity.

The command line is :mod:`ros2_posenet.tools.make_dataset`.
"""
