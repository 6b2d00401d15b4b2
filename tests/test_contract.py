"""The preprocessing contract (pcamtool.contract): uint8 -> float, normalization, Classifier, ProbabilityModel, ONNX export."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pcamtool.errors import PcamError
from pcamtool.models import create_model
from pcamtool.contract import Classifier, Normalize, ProbabilityModel, to_float01

MEAN, STD = [0.70, 0.54, 0.69], [0.24, 0.28, 0.21]


def images(n: int = 4, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 96, 96, 3), dtype=torch.uint8, generator=g)


def test_to_float01_values_layout_and_range():
    x = images()
    f = to_float01(x)
    assert f.shape == (4, 3, 96, 96) and f.dtype == torch.float32 and f.is_contiguous()
    assert torch.equal(f, x.permute(0, 3, 1, 2).double().div(255).float())
    assert f.min() >= 0 and f.max() <= 1
    cl = to_float01(x, memory_format=torch.channels_last)
    assert cl.is_contiguous(memory_format=torch.channels_last) and torch.equal(cl, f)
    # an NHWC batch that is itself a strided view (e.g. NCHW storage) converts the same
    strided = x.permute(0, 3, 1, 2).contiguous().permute(0, 2, 3, 1)
    assert torch.equal(to_float01(strided), f)
    assert to_float01(torch.full((1, 96, 96, 3), 255, dtype=torch.uint8)).eq(1).all()


@pytest.mark.parametrize("bad", [torch.zeros(2, 96, 96, 3), torch.zeros(96, 96, 3, dtype=torch.uint8),
                                 torch.zeros(2, 3, 96, 96, dtype=torch.uint8)])
def test_to_float01_rejects_what_is_not_uint8_nhwc(bad):
    with pytest.raises(PcamError, match="expected"):
        to_float01(bad)


def test_normalize_matches_the_formula_and_keeps_dtype():
    norm = Normalize(MEAN, STD)
    x = torch.rand(2, 3, 8, 8)
    want = (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    assert torch.allclose(norm(x), want, atol=1e-6)
    assert norm(x.half()).dtype == torch.float16
    assert set(norm.state_dict()) == {"mean", "std"}
    with pytest.raises(PcamError, match="3 values"):
        Normalize([0.5, 0.5], [1, 1])
    with pytest.raises(PcamError, match="positive"):
        Normalize(MEAN, [0.2, 0.0, 0.2])


def test_pcamnet_uint8_and_float_paths_agree():
    torch.manual_seed(0)
    net = Classifier(create_model("pcamnet", width=8), np.array(MEAN), torch.tensor(STD)).eval()
    x = images(3)
    out = net(x)
    assert out.shape == (3,) and out.dtype == torch.float32
    assert torch.equal(out, net.forward01(to_float01(x)))
    assert {"normalize.mean", "normalize.std"} <= set(net.state_dict())


def test_onnx_export_with_uint8_input_matches_pytorch(tmp_path):
    """The exported graph takes uint8 NHWC with a dynamic batch and gives PyTorch's numbers."""
    import warnings

    import onnx
    import onnxruntime as ort

    torch.manual_seed(0)
    net = Classifier(create_model("pcamnet", width=8), MEAN, STD).eval()
    with torch.no_grad():  # non-trivial BN statistics, so normalization and BN folding are exercised
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
    path = tmp_path / "net.onnx"
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (images(2),), str(path), input_names=["images"], output_names=["logits"],
                          opset_version=17, dynamo=False,
                          dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}})
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = images(5, seed=1)
    got = sess.run(None, {"images": x.numpy()})[0]
    with torch.no_grad():
        want = net(x).numpy()
    assert got.shape == (5,) and np.abs(got - want).max() <= 1e-4


# ------------------------------------------------------- pinned against NumPy


def test_classifier_is_the_backbone_of_normalized_floats_computed_in_numpy():
    """uint8 NHWC -> /255 -> (x - mean) / std -> backbone, each step redone in float64 NumPy."""
    seen = []

    class Probe(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            seen.append(x.detach().double().numpy())
            return x.sum((1, 2, 3))

    net = Classifier(Probe(), MEAN, STD)
    x = images(2, seed=2)
    out = net(x)
    want = (x.numpy().astype(np.float64) / 255.0 - np.array(MEAN)) / np.array(STD)
    want = want.transpose(0, 3, 1, 2)
    assert seen[0].shape == (2, 3, 96, 96)
    np.testing.assert_allclose(seen[0], want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out.double().numpy(), want.sum((1, 2, 3)), rtol=1e-4)
    out01 = net.forward01(to_float01(x))
    assert torch.equal(out01, out)


def test_probability_model_is_the_sigmoid_of_the_logits_in_float32():
    torch.manual_seed(0)
    net = Classifier(create_model("pcamnet", width=8), MEAN, STD).eval()
    x = images(3, seed=3)
    with torch.no_grad():
        logits = net(x).double().numpy()
        p = ProbabilityModel(net).eval()(x)
    assert p.shape == (3,) and p.dtype == torch.float32
    np.testing.assert_allclose(p.double().numpy(), 1 / (1 + np.exp(-logits)), rtol=1e-6, atol=1e-7)
    assert ProbabilityModel(net).dtype == torch.float32


def test_probability_model_in_another_dtype_computes_in_it_and_returns_float32():
    torch.manual_seed(0)
    net = Classifier(create_model("pcamnet", width=8), MEAN, STD).eval()
    x = images(2, seed=4)
    seen = []
    hook = net.backbone.register_forward_pre_hook(lambda m, a: seen.append(a[0].dtype))
    with torch.no_grad():
        ref = torch.sigmoid(net(x))
        p = ProbabilityModel(net, torch.bfloat16).eval()(x)
    hook.remove()
    assert seen[-1] == torch.bfloat16 and p.dtype == torch.float32
    assert torch.allclose(p, ref, atol=0.03)
    # the caller's network is left in float32 (the reference an fp16/bf16 export is checked against)
    assert all(q.dtype == torch.float32 for q in net.parameters())
    assert ProbabilityModel(net).net is net                 # nothing to convert: no copy


def test_probability_model_of_a_network_without_parameters():
    class Mean(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.mean((1, 2, 3))

    net = Classifier(Mean(), MEAN, STD)
    assert list(net.parameters()) == []
    for dt in (torch.float32, torch.bfloat16):
        pm = ProbabilityModel(net, dt)
        assert pm.net is net
        p = pm(images(2))
        assert p.shape == (2,) and p.dtype == torch.float32 and bool(((p > 0) & (p < 1)).all())


def test_to_float01_messages_name_the_shape():
    with pytest.raises(PcamError, match=r"expected uint8 images \(B, 96, 96, 3\), got torch.float32 with shape \(2, 96, 96, 3\)"):
        to_float01(torch.zeros(2, 96, 96, 3))
    with pytest.raises(PcamError, match=r"expected 3 channels last \(B, 96, 96, 3\), got shape \(2, 96, 96, 4\)"):
        to_float01(torch.zeros(2, 96, 96, 4, dtype=torch.uint8))


def test_normalize_messages_name_the_values():
    with pytest.raises(PcamError, match=r"mean and std need 3 values \(one per channel\), got \(2,\) and \(3,\)"):
        Normalize([0.5, 0.5], STD)
    with pytest.raises(PcamError, match=r"got \(3,\) and \(4,\)"):
        Normalize(MEAN, STD + [0.1])
    with pytest.raises(PcamError, match=r"std must be positive and mean finite, got mean \[0.5, 0.5, 0.5\], std \[0.5, -0.5, 0.5\]"):
        Normalize([0.5] * 3, [0.5, -0.5, 0.5])
    with pytest.raises(PcamError, match="mean finite"):
        Normalize([0.5, float("nan"), 0.5], [0.5] * 3)
    with pytest.raises(PcamError, match="mean finite"):
        Normalize([0.5, float("inf"), 0.5], [0.5] * 3)
    n = Normalize(np.array(MEAN), torch.tensor(STD, dtype=torch.float64))
    assert n.mean.dtype == torch.float32 and n.std.dtype == torch.float32
    assert n.mean.tolist() == pytest.approx(MEAN) and n.std.tolist() == pytest.approx(STD)
