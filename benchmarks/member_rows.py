"""What each member pays to read its ground truth: decoding only its rows (plus the SSIM halo) with the
row decoder (`ms_splatfacto/image_rows.py`) against decoding the whole image with PIL, as nerfstudio does.

A 1600x1200 photo (lund_tiny's first photo scaled up, JPEG quality 90, 4:2:0, and the same as PNG) is cut
into the tile plan's bands for 1, 2, 4 and 8 members (16-pixel tile rows dealt evenly, 10 halo rows).
Each round times, interleaved, PIL's whole decode and every member's band decode; reported as
min/median/max over rounds in ms, with the rows each member reconstructed. Prints a table and writes
benchmarks/results/member_rows.json.

    .venv/bin/python benchmarks/member_rows.py [--rounds 15]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from bench_stats import spread

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
LUND_TINY = REPO.parent / "shared" / "data" / "lund_tiny"
RESULTS = REPO / "benchmarks" / "results" / "member_rows.json"
WIDTH, HEIGHT, TILE = 1600, 1200, 16


def spans(members: int):
    from ms_splatfacto.backend.aggregate.layout import even_bounds
    from ms_splatfacto.backend.ops.row_inputs import gt_row_spans

    bounds = [min(t * TILE, HEIGHT) for t in even_bounds(-(-HEIGHT // TILE), members)]
    return gt_row_spans(bounds, HEIGHT)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    torch.set_num_threads(1)
    from ms_splatfacto.image_rows import COUNTS, file_rows

    source = Image.open(sorted((LUND_TINY / "images").glob("*.jpg"))[0]).convert("RGB").resize((WIDTH, HEIGHT), Image.BICUBIC)
    results = {"date": str(date.today()), "machine": platform.processor() or platform.machine(),
               "load_average": os.getloadavg(), "size": [WIDTH, HEIGHT], "rounds": args.rounds, "formats": {}}
    with tempfile.TemporaryDirectory() as folder:
        files = {"jpeg": Path(folder) / "photo.jpg", "png": Path(folder) / "photo.png"}
        source.save(files["jpeg"], quality=90)
        source.save(files["png"])
        for kind, path in files.items():
            data = torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8)
            plans = {m: spans(m) for m in (1, 2, 4, 8)}
            whole, bands = [], {m: [[] for _ in plans[m]] for m in plans}
            reference = np.array(Image.open(path))
            for _ in range(args.rounds):  # interleaved: whole, then every member of every plan
                start = time.perf_counter()
                np.array(Image.open(path))
                whole.append((time.perf_counter() - start) * 1e3)
                for m, plan in plans.items():
                    for r, (lo, hi) in enumerate(plan):
                        start = time.perf_counter()
                        rows = file_rows(data, lo, hi)
                        bands[m][r].append((time.perf_counter() - start) * 1e3)
                        assert np.array_equal(rows, reference[lo:hi])
            COUNTS.reset()
            for plan in plans.values():
                for lo, hi in plan:
                    file_rows(data, lo, hi)
            reconstructed = [n for *_, n in COUNTS.records]
            at = 0
            entry = {"file_bytes": path.stat().st_size, "whole_pil_ms": spread(whole), "members": {}}
            for m, plan in plans.items():
                entry["members"][m] = [{"rows": list(span), "reconstructed": reconstructed[at + r], "ms": spread(bands[m][r])}
                                       for r, span in enumerate(plan)]
                at += len(plan)
            results["formats"][kind] = entry
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(f"{WIDTH}x{HEIGHT}, {args.rounds} interleaved rounds, load {results['load_average'][0]:.2f}; ms min/median/max")
    print(f"{'format':6} {'members':>7} {'member':>6} {'rows':>11} {'decoded':>7} {'ms (min/med/max)':>22}")
    for kind, entry in results["formats"].items():
        w = entry["whole_pil_ms"]
        print(f"{kind:6} {'PIL':>7} {'whole':>6} {f'0-{HEIGHT}':>11} {HEIGHT:>7} {w['min']:7.2f}/{w['median']:6.2f}/{w['max']:6.2f}")
        for m, members in entry["members"].items():
            for r, band in enumerate(members):
                t = band["ms"]
                rows = f"{band['rows'][0]}-{band['rows'][1]}"
                print(f"{kind:6} {m:>7} {r:>6} {rows:>11} {band['reconstructed']:>7} {t['min']:7.2f}/{t['median']:6.2f}/{t['max']:6.2f}")
    print(f"wrote {RESULTS.relative_to(REPO)}")


if __name__ == "__main__":
    main()
