"""Where a process trains: its device, its place among torchrun's processes, autocast and the random streams."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

from config import TrainingError
from model import resolve_device


@dataclass
class Runtime:
    """Where this process trains: its device and its place among the torchrun processes (1 without torchrun)."""

    device: torch.device
    rank: int = 0
    world_size: int = 1
    owns_process_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def sum_dtype(self) -> torch.dtype:
        """The dtype of on-device loss sums: float64, except on Apple's GPU (MPS), which has none."""
        return torch.float32 if self.device.type == "mps" else torch.float64

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier(device_ids=[self.device.index] if self.cuda else None)

    def agree(self, flag: bool) -> bool:
        """Rank 0's `flag` on every process, for decisions all of them must take together (one broadcast)."""
        if self.world_size == 1:
            return flag
        tensor = torch.tensor([flag], dtype=torch.uint8, device=self.device)
        dist.broadcast(tensor, 0)
        return bool(tensor.item())

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum of `values` over all processes."""
        if self.world_size == 1:
            return values
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor)
        return tensor.tolist()

    def close(self) -> None:
        if self.owns_process_group:
            dist.destroy_process_group()


def start_runtime(device_name: str) -> Runtime:
    """Join the torchrun process group when RANK/WORLD_SIZE say so (NCCL on CUDA, gloo on the CPU)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    try:
        device = resolve_device(device_name)
    except ValueError as e:
        raise TrainingError(f"--device: {e}") from None
    if device.type == "cuda":
        device = torch.device("cuda", local_rank if world_size > 1 else device.index or 0)
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True
    owns = world_size > 1 and not dist.is_initialized()
    if owns:  # rank 0 may build the feature cache while the others wait: allow for it in the timeout
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(hours=3))
    return Runtime(device, rank, world_size, owns)


def decodes_on_device(gpu_decode: bool, runtime: Runtime) -> bool:
    """Whether images for the ResNet are decoded on the GPU (nvJPEG, when `gpu_decode` allows it) rather than by
    PIL in the workers."""
    return runtime.cuda and gpu_decode


def autocast(runtime: Runtime):
    """bf16 autocast on CUDA (no loss scaling needed), plain float32 elsewhere."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if runtime.cuda else contextlib.nullcontext()


def derived_seed(*parts: int) -> int:
    """A seed that depends on every part, so (seed, rank, epoch, step, stream) give independent random streams."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1, np.uint64)[0] >> 1)


DROPOUT_STREAM, VIEW_STREAM, LOADER_STREAM = 0, 1, 2


def reseed(seed: int, runtime: Runtime, gpu: bool = True) -> None:
    """Seed the generators this process draws from: the CPU's and (`gpu`) its own GPU's. (torch.manual_seed also
    queues the seeding of every GPU, which costs ~1 ms per call on a CUDA build without one.)

    The training loop seeds the GPU's only at the first step of an epoch (or of a resumed run), not at every step:
    reseeding it makes the next cuDNN LSTM with dropout rebuild its dropout state from a seed it reads back from
    the GPU, a host sync per step. So dropout masks on a GPU depend on where the run started, not only on the step.
    """
    torch.default_generator.manual_seed(seed)
    if gpu and runtime.cuda:
        torch.cuda.manual_seed(seed)

