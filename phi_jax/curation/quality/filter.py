"""Keep the records whose quality passes a threshold; count the rest, by reason.

    filter_stage(min_quality=3.0)                         # meta.quality >= 3 (from `data score`)
    filter_stage(min_quality=3, field="annotation.score") # straight on the teacher's score

A record without the field is dropped as `missing_<field>`, one below the threshold as
`<field>_below_min`; both counts land in the manifest, so nothing disappears unexplained.
"""

from __future__ import annotations

import functools
import math

from phi_jax.curation.core.stage import Counts, Stage
from phi_jax.errors import InputError


def filter_stage(min_quality: float, field: str = "quality") -> Stage:
    if not math.isfinite(min_quality):
        raise InputError(f"--min-quality={min_quality}: give a finite number (e.g. 3)")
    path = tuple(p for p in field.split(".") if p)
    if not path:
        raise InputError("--field is empty; name a meta field such as quality or annotation.score")
    return Stage("filter", functools.partial(_FilterStep, path, float(min_quality)),
                 {"min_quality": float(min_quality), "field": ".".join(path)}, batch_size=1024)


class _FilterStep:
    def __init__(self, path: tuple[str, ...], minimum: float):
        self._path, self._minimum = path, minimum
        name = "_".join(path)
        self._missing, self._below = f"missing_{name}", f"{name}_below_min"

    def __call__(self, records: list[dict], counts: Counts) -> list[dict]:
        kept = []
        for record in records:
            value = record["meta"]
            for key in self._path:
                value = value.get(key) if isinstance(value, dict) else None
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                counts.drop(self._missing)
            elif value < self._minimum:
                counts.drop(self._below)
            else:
                kept.append(record)
        counts.add("kept", len(kept))
        return kept
