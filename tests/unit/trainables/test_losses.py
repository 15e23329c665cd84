"""Losses (SPEC §2): hand-derived toy values, iw at w = 1, MONAI / torch cross-checks, numerics, the registry."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from trainables.losses import (
    LOSS_NAMES,
    PAPER_CONFIGS,
    asl_loss,
    bce_loss,
    dice_loss,
    focal_loss,
    gdl_loss,
    get_loss,
    loss_params,
    supports_iw,
    wce_loss,
)

torch.set_num_threads(1)

LN3 = math.log(3.0)

# ----------------------------------------------------------------------------------------------------- toy batch
# Two samples of 2 x 2 voxels, logits chosen so that p = sigmoid(x) is exact: x = ln 3 -> p = 3/4,
# x = -ln 3 -> p = 1/4, x = 0 -> p = 1/2. Flattened voxel order:
#   sample 0: p = [3/4, 1/4, 1/2, 1/2], y = [1, 0, 1, 0], w = [2, 1, 1, 1]
#   sample 1: p = [3/4, 3/4, 1/4, 1/2], y = [0, 1, 0, 0], w = [1, 3, 1, 1]
TOY_P = [[0.75, 0.25, 0.5, 0.5], [0.75, 0.75, 0.25, 0.5]]
TOY_Y = [[1, 0, 1, 0], [0, 1, 0, 0]]
TOY_W = [[2, 1, 1, 1], [1, 3, 1, 1]]


def toy(dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    logit_of = {0.75: LN3, 0.25: -LN3, 0.5: 0.0}
    logits = torch.tensor([[logit_of[p] for p in row] for row in TOY_P], dtype=dtype).reshape(2, 1, 2, 2)
    target = torch.tensor(TOY_Y, dtype=dtype).reshape(2, 1, 2, 2)
    weight = torch.tensor(TOY_W, dtype=dtype).reshape(2, 1, 2, 2)
    return logits, target, weight


def voxels(weighted: bool):
    """(p, y, w) of every toy voxel, per sample."""
    for s in range(2):
        yield [(p, y, TOY_W[s][i] if weighted else 1) for i, (p, y) in enumerate(zip(TOY_P[s], TOY_Y[s]))]


def value(loss: torch.Tensor) -> float:
    return float(loss.detach())


# ------------------------------------------------------------------------------------ closed-form toy values


@pytest.mark.parametrize("weighted", [False, True])
def test_bce_toy(weighted: bool) -> None:
    # Voxel loss -w[y ln p + (1-y) ln(1-p)]: (y=1, p=3/4) and (y=0, p=1/4) give ln(4/3), p = 1/2 gives ln 2,
    # (y=0, p=3/4) gives ln 4. Unweighted: 4 ln(4/3) + 5 ln 2 over 8 voxels. Weighted (w=2 on sample 0's first
    # voxel, w=3 on sample 1's second, both ln(4/3) voxels): 7 ln(4/3) + 5 ln 2 over 8.
    logits, target, weight = toy()
    expected = ((7 if weighted else 4) * math.log(4 / 3) + 5 * math.log(2)) / 8
    assert value(bce_loss(logits, target, weight if weighted else None)) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize(("gamma", "alpha"), [(2.0, 0.75), (0.0, 0.5), (1.5, 0.25)])
def test_focal_toy(weighted: bool, gamma: float, alpha: float) -> None:
    # Per voxel: y=1 -> -w a (1-p)^g ln p; y=0 -> -w (1-a) p^g ln(1-p); mean over the 8 voxels.
    # E.g. g=2, a=0.75, unweighted: [ln(4/3)/8 + (1.25/4 + 0.25*9/16*2) ln 2] / 8.
    expected = 0.0
    for sample in voxels(weighted):
        for p, y, w in sample:
            expected += -w * (
                alpha * (1 - p) ** gamma * math.log(p) if y else (1 - alpha) * p**gamma * math.log(1 - p)
            )
    expected /= 8
    if (gamma, alpha, weighted) == (2.0, 0.75, False):
        assert expected == pytest.approx(
            (math.log(4 / 3) / 8 + (1.25 / 4 + 0.25 * 9 / 16 * 2) * math.log(2)) / 8
        )
    logits, target, weight = toy()
    loss = focal_loss(logits, target, weight if weighted else None, gamma=gamma, alpha=alpha)
    assert value(loss) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize(("mode", "ratio"), [("prediction", 15 / 17), ("target", 5 / 3)])
def test_wce_toy(mode: str, ratio: float) -> None:
    # n = 8. prediction: Σp = 2 + 9/4 = 17/4, r = (8 - 17/4) / (17/4) = 15/17. target: Σy = 3, r = 5/3.
    # Voxel loss: y=1 -> -r ln p, y=0 -> -ln(1-p). Positives: (3/4, 1/2, 3/4) -> r (2 ln(4/3) + ln 2);
    # negatives: (1/4, 1/2, 3/4, 1/4, 1/2) -> 2 ln(4/3) + ln 2 + ln 4 + ln 2. Mean over 8.
    expected = (ratio * (2 * math.log(4 / 3) + math.log(2)) + 2 * math.log(4 / 3) + 4 * math.log(2)) / 8
    logits, target, _ = toy()
    assert value(wce_loss(logits, target, pos_weight=mode)) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("weighted", [False, True])
def test_dice_toy(weighted: bool) -> None:
    # Unweighted: sample 0: Σpy = 5/4, Σ(p²+y²) = 9/8 + 2 = 25/8 -> 1 - (5/2)/(25/8) = 1/5;
    #             sample 1: Σpy = 3/4, Σ(p²+y²) = 23/16 + 1 = 39/16 -> 1 - (3/2)/(39/16) = 5/13;
    #             mean (1/5 + 5/13) / 2 = 19/65. (Batch-summed: 25/89; linear denominators: other values.)
    # Weighted: sample 0: Σwpy = 2, Σw(p²+y²) = 75/16 -> 11/75; sample 1: Σwpy = 9/4, Σw(p²+y²) = 89/16 -> 17/89.
    logits, target, weight = toy()
    expected = (11 / 75 + 17 / 89) / 2 if weighted else 19 / 65
    assert value(dice_loss(logits, target, weight if weighted else None)) == pytest.approx(
        expected, rel=1e-12
    )


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("form", ["squared", "fbeta"])
@pytest.mark.parametrize("beta", [1.5, 1.0, 0.5])
def test_asl_toy(weighted: bool, form: str, beta: float) -> None:
    # squared: 1 - (1+β²) Σwpy / Σw(β²y² + p²); fbeta: 1 - (1+β²) Σwpy / Σw(β²y + p); per sample, mean.
    # β = 1.5, fbeta, unweighted: sample 0: 3.25 * 5/4 / (2.25*2 + 2) = 0.625 -> 0.375; sample 1:
    # 3.25 * 3/4 / (2.25 + 9/4) = 13/24 -> 11/24; mean 5/12.
    b2 = beta**2
    losses = []
    for sample in voxels(weighted):
        num = (1 + b2) * sum(w * p * y for p, y, w in sample)
        if form == "squared":
            den = sum(w * (b2 * y * y + p * p) for p, y, w in sample)
        else:
            den = sum(w * (b2 * y + p) for p, y, w in sample)
        losses.append(1 - num / den)
    expected = sum(losses) / 2
    if (beta, form, weighted) == (1.5, "fbeta", False):
        assert expected == pytest.approx(5 / 12)
    if beta == 1.0 and form == "squared":  # β = 1 squared ASL is the Dice loss
        assert expected == pytest.approx((11 / 75 + 17 / 89) / 2 if weighted else 19 / 65)
    logits, target, weight = toy()
    loss = asl_loss(logits, target, weight if weighted else None, beta=beta, form=form)
    assert value(loss) == pytest.approx(expected, rel=1e-12)


def test_gdl_toy() -> None:
    # Channels [p, 1-p] vs [y, 1-y], c_k = 1 / (1 + (Σy_k)²), 1 - 2 Σ c_k I_k / Σ c_k S_k, S = Σ(p² + y²).
    # sample 0: c = (1/5, 1/5), I = (5/4, 5/4), S = (25/8, 25/8) -> 1 - 1/(5/4) = 1/5.
    # sample 1: c = (1/2, 1/10), I = (3/4, 3/2), S = (39/16, 63/16)
    #           -> 2 (3/8 + 3/20) / (39/32 + 63/160) = (21/20) / (258/160) = 28/43 -> 15/43.
    # mean (1/5 + 15/43) / 2 = 59/215.
    logits, target, _ = toy()
    assert value(gdl_loss(logits, target)) == pytest.approx(59 / 215, rel=1e-12)


def test_gdl_against_numpy_reference() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(0, 2, size=(3, 1, 5, 4, 3))
    y = (rng.random(x.shape) < 0.3).astype(np.float64)
    y[2] = 0  # an empty sample
    p = 1 / (1 + np.exp(-x))
    expected = []
    for b in range(3):
        num = den = 0.0
        for pk, yk in ((p[b], y[b]), (1 - p[b], 1 - y[b])):
            c = 1 / (1 + yk.sum() ** 2)
            num += c * (pk * yk).sum()
            den += c * (pk**2 + yk**2).sum()
        expected.append(1 - 2 * num / den)
    assert value(gdl_loss(torch.from_numpy(x), torch.from_numpy(y))) == pytest.approx(
        np.mean(expected), rel=1e-10
    )


# ---------------------------------------------------------------------------------------------- iw at w = 1

IW_CASES = [
    ("bce", {}),
    ("focal", {"gamma": 2.0, "alpha": 0.75}),
    ("dice", {}),
    ("asl", {"beta": 1.5, "form": "squared"}),
    ("asl", {"beta": 1.5, "form": "fbeta"}),
]


def random_batch(dtype=torch.float64, shape=(2, 1, 6, 5, 4), seed=0, empty_sample=True):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(shape, generator=g, dtype=dtype) * 3
    target = (torch.rand(shape, generator=g) < 0.2).to(dtype)
    if empty_sample:
        target[-1] = 0
    weight = 1 + 49 * torch.rand(shape, generator=g, dtype=dtype)
    return logits, target, weight


@pytest.mark.parametrize(("name", "params"), IW_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_iw_with_unit_weight_equals_plain(name: str, params: dict, dtype: torch.dtype) -> None:
    logits, target, _ = random_batch(dtype)
    loss = get_loss(name, **params)
    torch.testing.assert_close(loss(logits, target, torch.ones_like(logits)), loss(logits, target))


@pytest.mark.parametrize(("name", "params"), IW_CASES)
def test_iw_weights_change_the_loss(name: str, params: dict) -> None:
    logits, target, weight = random_batch()
    loss = get_loss(name, **params)
    assert abs(value(loss(logits, target, weight)) - value(loss(logits, target))) > 1e-6


# ------------------------------------------------------------------------------------- peers: torch and MONAI


def test_bce_matches_torch() -> None:
    logits, target, weight = random_batch()
    torch.testing.assert_close(bce_loss(logits, target), torch.nn.BCEWithLogitsLoss()(logits, target))
    torch.testing.assert_close(
        bce_loss(logits, target, weight), torch.nn.BCEWithLogitsLoss(weight=weight)(logits, target)
    )
    torch.testing.assert_close(
        bce_loss(logits, target), F.binary_cross_entropy(torch.sigmoid(logits), target)
    )


@pytest.mark.parametrize(("gamma", "alpha"), [(2.0, 0.75), (2.0, 0.25), (0.0, 0.5), (0.5, 0.83)])
def test_focal_matches_monai(gamma: float, alpha: float) -> None:
    from monai.losses import FocalLoss

    logits, target, weight = random_batch(torch.float32)  # MONAI's FocalLoss computes in float32
    monai_voxel = FocalLoss(gamma=gamma, alpha=alpha, reduction="none")(logits, target)
    assert monai_voxel.shape == logits.shape
    torch.testing.assert_close(focal_loss(logits, target, gamma=gamma, alpha=alpha), monai_voxel.mean())
    torch.testing.assert_close(
        focal_loss(logits, target, weight, gamma=gamma, alpha=alpha), (monai_voxel * weight).mean()
    )


def test_focal_matches_authors_form() -> None:
    # dpipe focal_loss_with_logits: ((2a-1) y + 1 - a) * ((1-2p) y + p)^g * BCE, times w, mean.
    logits, target, weight = random_batch()
    p = torch.sigmoid(logits)
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    authors = ((2 * 0.75 - 1) * target + 1 - 0.75) * ((1 - 2 * p) * target + p) ** 2 * bce * weight
    torch.testing.assert_close(focal_loss(logits, target, weight), authors.mean())


def test_dice_matches_monai() -> None:
    from monai.losses import DiceLoss, MaskedDiceLoss

    logits, target, weight = random_batch()
    plain = DiceLoss(sigmoid=True, squared_pred=True, smooth_nr=0.0, smooth_dr=1e-30)(logits, target)
    torch.testing.assert_close(dice_loss(logits, target), plain)
    # iw Dice = MaskedDiceLoss with mask sqrt(w): input and target are both multiplied by the mask after the
    # sigmoid, so the squared terms carry w and the product p*y carries sqrt(w)² = w (peers-and-metrics §2.1).
    masked = MaskedDiceLoss(sigmoid=True, squared_pred=True, smooth_nr=0.0, smooth_dr=1e-30)
    torch.testing.assert_close(dice_loss(logits, target, weight), masked(logits, target, mask=weight.sqrt()))


@pytest.mark.parametrize("beta", [1.5, 1.0, 2.0])
def test_asl_fbeta_matches_monai_tversky(beta: float) -> None:
    from monai.losses import TverskyLoss

    logits, target, _ = random_batch()
    b2 = beta**2
    tversky = TverskyLoss(
        sigmoid=True, alpha=1 / (1 + b2), beta=b2 / (1 + b2), smooth_nr=0.0, smooth_dr=1e-30
    )
    torch.testing.assert_close(asl_loss(logits, target, beta=beta, form="fbeta"), tversky(logits, target))


def test_asl_squared_is_not_tversky() -> None:
    from monai.losses import TverskyLoss

    logits, target, _ = random_batch()
    tversky = TverskyLoss(sigmoid=True, alpha=1 / 3.25, beta=2.25 / 3.25, smooth_nr=0.0, smooth_dr=1e-30)
    assert abs(value(asl_loss(logits, target)) - value(tversky(logits, target))) > 1e-3


# ---------------------------------------------------------------------------------------------- wce gradient


def test_wce_prediction_weight_is_not_detached() -> None:
    logits, target, _ = random_batch(empty_sample=False)
    logits.requires_grad_(True)
    wce_loss(logits, target).backward()
    ours = logits.grad.clone()

    def manual(detach: bool) -> torch.Tensor:
        x = logits.detach().clone().requires_grad_(True)
        s = torch.sigmoid(x).sum()
        s = s.detach() if detach else s
        r = (x.numel() - s) / s
        loss = -(
            r * target * torch.log(torch.sigmoid(x)) + (1 - target) * torch.log(1 - torch.sigmoid(x))
        ).mean()
        loss.backward()
        return x.grad

    torch.testing.assert_close(ours, manual(detach=False))
    assert (ours - manual(detach=True)).abs().max() > 1e-6


# ------------------------------------------------------------------------------------------------- numerics

ALL_CASES = [(c["loss"], c["iw"], c["params"]) for c in PAPER_CONFIGS.values()] + [
    ("asl", False, {"form": "fbeta"}),
    ("asl", True, {"form": "fbeta"}),
    ("wce", False, {"pos_weight": "target"}),
    ("focal", True, {"gamma": 0.5, "alpha": 0.25}),
]


@pytest.mark.parametrize(("name", "iw", "params"), ALL_CASES, ids=lambda v: str(v))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("logit_kind", ["+100", "-100", "±100", "-1000"])
@pytest.mark.parametrize("target_kind", ["empty", "full", "mixed"])
def test_finite_loss_and_gradient(name, iw, params, dtype, logit_kind, target_kind) -> None:
    shape = (2, 1, 4, 4, 4)
    g = torch.Generator().manual_seed(1)
    sign = torch.where(torch.rand(shape, generator=g) < 0.5, -1.0, 1.0).to(dtype)
    logits = {
        "+100": torch.full(shape, 100.0),
        "-100": torch.full(shape, -100.0),
        "-1000": torch.full(shape, -1e3),
    }.get(logit_kind, 100.0 * sign).to(dtype)
    target = {"empty": torch.zeros(shape), "full": torch.ones(shape)}.get(
        target_kind, (torch.rand(shape, generator=g) < 0.3).float()
    ).to(dtype)
    weight = None
    if iw:  # the extreme values of the default clip
        weight = torch.where(target > 0, torch.tensor(2e5), torch.tensor(1.0)).to(dtype)
    logits.requires_grad_(True)
    loss = get_loss(name, **params)(logits, target, weight)
    loss.backward()
    assert loss.dtype == dtype and loss.ndim == 0
    assert torch.isfinite(loss), f"{name} {params}: loss {loss}"
    assert torch.isfinite(logits.grad).all(), f"{name} {params}: non-finite gradient"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("name", "params"), [("dice", {}), ("asl", {}), ("asl", {"form": "fbeta"})])
def test_ratio_losses_on_empty_patch_are_one_with_zero_gradient(dtype, name, params) -> None:
    # The authors' unsmoothed Dice/ASL on a patch without lesion: numerator 0 -> loss 1, gradient 0, also when
    # p² underflows to 0 (logits -100 in float32), where the guard replaces 0/0.
    for fill in (-100.0, -3.0, 2.0):
        logits = torch.full((2, 1, 4, 4, 4), fill, dtype=dtype, requires_grad=True)
        loss = get_loss(name, **params)(logits, torch.zeros_like(logits))
        loss.backward()
        assert value(loss) == 1.0
        assert (logits.grad == 0).all()


def test_float32_and_float64_agree() -> None:
    logits, target, weight = random_batch(torch.float64)
    for config in PAPER_CONFIGS.values():
        loss = get_loss(config["loss"], **config["params"])
        w = weight if config["iw"] else None
        w32 = None if w is None else w.float()
        v64 = value(loss(logits, target, w))
        v32 = value(loss(logits.float(), target.float(), w32))
        assert v32 == pytest.approx(v64, rel=1e-5)


def test_target_dtype_is_cast() -> None:
    logits, target, _ = random_batch(torch.float32)
    torch.testing.assert_close(dice_loss(logits, target.bool()), dice_loss(logits, target))
    torch.testing.assert_close(bce_loss(logits, target.to(torch.uint8)), bce_loss(logits, target))


# ------------------------------------------------------------------------------------------------- registry


def test_names_and_iw_support() -> None:
    assert LOSS_NAMES == ("bce", "focal", "wce", "dice", "asl", "gdl")
    assert [n for n in LOSS_NAMES if supports_iw(n)] == ["bce", "focal", "dice", "asl"]
    with pytest.raises(ValueError, match="known losses: bce, focal, wce, dice, asl, gdl"):
        supports_iw("tversky")


def test_paper_configs() -> None:
    assert list(PAPER_CONFIGS) == [
        "bce", "iw-bce", "focal", "iw-focal", "wce", "dice", "iw-dice", "asl", "iw-asl", "gdl",
    ]  # fmt: skip
    assert PAPER_CONFIGS["iw-focal"] == {"loss": "focal", "iw": True, "params": {"gamma": 2.0, "alpha": 0.75}}
    assert PAPER_CONFIGS["asl"]["params"] == {"beta": 1.5, "form": "squared"}
    assert PAPER_CONFIGS["wce"]["params"] == {"pos_weight": "prediction"}
    logits, target, weight = random_batch()
    for key, config in PAPER_CONFIGS.items():
        assert key.removeprefix("iw-") == config["loss"]
        assert config["iw"] == key.startswith("iw-")
        assert not config["iw"] or supports_iw(config["loss"])
        loss = get_loss(config["loss"], **config["params"])
        out = loss(logits, target, weight if config["iw"] else None)
        assert torch.isfinite(out)
        # the params written there are the defaults of the loss functions
        assert loss_params(config["loss"]) == config["params"]


def test_get_loss_errors() -> None:
    with pytest.raises(ValueError, match="unknown loss 'bcee'.*bce, focal, wce, dice, asl, gdl"):
        get_loss("bcee")
    with pytest.raises(ValueError, match=r"unknown parameter\(s\) \['beta'\].*gamma=2.0, alpha=0.75"):
        get_loss("focal", beta=1.0)
    with pytest.raises(ValueError, match="accepted.*none"):
        get_loss("dice", smooth=1e-5)
    bad = [
        ("focal", {"alpha": 0.0}), ("focal", {"alpha": 1.0}), ("focal", {"alpha": 1.5}), ("focal", {"gamma": -1.0}),
        ("focal", {"gamma": float("nan")}), ("focal", {"alpha": True}), ("focal", {"alpha": "0.5"}),
        ("asl", {"beta": 0.0}), ("asl", {"beta": -1.0}), ("asl", {"form": "tversky"}),
        ("wce", {"pos_weight": "targets"}), ("wce", {"pos_weight": 2.0}),
    ]  # fmt: skip
    for name, params in bad:
        with pytest.raises(ValueError, match=next(iter(params))):
            get_loss(name, **params)
    # also when the function is called directly
    logits, target, _ = random_batch()
    with pytest.raises(ValueError, match="alpha"):
        focal_loss(logits, target, alpha=0.0)


def test_weight_rejected_where_not_supported() -> None:
    logits, target, weight = random_batch()
    for name in ("wce", "gdl"):
        with pytest.raises(ValueError, match="no weight map"):
            get_loss(name)(logits, target, weight)


def test_shape_errors() -> None:
    logits, target, weight = random_batch()
    with pytest.raises(ValueError, match="target"):
        bce_loss(logits, target[:, :, :-1])
    with pytest.raises(ValueError, match="weight"):
        dice_loss(logits, target, weight[:1])
    with pytest.raises(ValueError, match=r"\(B, 1, \*spatial\)"):
        dice_loss(torch.cat([logits, logits], dim=1), torch.cat([target, target], dim=1))
    with pytest.raises(ValueError, match="floating-point"):
        bce_loss(target.long(), target)
