"""A `python train.py` run killed with a real SIGKILL and continued with --resume ends with exactly the weights of
a run that was never interrupted (same seed, CPU: bitwise)."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from sample_data import make_sample_dataset

REPO = Path(__file__).resolve().parents[1]


def wait_for_new_checkpoint(process: subprocess.Popen, path: Path, previous: int | None) -> int:
    """Poll until `path` is a checkpoint other than `previous` (inode: each write renames a new file into place)."""
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        try:
            inode = path.stat().st_ino
        except FileNotFoundError:
            inode = None
        if inode is not None and inode != previous:
            return inode
        assert process.poll() is None, "the run ended before writing a new checkpoint"
        time.sleep(0.002)
    raise AssertionError("no checkpoint appeared")


def test_sigkilled_runs_resume_to_the_same_weights(tmp_path_factory, tmp_path):
    shared = tmp_path_factory.getbasetemp() / "train-shared"
    make_sample_dataset(shared / "sample", n_train=150, n_val=30, n_test=5)
    env = os.environ | {"OMP_NUM_THREADS": "1", "CAPTION_CACHE_DIR": str(shared / "tokens")}
    command = [
        sys.executable, str(REPO / "train.py"), "--data", "sample", "--data-root", str(shared / "sample"),
        "--cache-dir", str(shared / "features"), "--image-size", "32", "--embed-size", "64", "--hidden-size", "128",
        "--batch-size", "16", "--epochs", "2", "--checkpoint-minutes", "0", "--log-every", "7", "--num-workers", "0",
        "--seed", "3",
        "--num-layers", "2", "--dropout", "0.1",
    ]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    done = subprocess.run(command + ["--out-dir", str(straight)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]

    # killed after its first checkpoint (mid-epoch 1), resumed and killed again after a new checkpoint, resumed
    checkpoint = killed / "checkpoint.pt"
    previous = None
    for attempt, resume in enumerate(([], ["--resume"])):
        with open(tmp_path / f"stderr-{attempt}.txt", "w") as stderr:
            process = subprocess.Popen(command + ["--out-dir", str(killed), *resume], env=env,
                                       stdout=subprocess.DEVNULL, stderr=stderr)
        try:
            previous = wait_for_new_checkpoint(process, checkpoint, previous)
            process.send_signal(signal.SIGKILL)
        finally:
            process.kill()
            process.wait()
        assert process.returncode == -signal.SIGKILL
        state = torch.load(checkpoint, weights_only=True)  # intact whenever the kill came
        assert state["global_step"] > 0 and (state["epoch"], state["step"]) != (3, 0)
    last_position = (state["epoch"], state["step"])
    finished = subprocess.run(command + ["--out-dir", str(killed), "--resume"], env=env, capture_output=True,
                              text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr[-2000:]
    assert f"resuming {checkpoint} at epoch {last_position[0]}, step {last_position[1]} " in finished.stdout

    for name in ("encoder-1.pkl", "decoder-1.pkl", "encoder-2.pkl", "decoder-2.pkl"):
        expected = torch.load(straight / name, weights_only=True)
        actual = torch.load(killed / name, weights_only=True)
        assert expected.keys() == actual.keys()
        assert all(torch.equal(expected[k], actual[k]) for k in expected), name
    expected = torch.load(straight / "checkpoint.pt", weights_only=True)
    actual = torch.load(checkpoint, weights_only=True)
    assert all(torch.equal(expected["model"][k], actual["model"][k]) for k in expected["model"])
    assert expected["global_step"] == actual["global_step"]
    for before, after in zip(expected["metrics"], actual["metrics"], strict=True):
        assert before["val_loss"] == after["val_loss"]
