"""The model zoo: shapes, the factory's errors, and rebuilding from resolved arguments."""
from __future__ import annotations

import inspect
import json

import pytest
import torch

from pcamtool.tta import dihedral
from pcamtool.errors import ModelError, PcamError
from pcamtool import models
from pcamtool.models import DEFAULT_MODEL, CentrePool, PlainCNN, create_model, resolve_model_args

# small variants keep the file fast on 2 cores; the defaults are checked once below
SMALL = {"pcamnet": {"width": 8}, "simple": {"width": 8, "hidden": 16}, "plain4": {"width": 8}}
# every model of the zoo (test_unknown_model_lists_the_known_ones fails when one is added)
NAMES = sorted(SMALL)


@pytest.mark.parametrize("name", NAMES)
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


@pytest.mark.parametrize("name", NAMES)
def test_default_arguments_build_and_backprop(name):
    torch.manual_seed(0)
    net = create_model(name)
    loss = net(torch.randn(2, 3, 96, 96)).square().mean()
    loss.backward()
    assert all(p.grad is not None for p in net.parameters() if p.requires_grad)


def test_unknown_model_lists_the_known_ones():
    assert DEFAULT_MODEL in NAMES
    for build in (lambda: create_model("resnet9000"), lambda: resolve_model_args("resnet9000", {})):
        with pytest.raises(ModelError, match=r"unknown model 'resnet9000' \(known: pcamnet, plain4, simple\)$"):
            build()
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


def same_network(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    """Same layers and shapes, and with ``a``'s weights ``b`` computes what ``a`` does."""
    sd, sd2 = a.state_dict(), b.state_dict()
    if list(sd) != list(sd2) or any(sd[k].shape != sd2[k].shape for k in sd):
        return False
    b.load_state_dict(sd)
    x = torch.randn(2, 3, 96, 96)
    return torch.equal(a.eval()(x), b.eval()(x))


@pytest.mark.parametrize("name", NAMES)
def test_resolved_arguments_rebuild_the_same_model(name):
    resolved = resolve_model_args(name, SMALL[name])
    # every argument of the factory, the given ones kept, the rest at their defaults
    params = inspect.signature(models._REGISTRY[name]).parameters
    assert list(resolved) == list(params)
    for key, p in params.items():
        expected = SMALL[name].get(key, p.default)
        assert resolved[key] == (list(expected) if isinstance(expected, tuple) else expected)
    # the record survives JSON (checkpoints, ONNX metadata)
    again = json.loads(json.dumps(resolved))
    assert again == resolved
    assert same_network(create_model(name, **SMALL[name]), create_model(name, **again))


def test_saved_arguments_outlive_a_changed_default(monkeypatch):
    saved = json.loads(json.dumps(resolve_model_args("plain4", {"blocks": 2})))
    original = create_model("plain4", **saved)
    # a later release changes plain4's default width (and dropout) ...
    defaults = dict(zip(("width", "blocks", "dropout", "centre_pool"), PlainCNN.__init__.__defaults__))
    monkeypatch.setattr(PlainCNN.__init__, "__defaults__", (16, defaults["blocks"], 0.5, defaults["centre_pool"]))
    assert resolve_model_args("plain4", {"blocks": 2})["width"] == 16
    assert not same_network(original, create_model("plain4", blocks=2))  # the user's kwargs alone no longer do
    # ... yet the saved arguments rebuild the network exactly
    rebuilt = create_model("plain4", **saved)
    assert rebuilt.features[0][0].out_channels == defaults["width"] and rebuilt.dropout.p == defaults["dropout"]
    assert same_network(original, rebuilt)


def test_resolve_rejects_in_one_line_naming_the_valid_arguments():
    with pytest.raises(ModelError, match=r"^model 'plain4' takes no argument\(s\) depths, widht "
                                         r"\(it takes: width, blocks, dropout, centre_pool\)$"):
        resolve_model_args("plain4", {"widht": 3, "depths": [1]})
    with pytest.raises(ModelError, match="centre_pool must be true or false, got 'False'"):
        resolve_model_args("plain4", {"centre_pool": "False"})  # --model-arg centre_pool=False
    with pytest.raises(ModelError, match="arguments must be a mapping"):
        resolve_model_args("plain4", [("width", 8)])  # type: ignore[arg-type]


def test_pcamnet_arguments_change_the_network():
    a = create_model("pcamnet", width=8, depths=[1, 1, 1])
    b = create_model("pcamnet", width=8, depths=(2, 1, 1))
    assert len(b.state_dict()) > len(a.state_dict())
    assert resolve_model_args("pcamnet", {"depths": (2, 1, 1)})["depths"] == [2, 1, 1]
    gap = create_model("pcamnet", width=8, centre_pool=False)
    assert gap.fc.in_features * 2 == a.fc.in_features


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


# ------------------------------------------------ timm is an extra: its absence is one line

_WITHOUT_TIMM = (
    "import sys\n"
    "sys.modules['timm'] = None; sys.modules['torchvision'] = None  # as if not installed (a no-op where absent)\n"
    "from pcamtool.cli import main\n"
    "sys.argv = ['pcamtool'] + sys.argv[1:]\n"
    "main()\n")


def _pcamtool_without_timm(*args: str, cwd) -> "subprocess.CompletedProcess[str]":
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    return subprocess.run([sys.executable, "-c", _WITHOUT_TIMM, *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300, env={**os.environ, "PYTHONPATH": str(root)})


@pytest.mark.slow
def test_timm_arch_without_timm_is_one_line_naming_the_extra(tmp_path):
    """train and cv of --arch timm:NAME without timm/torchvision: one line naming pcamtool[timm], exit 1.

    Runs where timm is installed (absence simulated) and in CI's torch-2.13 venv (really absent).
    """
    from helpers import write_kaggle

    from pcamtool import pack

    write_kaggle(tmp_path, n=20)
    store = pack(tmp_path / "train", progress=False).path
    common = ["--epochs", "1", "--max-train", "8", "--batch-size", "8", "--device", "cpu", "--threads", "1"]
    for cmd in (["train", str(store), "--arch", "timm:resnet18", "-o", str(tmp_path / "run")] + common,
                ["cv", str(store), "--arch", "timm:resnet18", "--folds", "2", "-o", str(tmp_path / "cv")] + common):
        r = _pcamtool_without_timm("-q", *cmd, cwd=tmp_path)
        assert r.returncode == 1, (cmd[0], r.stdout, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in r.stderr, (cmd[0], r.stderr)
        assert "timm:resnet18 needs timm and torchvision" in lines[0] and "pip install 'pcamtool[timm]'" in lines[0]
    # everything else still works without timm: a built-in CNN trains
    r = _pcamtool_without_timm("-q", "train", str(store), "--arch", "plain4", "--model-arg", "width=4",
                               "-o", str(tmp_path / "plain"), *common, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "plain" / "best.pt").is_file()


def test_models_imports_no_timm_and_one_prefix():
    import subprocess
    import sys

    code = ("import sys, pcamtool.models as m, pcamtool.zoo_timm as z, pcamtool.jsonutil as j\n"
            "import pcamtool.constants as c\n"
            "assert m.TIMM_PREFIX is z.PREFIX is c.TIMM_PREFIX == 'timm:'\n"
            "assert m.jsonable is j.jsonable and z.jsonable is j.jsonable\n"
            "assert 'timm' not in sys.modules and 'torchvision' not in sys.modules\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert models.jsonable({"a": (1, (2, 3))}) == {"a": [1, [2, 3]]}


def test_transfer_options_name_what_needs_timm():
    assert models.transfer_kwargs("plain4", {"width": 8}, None, 96) == {"width": 8}
    with pytest.raises(ModelError, match=r"^--img-size needs a timm network \(--arch timm:NAME\), not 'plain4'$"):
        models.transfer_kwargs("plain4", {}, None, 128)
    with pytest.raises(ModelError, match=r"^--pretrained and --img-size need a timm network"):
        models.transfer_kwargs("pcamnet", {}, "hub", 128)
