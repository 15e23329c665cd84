"""The README's lesion-loss table: each configuration's hold-out rows averaged over its seeds.

Run: ``python docs/lesion_losses/means.py [docs/lesion_losses/summary.json]`` (a study's holdout/summary.json).
"""

import json
import sys
from collections import defaultdict
from pathlib import Path

path = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).with_name("summary.json"))
configs = json.loads(path.read_text())["configs"]
by_config = defaultdict(list)
for c in configs.values():
    by_config[c["config"]].append(c)


def mean(values):
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else float("nan")


print("| configuration | strict avg recall (IoU ≥ 0.3) | avg recall (any) | object Dice | FP/image |")
print("|---|---|---|---|---|")
for name, cs in by_config.items():
    print(f"| {name} | {mean(c['strict']['avg_recall'] for c in cs):.3f} | {mean(c['luna16']['avg_recall'] for c in cs):.3f}"
          f" | {mean(c['luna16']['obj_dice'] for c in cs):.3f} | {mean(c['luna16']['fp_per_image'] for c in cs):.2f} |")
