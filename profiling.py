"""Where the time of a training step goes: torch.profiler recordings, their summary and a one-line report."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity

from fileio import atomic_write

PROFILE_SKIP, PROFILE_STEPS = 10, 20  # --profile records steps 11-30 (after cuDNN's and the allocator's warm-up)


def profiler(device: torch.device, **options) -> torch.profiler.profile:
    """A torch.profiler that records the host's ops and, on CUDA, the GPU's kernels and copies."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    return torch.profiler.profile(activities=activities, **options)


def step_profiler(folder: Path, device: torch.device, steps_left: int, summary: dict) -> torch.profiler.profile:
    """A profiler for the training loop (call .step() after each step): it skips PROFILE_SKIP steps (fewer in a
    short run), records the next PROFILE_STEPS, writes them to `folder` and puts write_profile's summary in
    `summary`."""
    skip = max(1, min(PROFILE_SKIP, steps_left // 2))
    active = max(1, min(PROFILE_STEPS, steps_left - skip))
    schedule = torch.profiler.schedule(wait=skip - 1, warmup=1, active=active, repeat=1)
    return profiler(device, schedule=schedule, on_trace_ready=lambda prof: summary.update(write_profile(prof, folder)))


def write_profile(prof: torch.profiler.profile, folder: Path) -> dict:
    """Save what `prof` recorded in `folder`: trace.json (the timeline, for https://ui.perfetto.dev or
    chrome://tracing), ops.txt (ops by self time: GPU time on CUDA, host time elsewhere) and summary.json.

    The summary gives per step (a `prof.step()` interval, or the whole recording without one) the host's wall time,
    the time the GPU was busy (at least one kernel or copy running) and their ratio, which says whether the host
    keeps the GPU fed, and the ten ops that took the most time.
    """
    folder.mkdir(parents=True, exist_ok=True)
    partial_trace = folder / f".trace.json.{os.getpid()}.tmp"
    prof.export_chrome_trace(str(partial_trace))
    os.replace(partial_trace, folder / "trace.json")
    events = prof.events()
    host_events = [e for e in events if e.device_type == DeviceType.CPU]
    steps = [e for e in host_events if e.name.startswith("ProfilerStep")]  # "ProfilerStep#N", shown "ProfilerStep*"
    # the GPU's kernels and copies; the GPU copies of annotations (ProfilerStep, record_function) are no work
    gpu_work = [e for e in events if e.device_type == DeviceType.CUDA and not e.is_user_annotation]
    host_us = (sum(e.time_range.elapsed_us() for e in steps) if steps else
               max(e.time_range.end for e in host_events) - min(e.time_range.start for e in host_events))
    count = max(len(steps), 1)
    gpu_us = busy_time([(e.time_range.start, e.time_range.end) for e in gpu_work])
    on_gpu = gpu_us > 0
    key = "self_device_time_total" if on_gpu else "self_cpu_time_total"
    averages = prof.key_averages()
    ops = [a for a in averages if not a.key.startswith("ProfilerStep")
           and not (a.is_user_annotation and a.device_type != DeviceType.CPU)]
    top = sorted(ops, key=lambda a: getattr(a, key), reverse=True)[:10]
    summary = {
        "steps": count,
        "host_ms_per_step": round(host_us / count / 1000, 3),
        "gpu_busy_ms_per_step": round(gpu_us / count / 1000, 3) if on_gpu else None,
        "gpu_busy_fraction": round(gpu_us / host_us, 3) if on_gpu and host_us else None,
        "top_ops_by": "self GPU time" if on_gpu else "self host time",
        "top_ops": [{"name": a.key, "ms_per_step": round(getattr(a, key) / count / 1000, 3),
                     "calls_per_step": round(a.count / count, 2)} for a in top],
    }
    with atomic_write(folder / "ops.txt", "w") as f:
        f.write(averages.table(sort_by=key, row_limit=40) + "\n")
    with atomic_write(folder / "summary.json", "w") as f:
        f.write(json.dumps(summary, indent=1) + "\n")
    return summary


def busy_time(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of (start, end) intervals: GPU time with at least one kernel or copy running."""
    total, reach = 0.0, -math.inf
    for start, end in sorted(intervals):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total


def profile_line(summary: dict, folder: Path) -> str:
    """One line that says what a profile found and where its files are."""
    gpu = (f", GPU busy {summary['gpu_busy_ms_per_step']:.2f} ms ({summary['gpu_busy_fraction']:.0%})"
           if summary["gpu_busy_ms_per_step"] is not None else "")
    top = ", ".join(f"{op['name']} {op['ms_per_step']:.2f}" for op in summary["top_ops"][:3])
    return (f"{summary['steps']} step(s), {summary['host_ms_per_step']:.2f} ms per step on the host{gpu}; "
            f"top ({summary['top_ops_by']}, ms per step): {top}; {folder}/trace.json, ops.txt")

