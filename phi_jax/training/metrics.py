"""Run metrics: metrics.jsonl, TensorBoard event files, a progress bar, and MFU.

Only process 0 writes (one line per logged step); every process computes the same numbers.
A workdir in a bucket (gs://) cannot be appended to: both files are written locally and uploaded
whole at every checkpoint (`sync`) and at the end, so the bucket's copy is at most one checkpoint
interval behind, and a resumed run continues the bucket's metrics.jsonl.
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
        self._remote = None
        if not enabled:
            return
        from phi_jax import fileio

        workdir = fileio.as_path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        self._remote, local = None, workdir
        if not isinstance(workdir, Path):
            import tempfile

            self._remote, local = workdir, Path(tempfile.mkdtemp(prefix="phi_jax-metrics-"))
            if (workdir / "metrics.jsonl").exists():
                (local / "metrics.jsonl").write_bytes((workdir / "metrics.jsonl").read_bytes())
        self._local = local
        self._jsonl = open(local / "metrics.jsonl", "a", buffering=1)
        from tensorboardX import SummaryWriter

        self._tb = SummaryWriter(str(local / "tensorboard"))
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

    def sync(self) -> None:
        """Upload the metrics written so far to a bucket workdir (nothing to do locally)."""
        if self._remote is None:
            return
        self._jsonl.flush()
        self._tb.flush()
        self._upload()

    def _upload(self) -> None:
        from phi_jax import fileio

        for file in sorted(p for p in self._local.rglob("*") if p.is_file()):
            fileio.upload_file(file, self._remote / file.relative_to(self._local).as_posix())

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()
        if self._jsonl is not None:
            self._jsonl.close()
        if self._remote is not None:
            import shutil

            self._upload()
            shutil.rmtree(self._local, ignore_errors=True)
            self._remote = None
