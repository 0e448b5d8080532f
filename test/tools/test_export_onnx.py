"""export: ONNX and TorchScript with the preprocessing inside give the same poses as eager PyTorch."""
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from helpers import untrained_checkpoint
from ros2_posenet.backends import build_inference_module
from ros2_posenet.checkpoint import load_checkpoint, model_from_checkpoint
from ros2_posenet.inference import Relocalizer
from ros2_posenet.preprocess import PreprocessConfig
from ros2_posenet.tools.export import main

PRE = PreprocessConfig(resize=72, crop=64)
COV = {"position_var": [0.04, 0.09, 0.01], "rotation_var": [1e-3, 2e-3, 3e-3], "samples": 10}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "posenet.pt"
    return untrained_checkpoint(path, [3.0, -1.0, 0.25], PRE, covariance=COV)


@pytest.fixture(scope="module")
def crops():
    return np.random.default_rng(1).integers(0, 256, (3, PRE.crop, PRE.crop, 3), dtype=np.uint8)


def eager(checkpoint, crops):
    """Reference: the checkpoint's model on Preprocessor.normalize'd crops (the training path)."""
    from ros2_posenet.preprocess import Preprocessor

    model = model_from_checkpoint(load_checkpoint(checkpoint))
    batch = torch.stack([Preprocessor(PRE).normalize(c) for c in crops])
    with torch.no_grad():
        t, q = model(batch)
    q = torch.where(q[:, :1] < 0, -q, q)
    return t.numpy(), q.numpy()


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_onnx_and_torchscript_match_eager_torch(tmp_path, checkpoint, crops):
    prefix = tmp_path / "deploy" / "posenet"
    assert main([str(checkpoint), "--out-prefix", str(prefix)]) == 0
    ref_t, ref_q = eager(checkpoint, crops)
    assert np.all(ref_q[:, 0] >= 0)

    session = ort.InferenceSession(str(prefix) + ".onnx", providers=["CPUExecutionProvider"])
    (inp,) = session.get_inputs()
    assert (inp.name, inp.type, inp.shape[1:]) == ("image", "tensor(uint8)", [64, 64, 3])
    assert [o.name for o in session.get_outputs()] == ["position", "orientation"]
    t, q = session.run(None, {"image": crops})
    np.testing.assert_allclose(t, ref_t, atol=1e-4)
    np.testing.assert_allclose(q, ref_q, atol=1e-4)

    extra = {"metadata.json": ""}
    scripted = torch.jit.load(str(prefix) + ".torchscript.pt", _extra_files=extra)
    with torch.no_grad():
        t, q = scripted(torch.from_numpy(crops))
    np.testing.assert_allclose(t.numpy(), ref_t, atol=1e-4)
    np.testing.assert_allclose(q.numpy(), ref_q, atol=1e-4)

    meta = {p.key: p.value for p in onnx.load(str(prefix) + ".onnx").metadata_props}
    assert json.loads(meta["preprocess"]) == PRE.to_dict()
    assert meta["map_frame"] == "scene_map" and json.loads(meta["covariance"]) == COV
    assert json.loads(extra["metadata.json"])["preprocess"] == meta["preprocess"]


def test_fp16_onnx_export_within_half_precision_tolerance(tmp_path, checkpoint, crops):
    prefix = tmp_path / "posenet16"
    assert main([str(checkpoint), "--out-prefix", str(prefix), "--format", "onnx", "--precision", "fp16"]) == 0
    weights = onnx.load(str(prefix) + ".onnx").graph.initializer
    assert any(w.data_type == onnx.TensorProto.FLOAT16 for w in weights)
    session = ort.InferenceSession(str(prefix) + ".onnx", providers=["CPUExecutionProvider"])
    t, q = session.run(None, {"image": crops})
    assert t.dtype == np.float32
    ref_t, ref_q = eager(checkpoint, crops)
    np.testing.assert_allclose(t, ref_t, atol=2e-2)
    np.testing.assert_allclose(q, ref_q, atol=2e-2)


def test_onnxruntime_relocalizer_predicts_like_torch(checkpoint):
    image = np.random.default_rng(2).integers(0, 256, (90, 120, 3), dtype=np.uint8)
    torch_pred = Relocalizer(str(checkpoint), device="cpu", backend="torch").predict(image)
    ort_reloc = Relocalizer(str(checkpoint), device="cpu", backend="onnxruntime")
    assert ort_reloc.backend_name == "onnxruntime" and ort_reloc.map_frame == "scene_map"
    ort_pred = ort_reloc.predict(image)
    np.testing.assert_allclose(ort_pred.position, torch_pred.position, atol=1e-5)
    np.testing.assert_allclose(ort_pred.quaternion, torch_pred.quaternion, atol=1e-5)
    np.testing.assert_array_equal(ort_pred.covariance, torch_pred.covariance)


def test_export_fails_cleanly_on_bad_checkpoint(tmp_path, capsys):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"garbage")
    assert main([str(bad), "--out-prefix", str(tmp_path / "x")]) == 2
    assert "corrupt" in capsys.readouterr().err
    assert not list(tmp_path.glob("x*"))


def test_inference_module_takes_uint8_nhwc_and_leaves_model_shared(checkpoint, crops):
    model = model_from_checkpoint(load_checkpoint(checkpoint))
    module = build_inference_module(model, PRE)
    assert module.model is model
    with torch.no_grad():
        t, q = module(torch.from_numpy(crops))
    assert t.shape == (3, 3) and q.shape == (3, 4) and t.dtype == q.dtype == torch.float32
    torch.testing.assert_close(q.norm(dim=1), torch.ones(3))


def documented_recipe(image: np.ndarray, resize: int, crop: int) -> np.ndarray:
    """The resize + centre crop exactly as README and the model's `preprocessing` metadata describe it."""
    import cv2

    H, W = image.shape[:2]
    s = resize / min(H, W)
    h, w = max(resize, round(H * s)), max(resize, round(W * s))
    resized = cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA if h < H else cv2.INTER_LINEAR)
    y0, x0 = (h - crop) // 2, (w - crop) // 2
    return resized[y0 : y0 + crop, x0 : x0 + crop]


@pytest.fixture(scope="module")
def exported_session(checkpoint, tmp_path_factory):
    prefix = tmp_path_factory.mktemp("recipe") / "posenet"
    assert main([str(checkpoint), "--out-prefix", str(prefix), "--format", "onnx", "--verify-samples", "0"]) == 0
    return ort.InferenceSession(str(prefix) + ".onnx", providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("shape", [(90, 121, 3), (41, 50, 3)], ids=["shrink", "enlarge"])
def test_exported_onnx_with_documented_recipe_predicts_like_the_node(checkpoint, exported_session, shape):
    meta = exported_session.get_modelmeta().custom_metadata_map
    pre = json.loads(meta["preprocess"])
    assert "cv2.INTER_AREA if h < H else cv2.INTER_LINEAR" in meta["preprocessing"]
    assert meta["resize_interpolation"].startswith("cv2.INTER_AREA when shrinking")

    image = np.random.default_rng(5).integers(0, 256, shape, dtype=np.uint8)
    reloc = Relocalizer(str(checkpoint), device="cpu", backend="torch", warmup=False)
    crop = documented_recipe(image, pre["resize"], pre["crop"])
    np.testing.assert_array_equal(crop, reloc.crop(image))  # the recipe is the node's preprocessing, pixel for pixel
    t, q = exported_session.run(["position", "orientation"], {"image": np.ascontiguousarray(crop)[None]})
    expected = reloc.predict(image)
    np.testing.assert_allclose(t[0], expected.position, atol=1e-5)
    np.testing.assert_allclose(q[0], expected.quaternion, atol=1e-5)
