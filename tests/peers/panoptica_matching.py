"""Run in the panoptica peer venv: ``python panoptica_matching.py CASES.npz REQUESTS.json OUT.json``.

``CASES.npz`` holds ``<case>/pred`` and ``<case>/gt`` (uint8 3D masks); ``REQUESTS.json`` is a list of
``[case, kind, threshold, strict]`` with kind ``naive`` (NaiveThresholdMatching) or ``bipartite``
(MaxBipartiteMatching), both on IoU. For each request it writes panoptica's TP / FP / FN, the sorted Dice of the
matched instances and the matched (reference label, prediction label) pairs on cc3d's 26-connected labels.
"""

import json
import sys

import numpy as np
import panoptica
from panoptica import (
    CCABackend,
    ConnectedComponentsInstanceApproximator,
    InputType,
    MaxBipartiteMatching,
    Metric,
    NaiveThresholdMatching,
    Panoptica_Evaluator,
    SemanticPair,
)
from panoptica.metrics import MetricMode

panoptica.disable_citation_reminder()


def matcher(kind, threshold, strict):
    cls = NaiveThresholdMatching if kind == "naive" else MaxBipartiteMatching
    return cls(Metric.IOU, threshold, strict_threshold=strict)


def evaluate(pred, gt, kind, threshold, strict):
    evaluator = Panoptica_Evaluator(
        expected_input=InputType.SEMANTIC,
        instance_approximator=ConnectedComponentsInstanceApproximator(cca_backend=CCABackend.cc3d),
        instance_matcher=matcher(kind, threshold, strict),
        instance_metrics=[Metric.DSC, Metric.IOU],
        global_metrics=[Metric.DSC],
    )
    result = next(iter(evaluator.evaluate(pred.copy(), gt.copy(), verbose=False).values()))
    tp = int(result.tp)
    dice = sorted(float(d) for d in result.get_list_metric(Metric.DSC, MetricMode.ALL)) if tp else []
    # the assignment itself: approximate + match on the uncropped arrays (cc3d labels, as ours)
    unmatched = ConnectedComponentsInstanceApproximator(cca_backend=CCABackend.cc3d).approximate_instances(
        SemanticPair(pred.copy(), gt.copy()))
    matched = matcher(kind, threshold, strict).match_instances(unmatched)
    n_ref = max(unmatched.ref_labels, default=0)
    pairs = []
    for p in unmatched.pred_labels:
        new = int(matched.prediction_arr[unmatched.prediction_arr == p][0])
        if new <= n_ref:
            pairs.append([new, int(p)])
    return {"tp": tp, "fp": int(result.fp), "fn": int(result.fn), "dice": dice, "pairs": sorted(pairs)}


def main(cases_path, requests_path, out_path):
    arrays = np.load(cases_path)
    out = {}
    for case, kind, threshold, strict in json.load(open(requests_path)):
        key = json.dumps([case, kind, threshold, strict])
        out[key] = evaluate(arrays[f"{case}/pred"], arrays[f"{case}/gt"], kind, threshold, strict)
    out["_versions"] = {"panoptica": panoptica.__version__ if hasattr(panoptica, "__version__") else "2.1.7",
                        "numpy": np.__version__}
    with open(out_path, "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main(*sys.argv[1:4])
