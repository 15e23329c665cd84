"""A TPE sweep through real Ray Tune, driven as the study's sweep stage drives it (the study's RoundSearcher and
ASHA scheduler, Tuner.restore when the experiment exists), with a synthetic trainable so that the test can kill
it mid-search in seconds. Run as ``python -m tests.integration.tpe_driver SPACE.yaml STORAGE``."""

from __future__ import annotations

import json
import math
import sys
import tempfile
import time
from pathlib import Path

EPOCHS = 4


def score(trial: dict, epoch: int) -> float:
    """Best at lr = 0.01 and iw.power = 0.5, better with the epoch; deterministic (a resumed trial reports the
    same values)."""
    p = trial["params"]
    value = 0.9 - 0.25 * abs(math.log10(p["optimizer.lr"]) + 2) - 0.2 * abs(p.get("iw.power", 0.5) - 0.5)
    return round(value + 0.03 * epoch + 0.005 * trial["seed"], 6)


def trainable(config):
    from ray import tune

    start = 0
    ckpt = tune.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            start = json.loads((Path(d) / "state.json").read_text())["epoch"] + 1
    for epoch in range(start, EPOCHS):
        time.sleep(config["sleep"])
        with tempfile.TemporaryDirectory() as d:
            (Path(d) / "state.json").write_text(json.dumps({"epoch": epoch}))
            tune.report({"epoch": epoch, "val_avg_recall": score(config["trial"], epoch),
                         "training_done": epoch + 1 == EPOCHS}, checkpoint=tune.Checkpoint.from_directory(d))


def main(space: str, storage: str) -> None:
    import ray
    from ray import tune

    from study.loader import load_config
    from study.tune.asha import make_scheduler, state_file
    from study.tune.searcher import RoundSearcher

    cfg = load_config(space)
    root = Path(storage)
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    try:
        wrapped = tune.with_resources(trainable, {"cpu": 1})
        path = root / "sweep"
        if tune.Tuner.can_restore(str(path)):
            tuner = tune.Tuner.restore(str(path), trainable=wrapped, resume_unfinished=True)
        else:
            tuner = tune.Tuner(
                wrapped, param_space={"sleep": 0.5},
                tune_config=tune.TuneConfig(search_alg=RoundSearcher(cfg, root, "sweep"),
                                            num_samples=2 * cfg.sweep_size,
                                            scheduler=make_scheduler(cfg, state_file(root, "sweep")),
                                            reuse_actors=True),
                run_config=tune.RunConfig(name="sweep", storage_path=str(root), verbose=0))
        tuner.fit()
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
