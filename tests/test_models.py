"""The model zoo: shapes, the factory's errors, and rebuilding from recorded arguments."""
from __future__ import annotations

import json

import pytest
import torch

from pcamtool.tta import dihedral
from pcamtool.errors import ModelError, PcamError
from pcamtool.models import DEFAULT_MODEL, CentrePool, create_model, list_models, model_args

# small variants keep the file fast on 2 cores; the defaults are checked once below
SMALL = {"pcamnet": {"width": 8}, "simple": {"width": 8, "hidden": 16}, "plain4": {"width": 8}}


def test_registry_lists_every_model_with_a_description():
    models = list_models()
    assert DEFAULT_MODEL == "plain4" and set(models) == {"pcamnet", "simple", "plain4"}
    assert all(isinstance(v, str) and v for v in models.values())


@pytest.mark.parametrize("name", sorted(list_models()))
def test_logits_shape_and_dtype(name):
    torch.manual_seed(0)
    net = create_model(name, **SMALL[name])
    x = torch.randn(3, 3, 96, 96)
    for train in (True, False):
        net.train(train)
        out = net(x)
        assert out.shape == (3,) and out.dtype == torch.float32 and torch.isfinite(out).all()
    out.sum().backward() if out.requires_grad else None
    single = net.eval()(x[:1])
    assert single.shape == (1,)


@pytest.mark.parametrize("name", sorted(list_models()))
def test_default_arguments_build_and_backprop(name):
    torch.manual_seed(0)
    net = create_model(name)
    loss = net(torch.randn(2, 3, 96, 96)).square().mean()
    loss.backward()
    assert all(p.grad is not None for p in net.parameters() if p.requires_grad)


def test_unknown_model_lists_the_known_ones():
    with pytest.raises(ModelError, match=r"unknown model 'resnet9000' \(known: pcamnet, plain4, simple\)"):
        create_model("resnet9000")
    assert issubclass(ModelError, PcamError)


def test_bad_arguments_are_model_errors():
    with pytest.raises(ModelError, match="takes no argument.*depth.*it takes: width"):
        create_model("pcamnet", depth=3)
    with pytest.raises(ModelError, match="width must be a positive integer"):
        create_model("pcamnet", width=0)
    with pytest.raises(ModelError, match="dropout must be in"):
        create_model("simple", dropout=1.5)
    with pytest.raises(ModelError, match="depths"):
        create_model("pcamnet", depths=[1, 0])
    with pytest.raises(ModelError, match="blocks must be an integer from 1 to 6"):
        create_model("plain4", blocks=7)
    with pytest.raises(ModelError, match="full_res_stem must be a non-negative integer"):
        create_model("pcamnet", full_res_stem=-1)


def test_full_res_stem_adds_a_full_resolution_layer():
    net = create_model("pcamnet", width=8, full_res_stem=4)
    first = net.stem[0][0]
    assert first.stride == (1, 1) and first.out_channels == 4
    assert net(torch.randn(2, 3, 96, 96)).shape == (2,)


@pytest.mark.parametrize("name", sorted(list_models()))
def test_recorded_arguments_rebuild_the_same_model(name):
    net = create_model(name, **SMALL[name])
    args = model_args(net)
    assert args["name"] == name and set(SMALL[name]) <= set(args["kwargs"])
    # every default is recorded, and the record survives JSON (checkpoints, ONNX metadata)
    again = json.loads(json.dumps(args))
    assert again == args
    rebuilt = create_model(again["name"], **again["kwargs"])
    sd, sd2 = net.state_dict(), rebuilt.state_dict()
    assert list(sd) == list(sd2) and all(sd[k].shape == sd2[k].shape for k in sd)
    rebuilt.load_state_dict(sd)
    x = torch.randn(2, 3, 96, 96)
    assert torch.equal(net.eval()(x), rebuilt.eval()(x))


def test_pcamnet_arguments_change_the_network():
    a = create_model("pcamnet", width=8, depths=[1, 1, 1])
    b = create_model("pcamnet", width=8, depths=[2, 1, 1])
    assert len(b.state_dict()) > len(a.state_dict())
    assert model_args(b)["kwargs"]["depths"] == [2, 1, 1]
    gap = create_model("pcamnet", width=8, centre_pool=False)
    assert gap.fc.in_features * 2 == a.fc.in_features


def test_model_args_of_a_foreign_module():
    with pytest.raises(ModelError, match="not built by create_model"):
        model_args(torch.nn.Linear(2, 1))


def test_centre_pool_sees_the_centre_and_is_dihedral_invariant():
    pool = CentrePool()
    centre = torch.zeros(1, 1, 6, 6)
    centre[..., 2:4, 2:4] = 1.0
    edge = torch.zeros(1, 1, 6, 6)
    edge[..., 0, 0:4] = 1.0
    c, e = pool(centre), pool(edge)
    assert torch.allclose(c[:, 0], e[:, 0])          # same global mean...
    assert c[0, 1] == 1.0 and e[0, 1] == 0.0          # ...but only one is in the centre
    x = torch.randn(2, 4, 6, 6)
    for k in range(8):
        assert torch.allclose(pool(dihedral(x, k)), pool(x), atol=1e-6)
