"""Dihedral group and TTA helpers, batched augmentation: determinism, switches, HED round trip."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from pcamtool import augment
from pcamtool.augment import (HED_FROM_RGB, RGB_FROM_HED, augment_batch, color_jitter,
                              hed_jitter, hed_to_rgb, random_shift, rgb_to_hed)
from pcamtool.config import AugmentConfig
from pcamtool.errors import PcamError
from pcamtool.tta import dihedral


def batch(n: int = 6, seed: int = 0) -> torch.Tensor:
    """Float NCHW in [0, 1] with tissue-like values (no exact 0 or 1)."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 96, 96, generator=g) * 0.9 + 0.05


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# every stage on, with strengths small enough for real tissue
EVERYTHING = AugmentConfig(flip=True, shift=True, shift_px=3, color=True, brightness=0.1, contrast=0.1,
                           saturation=0.1, hue=0.05, hed=True, hed_sigma=0.05, hed_bias=0.02)


# ------------------------------------------------------------------ dihedral


def test_augment_is_deterministic_for_a_seeded_generator():
    x = batch(8)
    cfg = AugmentConfig(shift=True)
    a = augment_batch(x, cfg, gen(3))
    b = augment_batch(x, cfg, gen(3))
    c = augment_batch(x, cfg, gen(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == x.shape and a.dtype == x.dtype and a.min() >= 0 and a.max() <= 1
    assert torch.equal(x, batch(8))  # the input is not modified


def test_all_switches_off_is_the_identity():
    x = batch(4)
    g = gen()
    state = g.get_state()
    assert augment_batch(x, AugmentConfig.off(), g) is x
    assert torch.equal(g.get_state(), state)  # and draws nothing
    assert not AugmentConfig.off().enabled and AugmentConfig().enabled
    zero = AugmentConfig(flip=False, shift=True, shift_px=0, color=True, brightness=0, contrast=0,
                         saturation=0, hue=0, hed=True, hed_sigma=0, hed_bias=0)
    assert augment_batch(x, zero, gen()) is x


@pytest.mark.parametrize("switch", ["flip", "shift", "color", "hed"])
def test_each_switch_alone_changes_the_batch(switch):
    x = batch(8)
    cfg = dataclasses.replace(AugmentConfig.off(), **{switch: True})
    out = augment_batch(x, cfg, gen(1))
    assert not torch.equal(out, x)
    if switch == "flip":  # every image is one of its own 8 transforms
        for i in range(8):
            assert any(torch.equal(out[i], dihedral(x[i:i + 1], k)[0]) for k in range(8))
    if switch in ("color", "hed"):  # colour changes, geometry does not: the pixels stay correlated
        assert torch.corrcoef(torch.stack([out.flatten(), x.flatten()]))[0, 1] > 0.8


@pytest.mark.parametrize("strengths", [
    dict(hed=True, hed_sigma=0.1, hed_bias=0.0), dict(hed=True, hed_sigma=0.0, hed_bias=0.05),
    dict(color=True, brightness=0.2, contrast=0.0, saturation=0.0, hue=0.0),
    dict(color=True, brightness=0.0, contrast=0.2, saturation=0.0, hue=0.0),
    dict(color=True, brightness=0.0, contrast=0.0, saturation=0.2, hue=0.0),
    dict(color=True, brightness=0.0, contrast=0.0, saturation=0.0, hue=0.1),
    dict(shift=True, shift_px=1),
])
def test_one_nonzero_strength_is_enough_to_switch_a_stage_on(strengths):
    x = batch(6)
    cfg = dataclasses.replace(AugmentConfig.off(), **strengths)
    got = augment_batch(x, cfg, gen(5))
    if cfg.hed:
        want = hed_jitter(x, cfg.hed_sigma, cfg.hed_bias, gen(5))
    elif cfg.color:
        want = color_jitter(x, cfg.brightness, cfg.contrast, cfg.saturation, cfg.hue, gen(5))
    else:
        want = random_shift(x, cfg.shift_px, gen(5))
    assert torch.equal(got, want) and not torch.equal(got, x)


def test_shift_is_a_reflect_padded_crop():
    x = batch(5)
    out = random_shift(x, 4, gen(2))
    padded = F.pad(x, (4, 4, 4, 4), mode="reflect")
    for i in range(5):
        crops = [padded[i, :, a:a + 96, b:b + 96] for a in range(9) for b in range(9)]
        assert any(torch.equal(out[i], c) for c in crops)


@pytest.mark.parametrize("max_px", [1, 3])
def test_random_shift_crops_the_reflect_padded_image_at_the_offsets_it_draws(max_px):
    """One row and one column offset in 0..2*max_px per image, and no other draw: the stream stays reproducible."""
    x = batch(6)
    g = gen(4)
    out = random_shift(x, max_px, g)
    ref = gen(4)
    rows, cols = torch.randint(0, 2 * max_px + 1, (2, 6), generator=ref).tolist()
    assert torch.equal(g.get_state(), ref.get_state())
    padded = F.pad(x, (max_px,) * 4, mode="reflect")
    for i in range(6):
        assert torch.equal(out[i], padded[i, :, rows[i]:rows[i] + 96, cols[i]:cols[i] + 96])
    assert not torch.equal(out, x)


def test_color_jitter_keeps_grey_and_range():
    grey = torch.full((4, 3, 96, 96), 0.5)
    out = color_jitter(grey, 0.0, 0.0, 0.5, 0.4, gen())  # saturation and hue only
    assert torch.allclose(out, grey, atol=1e-6)
    x = batch(4)
    assert torch.equal(color_jitter(x, 0, 0, 0, 0, gen()), x)
    out = color_jitter(x, 0.5, 0.5, 0.5, 0.5, gen())
    assert out.min() >= 0 and out.max() <= 1


def test_hed_round_trip_and_zero_strength_identity():
    x = batch(4)
    assert torch.allclose(hed_to_rgb(rgb_to_hed(x)), x, atol=1e-5)
    assert torch.allclose(hed_jitter(x, 0.0, 0.0, gen()), x, atol=1e-5)
    assert np.allclose(RGB_FROM_HED @ HED_FROM_RGB, np.eye(3))
    white = torch.ones(1, 3, 96, 96)
    assert rgb_to_hed(white).abs().max() < 1e-6  # no stain on blank glass


def test_hed_matches_scikit_image_formula():
    """rgb2hed as scikit-image defines it (before its clipping of negatives), in NumPy."""
    x = batch(2)
    rgb = x.permute(0, 2, 3, 1).double().numpy()
    want = (np.log(np.maximum(rgb, 1e-6)) / np.log(1e-6)) @ HED_FROM_RGB
    got = rgb_to_hed(x).permute(0, 2, 3, 1).double().numpy()
    assert np.allclose(got, want, atol=1e-5)


def test_hed_to_rgb_is_scikit_images_hed2rgb_clipped_to_one():
    """Negative stain amounts (HED jitter reaches them) would be brighter than blank glass: clipped to 1."""
    hed = torch.randn(2, 3, 96, 96, generator=gen(3)) * 0.05
    # skimage.color.hed2rgb: rgb = exp(ln(1e-6) * stains @ rgb_from_hed), clipped to [0, 1]
    rgb = np.exp(np.log(1e-6) * (hed.permute(0, 2, 3, 1).double().numpy() @ RGB_FROM_HED))
    assert (rgb > 1.05).mean() > 0.1 and (rgb < 0.95).mean() > 0.1  # both sides of the clip are reached
    got = hed_to_rgb(hed).permute(0, 2, 3, 1).double().numpy()
    np.testing.assert_allclose(got, np.clip(rgb, 0.0, 1.0), atol=1e-5)


def test_hed_jitter_scales_the_stain_channels():
    x = batch(4) * 0.4 + 0.3  # mid-tones, so that scaling clips no pixel
    out = hed_jitter(x, 0.3, 0.0, gen(5))  # alpha only: each stain channel is scaled per image
    ratio = rgb_to_hed(out) / rgb_to_hed(x)
    mask = rgb_to_hed(x).abs() > 0.02
    for i in range(4):
        for c in range(3):
            r = ratio[i, c][mask[i, c]]
            # one factor per image and channel (apart from pixels clipped at 0 or 1)
            assert r.numel() > 100 and 0.7 <= r.median() <= 1.3
            assert ((r - r.median()).abs() < 0.01).float().mean() > 0.95


def test_config_validation():
    with pytest.raises(PcamError, match="augment.brightness must be a non-negative number"):
        AugmentConfig(brightness=-0.1)
    with pytest.raises(PcamError, match="hed_sigma"):
        AugmentConfig(hed_sigma=-1)
    with pytest.raises(PcamError, match="flip must be true or false"):
        AugmentConfig(flip="yes")  # type: ignore[arg-type]
    with pytest.raises(PcamError, match="below 1"):
        AugmentConfig(contrast=1.5)
    with pytest.raises(PcamError, match="shift_px"):
        AugmentConfig(shift_px=2.5)
    cfg = AugmentConfig(shift=True, hue=0.05)
    assert AugmentConfig(**dataclasses.asdict(cfg)) == cfg
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.hue = 0.1  # type: ignore[misc]


def test_augment_rejects_uint8_and_nhwc():
    with pytest.raises(PcamError, match="float"):
        augment_batch(torch.zeros(2, 3, 96, 96, dtype=torch.uint8), AugmentConfig(), gen())
    with pytest.raises(PcamError, match="float"):
        augment_batch(torch.zeros(2, 96, 96, 3), AugmentConfig(), gen())


def test_channels_last_input_gives_the_same_values():
    x = batch(4)
    cfg = AugmentConfig(shift=True)
    a = augment_batch(x, cfg, gen(7))
    b = augment_batch(x.contiguous(memory_format=torch.channels_last), cfg, gen(7))
    assert torch.allclose(a, b, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_same_code_on_cuda():
    x = batch(8)
    cfg = AugmentConfig(shift=True)
    g = torch.Generator(device="cuda").manual_seed(0)
    out = augment_batch(x.cuda(), cfg, g)
    again = augment_batch(x.cuda(), cfg, torch.Generator(device="cuda").manual_seed(0))
    assert out.device.type == "cuda" and torch.equal(out, again)


@pytest.mark.parametrize("dtype, atol", [(torch.float16, 1e-2), (torch.float64, 1e-5)])
def test_every_stage_keeps_the_batch_dtype(dtype, atol):
    """A half-precision batch (to save memory) or a double one stays so, with the values of the float32 path."""
    x = batch(4).to(dtype)
    got = augment_batch(x, EVERYTHING, gen(1))
    want = augment_batch(x.float(), EVERYTHING, gen(1))
    assert got.dtype == dtype
    assert (got.float() - want).abs().max() <= atol


class DevicesMade(TorchFunctionMode):
    """Records the device of every tensor that a torch function returns inside it."""

    def __init__(self) -> None:
        super().__init__()
        self.devices: set[torch.device] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if isinstance(out, torch.Tensor):
            self.devices.add(out.device)
        return out


def test_a_default_device_set_by_the_caller_moves_nothing():
    """``torch.set_default_device("cuda")`` in a script must not send a CPU batch's constants or draws to the GPU.

    The meta device stands in for the GPU. The colour and stain constants are
    cached per device: the caches are emptied so that they are built under the
    caller's default device, as in a fresh process.
    """
    x = batch(4)
    want = augment_batch(x, EVERYTHING, gen(2))  # also builds tta's CPU tables, which meta could not copy back
    want_shift = random_shift(x, 2, gen(2))
    g, g_shift = gen(2), gen(2)
    augment._hed_matrices.cache_clear()
    augment._colour_constants.cache_clear()
    # a CPU matrix product with a meta operand need not fail, so every tensor made is checked
    with torch.device("meta"), DevicesMade() as made:
        got = augment_batch(x, EVERYTHING, g)
        got_shift = random_shift(x, 2, g_shift)
        back = hed_to_rgb(rgb_to_hed(x))
    assert made.devices == {x.device}
    assert torch.equal(got, want) and torch.equal(got_shift, want_shift)
    assert torch.allclose(back, x, atol=1e-5)


def test_constants_are_made_once_per_device(monkeypatch):
    """Colour and HED matrices are cached: built per batch on a GPU, each would be a blocking host copy."""
    cfg = AugmentConfig(hed=True, shift=True)
    augment_batch(batch(4), cfg, gen(0))  # the first batch on a device builds them
    made = []
    for name in ("tensor", "as_tensor", "eye", "full", "from_numpy"):
        orig = getattr(torch, name)
        monkeypatch.setattr(torch, name, lambda *a, _o=orig, _n=name, **k: (made.append(_n), _o(*a, **k))[1])
    out = augment_batch(batch(4, seed=1), cfg, gen(1))
    assert made == [] and out.shape == (4, 3, 96, 96)


# ------------------------------------------------------- pinned against NumPy twins


def draws(seed: int, *shapes: tuple[int, ...]) -> list[np.ndarray]:
    """The U(0, 1) numbers a generator seeded ``seed`` gives, in the order augmentation asks for them."""
    g = gen(seed)
    return [torch.rand(s, generator=g).double().numpy() for s in shapes]


def state_after(seed: int, *shapes: tuple[int, ...]) -> torch.Tensor:
    """The state of a generator seeded ``seed`` once it has given exactly those U(0, 1) draws."""
    g = gen(seed)
    for s in shapes:
        torch.rand(s, generator=g)
    return g.get_state()


@pytest.mark.parametrize("which", [dict(brightness=0.3), dict(contrast=0.4), dict(saturation=0.5), dict(hue=0.2),
                                   dict(brightness=0.2, contrast=0.3, saturation=0.4, hue=0.1)])
def test_color_jitter_matches_the_numpy_twin(which):
    from oracles import color_jitter_numpy

    strengths = {"brightness": 0.0, "contrast": 0.0, "saturation": 0.0, "hue": 0.0, **which}
    x = batch(4, seed=2) * 0.6 + 0.2
    order = [k for k in ("saturation", "hue", "brightness", "contrast") if strengths[k] > 0]
    u = dict(zip(order, (d.reshape(-1) for d in draws(9, *[(4, 1, 1)] * len(order)))))
    g = gen(9)
    got = color_jitter(x, strengths["brightness"], strengths["contrast"], strengths["saturation"],
                       strengths["hue"], g)
    assert torch.equal(g.get_state(), state_after(9, *[(4, 1, 1)] * len(order)))  # a jitter that is off draws nothing
    want = color_jitter_numpy(x.numpy(), u=u, **strengths)
    np.testing.assert_allclose(got.double().numpy(), want, atol=2e-5)
    assert not np.allclose(want, x.numpy(), atol=1e-3)


def test_hed_jitter_matches_the_numpy_twin():
    from oracles import hed_jitter_numpy

    x = batch(3, seed=4)
    ua, ub = draws(6, (3, 3), (3, 3))
    g = gen(6)
    got = hed_jitter(x, 0.2, 0.05, g)
    assert torch.equal(g.get_state(), state_after(6, (3, 3), (3, 3)))
    want = hed_jitter_numpy(x.numpy(), 0.2, 0.05, ua, ub, RGB_FROM_HED)
    np.testing.assert_allclose(got.double().numpy(), want, atol=3e-5)
    assert np.abs(want - x.numpy()).max() > 0.01
    assert np.allclose(RGB_FROM_HED, [[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])


def test_augment_batch_is_hed_then_colour_then_one_gather():
    """The order of the stages and of the random draws, rebuilt from the stages themselves."""
    from pcamtool.tta import remap

    x = batch(6, seed=8)
    used = gen(12)
    got = augment_batch(x, EVERYTHING, used)
    g = gen(12)
    y = hed_jitter(x, 0.05, 0.02, g)
    y = color_jitter(y, 0.1, 0.1, 0.1, 0.05, g)
    ks = torch.randint(0, 8, (6,), generator=g)
    shifts = torch.randint(0, 7, (2, 6), generator=g)
    assert torch.equal(got, remap(y, ks, shifts, 3))
    assert torch.equal(used.get_state(), g.get_state())  # and nothing else is drawn
    # shift alone: a reflect-padded crop of up to shift_px, and no transform
    only_shift = dataclasses.replace(AugmentConfig.off(), shift=True, shift_px=2)
    g = gen(3)
    assert torch.equal(augment_batch(x, only_shift, gen(3)),
                       remap(x, None, torch.randint(0, 5, (2, 6), generator=g), 2))
    assert torch.equal(random_shift(x, 2, gen(3)), augment_batch(x, only_shift, gen(3)))
    assert random_shift(x, 0, gen(3)) is x


def test_random_numbers_move_to_the_batch_device():
    """A CPU generator for a batch on another device: every stage runs on the batch's device.

    The meta device stands in for a GPU: every build of torch has it, and an
    elementwise product of a meta tensor with a CPU one fails, as with CUDA.
    Last in the file: the first meta operation in a process imports torch's
    Python meta kernels (2-5 s), which the other tests need not wait for.
    """
    x = torch.empty(4, 3, 96, 96, device="meta")
    out = augment_batch(x, EVERYTHING, gen(0))
    assert out.device.type == "meta" and out.shape == x.shape
