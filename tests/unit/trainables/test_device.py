"""The device of a trial (the GPU Ray assigned, checked), its batches on that device, and the records of several
cases built while the next case is predicted."""

from __future__ import annotations

import pytest
import torch

from trainables.device import GpuUnavailableError, gpu_error_line, is_gpu_error, task_device, torch_build


def test_outside_ray_the_device_is_the_cpu_here():
    assert task_device() == torch.device("cpu")  # no Ray, no CUDA: never an error
    assert torch_build() == f"torch {torch.__version__} (CUDA build: {torch.version.cuda or 'none'})"


def test_the_gpu_error_line_is_found_in_a_trial_error_text():
    line = ("CUDA unusable on node n1 (10.0.0.5): Ray gave this trial GPU 0 (CUDA_VISIBLE_DEVICES=0), but torch 2.13.0"
            "+cpu (CUDA build: none) cannot use it (torch.cuda.is_available() is False); install a CUDA build ...")
    traceback = ("Failure # 1 (occurred at 2026-12-04)\nray::ImplicitFunc.train() (pid=1, ip=10.0.0.5)\n"
                 '  File "trainer.py", line 76, in __init__\n'
                 f"trainables.device.GpuUnavailableError: {line}\n")
    assert is_gpu_error(traceback) and gpu_error_line(traceback) == line
    assert is_gpu_error(GpuUnavailableError(line)) and gpu_error_line(GpuUnavailableError(line)) == line
    assert not is_gpu_error("TrialDivergedError: non-finite training loss (nan) at epoch 0, iteration 3")


def test_a_trial_given_a_fake_gpu_fails_before_building_anything(fake_gpu_ray):
    """Ray advertises a GPU that torch (a CPU build here) cannot use: the trial's device check raises the one-line
    error instead of returning the CPU."""
    import ray

    task = ray.remote(num_gpus=1, num_cpus=1, max_retries=0)(task_device)
    with pytest.raises(ray.exceptions.RayTaskError) as err:
        ray.get(task.remote(1.0))
    cpu = ray.get(ray.remote(num_gpus=0, num_cpus=1)(task_device).remote(1.0))
    assert is_gpu_error(err.value)
    text = gpu_error_line(err.value)
    assert text.startswith("CUDA unusable on node ") and "Ray gave this trial GPU 0" in text
    assert "torch.cuda.is_available() is False" in text and "install a CUDA build of torch" in text
    assert cpu == torch.device("cpu")  # a CPU task on the same node is not affected


def test_the_prefetcher_hands_the_samplers_batches_to_the_cpu_without_copying(tmp_path):
    from trainables.data import PatchSampler, make_phantom, prepare_cache
    from trainables.step import DevicePrefetcher

    cache = prepare_cache(make_phantom(tmp_path / "p", n_cases=4, seed=0, shape=(16, 24, 24)), tmp_path / "c",
                          progress=False)
    ids = cache.case_ids("train")
    for iw, extras in ((True, ()), (False, ("labels",))):
        sampler = PatchSampler(cache, ids, patch_size=(8, 8, 8), batch_size=2, iw=iw, seed=1, num_workers=0,
                               extras=extras)
        ref = PatchSampler(cache, ids, patch_size=(8, 8, 8), batch_size=2, iw=iw, seed=1, num_workers=0,
                           extras=extras)
        stream = DevicePrefetcher(iter(sampler), torch.device("cpu"), iw=iw, extras=extras)
        for k in range(3):
            b, want = next(stream), ref.batch(k)
            assert torch.equal(b.image, torch.from_numpy(want.image))
            assert b.target.dtype == torch.uint8 and torch.equal(b.target, torch.from_numpy(want.target))
            assert (b.weight is None) is (not iw)
            if iw:
                assert torch.equal(b.weight, torch.from_numpy(want.weight))
            assert sorted(b.extras) == sorted(extras)
        assert sampler.state_dict()["next_batch"] == 3  # one step ahead only on a GPU


def test_records_built_beside_the_next_case_equal_records_built_in_turn(tmp_path):
    """predict_records overlaps a case's records with the next case's inference on a GPU; forced here on the
    CPU, the records are the same as built one after the other, case by case and threshold by threshold."""
    from trainables.config import InferenceConfig
    from trainables.data import make_phantom, prepare_cache
    from trainables.evaluate import predict_records

    cache = prepare_cache(make_phantom(tmp_path / "p", n_cases=6, seed=2, shape=(16, 24, 24)), tmp_path / "c",
                          progress=False)
    class Bright(torch.nn.Module):  # a lesion detector of sorts: bright voxels are lesion
        def forward(self, x):
            return 30.0 * (x - 0.6)

    model = Bright()
    args = dict(inference=InferenceConfig(window=(16, 24, 24), stride=(16, 24, 24)),
                rules={"any": ("any", None), "strict": ("iou", 0.3)}, device=torch.device("cpu"),
                thresholds=(0.5, 0.9))
    ids = cache.case_ids(["train", "val", "holdout"])
    serial = predict_records(model, cache, ids, overlap=False, **args)
    overlapped = predict_records(model, cache, ids, overlap=True, **args)
    assert serial == overlapped
    assert list(serial[0.5]["any"]) == ids and len(ids) == 6
    hits = [r["hit_dice"] for recs in serial[0.5]["any"].values() for r in recs.records if r["is_tum"]]
    assert hits and max(hits) > 0  # lesions found: the records are not empty
