"""train.py in-process: learning from the feature cache, the cache's reuse and invalidation, the files written
(template-compatible pickles, weights-only checkpoint), refusals to resume, NaN stops, the image paths, the CLI."""

import json
import math
import os
import shutil
import threading
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import train
import vocabulary
from checkpoints import check_resumable, load_checkpoint
from config import (
    RESUME_MUST_MATCH,
    TrainConfig,
    TrainingDiverged,
    TrainingError,
    build_parser,
    resolve_config,
)
from data_loader import dataset_paths
from datasets import caption_table, read_split
from features import (
    CACHE_FORMAT,
    FeatureCache,
    cache_build_lock,
    extract_features,
    fcntl,
    feature_cache,
    feature_stats,
    sampled_feature_stats,
)
from model import DecoderRNN, EncoderCNN
from profiling import busy_time
from runtime import Runtime
from sample_data import make_sample_dataset
from vocabulary import Vocabulary

TINY = dict(image_size=32, embed_size=64, hidden_size=64, batch_size=32, num_workers=0, extract_batch_size=50)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A folder shared by this module's runs: the sample set, token and feature caches."""
    root = tmp_path_factory.getbasetemp() / "train-shared"
    make_sample_dataset(root / "sample", n_train=150, n_val=30, n_test=5)
    return root


@pytest.fixture(scope="module")
def token_cache(base):
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(vocabulary, "CACHE_DIR", base / "tokens")
        yield


def config(base: Path, out: Path, **overrides) -> TrainConfig:
    settings = dict(TINY, data="sample", data_root=str(base / "sample"), cache_dir=str(base / "features"),
                    out_dir=str(out))
    return TrainConfig(**(settings | overrides))


def cli_error(capsys) -> str:
    """The error line of a CLI run: exactly one, and the last thing written to stderr (after any progress bars)."""
    lines = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], lines[-3:]
    return errors[0]


@pytest.fixture(scope="module")
def trained(base, token_cache, tmp_path_factory) -> dict:
    """One run of a few hundred steps from the cache, inspected by several tests."""
    out = tmp_path_factory.mktemp("trained")
    return train.train(config(base, out, epochs=8, checkpoint_minutes=0, log_every=10))


def test_loss_goes_down_from_the_cache(trained):
    metrics = trained["metrics"]
    steps = metrics[-1]["step"]
    assert steps >= 200 and trained["cache"] is not None
    train_losses = [m["train_loss"] for m in metrics]
    val_losses = [m["val_loss"] for m in metrics]
    assert train_losses[-1] < 0.6 * train_losses[0]
    assert 0.5 < train_losses[-1] / val_losses[-1] < 2  # both are mean cross-entropies per word
    assert val_losses[-1] < val_losses[0] - 0.5
    assert all(math.isclose(m["val_perplexity"], math.exp(m["val_loss"]), rel_tol=1e-9) for m in metrics)
    assert all(m["captions_per_second"] > 0 for m in metrics)


def test_pickles_load_strictly_into_fresh_modules_and_reproduce_the_val_loss(trained, base):
    """The saved encoder maps raw ResNet features (the standardisation is folded into embed) like the model did."""
    out = Path(trained["out_dir"])
    cfg = json.loads((out / "train_config.json").read_text())
    assert cfg["image_size"] == 32 and cfg["embed_size"] == 64 and cfg["hidden_size"] == 64
    vocab = Vocabulary.load(out / "vocab.pkl")
    for epoch in range(1, 9):
        assert (out / f"encoder-{epoch}.pkl").exists() and (out / f"decoder-{epoch}.pkl").exists()
    encoder = EncoderCNN(64, pretrained=False)
    decoder = DecoderRNN(64, 64, len(vocab), cfg["num_layers"])
    saved = torch.load(out / "encoder-8.pkl", weights_only=True)
    assert all(tensor.is_contiguous() for tensor in saved.values())  # as old PyTorch and the template wrote them
    encoder.load_state_dict(saved, strict=True)
    decoder.load_state_dict(torch.load(out / "decoder-8.pkl", weights_only=True), strict=True)
    encoder.eval()
    decoder.eval()

    # the template's forward on the validation images' cached centre features gives the reported val loss
    paths = dataset_paths("sample", base / "sample")
    split = read_split(paths["val_annotations"], paths["val_images"])
    cache = feature_cache(encoder, split, ("centre",), image_size=32, cache_dir=base / "features",
                          runtime=Runtime(torch.device("cpu")))
    assert not cache.built
    table = caption_table(split, vocab, cache.readable)
    total, tokens = 0.0, 0
    with torch.no_grad():
        for i in range(len(table.lengths)):
            captions = table.tokens[i : i + 1, : table.lengths[i]]
            features = torch.from_numpy(np.asarray(cache.features[int(table.rows[i]), :1], dtype=np.float32))
            outputs = decoder(encoder.embed(features), captions)
            total += F.cross_entropy(outputs.flatten(0, 1), captions.flatten(), reduction="sum").item()
            tokens += captions.numel()
    assert total / tokens == pytest.approx(trained["val_loss"], abs=2e-4)


def test_checkpoint_loads_weights_only_and_holds_the_training_state(trained):
    out = Path(trained["out_dir"])
    checkpoint = torch.load(out / "checkpoint.pt", weights_only=True)
    assert checkpoint["epoch"] == 9 and checkpoint["step"] == 0
    assert checkpoint["global_step"] == trained["metrics"][-1]["step"]
    assert checkpoint["vocab_fingerprint"] == Vocabulary.load(out / "vocab.pkl").fingerprint()
    assert {"optimizer", "scheduler", "sampler", "config", "metrics", "model"} <= checkpoint.keys()
    assert checkpoint["metrics"] == trained["metrics"]
    # Adam holds exactly encoder.embed's and the decoder's parameters
    vocab_size = len(Vocabulary.load(out / "vocab.pkl"))
    decoder_params = list(DecoderRNN(64, 64, vocab_size, checkpoint["config"]["num_layers"]).parameters())
    adam_params = [i for group in checkpoint["optimizer"]["param_groups"] for i in group["params"]]
    assert len(adam_params) == 2 + len(decoder_params) == len(checkpoint["optimizer"]["state"])
    assert all(torch.isfinite(t).all() for t in checkpoint["model"].values())
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == trained["metrics"]
    assert (out / "loss.png").read_bytes().startswith(b"\x89PNG")
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no temp files left


def test_cache_miss_builds_hit_reuses_and_changes_invalidate(base, token_cache, tmp_path):
    """A hit runs no ResNet forward; a new image size, backbone or image list builds a new cache."""
    data = tmp_path / "data"
    shutil.copytree(base / "sample", data)
    paths = dataset_paths("sample", data)
    split = read_split(paths["val_annotations"], paths["val_images"])
    cpu = Runtime(torch.device("cpu"))
    encoder = EncoderCNN(16, pretrained=False, backbone_seed=0)
    forwards = []
    encoder.resnet.register_forward_hook(lambda *_: forwards.append(1))

    def build(enc=encoder, size=32, views=("centre", "mirror"), the_split=split) -> FeatureCache:
        forwards.clear()
        return feature_cache(enc, the_split, views, image_size=size, cache_dir=tmp_path / "features",
                             runtime=cpu, batch_size=16, num_workers=0)

    outdated = tmp_path / "features" / "captions_val-32px-0123456789abcdef"  # written by an older train.py
    outdated.mkdir(parents=True)
    (outdated / "key.json").write_text(json.dumps({"key": {"format": CACHE_FORMAT - 1}}))
    first = build()
    assert first.built and forwards and first.features.shape == (30, 2, 2048)
    assert not outdated.exists()
    assert first.features.dtype == np.float16 and first.skipped == 0
    assert isinstance(first.features, np.memmap)
    # 20 batches of one image: written to the cache in two flushes (EXTRACT_FLUSH_BATCHES = 16), in the right rows
    one_by_one, flags = np.zeros((20, 1, 2048), dtype=np.float16), np.zeros(20, dtype=bool)
    extract_features(encoder, split.paths[:20], one_by_one, flags, image_size=32, mirror=False, runtime=cpu,
                           batch_size=1, num_workers=0, desc="one by one")
    assert flags.all()
    np.testing.assert_allclose(one_by_one[:, 0], first.features[:20, 0], rtol=0.02, atol=0.01)
    again = build()
    assert not again.built and not forwards and again.path == first.path
    np.testing.assert_array_equal(again.features, first.features)

    bigger = build(size=40)
    assert bigger.built and bigger.path != first.path
    other_backbone = EncoderCNN(16, pretrained=False, backbone_seed=1)
    assert build(enc=other_backbone).built
    centre_only = build(views=("centre",))
    assert centre_only.built
    # the same centre views (batched with or without their mirrors, so equal up to rounding)
    np.testing.assert_allclose(centre_only.features[:, 0], first.features[:, 0], rtol=0.02, atol=0.01)

    image = split.paths[3]
    os.utime(image, ns=(image.stat().st_atime_ns, image.stat().st_mtime_ns + 10**9))  # touched: stale
    touched = build()
    assert touched.built and touched.path != first.path
    assert not build().built

    image.write_bytes(b"not a jpeg")  # now unreadable: counted, zero features, its captions left out
    broken = build()
    assert broken.built and broken.skipped == 1 and not broken.readable[3]
    assert not broken.features[3].any()
    vocab = Vocabulary(1, str(tmp_path / "vocab.pkl"), annotations_file=str(paths["train_annotations"]))
    table = caption_table(split, vocab, broken.readable)
    assert table.left_out == sum(1 for _, image_id in split.captions if image_id == split.image_ids[3]) > 0
    assert 3 not in table.rows.tolist()

    # JPEGs decoded by torchvision on the device (nvJPEG on a GPU) make a cache of their own, with nearly the
    # same features (resizing with torch instead of PIL moves pixels by ~0.005 in normalised units)
    on_device = feature_cache(encoder, split, ("centre",), image_size=32, cache_dir=tmp_path / "features",
                              runtime=cpu, batch_size=16, num_workers=0, decode_on_device=True)
    assert on_device.built and on_device.path != centre_only.path
    assert on_device.readable.tolist() == broken.readable.tolist()
    ok = broken.readable
    pil, device = (np.asarray(c.features[ok, 0], dtype=np.float64) for c in (broken, on_device))
    spread = pil - pil.mean(0)  # random-ResNet features share a large offset: compare what varies
    assert np.abs(device - pil).mean() < 0.1 * np.abs(spread).mean()

    fewer = read_split(paths["val_annotations"], paths["val_images"])
    fewer.image_ids, fewer.paths = fewer.image_ids[:-1], fewer.paths[:-1]  # an image dropped from the list
    assert build(the_split=fewer).built
    temp_folders = [p for p in (tmp_path / "features").iterdir() if p.is_dir() and p.name.startswith(".")]
    assert not temp_folders


@pytest.mark.skipif(fcntl is None, reason="the build lock needs POSIX flock")
def test_a_run_wanting_a_cache_that_another_run_is_building_waits_and_reuses_it(base, token_cache, tmp_path, capsys):
    """Two runs started together build a cache once: the second waits on the build lock, then reads the cache."""
    paths = dataset_paths("sample", base / "sample")
    split = read_split(paths["val_annotations"], paths["val_images"])
    cpu = Runtime(torch.device("cpu"))
    encoder = EncoderCNN(16, pretrained=False, backbone_seed=0)
    forwards = []
    encoder.resnet.register_forward_hook(lambda *_: forwards.append(threading.current_thread().name))
    cache_dir = tmp_path / "features"
    opened = {}

    def second_run():
        opened["cache"] = feature_cache(encoder, split, ("centre",), image_size=32, cache_dir=cache_dir, runtime=cpu,
                                        batch_size=16, num_workers=0)

    with cache_build_lock(cache_dir):  # the first run is building
        waiter = threading.Thread(target=second_run, name="second")
        waiter.start()
        waiter.join(timeout=1.0)
        assert waiter.is_alive() and not forwards  # blocked on the lock, not extracting
        first = feature_cache(encoder, split, ("centre",), image_size=32, cache_dir=tmp_path / "elsewhere",
                              runtime=cpu, batch_size=16, num_workers=0)
        shutil.copytree(first.path, cache_dir / first.path.name)  # what the first run's build leaves
    waiter.join(timeout=60)
    assert not waiter.is_alive()
    assert "waiting for another run that is building a feature cache" in capsys.readouterr().out
    assert not opened["cache"].built and "second" not in forwards
    np.testing.assert_array_equal(opened["cache"].features, first.features)


def test_resume_refuses_another_vocabulary_or_model_shape(trained, base, capsys):
    out = Path(trained["out_dir"])
    before = {name: (out / name).read_bytes() for name in ("vocab.pkl", "checkpoint.pt")}
    args = ["--data-root", str(base / "sample"), "--cache-dir", str(base / "features"), "--out-dir", str(out),
            "--image-size", "32", "--embed-size", "64", "--batch-size", "32", "--epochs", "9", "--resume"]
    assert train.main(args + ["--hidden-size", "64", "--vocab-threshold", "60"]) == 2
    message = cli_error(capsys)
    assert "checkpoint.pt" in message and "different vocabulary" in message

    assert train.main(args + ["--hidden-size", "32"]) == 2
    message = cli_error(capsys)
    assert "checkpoint.pt" in message and "--hidden-size 32" in message and "64" in message

    # the optimiser's settings and the schedule's length belong to the checkpoint too
    assert train.main(args + ["--hidden-size", "64"]) == 2
    assert "--epochs 9: the checkpoint was trained with 8" in cli_error(capsys)
    assert train.main(args + ["--hidden-size", "64", "--epochs", "8", "--lr", "0.5"]) == 2
    assert "--lr 0.5: the checkpoint was trained with 0.003" in cli_error(capsys)
    assert train.main(args + ["--hidden-size", "64", "--epochs", "8", "--backbone-seed", "1"]) == 2
    assert "trained on another ResNet-50 backbone" in cli_error(capsys)
    # every setting that shapes the run must match (checked in order: the first that differs is named)
    checkpoint = load_checkpoint(out / "checkpoint.pt")
    cfg = TrainConfig(**checkpoint["config"])
    vocab = Vocabulary.load(out / "vocab.pkl")
    backbone = checkpoint["backbone_fingerprint"]
    check_resumable(checkpoint, cfg, vocab, backbone, 1, out / "checkpoint.pt")  # the same run: fine
    for name in RESUME_MUST_MATCH:
        other = replace(cfg, **{name: not getattr(cfg, name) if isinstance(getattr(cfg, name), bool)
                                else getattr(cfg, name) + 1})
        with pytest.raises(TrainingError, match=f"cannot resume with --{name.replace('_', '-')} "):
            check_resumable(checkpoint, other, vocab, backbone, 1, out / "checkpoint.pt")
    with pytest.raises(TrainingError, match="cannot resume on 2 processes: it was written by a run on 1"):
        check_resumable(checkpoint, cfg, vocab, backbone, 2, out / "checkpoint.pt")
    assert before == {name: (out / name).read_bytes() for name in before}  # nothing was overwritten


def test_a_bad_validation_file_fails_before_any_feature_is_extracted(token_cache, tmp_path):
    make_sample_dataset(tmp_path / "small", n_train=12, n_val=4, n_test=1)
    val_file = dataset_paths("sample", tmp_path / "small")["val_annotations"]
    data = json.loads(val_file.read_text())
    del data["annotations"][1]["caption"]
    val_file.write_text(json.dumps(data))
    with pytest.raises(TrainingError, match=rf"^{val_file}: .*caption"):
        train.train(config(tmp_path, tmp_path / "out", data_root=str(tmp_path / "small")))
    assert not (tmp_path / "features").exists()


def test_a_fresh_run_removes_the_weights_an_earlier_run_left(base, token_cache, tmp_path, capsys):
    """Otherwise "the highest N" (evaluate.latest_weights, 3_Inference) would be the older, longer run's model."""
    from evaluate import latest_weights

    out = tmp_path / "out"
    train.train(config(base, out, epochs=2))
    (out / "notes.txt").write_text("the user's own file")
    for name in ("encoder-12.pkl", "decoder-12.pkl"):  # what a longer run before it left
        shutil.copy(out / name.replace("12", "2"), out / name)
    capsys.readouterr()
    second = train.train(config(base, out, epochs=1))
    assert "note: starting afresh in" in capsys.readouterr().out
    assert sorted(p.name for p in out.glob("*coder-*.pkl")) == ["decoder-1.pkl", "encoder-1.pkl"]
    assert latest_weights(out)[0] == out / "encoder-1.pkl"
    assert [m["epoch"] for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())] == [1]
    assert second["metrics"][0]["val_loss"] == json.loads((out / "metrics.jsonl").read_text())["val_loss"]
    assert (out / "notes.txt").exists()


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_checkpoint(base, token_cache, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["--data-root", str(base / "sample"), "--cache-dir", str(base / "features"), "--out-dir", str(out),
            "--image-size", "32", "--embed-size", "64", "--hidden-size", "64", "--batch-size", "32",
            "--num-workers", "0", "--epochs", "3", "--checkpoint-minutes", "0", "--log-every", "4",
            "--nan-at-step", "45"]
    assert train.main(args) == 1
    message = cli_error(capsys)
    checkpoint = torch.load(out / "checkpoint.pt", weights_only=True)
    steps_per_epoch = checkpoint["metrics"][0]["step"]
    assert 23 <= steps_per_epoch < 45  # so the NaN comes in epoch 2
    assert f"non-finite loss at epoch 2, step {45 - steps_per_epoch} " in message
    assert f"{out / 'checkpoint.pt'} is intact" in message
    assert checkpoint["epoch"] == 2 and checkpoint["global_step"] < 45
    assert all(torch.isfinite(t).all() for t in checkpoint["model"].values())
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1

    with pytest.raises(TrainingDiverged, match=r"epoch 1, step 3 \("):
        train.train(config(base, tmp_path / "early", epochs=1, nan_at_step=3, log_every=50))
    assert not (tmp_path / "early" / "checkpoint.pt").exists()


def test_mirror_caches_and_trains_on_both_views(base, token_cache, tmp_path, capsys):
    """--mirror: the cache holds each training image and its mirror image; epochs draw views from both."""
    make_sample_dataset(tmp_path / "small", n_train=30, n_val=6, n_test=1)
    small = dict(data_root=str(tmp_path / "small"), epochs=2, batch_size=64, vocab_threshold=1)
    mirrored = train.train(config(base, tmp_path / "mirrored", mirror=True, **small))
    features = np.load(Path(mirrored["cache"]) / "features.npy", mmap_mode="r")
    assert features.shape == (30, 2, 2048) and not np.array_equal(features[:, 0], features[:, 1])
    # the mirror views are trained on: give them to other images (the feature statistics stay the same) and the
    # same run, from the same cache, learns other weights
    cache = np.load(Path(mirrored["cache"]) / "features.npy", mmap_mode="r+")
    cache[:, 1] = np.roll(np.array(cache[:, 1]), 1, axis=0)
    cache.flush()
    del cache
    shuffled = train.train(config(base, tmp_path / "shuffled", mirror=True, **small))
    assert not shuffled["cache_built"] and shuffled["weights_sha256"] != mirrored["weights_sha256"]
    plain = train.train(config(base, tmp_path / "plain", **small))
    assert np.load(Path(plain["cache"]) / "features.npy", mmap_mode="r").shape == (30, 1, 2048)
    assert mirrored["weights_sha256"] != plain["weights_sha256"]
    args = ["--data-root", str(tmp_path / "small"), "--cache-dir", str(base / "features"), "--image-size", "32",
            "--embed-size", "64", "--hidden-size", "64", "--batch-size", "64", "--vocab-threshold", "1",
            "--out-dir", str(tmp_path / "mirrored"), "--epochs", "3", "--resume", "--no-mirror"]
    assert train.main(args) == 2
    assert "--mirror False" in cli_error(capsys)


def test_image_paths_without_cache_and_with_cnn_fine_tuning(base, token_cache, tmp_path):
    """--no-cache runs the JPEGs through the ResNet each step; --train-cnn also changes resnet.7 and only it."""
    make_sample_dataset(tmp_path / "small", n_train=30, n_val=6, n_test=1)
    small = dict(data_root=str(tmp_path / "small"), epochs=1, batch_size=64, vocab_threshold=1)
    e2e = train.train(config(base, tmp_path / "e2e", cache=False, **small))
    assert e2e["cache"] is None and math.isfinite(e2e["val_loss"])
    assert (tmp_path / "e2e" / "encoder-1.pkl").exists()

    tuned = train.train(config(base, tmp_path / "cnn", train_cnn=True, cnn_lr=1e-3, **small))
    assert tuned["cache"] is None and math.isfinite(tuned["val_loss"])
    state = torch.load(tmp_path / "cnn" / "encoder-1.pkl", weights_only=True)
    initial = EncoderCNN(64, pretrained=False).state_dict()
    assert not torch.equal(state["resnet.7.2.conv3.weight"], initial["resnet.7.2.conv3.weight"])
    assert torch.equal(state["resnet.6.0.conv1.weight"], initial["resnet.6.0.conv1.weight"])
    assert torch.equal(state["resnet.7.2.bn3.running_mean"], initial["resnet.7.2.bn3.running_mean"])
    assert set(state) == set(initial)


def test_grad_clip_bounds_the_gradient_norm(base, token_cache, tmp_path):
    """Clipped to a norm far below Adam's epsilon, the updates all but vanish: the model stays near its start."""
    make_sample_dataset(tmp_path / "small", n_train=30, n_val=6, n_test=1)
    small = dict(data_root=str(tmp_path / "small"), epochs=1, batch_size=16, vocab_threshold=1, lr=1e-2)
    free = train.train(config(base, tmp_path / "free", **small))
    clipped = train.train(config(base, tmp_path / "clipped", grad_clip=1e-9, **small))
    assert clipped["val_loss"] > free["val_loss"] + 0.5  # 4.37 against 3.53 on 17 steps


def test_statistics_without_a_cache_come_from_the_images_as_the_cache_would_give(base, token_cache, tmp_path):
    """--no-cache standardises the features with statistics of up to STATS_IMAGES images: here, all of them."""
    paths = dataset_paths("sample", base / "sample")
    split = read_split(paths["val_annotations"], paths["val_images"])
    cpu = Runtime(torch.device("cpu"))
    encoder = EncoderCNN(16, pretrained=False, backbone_seed=0)
    cache = feature_cache(encoder, split, ("centre",), image_size=32, cache_dir=base / "features", runtime=cpu,
                          batch_size=16, num_workers=0)
    cfg = resolve_config(config(base, tmp_path / "out"))
    sampled_mean, sampled_std = sampled_feature_stats(encoder, split.paths, cfg, cpu)
    cached_mean, cached_std = feature_stats(cache.features, cache.readable)
    torch.testing.assert_close(sampled_mean, cached_mean, rtol=0.02, atol=0.02)
    torch.testing.assert_close(sampled_std, cached_std, rtol=0.05, atol=0.02)


def test_resume_refuses_a_checkpoint_whose_weights_or_epoch_length_do_not_fit(trained, base, tmp_path, capsys):
    args = ["--data-root", str(base / "sample"), "--cache-dir", str(base / "features"), "--image-size", "32",
            "--embed-size", "64", "--hidden-size", "64", "--batch-size", "32", "--epochs", "8", "--resume"]
    for name, change, expected in [
        ("weights", lambda c: c["model"].pop("decoder.fc.weight"), "its model weights do not fit this model"),
        ("steps", lambda c: c.update(steps_per_epoch=c["steps_per_epoch"] + 1), "its epochs have"),
    ]:
        out = tmp_path / name
        shutil.copytree(trained["out_dir"], out)
        tampered = load_checkpoint(out / "checkpoint.pt")
        change(tampered)
        torch.save(tampered, out / "checkpoint.pt")
        assert train.main(args + ["--out-dir", str(out)]) == 2
        assert expected in cli_error(capsys)


def test_an_image_path_run_stopped_mid_epoch_resumes_at_its_batch(base, token_cache, tmp_path):
    """--no-cache --resume continues the DataLoader at the checkpoint's batch: the epoch still has its own number of
    optimiser steps, not those before the stop plus a whole epoch more."""
    make_sample_dataset(tmp_path / "small", n_train=20, n_val=4, n_test=1)
    out = tmp_path / "out"
    small = dict(data_root=str(tmp_path / "small"), epochs=1, batch_size=8, vocab_threshold=1, cache=False,
                 checkpoint_minutes=0, log_every=2)
    with pytest.raises(TrainingDiverged):
        train.train(config(base, out, nan_at_step=7, **small))
    stopped = load_checkpoint(out / "checkpoint.pt")
    assert stopped["step"] == 6 < stopped["steps_per_epoch"]
    train.train(config(base, out, resume=True, **small))
    final = load_checkpoint(out / "checkpoint.pt")
    assert final["global_step"] == final["steps_per_epoch"] == final["scheduler"]["last_epoch"]


def test_a_caption_file_without_captions_is_refused_by_name(tmp_path):
    empty = tmp_path / "captions.json"
    empty.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": []}))
    with pytest.raises(TrainingError, match=f"^{empty}: has no caption annotations"):
        read_split(empty, tmp_path)


def test_blind_baseline_trains_on_zero_features(base, token_cache, tmp_path):
    result = train.train(config(base, tmp_path / "blind", epochs=1, blind=True))
    assert result["cache"] is None and math.isfinite(result["val_loss"])
    checkpoint = torch.load(tmp_path / "blind" / "checkpoint.pt", weights_only=True)
    assert not checkpoint["model"]["feature_mean"].any() and (checkpoint["model"]["feature_std"] == 1).all()


def test_caption_table_pairs_every_caption_with_its_own_image_row(base, token_cache, tmp_path):
    paths = dataset_paths("sample", base / "sample")
    split = read_split(paths["val_annotations"], paths["val_images"])
    vocab = Vocabulary(1, str(tmp_path / "vocab.pkl"), annotations_file=str(paths["val_annotations"]))
    readable = np.ones(len(split.image_ids), dtype=bool)
    readable[[0, 7]] = False
    table = caption_table(split, vocab, readable)
    texts = {ann["id"]: ann["caption"] for ann in json.loads(paths["val_annotations"].read_text())["annotations"]}
    unreadable = {split.image_ids[0], split.image_ids[7]}
    kept = [(ann_id, image_id) for ann_id, image_id in split.captions if image_id not in unreadable]
    assert len(table.rows) == len(kept) and table.left_out == len(split.captions) - len(kept) > 0
    for i, (ann_id, image_id) in enumerate(kept):
        assert split.image_ids[table.rows[i]] == image_id
        ids = table.tokens[i, : table.lengths[i]].tolist()
        assert ids == vocab.encode(texts[ann_id])
        assert not table.tokens[i, table.lengths[i] :].any()


def test_learning_rate_warms_up_linearly_then_follows_a_cosine_down_to_its_floor():
    factors = [train.lr_factor(step, total_steps=104, warmup_steps=4, min_fraction=0.1) for step in range(104)]
    assert factors[:5] == [0.25, 0.5, 0.75, 1.0, 1.0]  # the peak at the first step after the warm-up
    assert factors[54] == pytest.approx(0.55)  # half-way through the cosine: half-way between peak and floor
    assert factors[-1] == pytest.approx(0.1, abs=1e-3) and min(factors) >= 0.1
    assert (np.diff(factors[3:]) <= 0).all()  # never rises after the peak
    assert train.lr_factor(0, total_steps=10, warmup_steps=0, min_fraction=0.0) == 1.0


def test_feature_stats_leave_out_unreadable_images_and_floor_the_spread():
    features = np.zeros((3, 2, 2048), dtype=np.float16)
    features[0, :, 0], features[2, :, 0] = (1.0, 3.0), (5.0, 7.0)  # dimension 0 varies: values 1, 3, 5, 7
    features[1] = 1000  # an unreadable image's row: whatever it holds must not count
    features[:, :, 1] = 2.0  # dimension 1 is constant
    mean, std = feature_stats(features, np.array([True, False, True]))
    assert mean[0] == 4.0 and std[0] == pytest.approx(np.std([1.0, 3.0, 5.0, 7.0]))
    assert mean[1] == 2.0 and mean[2:].abs().max() == 0
    # a constant dimension gets a small positive spread instead of 0 (standardising by it would divide by zero)
    floor = 0.01 * np.std([1.0, 3.0, 5.0, 7.0]) / 2048 + 1e-6  # 1% of the mean spread (only dimension 0 has one)
    assert std[1] == pytest.approx(floor, rel=1e-4) and (std[1:] == std[1]).all()


def test_presets_fill_only_what_is_not_set():
    sample = resolve_config(TrainConfig(data="sample", embed_size=96))
    assert (sample.image_size, sample.pretrained, sample.embed_size) == (64, False, 96)
    assert sample.out_dir == "models/sample" and sample.data_root.endswith("data/sample")
    coco = resolve_config(TrainConfig(data="coco"))
    assert (coco.image_size, coco.pretrained, coco.vocab_threshold) == (224, True, 4)
    assert (coco.embed_size, coco.hidden_size, coco.num_layers, coco.dropout) == (512, 512, 2, 0.1)
    assert coco.out_dir == "models" and resolve_config(TrainConfig(data="coco", blind=True)).out_dir == "models-blind"
    assert resolve_config(TrainConfig(blind=True)).out_dir == "models/sample-blind"
    assert resolve_config(TrainConfig(blind=True, out_dir="x")).out_dir == "x"
    with pytest.raises(TrainingError, match="--epochs"):
        resolve_config(TrainConfig(epochs=0))


def test_flags_come_from_the_config_fields():
    args = build_parser().parse_args(
        ["--data", "coco", "--embed-size", "256", "--no-cache", "--lr", "0.01", "--no-pretrained", "--resume",
         "--profile", "prof"]
    )
    cfg = TrainConfig(**vars(args))
    assert (cfg.data, cfg.embed_size, cfg.cache, cfg.lr, cfg.pretrained, cfg.resume, cfg.profile) == (
        "coco", 256, False, 0.01, False, True, "prof")
    assert cfg.hidden_size is None  # left to the preset


def test_gpu_busy_time_counts_overlapping_kernels_once():
    # what write_profile sums for "GPU busy": the union of the kernels' and copies' intervals (several streams
    # overlap during JPEG decoding), never more than the span they cover
    assert busy_time([]) == 0
    assert busy_time([(0, 10), (20, 25)]) == 15
    assert busy_time([(0, 10), (5, 12), (2, 4), (30, 31), (11, 15)]) == 16
    assert busy_time([(5, 6), (0, 10)]) == 10


@pytest.mark.parametrize(
    "extra, expected",
    [
        ([], "captions_train2014.json: not found"),
        (["--epochs", "0"], "--epochs: must be an integer >= 1"),
        (["--device", "tpu"], "--device"),
        (["--blind", "--train-cnn"], "exclude each other"),
        (["--dropout", "1"], "--dropout: must be in [0, 1]"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(extra, expected, tmp_path, capsys):
    args = ["--data", "coco", "--data-root", str(tmp_path / "nowhere"), "--out-dir", str(tmp_path / "out")]
    assert train.main(args + extra) == 2
    assert expected in cli_error(capsys)
    assert not (tmp_path / "out").exists()


def test_broken_annotation_file_is_named(tmp_path, capsys):
    annotations = tmp_path / "data" / "annotations" / "captions_train.json"
    annotations.parent.mkdir(parents=True)
    annotations.write_text('{"images": [], "annotations": [')
    assert train.main(["--data-root", str(tmp_path / "data"), "--out-dir", str(tmp_path / "out")]) == 2
    err = cli_error(capsys)
    assert str(annotations) in err and "COCO" in err, err


def test_missing_or_corrupt_checkpoint_is_refused_naming_the_file(base, token_cache, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["--data-root", str(base / "sample"), "--cache-dir", str(base / "features"), "--out-dir", str(out),
            "--image-size", "32", "--resume"]
    assert train.main(args) == 2
    assert f"{out / 'checkpoint.pt'}: no checkpoint to resume from" in cli_error(capsys)
    out.mkdir()
    (out / "checkpoint.pt").write_bytes(b"garbage")
    assert train.main(args) == 2
    assert f"{out / 'checkpoint.pt'}: not a readable training checkpoint" in cli_error(capsys)
