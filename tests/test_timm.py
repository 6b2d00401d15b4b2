"""timm networks in the zoo (local weights, errors, export parity) and the fine-tuning recipe."""
from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

# the `timm` extra: CI's venv beside a user's torch (no timm) deselects these with -m "not timm"
pytestmark = pytest.mark.timm
timm = pytest.importorskip("timm", reason="timm is an optional extra (pip install 'pcamtool[timm]')")

from pcamtool.contract import Classifier, ProbabilityModel  # noqa: E402
from pcamtool.errors import ModelError  # noqa: E402
from pcamtool.models import (HUB, create_model, model_normalization, resolve_model_args,  # noqa: E402
                             transfer_kwargs, without_pretrained)
from pcamtool.train.finetune import (PRETRAINED_RECIPE, SCRATCH_RECIPE, Recipe, apply_epoch,  # noqa: E402
                                     default_recipe, param_groups, set_backbone_frozen)
from pcamtool.zoo_timm import TimmBackbone  # noqa: E402

NAME = "timm:resnet10t"  # 4.9M parameters, a few ms per 96x96 image on a CPU
ROOT = Path(__file__).resolve().parents[1]
MEAN, STD = [0.70, 0.54, 0.69], [0.17, 0.20, 0.15]


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> dict[str, Path]:
    """An ImageNet-shaped (1000-class) state dict, as a Kaggle data set would carry it, in both formats."""
    root = tmp_path_factory.mktemp("weights")
    torch.manual_seed(123)
    sd = timm.create_model("resnet10t").state_dict()
    files = {"pth": root / "resnet10t.pth"}
    torch.save(sd, files["pth"])
    try:
        from safetensors.torch import save_file
    except ImportError:
        pass
    else:
        files["safetensors"] = root / "resnet10t.safetensors"
        save_file(sd, str(files["safetensors"]))
    torch.manual_seed(7)
    files["other"] = root / "resnet14t.pth"
    torch.save(timm.create_model("resnet14t").state_dict(), files["other"])
    return files


def _file_tensor(path: Path, key: str) -> torch.Tensor:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))[key]
    return torch.load(path, weights_only=True)[key]


@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
def test_local_weights_load(weights, fmt):
    if fmt not in weights:
        pytest.skip("safetensors not installed")
    path = weights[fmt]
    net = create_model(NAME, pretrained=str(path))
    assert isinstance(net, TimmBackbone)
    for key in ("conv1.0.weight", "layer4.0.conv2.weight", "bn1.running_mean"):
        assert torch.equal(net.net.state_dict()[key], _file_tensor(path, key)), key
    # a random init differs, and the 1000-class head was replaced by one output
    scratch = create_model(NAME)
    assert not torch.equal(scratch.net.state_dict()["conv1.0.weight"], _file_tensor(path, "conv1.0.weight"))
    assert net.head().out_features == 1
    assert net(torch.randn(3, 3, 96, 96)).shape == (3,)


def test_resolved_args_rebuild_without_the_file(weights, tmp_path):
    path = tmp_path / "w.pth"
    path.write_bytes(weights["pth"].read_bytes())
    args = resolve_model_args(NAME, {"pretrained": str(path), "drop_rate": 0.1})
    assert args == {"timm_name": "resnet10t", "img_size": 96, "pretrained": str(path.resolve()),
                    "timm_kwargs": {"drop_rate": 0.1}, "timm_version": timm.__version__}
    assert resolve_model_args(NAME, args) == args  # what a checkpoint records resolves to itself
    trained = Classifier(create_model(NAME, **args), MEAN, STD)
    path.unlink()  # the inference machine has no copy of the starting weights
    with pytest.raises(ModelError, match="not found"):
        create_model(NAME, **args)
    rebuilt = Classifier(create_model(NAME, **without_pretrained(args)), MEAN, STD)
    rebuilt.load_state_dict(trained.state_dict())
    assert rebuilt.backbone.net.drop_rate == 0.1
    x = torch.randint(0, 256, (2, 96, 96, 3), dtype=torch.uint8)
    assert torch.equal(trained.eval()(x), rebuilt.eval()(x))


def test_transfer_options_only_for_timm(weights):
    assert transfer_kwargs(NAME, {"drop_rate": 0.1}, HUB, 128) == {"drop_rate": 0.1, "pretrained": True,
                                                                    "img_size": 128}
    assert transfer_kwargs(NAME, {}, str(weights["pth"])) == {"pretrained": str(weights["pth"])}
    assert transfer_kwargs("plain4", {"width": 8}, None, 96) == {"width": 8}
    with pytest.raises(ModelError, match=r"--pretrained and --img-size need a timm network"):
        transfer_kwargs("plain4", {}, HUB, 128)


def test_normalization_follows_the_weights(weights):
    pre = resolve_model_args(NAME, {"pretrained": str(weights["pth"])})
    assert model_normalization(NAME, pre) == ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    assert model_normalization(NAME, resolve_model_args(NAME, {})) is None
    assert model_normalization("plain4", resolve_model_args("plain4", {})) is None
    assert default_recipe(NAME, pre["pretrained"]) == PRETRAINED_RECIPE
    assert default_recipe(NAME, None) == default_recipe("plain4", None) == SCRATCH_RECIPE


def test_bad_input_is_one_line(weights, tmp_path):
    with pytest.raises(ModelError, match=r"unknown timm model timm:resnt34 \(did you mean timm:resnet34"):
        create_model("timm:resnt34")
    with pytest.raises(ModelError, match=r"resnet14t.pth: weights of another architecture than timm:resnet10t "
                                         r"\(first mismatched key: layer1\.0\.conv1\.weight\)"):
        create_model(NAME, pretrained=str(weights["other"]))  # same keys, other shapes
    sd = torch.load(weights["pth"], weights_only=True)
    torch.save({k: v for k, v in sd.items() if k != "layer3.0.conv1.weight"}, tmp_path / "missing.pth")
    with pytest.raises(ModelError, match=r"missing.pth: weights of another architecture than timm:resnet10t \(first "
                                         r"mismatched key: layer3\.0\.conv1\.weight, not in the file; 1 missing\)"):
        create_model(NAME, pretrained=str(tmp_path / "missing.pth"))
    torch.save({**sd, "layer5.0.conv1.weight": sd["layer4.0.conv1.weight"]}, tmp_path / "extra.pth")
    with pytest.raises(ModelError, match=r"first mismatched key: layer5\.0\.conv1\.weight, not in the model"):
        create_model(NAME, pretrained=str(tmp_path / "extra.pth"))
    with pytest.raises(ModelError, match="unexpected keyword argument 'widht'"):
        create_model(NAME, widht=3)
    for bad in ({"img_size": 8}, {"num_classes": 2}, {"pretrained": 3}):
        with pytest.raises(ModelError):
            resolve_model_args(NAME, bad)


def test_img_size_upscales_inside_the_module():
    net = create_model(NAME, img_size=128).eval()
    seen = []
    net.net.conv1.register_forward_hook(lambda m, i, o: seen.append(tuple(i[0].shape)))
    assert net(torch.randn(2, 3, 96, 96)).shape == (2,)
    assert seen == [(2, 3, 128, 128)]


def _export_parity(backbone: torch.nn.Module, path: Path) -> float:
    import onnxruntime as ort

    model = ProbabilityModel(Classifier(backbone, MEAN, STD)).eval()
    x = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (8, 96, 96, 3), dtype=np.uint8))
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x[:2],), str(path), input_names=["images"], output_names=["prob"], opset_version=17,
                          dynamo=False, dynamic_axes={"images": {0: "batch"}, "prob": {0: "batch"}})
        want = model(x).numpy()
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"images": x.numpy()})[0]
    return float(np.abs(got - want).max())


@pytest.mark.parametrize("img_size", [96, 128])
def test_export_parity_opset17(weights, tmp_path, img_size):
    backbone = create_model(NAME, pretrained=str(weights["pth"]), img_size=img_size)
    assert _export_parity(backbone, tmp_path / "m.onnx") <= 1e-4


def _grads(net: torch.nn.Module) -> dict[str, bool]:
    net.zero_grad(set_to_none=True)
    net(torch.randn(4, 3, 96, 96)).sum().backward()
    return {n: p.grad is not None for n, p in net.named_parameters()}


def test_freeze_unfreeze_changes_which_parameters_learn():
    net = create_model(NAME).train()
    head = {"net.fc.weight", "net.fc.bias"}
    set_backbone_frozen(net, True, train_bn=False)
    g = _grads(net)
    assert {n for n, has in g.items() if has} == head
    set_backbone_frozen(net, True)  # fastai's train_bn: normalization layers learn too
    g = _grads(net)
    assert g["net.bn1.weight"] and g["net.fc.weight"] and not g["net.conv1.0.weight"]
    convs = {n + ".weight" for n, m in net.named_modules() if isinstance(m, torch.nn.Conv2d)}
    assert len(convs) > 10 and not any(g[n] for n in convs)
    set_backbone_frozen(net, False)
    assert all(_grads(net).values())
    # the built-ins have no separable head: never frozen, one group
    plain = create_model("simple", width=8)
    set_backbone_frozen(plain, True)
    assert all(p.requires_grad for p in plain.parameters())
    assert len(param_groups(plain, 1e-3, 0.1)) == 1


def test_fine_tune_steps_from_local_weights(weights):
    """The recipe end to end: frozen epoch (head and BN learn, convs stay the file's), then everything."""
    torch.manual_seed(0)
    net = Classifier(create_model(NAME, pretrained=str(weights["pth"])), *model_normalization(
        NAME, resolve_model_args(NAME, {"pretrained": str(weights["pth"])}))).train()
    groups = param_groups(net, 1e-2, 0.1)
    assert [g["name"] for g in groups] == ["head", "backbone"]
    assert [g["lr"] for g in groups] == pytest.approx([1e-2, 1e-3])
    assert sum(len(g["params"]) for g in groups) == len(list(net.parameters()))
    opt = torch.optim.AdamW(groups, lr=1e-2)
    recipe = Recipe(freeze_epochs=1, backbone_mult=0.1)
    x = torch.randint(0, 256, (8, 96, 96, 3), dtype=torch.uint8)
    y = torch.tensor([0, 1] * 4, dtype=torch.float32)
    conv = net.backbone.net.conv1[0].weight
    fc = net.backbone.net.fc.weight.detach().clone()
    bn_mean = net.backbone.net.bn1.running_mean.clone()

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(net(x), y)
        loss.backward()
        opt.step()
        return float(loss.detach())

    assert apply_epoch(net, 1, recipe) is True
    losses = [step() for _ in range(3)]
    assert torch.equal(conv, _file_tensor(weights["pth"], "conv1.0.weight"))  # frozen: untouched, no decay
    assert not torch.equal(net.backbone.net.fc.weight, fc)
    assert not torch.equal(net.backbone.net.bn1.running_mean, bn_mean)  # BN stayed in train mode
    assert apply_epoch(net, 2, recipe) is False
    assert apply_epoch(net, 3, recipe) is None  # no change
    losses.append(step())
    assert not torch.equal(conv, _file_tensor(weights["pth"], "conv1.0.weight"))
    assert all(np.isfinite(losses))


def _run_py(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT), **env})


def test_timm_is_imported_only_for_timm_names():
    r = _run_py("import sys, pcamtool.models as m, pcamtool.train.finetune\n"
                "m.create_model('simple', width=8)\n"
                "assert 'timm' not in sys.modules and 'torchvision' not in sys.modules, 'timm imported'\n"
                "sys.modules['timm'] = None  # as if it were not installed\n"
                "try:\n    m.create_model('timm:resnet10t')\n"
                "except m.ModelError as e:\n    print(e)\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout == ("timm:resnet10t needs timm and torchvision (timm is not installed): "
                        "pip install 'pcamtool[timm]'\n")


def test_no_internet_for_hub_weights_is_one_line(tmp_path):
    # sockets blocked in the child: timm's download fails at once, nothing leaves the machine
    code = ("import socket\n"
            "def refuse(*a, **k):\n    raise OSError(101, 'Network is unreachable')\n"
            "socket.socket.connect = refuse\nsocket.create_connection = refuse\nsocket.getaddrinfo = refuse\n"
            "from pcamtool.models import create_model, ModelError\n"
            "try:\n    create_model('timm:resnet10t', pretrained=True)\n"
            "except ModelError as e:\n    print(e)\n")
    r = _run_py(code, HF_HOME=str(tmp_path / "hf"), TORCH_HOME=str(tmp_path / "torch"), HF_HUB_ETAG_TIMEOUT="2",
                HF_HUB_DOWNLOAD_TIMEOUT="2")
    assert r.returncode == 0, r.stderr
    assert "timm:resnet10t: cannot download the pretrained weights (no internet here?)" in r.stdout
    assert "--pretrained PATH" in r.stdout and r.stdout.count("\n") == 1


def test_train_export_infer_from_local_weights(weights, tmp_path):
    """fit -> best.pt -> export (parity at 1e-4 on the CPU) -> infer, for a timm network started from a file."""
    from helpers import write_kaggle

    from pcamtool import pack
    from pcamtool.config import AugmentConfig, TrainConfig
    from pcamtool.export import export_onnx
    from pcamtool.infer import predict
    from pcamtool.train import fit
    from pcamtool.train.runs import load_checkpoint

    write_kaggle(tmp_path, n=30)
    store = pack(tmp_path / "train", progress=False).path
    cfg = TrainConfig(store=str(store), out=str(tmp_path / "run"), arch=NAME,
                      model_kwargs={"pretrained": str(weights["pth"])}, epochs=1, batch_size=8, max_train=16,
                      device="cpu", threads=1, augment=AugmentConfig.off())
    res = fit(cfg, progress=False)
    spec = load_checkpoint(res.run_dir / "best.pt")["model"]
    assert spec["kwargs"]["timm_name"] == "resnet10t" and spec["kwargs"]["timm_version"] == timm.__version__
    exp = export_onnx(res.run_dir, store_path=store, check_images=8)
    assert exp.max_abs_diff <= 1e-4 and exp.metadata["arch"] == NAME
    pred = predict(store, [exp.path], tta=2, provider="cpu", progress=False)
    assert len(pred.ids) == 30 and np.all((pred.probs >= 0) & (pred.probs <= 1))


def test_pretrained_option_freezes_the_backbone_first_and_keeps_the_networks_statistics(weights, tmp_path):
    """`train --pretrained FILE`: epoch 1 trains the head alone; the model normalizes as the weights expect."""
    from click.testing import CliRunner
    from helpers import write_kaggle

    from pcamtool import pack
    from pcamtool.cli import cli
    from pcamtool.train.runs import load_checkpoint

    write_kaggle(tmp_path, n=30)
    store = pack(tmp_path / "train", progress=False).path
    run = tmp_path / "run"
    r = CliRunner().invoke(cli, ["-q", "train", str(store), "--arch", NAME, "--pretrained", str(weights["pth"]),
                                 "--epochs", "1", "--batch-size", "8", "--max-train", "16", "--device", "cpu",
                                 "--threads", "1", "--no-flip", "--no-color", "-o", str(run)])
    assert r.exit_code == 0, r.output
    ck = load_checkpoint(run / "last.pt")
    assert ck["model"]["kwargs"]["pretrained"] == str(weights["pth"].resolve())
    mean, std = model_normalization(NAME, ck["model"]["kwargs"])
    assert ck["mean"] == pytest.approx(mean) and ck["std"] == pytest.approx(std)
    assert ck["mean"] != pytest.approx(MEAN)  # not the store's statistics
    file_sd = torch.load(weights["pth"], weights_only=True)
    trained = {k.removeprefix("backbone.net."): v for k, v in ck["weights"].items()}
    conv = next(k for k in file_sd if k.endswith("conv1.0.weight"))
    assert torch.equal(trained[conv], file_sd[conv])             # frozen in epoch 1
    head = [k for k in trained if k.startswith("fc.") and k.endswith("weight")]
    assert head and trained[head[0]].shape[0] == 1               # one class


# ------------------------------------------- what hostile users tripped on (issue 24): one line each


def test_unreadable_weights_files_are_one_line(tmp_path):
    files = {"random.safetensors": os.urandom(4096), "empty.pth": b""}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    torch.save(torch.randn(4), tmp_path / "one.pth")
    torch.save({"epoch": 3, "note": "no tensors"}, tmp_path / "meta.pth")
    expect = {"random.safetensors": "not a readable safetensors file: ",
              "empty.pth": "empty weights file (0 bytes)",
              "one.pth": "holds one tensor, not a state dict",
              "meta.pth": "holds a dict, not a state dict"}
    for name, words in expect.items():
        with pytest.raises(ModelError) as info:
            create_model(NAME, pretrained=str(tmp_path / name))
        msg = str(info.value)
        assert msg.startswith(str(tmp_path / name) + ": ") and words in msg and "\n" not in msg, msg


def test_a_timm_training_checkpoint_still_loads(weights, tmp_path):
    """The file check reads what timm reads: a state dict wrapped with its training arguments."""
    import argparse

    sd = torch.load(weights["pth"], weights_only=True)
    torch.save({"epoch": 3, "state_dict": sd, "args": argparse.Namespace(lr=0.1)}, tmp_path / "train.pth")
    net = create_model(NAME, pretrained=str(tmp_path / "train.pth"))
    assert torch.equal(net.net.state_dict()["conv1.0.weight"], sd["conv1.0.weight"])


def test_zero_byte_pretrained_on_the_command_line_is_one_line_not_aborted(tmp_path):
    from click.testing import CliRunner
    from helpers import write_kaggle

    from pcamtool import pack
    from pcamtool.cli import cli

    write_kaggle(tmp_path, n=20)
    store = pack(tmp_path / "train", progress=False).path
    (tmp_path / "w.pth").write_bytes(b"")
    r = CliRunner().invoke(cli, ["-q", "train", str(store), "--arch", NAME, "--pretrained", str(tmp_path / "w.pth"),
                                 "--epochs", "1", "--max-train", "8", "--device", "cpu", "-o", str(tmp_path / "run")])
    assert r.exit_code == 1, r.output
    assert "Aborted" not in r.output and "Traceback" not in r.output
    assert r.output.strip().splitlines() == [f"Error: {tmp_path / 'w.pth'}: empty weights file (0 bytes)"]


def test_an_input_size_the_network_cannot_take_is_one_line():
    # a hybrid ViT asserts its patch grid while being built; the error names the option and the native size
    with pytest.raises(ModelError, match=r"^timm:vit_tiny_r_s16_p8_224 cannot be built for 97x97 inputs "
                                         r"\(--img-size 97\): AssertionError; try --img-size 224"):
        create_model("timm:vit_tiny_r_s16_p8_224", img_size=97)
    # a network that builds but fails on its first batch fails at build time instead, with the same words
    from pcamtool import zoo_timm

    class Picky(torch.nn.Module):
        def forward(self, x):
            if x.shape[-1] % 16:  # as timm's patch embedding does (a bare assert there)
                raise AssertionError
            return x.mean((2, 3))[:, :1]  # one logit per image, as num_classes=1 gives

    with pytest.raises(ModelError, match=r"^timm:picky cannot take 97x97 inputs \(--img-size 97\): AssertionError$"):
        zoo_timm._check_input_size(TimmBackbone(Picky(), 97), "timm:picky", None)
    zoo_timm._check_input_size(TimmBackbone(Picky(), 128), "timm:picky", None)  # a size it takes passes
    assert create_model("timm:vit_tiny_patch16_224", img_size=97)(torch.zeros(1, 3, 96, 96)).shape == (1,)


def test_proxy_without_internet_fails_fast_in_one_line(tmp_path):
    """A proxy that cannot be reached: one line within seconds, not ~50 s of hub retries."""
    code = ("import time\n"
            "from pcamtool.models import create_model, ModelError\n"
            "import timm\n"
            "t = time.perf_counter()\n"
            "try:\n    create_model('timm:resnet10t', pretrained=True)\n"
            "except ModelError as e:\n    print(e)\n"
            "print(round(time.perf_counter() - t, 1))\n")
    r = _run_py(code, HTTPS_PROXY="http://127.0.0.1:9", HTTP_PROXY="http://127.0.0.1:9", https_proxy="",
                http_proxy="", HF_HOME=str(tmp_path / "hf"), TORCH_HOME=str(tmp_path / "torch"))
    assert r.returncode == 0, r.stderr
    message, seconds = r.stdout.strip().splitlines()
    assert message.startswith("timm:resnet10t: cannot download the pretrained weights (no internet here?)")
    assert float(seconds) < 15, seconds
    assert "retry" not in r.stderr.lower() and "Traceback" not in r.stderr, r.stderr


@pytest.mark.slow
def test_without_timm_export_of_a_timm_run_is_one_line_and_its_onnx_still_infers(tmp_path):
    """The extra is needed to rebuild a timm network (export), not to run its ONNX file (infer)."""
    from click.testing import CliRunner
    from helpers import write_kaggle

    from pcamtool import pack
    from pcamtool.cli import cli

    write_kaggle(tmp_path, n=20)
    store = pack(tmp_path / "train", progress=False).path
    run = tmp_path / "run"
    r = CliRunner().invoke(cli, ["-q", "train", str(store), "--arch", NAME, "--epochs", "1", "--max-train", "8",
                                 "--batch-size", "8", "--device", "cpu", "--threads", "1", "-o", str(run)])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(cli, ["-q", "export", str(run), "-o", str(tmp_path / "m.onnx"), "--provider", "cpu"])
    assert r.exit_code == 0, r.output
    hide = "import sys\nsys.modules['timm'] = None; sys.modules['torchvision'] = None\n"
    main = "from pcamtool.cli import main\nsys.argv = ['pcamtool'] + sys.argv[1:]\nmain()\n"

    def without_timm(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", hide + main, "-q", *args], capture_output=True, text=True,
                              cwd=tmp_path, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})

    r = without_timm("export", str(run), "-o", str(tmp_path / "again.onnx"), "--provider", "cpu")
    assert r.returncode == 1 and not (tmp_path / "again.onnx").exists(), r.stderr
    assert r.stderr.strip().splitlines() == [f"Error: {NAME} needs timm and torchvision (timm is not installed): "
                                             f"pip install 'pcamtool[timm]'"], r.stderr
    r = without_timm("infer", str(store), "--model", str(tmp_path / "m.onnx"), "--tta", "2", "--provider", "cpu")
    assert r.returncode == 0, r.stderr
    rows = r.stdout.strip().splitlines()
    assert rows[0] == "id,label" and len(rows) == 21
