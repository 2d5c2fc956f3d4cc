"""`torchrun --nproc_per_node=2 train.py` on the CPU (gloo): both processes end with identical weights, the files
and the feature cache are written once, by rank 0, and only rank 0 shows progress."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from checkpoints import weights_digest
from data_loader import BucketBatchSampler, dataset_paths
from datasets import caption_table, read_split
from model import AttentionDecoder, Captioner, DecoderRNN, EncoderCNN, GridEncoder, load_pretrained
from sample_data import make_sample_dataset
from vocabulary import Vocabulary

REPO = Path(__file__).resolve().parents[1]


def torchrun_train(tmp_path_factory, tmp_path: Path, *options: str) -> tuple[Path, dict, dict]:
    """`torchrun --nproc_per_node=2 train.py` on a small shared sample set with `options`; asserts it succeeded and
    returns the sample set's folder and each rank's stdout and stderr (out/ and features/ are under tmp_path)."""
    shared = tmp_path_factory.getbasetemp() / "train-shared"
    make_sample_dataset(shared / "sample", n_train=150, n_val=30, n_test=5)
    logs = tmp_path / "logs"
    env = os.environ | {"OMP_NUM_THREADS": "1", "CAPTION_CACHE_DIR": str(shared / "tokens")}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--redirects=3",
        f"--log-dir={logs}", str(REPO / "train.py"), "--data", "sample", "--data-root", str(shared / "sample"),
        "--cache-dir", str(tmp_path / "features"), "--out-dir", str(tmp_path / "out"), "--batch-size", "16",
        "--checkpoint-minutes", "0", "--log-every", "10", "--num-workers", "0", *options,
    ]
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=400)
    stdout = {rank: next(logs.rglob(f"{rank}/stdout.log")).read_text() for rank in (0, 1)}
    stderr = {rank: next(logs.rglob(f"{rank}/stderr.log")).read_text() for rank in (0, 1)}
    assert run.returncode == 0, stderr[0][-3000:] + stderr[1][-3000:]
    return shared, stdout, stderr


def test_two_processes_end_with_identical_weights_and_write_files_once(tmp_path_factory, tmp_path):
    out, cache = tmp_path / "out", tmp_path / "features"
    shared, stdout, stderr = torchrun_train(tmp_path_factory, tmp_path, "--image-size", "32", "--embed-size", "64",
                                            "--hidden-size", "64", "--num-layers", "2", "--dropout", "0.1",
                                            "--epochs", "2")

    digests = {}
    for rank in (0, 1):
        found = re.findall(r"rank (\d)/2: weights sha256 ([0-9a-f]{64})", stdout[rank])
        assert found and found[0][0] == str(rank)
        digests[rank] = found[0][1]
    assert digests[0] == digests[1]

    # the saved weights are those weights
    vocab = Vocabulary.load(out / "vocab.pkl")
    model = Captioner(EncoderCNN(64, pretrained=False), DecoderRNN(64, 64, len(vocab), 2))
    checkpoint = torch.load(out / "checkpoint.pt", weights_only=True)
    model.load_state_dict(checkpoint["model"], strict=False)
    assert weights_digest(model) == digests[0]
    assert checkpoint["world_size"] == 2

    # rank 0 reports, writes and builds; rank 1 only trains
    assert stdout[0].count("epoch 1/2: train loss") == 1 and "done: 2 epochs" in stdout[0]
    assert "epoch" not in stdout[1] and "done" not in stdout[1]
    assert "features captions_train" in stderr[0] and "epoch 1/2" in stderr[0]
    assert "features" not in stderr[1] and "epoch" not in stderr[1]
    expected = {"vocab.pkl", "train_config.json", "checkpoint.pt", "metrics.jsonl", "loss.png"}
    expected |= {f"{part}-{epoch}.pkl" for part in ("encoder", "decoder") for epoch in (1, 2)}
    assert {p.name for p in out.iterdir()} == expected
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [1, 2] and metrics[1]["val_loss"] < metrics[0]["val_loss"]
    folders = sorted(p.name for p in cache.iterdir() if p.is_dir())
    assert len(folders) == 2 and folders[0].startswith("captions_train-32px-")

    # each process took its half of the batches
    paths = dataset_paths("sample", shared / "sample")
    split = read_split(paths["train_annotations"], paths["train_images"])
    lengths = caption_table(split, vocab, np.ones(len(split.image_ids), dtype=bool)).lengths
    steps = int(re.search(r"(\d+) steps/epoch", stdout[0]).group(1))
    assert steps == len(BucketBatchSampler(lengths, 16, num_replicas=2, rank=0)) < len(BucketBatchSampler(lengths, 16))


def test_the_attention_decoder_trains_under_ddp_with_the_same_weights_on_both_processes(tmp_path_factory, tmp_path):
    """The attention decoder through the same torchrun path: a grid cache, identical weights on both ranks, and the
    saved pair loads as an attention model."""
    out, cache = tmp_path / "out", tmp_path / "features"
    _, stdout, _ = torchrun_train(tmp_path_factory, tmp_path, "--decoder", "attention", "--image-size", "64",
                                  "--embed-size", "32", "--hidden-size", "32", "--attention-size", "16",
                                  "--dropout", "0.1", "--epochs", "1")
    digests = [re.findall(r"rank \d/2: weights sha256 ([0-9a-f]{64})", stdout[rank]) for rank in (0, 1)]
    assert digests[0] and digests[0] == digests[1]
    assert any(p.name.startswith("captions_train-64px-grid2-") for p in cache.iterdir())
    encoder, decoder, _ = load_pretrained(out / "encoder-1.pkl", out / "decoder-1.pkl", out / "vocab.pkl")
    assert isinstance(encoder, GridEncoder) and isinstance(decoder, AttentionDecoder) and encoder.grid == 2
