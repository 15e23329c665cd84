"""``study gpu-check``: measure a GPU once (JSON and a table), and render a recorded JSON as the GPU page's table (docs/gpu.md).

The measurements are :mod:`trainables.gpucheck`'s. On a machine whose torch sees no CUDA device the command exits
2 and says so (``--device cpu --smoke`` runs every section at toy sizes on the CPU: the command's own check,
never a GPU figure).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from trainables.errors import UserError


def register(sub) -> None:
    from study.cli.args import positive_float

    p = sub.add_parser(
        "gpu-check", help="measure this machine's GPU with the trials' own code (about 10 minutes); JSON + table",
        description="Run once on a GPU node: the environment (GPU, CUDA build, native bf16, TF32, Ray's GPU "
        "assignment), the paper's step per configuration in fp32 and AMP, channels-last and torch.compile, the "
        "real input pipeline against a device-resident batch, one 300x320x380 sliding-window case (GPU vs host "
        "time), two trials sharing the GPU at 0.5 each, and a checkpoint write. Prints a table; --out keeps the "
        "JSON, which --markdown renders as the GPU table of docs/gpu.md.")
    p.add_argument("--out", type=Path, help="write the measurements to this JSON file")
    p.add_argument("--minutes", type=positive_float, default=10.0,
                   help="time budget of the whole check (default 10); each section gets its share")
    p.add_argument("--markdown", type=Path, metavar="FILE.json",
                   help="print the GPU table (docs/gpu.md) from a recorded JSON and measure nothing")
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu (with --smoke only)")
    p.add_argument("--smoke", action="store_true",
                   help="toy sizes: checks that every section runs (minutes of GPU time become seconds); "
                   "its figures are not the paper's")
    p.add_argument("--sections", default=None,
                   help="comma-separated subset of the sections (default: all: env,step,layout,loop,window,"
                   "shared,checkpoint)")
    p.set_defaults(func=cmd_gpu_check)


def cmd_gpu_check(args) -> int:
    if args.markdown is not None:
        print(markdown(read_report(args.markdown)), end="")
        return 0
    import torch

    from trainables.device import cuda_problem, torch_build
    from trainables.gpucheck import SECTIONS, run_check

    sections = SECTIONS if args.sections is None else tuple(s.strip() for s in args.sections.split(",") if s.strip())
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown or not sections:
        raise UserError(f"--sections {args.sections}: unknown section(s) {', '.join(unknown) or '(none given)'}; "
                        f"known: {', '.join(SECTIONS)}")
    if args.device not in ("cuda", "cpu"):
        raise UserError(f"--device {args.device}: use cuda (the GPU check) or cpu (with --smoke)")
    if args.device == "cpu" and not args.smoke:
        raise UserError("--device cpu measures no GPU: add --smoke to check that the command runs here, or run "
                        "`study gpu-check` on a GPU node")
    if args.device == "cuda":
        problem = cuda_problem()
        if problem is not None:
            raise UserError(f"no usable CUDA device here: {torch_build()} ({problem}); `study gpu-check` measures a "
                            "GPU: run it on a GPU node with a CUDA build of torch (`--device cpu --smoke` checks "
                            "the command itself)")
    if args.out is not None:
        from study.preflight import check_output_folder

        check_output_folder("--out", args.out.parent, purpose="the JSON")
        args.out.parent.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    report = run_check(device, minutes=args.minutes, smoke=args.smoke, sections=sections,
                       where=args.out.parent.resolve() if args.out is not None else None,
                       progress=lambda line: print(f"[gpu-check] {line}", flush=True))
    if args.out is not None:
        from trainables.io_utils import write_text_atomic

        write_text_atomic(args.out, json.dumps(report, indent=2, default=str))
        print(f"[gpu-check] measurements written to {args.out}")
    print()
    print(markdown(report), end="")
    return 0


def read_report(path: Path) -> dict[str, Any]:
    """A recorded ``study gpu-check`` JSON, checked enough to render (a UserError names what is wrong)."""
    from trainables.io_utils import read_json

    data = read_json(path, what="the gpu-check measurements", remedy="record it again with `study gpu-check --out`")
    if not isinstance(data, dict) or not isinstance(data.get("sections"), dict) or data.get("version") != 1:
        raise UserError(f"{path}: not a `study gpu-check` JSON (version 1 with 'sections'); record it with "
                        "`study gpu-check --out FILE.json`")
    return data


def _f(value, digits: int = 2, unit: str = "") -> str:
    return "–" if value is None else f"{value:.{digits}f}{unit}"


def markdown(report: dict[str, Any]) -> str:
    """The GPU page's section from a gpu-check JSON: a header line naming the card and software, the step
    table, and one line per other measurement (what it means for a study)."""
    sec = report["sections"]
    env = sec.get("env") or {}
    card = env.get("gpu") or "CPU"
    lines = []
    what = (f"{card} (compute capability {env.get('capability')}, {env.get('memory_gib')} GiB"
            f"{', native bf16' if env.get('native_bf16') else ''})" if env.get("gpu") else card)
    lines.append(f"Measured with `study gpu-check` on {what}; {env.get('torch_build', '')}, cuDNN "
                 f"{env.get('cudnn')}; {report.get('created', '')}; budget {report.get('minutes')} min, "
                 f"{report.get('seconds')} s used.")
    if report.get("smoke"):
        lines.append("")
        lines.append("**Smoke run at toy sizes: these figures check the command, they are not GPU figures.**")
    ray_task = env.get("ray_task")
    if ray_task:
        ok = ray_task.get("cuda_problem") is None
        lines.append("")
        lines.append(f"- Ray task with `num_gpus=1`: GPU ids {ray_task.get('gpu_ids')}, CUDA "
                     f"{'usable' if ok else 'NOT usable: ' + str(ray_task.get('cuda_problem'))}.")
    step = sec.get("step") or {}
    if step.get("rows"):
        lines += ["", f"The paper's step (batch {step['batch']} × 1 × {step['patch']}³, U-Net width {step['width']:g}, "
                      "SGD Nesterov); fp32 means float32 with TF32 convolutions (PyTorch's default):", "",
                  "| configuration | precision | ms / iteration | peak GPU memory (GiB) | 10,000 iterations (h) |",
                  "|---|---|---|---|---|"]
        for r in step["rows"]:
            lines.append(f"| {r['config']} | {r['precision']} | {r['ms_per_iter']:.1f} | {_f(r['peak_gib'])} | "
                         f"{r['projected_hours']:.2f} |")
    elif "error" in step:
        lines += ["", f"- step: failed ({step['error']})"]
    extra = []
    lay = sec.get("layout") or {}
    if "layout_amp_off" in lay:
        extra.append("channels-last / NCDHW step time: "
                     + ", ".join(f"AMP {k.rsplit('_', 1)[1]} {lay[k]['ratio']:.2f}"
                                 for k in ("layout_amp_off", "layout_amp_on") if k in lay)
                     + " (below 0.95: a study picks channels-last)")
    comp = lay.get("compile_amp_on") or {}
    if "ratio" in comp:
        extra.append(f"torch.compile / eager step time (AMP): {comp['ratio']:.2f}, compilation "
                     f"{comp['compile_time']:.0f} s (below 0.95: a study compiles)")
    elif "error" in comp:
        extra.append(f"torch.compile: failed ({comp['error']})")
    elif "skipped" in comp:
        extra.append(f"torch.compile: skipped ({comp['skipped']})")
    loop = (sec.get("loop") or {}).get("workers") or {}
    if loop:
        extra.append("input pipeline (sampler → pinned → prefetch → step) / device-resident batch: "
                     + ", ".join(f"{v['ratio']:.3f} with {k} worker(s)" for k, v in loop.items())
                     + " (1.00 = the GPU never waits for data)")
    win = sec.get("window") or {}
    if "device_seconds" in win:
        vol = "×".join(map(str, win["volume"]))
        extra.append(f"one {vol} case ({win['windows']} windows of {win['window']}³, {win['precision']}): "
                     f"{win['device_seconds']:.2f} s sliding window on the device, {win['host_records_seconds']:.2f} s "
                     f"of records on the host ({win['thresholds']} thresholds), overlapped case after case: "
                     f"{win['overlapped_seconds_per_case']:.2f} s per case instead of {win['serial_seconds_per_case']:.2f}")
    sh = sec.get("shared") or {}
    if sh.get("ratio") is not None:
        peaks = ", ".join(_f(p.get("peak_gib"), unit=" GiB") for p in sh["pair"])
        extra.append(f"two trials at 0.5 GPU each: {sh['combined_it_per_s']:.2f} it/s together vs "
                     f"{sh['single']['it_per_s']:.2f} for one alone (×{sh['ratio']:.2f}); peak memory {peaks}")
    ck = sec.get("checkpoint") or {}
    if "seconds" in ck:
        extra.append(f"one checkpoint: {ck['megabytes']:.0f} MB written in {ck['seconds']:.2f} s")
    for name, s in sec.items():
        if "error" in s and name not in ("step",) and not (name == "layout" and "layout_amp_off" in s):
            extra.append(f"{name}: failed ({s['error']})")
        elif "skipped" in s:
            extra.append(f"{name}: skipped ({s['skipped']})")
    if extra:
        lines.append("")
        lines += [f"- {e}" for e in extra]
    return "\n".join(lines) + "\n"
