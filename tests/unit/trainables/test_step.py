"""Mixed precision (the precision policy, bf16 forward, fp16 loss scaling) and channels-last 3D, on the CPU."""

from __future__ import annotations

import contextlib

import pytest
import torch

from trainables.losses import get_loss
from trainables.step import Precision, train_step
from trainables.unet import UNet3D

torch.set_num_threads(1)


def _toy(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    y = torch.zeros(2, 1, 16, 16, 16)
    y[:, :, 4:10, 5:11, 6:12] = 1.0
    x = 0.1 * torch.randn(2, 1, 16, 16, 16, generator=g) + y
    return x, y


def test_cpu_precision_is_float32():
    """bf16 training on the CPU was measured unreliable (trainables.step): ``amp`` is a GPU option."""
    for amp in (False, True):
        p = Precision.for_device("cpu", amp)
        assert p.dtype is None and not p.needs_scaler and isinstance(p.autocast(), contextlib.nullcontext)
    ctx = Precision("cpu", torch.bfloat16).autocast()
    assert isinstance(ctx, torch.autocast) and ctx.fast_dtype == torch.bfloat16


@pytest.mark.parametrize("native,emulated,expected", [
    (True, True, torch.bfloat16),  # Ampere and newer: bf16, no loss scaling
    (False, True, torch.float16),  # V100/T4: torch emulates bf16 (slower than fp16): fp16 with loss scaling
    (False, False, torch.float16),
])
def test_gpu_precision_policy(monkeypatch, native, emulated, expected):
    """bf16 only where the GPU computes it natively, else fp16 *with* loss scaling."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                        lambda including_emulation=True: native or (including_emulation and emulated))
    p = Precision.for_device("cuda", True)
    assert p.dtype == expected
    assert p.needs_scaler is (expected == torch.float16) and p.name == ("bf16" if native else "fp16")
    assert Precision.for_device("cuda", False).dtype is None


def test_fp16_step_uses_the_grad_scaler():
    """Loss scaling is really in the step under the float16 policy (forced on the CPU): a step whose scaled
    gradients overflow is skipped (weights unchanged) and the scale halves; a normal step keeps the scale."""
    torch.manual_seed(0)
    model = UNet3D(width=0.125)
    x, y = _toy()
    fp16 = Precision("cpu", torch.float16)
    scaler = fp16.scaler()
    assert scaler.is_enabled() and scaler.get_scale() == 65536.0
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = {k: v.detach().clone() for k, v in model.named_parameters()}  # (BatchNorm statistics move anyway)
    huge = lambda *a: get_loss("bce")(*a) * 1e36  # noqa: E731 - finite loss, gradients overflow once scaled
    assert float(train_step(model, opt, scaler, huge, x, y, None, fp16)) > 0
    assert scaler.get_scale() == 32768.0
    assert all(torch.equal(v, before[k]) for k, v in model.named_parameters())
    train_step(model, opt, scaler, get_loss("bce"), x, y, None, fp16)
    assert scaler.get_scale() == 32768.0  # finite gradients: no back-off, the step is taken
    assert not all(torch.equal(v, before[k]) for k, v in model.named_parameters())


def test_the_step_returns_its_loss_on_the_device_without_reading_it():
    """No host sync in the step: the loss comes back as a detached 0-d tensor (the trainer checks a window of them
    at once), equal to the loss of the batch under the model before the update."""
    torch.manual_seed(0)
    model = UNet3D(width=0.125)
    x, y = _toy()
    with torch.no_grad():
        expected = get_loss("bce")(model(x), y, None)  # train mode: the same BatchNorm batch statistics
    p = Precision.for_device("cpu", False)
    torch.manual_seed(0)
    model = UNet3D(width=0.125)
    loss = train_step(model, torch.optim.SGD(model.parameters(), lr=0.1), p.scaler(), get_loss("bce"), x, y, None, p)
    assert isinstance(loss, torch.Tensor) and loss.ndim == 0 and not loss.requires_grad
    assert torch.equal(loss, expected)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_the_output_block_runs_in_float32_under_autocast(dtype):
    """Under mixed precision the body runs in the low dtype, the output block (last residual block, convolution
    and BatchNorm) in float32: the logits are float32 and equal to an fp32 head applied to the body's features."""
    torch.manual_seed(0)
    model = UNet3D(width=0.25).eval()
    x, _ = _toy()
    features = {}
    model.dec1.register_forward_hook(lambda m, args, out: features.setdefault("x", out))  # the head's input
    with torch.no_grad():
        ref = model(x)
        features.clear()
        with Precision("cpu", dtype).autocast():
            low = model(x)
        head = model.out(features["x"].float())  # the head in float32, outside autocast
    assert features["x"].dtype == dtype  # the body really ran in the low dtype
    assert low.dtype == torch.float32
    assert torch.equal(low, head)
    err = (low - ref).abs().max() / ref.abs().max()
    assert 0 < err < 0.05, float(err)  # the body's rounding (8-bit mantissa) remains: close, not exact


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
