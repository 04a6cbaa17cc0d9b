"""What every benchmark reports of repeated measurements: min, median and max (the spread beside the median)."""

from __future__ import annotations

import statistics
from typing import Dict, Iterable


def spread(values: Iterable[float]) -> Dict[str, float]:
    values = list(values)
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}
