"""The paper's training step on a GPU: ms per iteration, peak memory and the projected time of a sweep.

``python -m trainables.gpu_bench`` times the trials' own SGD step (:func:`trainables.step.train_step`, with the
trainable's optimiser, precision policy and cuDNN setting), one iteration of the paper protocol (batch 2 × 1 × 128³, UNet3D
width 1.0, Nesterov SGD) for each of the ten paper configurations, with and without mixed precision, and prints
a Markdown table for the README's performance section: ms/iteration, peak GPU memory, and the projected time
of 10,000 iterations (100 epochs × 100 iterations, one configuration). The card is named in the output.

``--device cpu --size 32 --width 0.125`` runs the same code on a CPU (a smoke check, not a GPU figure).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
from collections.abc import Sequence

import numpy as np
import torch

from trainables.config import OptimizerConfig
from trainables.environment import print_machine
from trainables.losses import PAPER_CONFIGS, get_loss
from trainables.step import Precision, configure_backends, time_steps
from trainables.trainer import build_optimizer
from trainables.unet import UNet3D, count_parameters
from trainables.weights import label_components, weights_from_labels

PROTOCOL_ITERATIONS = 10_000


def synthetic_batch(size: int, batch: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Image, target and iw map of a patch with lesions of several sizes (the weights are real iw maps)."""
    rng = np.random.default_rng(seed)
    target = np.zeros((batch, 1, size, size, size), np.float32)
    weight = np.empty_like(target)
    zz, yy, xx = np.mgrid[:size, :size, :size]
    for b in range(batch):
        for radius in (size / 6, size / 12, size / 24, 1.5):
            c = rng.uniform(radius, size - radius, 3)
            target[b, 0][(zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2 <= radius**2] = 1.0
        labels, _ = label_components(target[b, 0] > 0)
        weight[b, 0] = weights_from_labels(labels)
    image = target * 0.5 + rng.normal(0, 0.1, target.shape).astype(np.float32)
    return torch.from_numpy(image), torch.from_numpy(target), torch.from_numpy(weight)


def time_config(
    name: str, *, device: torch.device, size: int, width: float, batch: int, amp: bool, iters: int, warmup: int
) -> dict:
    """Time the trainable's own step (:func:`trainables.step.train_step`) on one paper configuration."""
    cfg = PAPER_CONFIGS[name]
    torch.manual_seed(0)
    model = UNet3D(width=width).to(device)
    opt = build_optimizer(model, OptimizerConfig())  # the paper's SGD
    loss_fn = get_loss(cfg["loss"], **cfg["params"])
    x, y, w = (t.to(device) for t in synthetic_batch(size, batch))
    w = w if cfg["iw"] else None
    precision = Precision.for_device(device, amp)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times, loss = time_steps(model, opt, loss_fn, x, y, w, precision, iters=iters, warmup=warmup)
    ms = 1000 * statistics.median(times)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    return {"config": name, "amp": amp, "amp_dtype": precision.name if amp else None,
            "ms_per_iter": ms, "peak_gib": peak, "final_loss": loss,
            "projected_hours": ms * PROTOCOL_ITERATIONS / 3.6e6}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--size", type=int, default=128, help="patch side (paper: 128)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--width", type=float, default=1.0)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--configs", nargs="*", default=list(PAPER_CONFIGS), choices=list(PAPER_CONFIGS))
    parser.add_argument("--json", help="also write the rows to this JSON file")
    parser.add_argument("--layout", action="store_true",
                        help="only compare the NCDHW and channels-last memory layouts (Dice step, AMP off and on, "
                             "alternating A/B): what `model.channels_last` should be on this device")
    args = parser.parse_args(argv)
    print_machine()
    device = torch.device(args.device)
    configure_backends(device)  # exactly as the trials do
    if device.type == "cuda":
        if not torch.cuda.is_available():
            parser.error("no CUDA device: use --device cpu for a smoke run")
        card = torch.cuda.get_device_name(device)
    else:
        card = f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    n_params = count_parameters(UNet3D(width=args.width))
    print(f"# {card}; torch {torch.__version__}; UNet3D width {args.width:g} ({n_params:,} parameters); "
          f"batch {args.batch} x 1 x {args.size}^3; median of {args.iters} iterations after {args.warmup} warm-up")
    if args.layout:
        from trainables.config import ModelConfig, ResourcesConfig, StudyConfig, TrainingConfig, TrialSpec
        from trainables.step import layout_seconds

        for amp in (False, True):
            study = StudyConfig(model=ModelConfig(width=args.width),
                                training=TrainingConfig(batch_size=args.batch, patch_size=(args.size,) * 3, amp=amp),
                                resources=ResourcesConfig(cpu=torch.get_num_threads()))
            ms = layout_seconds(study, TrialSpec(loss="dice", iw=False, seed=0), rounds=args.iters,
                                device=device.type)
            print(f"AMP {'on' if amp else 'off'}: NCDHW {1000 * ms['ncdhw']:.1f} ms, channels-last "
                  f"{1000 * ms['channels_last']:.1f} ms per step, ratio {ms['channels_last'] / ms['ncdhw']:.2f}",
                  flush=True)
        return 0
    print("| configuration | AMP | ms / iteration | peak GPU memory (GiB) | 10,000 iterations (h) |")
    print("|---|---|---|---|---|")
    rows = []
    for name in args.configs:
        for amp in (False, True):
            r = time_config(name, device=device, size=args.size, width=args.width, batch=args.batch, amp=amp,
                            iters=args.iters, warmup=args.warmup)
            r["card"] = card
            rows.append(r)
            peak = "–" if r["peak_gib"] is None else f"{r['peak_gib']:.2f}"
            print(f"| {name} | {r['amp_dtype'] or 'off'} | {r['ms_per_iter']:.0f} | {peak} | "
                  f"{r['projected_hours']:.2f} |", flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=2)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
