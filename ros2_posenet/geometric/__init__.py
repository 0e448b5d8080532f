"""The geometric stage: local features matched to a map of the training images' 3D points, PnP-RANSAC.

The regressor's pose is the prior; this stage makes it precise and says when it is wrong.

* :mod:`.features` — OpenCV SIFT/ORB detection and matching.
* :mod:`.retrieval` — global descriptors (which keyframes look like a query).
* :mod:`.scene_map` — :class:`SceneMap` (keyframes, features, 3D points; one ``.npz``) and its builder.
* :mod:`.triangulation` — depth-free map points from keyframes with known poses.
* :mod:`.map_builder` — a dataset's scene map, covariance calibration (the library behind ``build-map``).
* :mod:`.refiner` — :class:`Refiner`: prior → keyframes → matches → PnP-RANSAC → pose + covariance or fallback.
* :mod:`.matching` — guided matching within a pixel window of projected map points (grid index).
* :mod:`.refiner_process` — :class:`RefinerProcess`: the refiner in a niced child process (the node's).
* :mod:`.settings` — the strict dict round trip of the stage's settings.
"""
