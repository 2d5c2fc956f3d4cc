"""bench.py end to end: `--quick --json --profile` runs as a subprocess and writes every figure and profile (no speed
targets asserted); and the attention decoder's run settings."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import bench
from config import resolve_config

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
    "attention.grid", "attention.attention_size",
    "attention.training.wall_seconds", "attention.training.setup_seconds", "attention.training.captions_per_s",
    "attention.training.captions_per_s_after_first_epoch", "attention.training.val_loss",
    "attention.training.cache_build_seconds", "attention.training.cache_mib",
    "attention.decoding.beam3_one_at_a_time_images_per_s", "attention.decoding.beam3_batched_images_per_s",
    "speedups.attention_train_captions_per_s_vs_lstm", "speedups.attention_beam_batched",
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
    assert set(results["speedups"]) >= {"train_3_epochs", "greedy_batched", "beam_batched", "attention_beam_batched"}


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


def test_attention_decoder_is_measured_on_the_same_work(quick_run):
    _, results = quick_run
    cfg, attention, lstm = results["config"], results["attention"], results["training"]["cache"]
    training, decoding = attention["training"], attention["decoding"]
    # its own grid cache, built in the run, of crop / 32 cells a side (1 at the quick preset's 32 px)
    assert attention["grid"] == bench.attention_grid(cfg["image_size"]) == 1
    assert training["cache_built"] is True and training["setup_seconds"] >= training["cache_build_seconds"]
    assert len(training["val_losses"]) == cfg["epochs"] and all(loss > 0 for loss in training["val_losses"])
    assert results["speedups"]["attention_train_captions_per_s_vs_lstm"] == round(
        training["captions_per_s_after_first_epoch"] / lstm["captions_per_s_after_first_epoch"], 3)
    # the LSTM's decoding counts, batched and one at a time giving the same captions
    assert [decoding[k] for k in ("images_batched", "images_one_at_a_time", "max_len")] == [
        results["decoding"][k] for k in ("images_batched", "images_one_at_a_time", "max_len")]
    assert 0 <= decoding["beam3_agreement"] <= 1
    assert results["speedups"]["attention_beam_batched"] == round(
        decoding["beam3_batched_images_per_s"] / decoding["beam3_one_at_a_time_images_per_s"], 2)
    assert "files" not in training and "cache" not in training


def test_table_reports_every_cpu_target(quick_run):
    run, results = quick_run
    names = [t["name"] for t in results["targets"]]
    assert names == ["train_3_epochs", "train_3_epochs_cache_on_disk", "equal_val_loss", "greedy_batched",
                     "beam_batched", "attention_beam_batched"]
    verdicts = [line.split()[0] for line in run.stdout.splitlines() if line.startswith(("PASS", "FAIL"))]
    assert verdicts == ["PASS" if t["passed"] else "FAIL" for t in results["targets"]]
    attention = next(t for t in results["targets"] if t["name"] == "attention_beam_batched")
    assert attention["value"] == results["speedups"]["attention_beam_batched"] and attention["threshold"] == 5.0
    for row in ("attention, grid cache", "attention, train from cache", "attention, beam 3 batched"):
        assert row in run.stdout


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
    attention = results["attention"]["decoding"]["beam3_batched_images_per_s"]
    assert checked["attention_beam_decoding"]["value"] == attention > 0
    assert set(checked) == {name for name, *_ in bench.GPU_TARGETS}


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


@pytest.mark.parametrize("preset", list(bench.PRESETS))
def test_attention_runs_take_the_lstm_sizes_and_a_grid_from_the_crop(preset, tmp_path):
    cfg = bench.PRESETS[preset]
    lstm = bench.train_config(cfg, tmp_path / "data", tmp_path, "cache", cache=True)
    attention = resolve_config(bench.train_config(cfg, tmp_path / "data", tmp_path, "attention", cache=True,
                                                  decoder="attention"))  # accepted by train.py (one LSTM cell)
    assert (attention.decoder, attention.num_layers, attention.attention_size) == ("attention", 1, cfg.attention_size)
    assert attention.grid == {224: 7, 128: 4, 32: 1}[cfg.image_size] == bench.attention_grid(cfg.image_size)
    same = ("image_size", "embed_size", "hidden_size", "dropout", "batch_size", "lr", "epochs", "cache_dir", "mirror")
    assert [getattr(attention, k) for k in same] == [getattr(lstm, k) for k in same]
    assert lstm.decoder == "lstm" and lstm.num_layers == cfg.num_layers


def test_bad_arguments_exit_2(tmp_path):
    run = subprocess.run([sys.executable, str(REPO / "bench.py"), "--images", "0"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2
    assert "--images" in run.stderr
