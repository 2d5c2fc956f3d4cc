"""bench.py end to end: `--quick --json --profile` runs as a subprocess and writes every figure and profile (no speed
targets asserted)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import bench

REPO = Path(__file__).resolve().parents[1]

POSITIVE_FIGURES = [
    "data.train_images", "data.captions", "data.caption_length_mean", "data.caption_length_max",
    "data.jpeg_kib_mean",
    "feature_extraction.cpu_decode_images_per_s",
    "training.cache.wall_seconds", "training.cache.setup_seconds", "training.cache.captions_per_s",
    "training.cache.val_loss", "training.cache.cpu_seconds", "training.per_caption.cpu_seconds",
    "training.cache_warm.wall_seconds", "training.cache_warm.setup_seconds", "training.cache_warm.val_loss",
    "training.cache.captions_per_s_after_first_epoch",
    "training.per_caption.wall_seconds", "training.per_caption.captions_per_s", "training.per_caption.val_loss",
    "training.coco_epoch_seconds",
    "setup.first_seconds", "setup.second_seconds",
    "decoding.sample_one_at_a_time_images_per_s", "decoding.greedy_batched_images_per_s",
    "decoding.beam3_one_at_a_time_images_per_s", "decoding.beam3_batched_images_per_s",
    "memory.rss_peak_mib", "memory.children_rss_peak_mib",
    "speedups.train_3_epochs", "speedups.train_3_epochs_cache_on_disk", "speedups.train_captions_per_s",
    "speedups.train_3_epochs_cpu_time",
    "speedups.greedy_batched", "speedups.beam_batched", "speedups.setup_second_run",
]


def lookup(results: dict, dotted: str):
    value = results
    for part in dotted.split("."):
        value = value[part]
    return value


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    env = os.environ | {"OMP_NUM_THREADS": "1", "CAPTION_CACHE_DIR": str(out.parent / "cache")}
    run = subprocess.run(
        [sys.executable, str(REPO / "bench.py"), "--quick", "--device", "cpu", "--json", str(out),
         "--profile", str(out.parent / "profile")],
        cwd=out.parent, env=env, capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return run, json.loads(out.read_text())


def test_json_has_every_figure_positive(quick_run):
    _, results = quick_run
    for dotted in POSITIVE_FIGURES:
        value = lookup(results, dotted)
        assert isinstance(value, (int, float)) and not isinstance(value, bool), dotted
        assert value > 0, f"{dotted} = {value}"
    assert set(results["speedups"]) >= {"train_3_epochs", "greedy_batched", "beam_batched"}


def test_runs_compare_the_same_work(quick_run):
    _, results = quick_run
    data, training = results["data"], results["training"]
    # COCO-like captions: 5 per image, lengths around 11 with a long tail
    assert data["captions"] == 5 * (data["train_images"] + data["val_images"])
    assert 9 <= data["caption_length_mean"] <= 14
    assert data["caption_length_max"] > 16
    # the second cached run reused the feature cache and learned exactly what the first did
    assert results["setup"]["second_run_reused_feature_cache"] is True
    assert training["cache"]["cache_built"] is True
    assert training["cache_warm"]["val_losses"] == training["cache"]["val_losses"]
    assert len(training["per_caption"]["val_losses"]) == results["config"]["epochs"] == 3
    # the per-caption path reaches about the same validation loss as the cache path
    assert training["val_loss_relative_difference"] < 0.1
    # no GPU figures on the CPU
    assert results["feature_extraction"]["gpu_decode_images_per_s"] is None
    assert results["memory"]["cuda_max_allocated_mib"] is None


def test_table_reports_every_cpu_target(quick_run):
    run, results = quick_run
    names = [t["name"] for t in results["targets"]]
    assert names == ["train_3_epochs", "train_3_epochs_cache_on_disk", "equal_val_loss", "greedy_batched",
                     "beam_batched"]
    verdicts = [line.split()[0] for line in run.stdout.splitlines() if line.startswith(("PASS", "FAIL"))]
    assert verdicts == ["PASS" if t["passed"] else "FAIL" for t in results["targets"]]


def test_gpu_targets_read_figures_that_a_run_writes(quick_run):
    """The GPU targets are checked only on a GPU: their figures must exist in every run's JSON, or the first GPU run
    would end in a KeyError after all its measurements."""
    _, results = quick_run
    checked = {t["name"]: t for t in bench.check_targets(results, bench.GPU_TARGETS)}
    assert checked["feature_extraction"]["value"] is None and not checked["feature_extraction"]["passed"]
    training = results["training"]
    assert checked["decoder_training"]["value"] == training["cache"]["captions_per_s_after_first_epoch"] > 0
    # a COCO epoch is extrapolated from the epochs after the warm-up one
    assert checked["coco_epoch"]["value"] == training["coco_epoch_seconds"] == round(
        bench.COCO_TRAIN2014_CAPTIONS / training["cache"]["captions_per_s_after_first_epoch"], 2)
    assert checked["beam_decoding"]["value"] == results["decoding"]["beam3_batched_images_per_s"] > 0


def test_profile_records_where_each_phase_spends_its_time(quick_run):
    run, results = quick_run
    folder = Path(results["profile"]["folder"])
    expected_top_op = {"extract": "convolution", "train": "rnn_layer_backward", "beam": "rnn_layer"}
    steps = {}
    for phase, top_op in expected_top_op.items():
        summary = results["profile"][phase]
        assert json.loads((folder / phase / "summary.json").read_text()) == summary
        trace = json.loads((folder / phase / "trace.json").read_text())
        steps[phase] = {event["name"] for event in trace["traceEvents"]
                        if event.get("name", "").startswith("ProfilerStep#")}
        assert "Self CPU" in (folder / phase / "ops.txt").read_text()
        # on the CPU the ResNet's convolutions and the LSTM lead, and there are no GPU figures
        assert summary["host_ms_per_step"] > 0 and summary["gpu_busy_ms_per_step"] is None
        assert summary["top_ops_by"] == "self host time"
        assert top_op in " ".join(op["name"] for op in summary["top_ops"][:3]), (phase, summary["top_ops"])
        assert f"profile, {phase}" in run.stdout
    # training: 14 steps in the profiled epoch, so half are skipped as warm-up (train.py: 10 of them, at most) and
    # the next 7 are recorded, each its own step
    assert results["profile"]["train"]["steps"] == 7
    assert steps["train"] == {f"ProfilerStep#{n}" for n in range(7, 14)}
    assert results["profile"]["extract"]["steps"] == results["profile"]["beam"]["steps"] == 1
    # the DataLoader's hand-over shows up in the extraction profile: where data-loading stalls would appear
    assert "DataLoader" in (folder / "extract" / "ops.txt").read_text()


def test_bad_arguments_exit_2(tmp_path):
    run = subprocess.run([sys.executable, str(REPO / "bench.py"), "--images", "0"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2
    assert "--images" in run.stderr
