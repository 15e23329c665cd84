"""The seed-collapse experiment quoted in the README (not part of the test suite).

One trial trained without Ray (``run_trial``) on a 24-case phantom, then judged on its 6 validation cases with
eval-mode BatchNorm and with "precise BN" (every BN's running statistics recomputed over 100 training batches).
Prints one JSON line. The README's numbers come from these runs (docs/claim/collapse_results.jsonl):

    python docs/claim/collapse_experiment.py 0.14,0.40 dice iw 1 20 50        # contrast, loss, iw|plain, seed,
    python docs/claim/collapse_experiment.py 0.14,0.40 dice plain 1 20 50     # epochs, iterations[, lr]
    python docs/claim/collapse_experiment.py 0.14,0.40 dice iw 0 20 50
    python docs/claim/collapse_experiment.py 0.22,0.40 dice plain 1 20 50
    python docs/claim/collapse_experiment.py 0.30,0.40 dice plain 1 20 50
    python docs/claim/collapse_experiment.py 0.14,0.40 dice iw 0 20 50 0.003
"""

import copy
import json
import sys
import time
from pathlib import Path

import torch

from study.config import config_from_dict
from study.space import study_payload
from trainables.data import Cache, PatchSampler, make_phantom, prepare_cache
from trainables.evaluate import build_model, predict_records
from trainables.metrics import summarize
from trainables.metrics.summary import restrict_to_size
from trainables.trainable import run_trial

contrast = tuple(float(c) for c in sys.argv[1].split(","))
loss, iw, seed = sys.argv[2], sys.argv[3] == "iw", int(sys.argv[4])
epochs, its = int(sys.argv[5]), int(sys.argv[6])
root = Path(f"/tmp/iw-collapse/data_{sys.argv[1]}")
cache_dir = root / "cache"
if not (cache_dir / "cache.json").is_file():
    m = make_phantom(root / "phantom", n_cases=24, seed=0, shape=(48, 64, 64), contrast=contrast)
    prepare_cache(m, cache_dir, progress=False)
torch.set_num_threads(1)
data = {
    "data": {"source": "phantom"},
    "model": {"width": 0.125},
    "training": {
        "epochs": epochs,
        "iterations": its,
        "patch_size": [32, 32, 32],
        "optimizer": {"lr": float(sys.argv[7]) if len(sys.argv) > 7 else 0.01},
        "lr_schedule": {"milestones": [int(epochs * 0.8)], "gamma": 0.1},
    },
    "inference": {"window": [48, 64, 64], "stride": [48, 64, 64]},
    "search": {"losses": {loss: {"iw": iw}}, "seeds": [seed]},
}
cfg = config_from_dict(data)
config = {
    "trial": cfg.trials[0].as_dict(),
    "study": study_payload(cfg, str(cache_dir)),
    "run": {"stage": "sweep", "splits": ["train"], "validate": False, "epochs": epochs},
}
states, losses = [], []
t0 = time.time()
run_trial(
    config,
    state=None,
    report=lambda m, d: (
        losses.append(m["train_loss"]),
        states.append(torch.load(Path(d) / "state.pt", weights_only=True)),
    ),
)
train_s = time.time() - t0
cache = Cache(cache_dir)
val = cache.case_ids(["val"])
model = build_model(cfg.model)
model.load_state_dict(states[-1]["model"])
rules = {"any": ("any", None), "strict": ("iou", 0.3)}


def evaluate(m):
    rec = predict_records(m, cache, val, inference=cfg.inference, rules=rules, device=torch.device("cpu"))[0.5]
    a = summarize(rec["any"], "luna16", n_boot=0)
    s = summarize(rec["strict"], "luna16", n_boot=0)
    small = summarize(restrict_to_size(rec["any"], 0, 6.0), "luna16", n_boot=0)
    small_s = summarize(restrict_to_size(rec["strict"], 0, 6.0), "luna16", n_boot=0)
    return {
        "any": round(a["avg_recall"], 3),
        "strict": round(s["avg_recall"], 3),
        "dice": None if a["obj_dice"] is None else round(a["obj_dice"], 3),
        "fp": round(a["fp_per_image"], 2),
        "pos": round(a["pred_positive_fraction"], 4),
        "small_any": round(small["avg_recall"], 3),
        "small_strict": round(small_s["avg_recall"], 3),
    }


out = {
    "contrast": contrast,
    "loss": loss,
    "iw": iw,
    "seed": seed,
    "train_s": round(train_s),
    "loss_curve": [round(v, 4) for v in losses[:: max(1, epochs // 5)]] + [round(losses[-1], 4)],
}
bn = model.out[-1]
out["final_bn"] = {
    "mean": float(bn.running_mean[0]),
    "var": float(bn.running_var[0]),
    "w": float(bn.weight[0]),
    "b": float(bn.bias[0]),
}
out["eval_bn"] = evaluate(model)
# precise BN: recompute every BN's running statistics as a plain average over 100 training batches
pm = copy.deepcopy(model)
for mod in pm.modules():
    if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm):
        mod.reset_running_stats()
        mod.momentum = None
pm.train()
tr = PatchSampler(
    cache, cache.case_ids(["train"]), patch_size=(32, 32, 32), batch_size=2, iw=False, seed=999, num_workers=0
)
with torch.no_grad():
    for k in range(100):
        pm(torch.from_numpy(tr.batch(k).image))
fb = pm.out[-1]
out["precise_bn"] = evaluate(pm)
out["precise_final_bn"] = {"mean": float(fb.running_mean[0]), "var": float(fb.running_var[0])}
print(json.dumps(out), flush=True)
