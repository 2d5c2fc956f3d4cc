"""checkpoint.pt: what a training run writes to continue exactly where it stopped, and the checks on resuming."""

from __future__ import annotations

import hashlib
import re
from dataclasses import asdict
from pathlib import Path

import torch

from config import ATTENTION_MUST_MATCH, RESUME_MUST_MATCH, TrainConfig, TrainingError
from model import Captioner, atomic_torch_save
from vocabulary import Vocabulary

CHECKPOINT_FORMAT = 1


def trainable_state(model: Captioner) -> dict[str, torch.Tensor]:
    """What training changes or needs to continue (embed, decoder, resnet.7 if fine-tuned, feature stats), on CPU."""
    state = model.state_dict()
    keep = ("encoder.embed.", "encoder.grid_size", "encoder.feature_", "decoder.", "feature_")
    keep += ("encoder.resnet.7.",) if model.encoder.train_cnn else ()
    return {k: v.detach().cpu() for k, v in state.items() if k.startswith(keep)}


def weights_digest(model: Captioner) -> str:
    """sha256 of the trained weights: equal digests mean bitwise-equal models."""
    digest = hashlib.sha256()
    for name, tensor in trainable_state(model).items():
        digest.update(name.encode())
        digest.update(tensor.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def remove_earlier_run(out: Path) -> None:
    """Delete the epoch weights, metrics and plot an earlier run left in `out`, so that "the highest N"
    (evaluate.latest_weights, 3_Inference) is always this run's and never an older model beside this run's
    vocab.pkl. Its checkpoint.pt stays until this run writes its own, so `--resume` can still continue it."""
    earlier = sorted(p for p in out.iterdir() if re.fullmatch(r"(encoder|decoder)-\d+\.pkl", p.name))
    earlier += [p for p in (out / "metrics.jsonl", out / "loss.png") if p.exists()]
    for path in earlier:
        path.unlink()
    notes = [f"removed {len(earlier)} files of an earlier run ({', '.join(p.name for p in earlier[:4])}"
             f"{', ...' if len(earlier) > 4 else ''})"] if earlier else []
    if (out / "checkpoint.pt").exists():
        notes.append(f"{out / 'checkpoint.pt'} will be replaced (--resume continues it)")
    if notes:
        print(f"note: starting afresh in {out}: {'; '.join(notes)}", flush=True)



def load_checkpoint(path: Path) -> dict:
    """A checkpoint.pt written by this module (weights_only: it holds tensors and plain data only)."""
    if not path.exists():
        raise TrainingError(f"{path}: no checkpoint to resume from (train without --resume first)")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        reason = (str(e).strip().splitlines() or [""])[0][:200]
        raise TrainingError(f"{path}: not a readable training checkpoint ({type(e).__name__}: {reason})") from None
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise TrainingError(f"{path}: not a checkpoint of this train.py (format {CHECKPOINT_FORMAT})")
    return checkpoint


def check_resumable(checkpoint: dict, cfg: TrainConfig, vocab: Vocabulary, backbone: str, world_size: int,
                    path: Path) -> None:
    """Refuse, in one line, to continue a checkpoint with a different vocabulary, backbone or model shape."""
    if checkpoint["vocab_fingerprint"] != vocab.fingerprint():
        raise TrainingError(
            f"{path}: cannot resume with a different vocabulary: the checkpoint's has {checkpoint['vocab_size']} "
            f"words (fingerprint {checkpoint['vocab_fingerprint']}), this run's {len(vocab)} "
            f"({vocab.fingerprint()}); use the same data and --vocab-threshold, or train without --resume"
        )
    if checkpoint["backbone_fingerprint"] != backbone:
        raise TrainingError(f"{path}: cannot resume: it was trained on another ResNet-50 backbone "
                            "(--pretrained / --weights-path / --backbone-seed differ)")
    trained = {"decoder": "lstm"} | checkpoint["config"]  # checkpoints from before the attention decoder: lstm
    for name in ("decoder", *RESUME_MUST_MATCH, *(ATTENTION_MUST_MATCH if cfg.decoder == "attention" else ())):
        if trained.get(name) != getattr(cfg, name):
            raise TrainingError(f"{path}: cannot resume with --{name.replace('_', '-')} {getattr(cfg, name)}: "
                                f"the checkpoint was trained with {trained.get(name)}")
    if checkpoint["world_size"] != world_size:
        raise TrainingError(f"{path}: cannot resume on {world_size} processes: it was written by a run on "
                            f"{checkpoint['world_size']} (each takes its own share of the batches)")


def check_steps_per_epoch(checkpoint: dict, steps_per_epoch: int, path: Path) -> None:
    """Refuse to continue a checkpoint whose epochs had another number of steps (other captions or images)."""
    if checkpoint.get("steps_per_epoch", steps_per_epoch) != steps_per_epoch:
        raise TrainingError(f"{path}: cannot resume: its epochs have {checkpoint['steps_per_epoch']} "
                            f"steps, this run's {steps_per_epoch} (the captions or the readable images changed)")



def save_checkpoint(
    path: Path,
    model: Captioner,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    *,
    cfg: TrainConfig,
    vocab: Vocabulary,
    backbone: str,
    world_size: int,
    steps_per_epoch: int,
    epoch: int,
    step: int,
    progress: dict,
    metrics: list[dict],
) -> None:
    """Write checkpoint.pt (atomically) for continuing at step `step` of epoch `epoch`: the trained weights, the
    optimiser and schedule, the position, the epoch's running sums (`progress`) and the metrics so far."""
    atomic_torch_save({
        "format": CHECKPOINT_FORMAT,
        "model": trainable_state(model),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "epoch": epoch,
        "step": step,
        "global_step": (epoch - 1) * steps_per_epoch + step,
        "steps_per_epoch": steps_per_epoch,
        "sampler": {"seed": cfg.seed, "epoch": epoch, "start_batch": step, "num_replicas": world_size},
        "world_size": world_size,
        "config": asdict(cfg),
        "vocab_fingerprint": vocab.fingerprint(),
        "vocab_size": len(vocab),
        "backbone_fingerprint": backbone,
        "progress": progress,
        "metrics": metrics,
    }, path)
