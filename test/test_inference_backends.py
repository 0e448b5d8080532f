"""Relocalizer backends: the same poses from every backend, clear errors for unavailable ones."""
import logging

import numpy as np
import pytest
import torch

from ros2_posenet.backends import BackendUnavailableError, onnxruntime_providers, resolve_backend
from ros2_posenet.checkpoint import save_checkpoint, save_ensemble
from ros2_posenet.inference import Relocalizer
from ros2_posenet.model import ModelConfig, PoseNet
from ros2_posenet.preprocess import PreprocessConfig

NO_CUDA = not torch.cuda.is_available()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = PoseNet(ModelConfig(backbone="resnet18", pretrained=False, hidden_dim=16))
    model.set_position_offset(torch.tensor([0.5, 1.5, -1.0]))
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "ckpt.pt", model, PreprocessConfig(resize=40, crop=32))


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(3)
    return [rng.integers(0, 256, (48, 64, 3), dtype=np.uint8) for _ in range(3)]


def test_predict_batch_matches_predict_and_forward_batch(checkpoint, images):
    reloc = Relocalizer(str(checkpoint), device="cpu")
    assert reloc.backend_name == "torch" and reloc.crop(images[0]).shape == (32, 32, 3)
    batch = reloc.predict_batch(images)
    t, q = reloc.forward_batch(torch.cat([reloc.prepare(im) for im in images]))
    for i, image in enumerate(images):
        single = reloc.predict(image)
        np.testing.assert_allclose(batch[i].position, single.position, atol=1e-5)
        np.testing.assert_allclose(batch[i].quaternion, single.quaternion, atol=1e-5)
        np.testing.assert_allclose(single.position, t[i].numpy(), atol=1e-5)
        np.testing.assert_allclose(single.quaternion, q[i].numpy(), atol=1e-5)


def test_predict_batch_marks_non_finite_outputs(checkpoint, images):
    reloc = Relocalizer(str(checkpoint), device="cpu")
    with torch.no_grad():
        reloc.model.fc_position.bias.fill_(float("nan"))
    assert reloc.predict_batch(images) == [None] * len(images)


def test_compiled_torch_matches_eager(checkpoint, images):
    eager = Relocalizer(str(checkpoint), device="cpu")
    compiled = Relocalizer(str(checkpoint), device="cpu", compile=True)
    for image in images[:2]:
        a, b = eager.predict(image), compiled.predict(image)
        np.testing.assert_allclose(b.position, a.position, atol=1e-4)
        np.testing.assert_allclose(b.quaternion, a.quaternion, atol=1e-4)


def test_onnxruntime_backend_only_takes_uint8_crops(checkpoint, images):
    reloc = Relocalizer(str(checkpoint), device="cpu", backend="onnxruntime")
    assert reloc.device.type == "cpu"
    with pytest.raises(BackendUnavailableError, match="forward_batch needs backend 'torch'"):
        reloc.forward_batch(reloc.prepare(images[0]))


def test_an_ensemble_exports_to_onnxruntime_with_the_same_poses(checkpoint, images, tmp_path):
    torch.manual_seed(1)
    other = PoseNet(ModelConfig(backbone="resnet18", pretrained=False, hidden_dim=16))
    ensemble = save_ensemble(tmp_path / "ensemble.pt", [checkpoint, save_checkpoint(
        tmp_path / "other.pt", other, PreprocessConfig(resize=40, crop=32))])
    eager = Relocalizer(str(ensemble), device="cpu").predict_batch(images)
    onnx = Relocalizer(str(ensemble), device="cpu", backend="onnxruntime").predict_batch(images)
    single = Relocalizer(str(checkpoint), device="cpu").predict_batch(images)
    for a, b, s in zip(eager, onnx, single):
        np.testing.assert_allclose(a.position, b.position, atol=1e-4)
        np.testing.assert_allclose(a.quaternion, b.quaternion, atol=1e-4)
        assert not np.allclose(a.position, s.position, atol=1e-3)  # the graph holds both networks


def test_auto_backend_is_onnxruntime_on_cpu():
    assert resolve_backend("auto", torch.device("cpu")) == "onnxruntime"
    assert resolve_backend("auto", torch.device("cuda")) == "torch"
    assert resolve_backend("tensorrt", torch.device("cpu")) == "tensorrt"


def test_fp16_falls_back_to_fp32_on_cpu_with_a_warning(checkpoint, caplog):
    with caplog.at_level(logging.WARNING, logger="ros2_posenet.backends"):
        reloc = Relocalizer(str(checkpoint), device="cpu", precision="fp16")
    assert reloc.backend_name == "torch" and not reloc.half
    assert next(reloc.model.parameters()).dtype == torch.float32
    assert "fp16 needs CUDA" in caplog.text


def test_invalid_settings_are_rejected(checkpoint):
    with pytest.raises(ValueError, match="backend must be one of"):
        Relocalizer(str(checkpoint), device="cpu", backend="tflite")
    with pytest.raises(ValueError, match="precision must be one of"):
        Relocalizer(str(checkpoint), device="cpu", precision="int8")
    with pytest.raises(ValueError, match="compile mode"):
        Relocalizer(str(checkpoint), device="cpu", compile="fastest")


@pytest.mark.skipif(not NO_CUDA, reason="checks the errors of a machine without a GPU")
def test_gpu_backends_without_gpu_give_clear_errors(checkpoint):
    with pytest.raises(BackendUnavailableError, match="'tensorrt' needs a CUDA GPU"):
        Relocalizer(str(checkpoint), device="cpu", backend="tensorrt")
    with pytest.raises(ValueError, match="CUDA is not available"):
        Relocalizer(str(checkpoint), device="cuda", backend="onnxruntime")


@pytest.mark.skipif(NO_CUDA or "CUDAExecutionProvider" in onnxruntime_providers(), reason="needs CUDA without onnxruntime-gpu")
def test_explicit_cuda_onnxruntime_without_cuda_provider_is_an_error(checkpoint):
    with pytest.raises(BackendUnavailableError, match="onnxruntime-gpu"):
        Relocalizer(str(checkpoint), device="cuda", backend="onnxruntime")


@pytest.mark.skipif(NO_CUDA, reason="needs a CUDA GPU")
def test_cuda_torch_fp16_close_to_cpu_fp32(checkpoint, images):
    cpu = Relocalizer(str(checkpoint), device="cpu")
    gpu = Relocalizer(str(checkpoint), device="cuda", precision="fp16")
    assert gpu.half and gpu.device.type == "cuda"
    a, b = cpu.predict(images[0]), gpu.predict(images[0])
    np.testing.assert_allclose(b.position, a.position, atol=2e-2)
    np.testing.assert_allclose(b.quaternion, a.quaternion, atol=2e-2)


@pytest.mark.skipif(NO_CUDA, reason="needs a CUDA GPU")
def test_cuda_graph_replay_matches_eager_and_sees_weight_changes(checkpoint, images):
    graph = Relocalizer(str(checkpoint), device="cuda")
    eager = Relocalizer(str(checkpoint), device="cuda", cuda_graph=False)
    for image in images:
        a, b = eager.predict(image), graph.predict(image)
        np.testing.assert_allclose(b.position, a.position, atol=1e-4)
        np.testing.assert_allclose(b.quaternion, a.quaternion, atol=1e-4)
    assert graph.backend._graph is not None and eager.backend._graph is None
    with torch.no_grad():
        graph.model.fc_position.bias.fill_(float("nan"))
    assert graph.predict_batch(images[:1]) == [None]
