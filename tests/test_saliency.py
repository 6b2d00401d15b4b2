"""saliency: Grad-CAM and occlusion maps have the patch's shape and light the planted feature, not elsewhere."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from pcamtool.contract import Classifier
from pcamtool.errors import PcamError
from pcamtool.models import BasicBlock, create_model
from pcamtool.saliency import display_scale, grad_cam, last_conv_block, occlusion, onnx_runner

BLOB = 12
CENTRE = (42, 42)     # a blob inside the central 32x32
CORNER = (8, 70)      # a blob far outside it


class BlueDetector(nn.Module):
    """Logit = mean 'blueness' of the patch; ``centre_only`` blanks everything but the central 32x32 first."""

    def __init__(self, centre_only: bool) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())
        self.fc = nn.Linear(4, 1)
        with torch.no_grad():
            self.features[0].weight.zero_()
            self.features[0].weight[:, 2, 1, 1] = 1.0       # blue up ...
            self.features[0].weight[:, :2, 1, 1] = -0.5     # ... red and green down: grey gives 0
            self.features[0].bias.fill_(-0.1)
            self.fc.weight.fill_(10.0)
            self.fc.bias.zero_()
        mask = torch.zeros(1, 1, 96, 96)
        mask[..., 32:64, 32:64] = 1
        self.register_buffer("mask", mask if centre_only else torch.ones(1, 1, 96, 96))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x * self.mask).mean((2, 3))).squeeze(1)


def detector(centre_only: bool) -> Classifier:
    return Classifier(BlueDetector(centre_only), [0.0] * 3, [1.0] * 3).eval()


def patch(*where: tuple[int, int]) -> np.ndarray:
    img = np.full((96, 96, 3), 128, np.uint8)
    for y, x in where:
        img[y:y + BLOB, x:x + BLOB] = (25, 25, 230)
    return img


def inside(mask_shape, y: int, x: int, margin: int) -> np.ndarray:
    m = np.zeros(mask_shape, bool)
    m[max(0, y - margin):y + BLOB + margin, max(0, x - margin):x + BLOB + margin] = True
    return m


def torch_runner(net: Classifier):
    def run(images: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return torch.sigmoid(net(torch.from_numpy(images))).double().numpy()
    return run


def test_grad_cam_lights_the_planted_blob_wherever_it_is():
    net = detector(centre_only=False)
    images = np.stack([patch(CORNER), patch(CENTRE)])
    maps, probs = grad_cam(net, images, sign=np.ones(2))
    assert maps.shape == (2, 96, 96) and maps.dtype == np.float32
    assert np.allclose(maps.max((1, 2)), 1.0) and maps.min() >= 0
    for m, (y, x) in zip(maps, (CORNER, CENTRE)):
        peak = np.unravel_index(np.argmax(m), m.shape)
        assert inside(m.shape, y, x, 1)[peak], peak
        assert m[~inside(m.shape, y, x, 2)].max() < 0.02      # nothing lights up away from it
    assert np.allclose(probs, torch_runner(net)(images))


def test_a_model_that_only_looks_at_the_centre_lights_the_centre():
    images = np.stack([patch(CENTRE, CORNER)])
    cam, _ = grad_cam(detector(centre_only=True), images, sign=np.ones(1))
    occ, _ = occlusion(torch_runner(detector(centre_only=True)), images, sign=np.ones(1))
    for m in (cam[0], display_scale(occ)[0]):
        peak = np.unravel_index(np.argmax(m), m.shape)
        assert inside(m.shape, *CENTRE, 8)[peak], peak
        assert m[inside(m.shape, *CORNER, 0)].max() < 0.02   # the corner blob is invisible to it
    # the same two blobs seen by a model that looks everywhere: both light up
    cam_all, _ = grad_cam(detector(centre_only=False), images, sign=np.ones(1))
    assert cam_all[0][inside((96, 96), *CORNER, 0)].max() > 0.5


def test_occlusion_peaks_at_the_blob_and_is_a_probability_drop():
    net = detector(centre_only=False)
    images = np.stack([patch(CORNER), patch((70, 10))])
    run = torch_runner(net)
    maps, probs = occlusion(run, images, window=16, stride=8, sign=np.ones(2), space="prob")
    assert maps.shape == (2, 96, 96)
    for m, (y, x) in zip(maps, (CORNER, (70, 10))):
        peak = np.unravel_index(np.argmax(m), m.shape)
        assert inside(m.shape, y, x, 8)[peak], peak
        assert m.max() > 0.01
    # hiding part of the blob can only lower the blueness, never raise it; nor can any drop
    # exceed what the whole blob adds over a blank patch
    blank = run(patch()[None])[0]
    assert maps.min() >= -1e-7 and maps.max() <= probs.max() - blank + 1e-6
    # explaining the other class flips the sign
    neg, _ = occlusion(run, images, sign=-np.ones(2), space="prob")
    assert np.allclose(neg, -maps, atol=1e-6)
    # in log-odds (the default) the same windows matter, by the logit's own scale
    logit, _ = occlusion(run, images, sign=np.ones(2))
    assert np.array_equal(np.argmax(logit.reshape(2, -1), 1), np.argmax(maps.reshape(2, -1), 1))
    one = patch(CORNER)[None]
    hidden = one.copy()
    hidden[0, :16, 80:96] = one.reshape(-1, 3).mean(0).round()
    odds = lambda p: np.log(p / (1 - p))  # noqa: E731
    corner, _ = occlusion(run, one, window=16, stride=16, sign=np.ones(1))
    assert corner[0, 0, 95] == pytest.approx(odds(run(one)[0]) - odds(run(hidden)[0]), rel=1e-4)


def test_display_scale_keeps_a_map_with_nothing_in_it_dark():
    maps = np.zeros((2, 96, 96), np.float32)
    maps[0, 10, 10] = 0.01        # noise: far below the floor
    maps[1, 20, 20] = 2.0
    maps[1, 30, 30] = -5.0        # against the class: not shown
    shown = display_scale(maps, floor=0.1)
    assert shown[0].max() == pytest.approx(0.1) and shown[1].max() == 1.0 and shown.min() == 0.0
    assert display_scale(maps)[0].max() == 1.0      # without a floor every map is stretched to its maximum


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the TorchScript exporter, as export.py uses
def test_occlusion_through_onnx_sessions_matches_pytorch(tmp_path: Path):
    import onnx

    from pcamtool.contract import ProbabilityModel
    from pcamtool.onnx_io import INPUT, ONNX_FORMAT, OUTPUT

    net = detector(centre_only=False)
    path = tmp_path / "blue.onnx"
    x = torch.from_numpy(np.stack([patch(CORNER)] * 2))
    torch.onnx.export(ProbabilityModel(net), (x,), str(path), input_names=[INPUT], output_names=[OUTPUT],
                      opset_version=17, dynamo=False, dynamic_axes={INPUT: {0: "batch"}, OUTPUT: {0: "batch"}})
    proto = onnx.load(str(path))
    for k, v in {"format": ONNX_FORMAT, "tta_default": "8"}.items():
        proto.metadata_props.add(key=k, value=v)
    onnx.save(proto, str(path))
    images = np.stack([patch(CORNER), patch(CENTRE)])
    calls: list[int] = []
    run = onnx_runner([path], provider="cpu", batch_size=64)

    def counted(batch: np.ndarray) -> np.ndarray:
        calls.append(len(batch))
        return run(batch)

    got, p = occlusion(counted, images, batch_size=64)
    want, q = occlusion(torch_runner(net), images)
    assert np.allclose(got, want, atol=1e-5) and np.allclose(p, q, atol=1e-6)
    assert max(calls) == 64 and sum(calls) == 2 + 2 * 11 * 11     # batched: 121 windows per patch


@pytest.mark.parametrize("arch", ["plain4", "pcamnet", "simple"])
def test_last_conv_block_of_the_built_in_models(arch):
    net = Classifier(create_model(arch), [0.5] * 3, [0.2] * 3).eval()
    block = last_conv_block(net)
    if arch == "plain4":
        assert block is net.backbone.features[6]               # the 12x12 conv-BN-ReLU, post-activation
    elif arch == "simple":
        assert block is net.backbone.features[9]               # the last of the 24x24 convolutions
    else:
        assert block is [m for m in net.backbone.modules() if isinstance(m, BasicBlock)][-1]
    images = np.random.default_rng(0).integers(0, 256, (3, 96, 96, 3), dtype=np.uint8)
    maps, probs = grad_cam(net, images, batch_size=2)
    assert maps.shape == (3, 96, 96) and np.isfinite(maps).all() and 0 <= maps.min() and maps.max() <= 1
    assert all(p.grad is None for p in net.parameters())     # no gradients left behind on the model


def test_bad_inputs_are_one_line():
    net = detector(False)
    with pytest.raises(PcamError, match="uint8 images"):
        grad_cam(net, np.zeros((1, 64, 64, 3), np.uint8))
    with pytest.raises(PcamError, match="window"):
        occlusion(torch_runner(net), patch()[None], window=0)
    with pytest.raises(PcamError, match="stride"):   # windows with gaps would leave pixels unmeasured
        occlusion(torch_runner(net), patch()[None], window=8, stride=16)
    with pytest.raises(PcamError, match="sign"):
        occlusion(torch_runner(net), patch()[None], sign=np.array([0.5]))
