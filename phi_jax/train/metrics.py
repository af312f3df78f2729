"""Run metrics: metrics.jsonl, TensorBoard event files, a progress bar, and MFU.

Only process 0 writes (one line per logged step); every process computes the same numbers.
MFU is model FLOPs (from the config, causal attention counted honestly) over the device's peak
dense bf16 FLOP/s from `PEAK_FLOPS`; on a device kind not in the table it is omitted unless
`train.peak_flops_per_device` is set.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import jax

# Peak dense bf16 FLOP/s per device (chip), from the vendors' spec sheets.
PEAK_FLOPS = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,  # v5e
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,  # Trillium / v6e
    "NVIDIA H100": 989e12,
    "NVIDIA H200": 989e12,
    "NVIDIA A100": 312e12,
}


def peak_flops_per_device(device: jax.Device | None = None, override: float | None = None) -> float | None:
    if override:
        return float(override)
    kind = (device or jax.devices()[0]).device_kind
    for prefix in sorted(PEAK_FLOPS, key=len, reverse=True):
        if kind.startswith(prefix):
            return PEAK_FLOPS[prefix]
    return None


class MetricsWriter:
    """Writes per-step scalars to metrics.jsonl and TensorBoard; draws a tqdm bar with ETA."""

    def __init__(self, workdir: str | os.PathLike, *, total_steps: int, start_step: int,
                 enabled: bool = True, progress: bool = True):
        self.enabled = enabled
        self._jsonl = None
        self._tb = None
        self._bar = None
        if not enabled:
            return
        workdir = Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(workdir / "metrics.jsonl", "a", buffering=1)
        from tensorboardX import SummaryWriter

        self._tb = SummaryWriter(str(workdir / "tensorboard"))
        if progress:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)

    def write(self, step: int, scalars: dict[str, Any], name: str = "train") -> None:
        """One metrics.jsonl line and TensorBoard scalars under `name/` (train or eval)."""
        if not self.enabled:
            return
        clean = {k: (float(v) if not isinstance(v, (bool, int)) else v) for k, v in scalars.items()}
        self._jsonl.write(json.dumps({"step": step, "time": time.time(), **clean}) + "\n")
        for key, value in clean.items():
            self._tb.add_scalar(f"{name}/{key}", value, step)
        if self._bar is not None and name == "train":
            self._bar.set_postfix(loss=f"{clean.get('loss', float('nan')):.4f}",
                                  tok_s=f"{clean.get('tokens_per_s', 0):.0f}")

    def advance(self, n: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()
        if self._jsonl is not None:
            self._jsonl.close()
