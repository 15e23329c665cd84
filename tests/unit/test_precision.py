"""Mixed precision (bf16 autocast) and channels-last 3D: options of the training step, checked on the CPU."""

from __future__ import annotations

import contextlib

import torch

from trainables.losses import get_loss
from trainables.trainable import _autocast
from trainables.unet import UNet3D

torch.set_num_threads(1)


def _toy(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    y = torch.zeros(2, 1, 16, 16, 16)
    y[:, :, 4:10, 5:11, 6:12] = 1.0
    x = 0.1 * torch.randn(2, 1, 16, 16, 16, generator=g) + y
    return x, y


def test_autocast_choice():
    assert isinstance(_autocast(torch.device("cpu"), False), contextlib.nullcontext)
    ctx = _autocast(torch.device("cpu"), True)
    assert isinstance(ctx, torch.autocast) and ctx.fast_dtype == torch.bfloat16


def test_bf16_forward_is_close_to_fp32():
    torch.manual_seed(0)
    model = UNet3D(width=0.25).eval()
    x, _ = _toy()
    with torch.no_grad():
        ref = model(x)
        with _autocast(torch.device("cpu"), True):
            low = model(x)
    assert low.dtype == torch.bfloat16  # the convolutions really ran in bf16
    err = (low.float() - ref).abs().max() / ref.abs().max()
    assert 0 < err < 0.05, float(err)  # bf16 has an 8-bit mantissa: ~1e-2 relative, not exact


def test_bf16_training_steps_lower_the_loss_and_stay_finite():
    torch.manual_seed(0)
    model = UNet3D(width=0.25)
    opt = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9, nesterov=True)
    loss_fn = get_loss("dice")
    x, y = _toy()
    losses = []
    for _ in range(8):
        with _autocast(torch.device("cpu"), True):
            logits = model(x)
        loss = loss_fn(logits.float(), y, None)  # losses in fp32, as the trainable does
        opt.zero_grad()
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses


def test_channels_last_gives_the_same_gradients():
    torch.manual_seed(0)
    plain = UNet3D(width=0.25, channels_last=False)
    fast = UNet3D(width=0.25, channels_last=True)
    fast.load_state_dict(plain.state_dict())
    x, y = _toy()
    loss_fn = get_loss("bce")
    for model in (plain, fast):
        loss_fn(model(x), y, None).backward()
    for (name, a), (_, b) in zip(plain.named_parameters(), fast.named_parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-3, atol=1e-5, msg=name)
