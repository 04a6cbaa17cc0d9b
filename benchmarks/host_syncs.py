"""Host syncs per training step, by call site: the reads of device data a GPU would wait for.

A step as `ns-train` runs it (forward, loss, backward, MsTrainer's non-finite guard, Adam, densification
statistics; no refinement) on lund_tiny's cameras with N synthetic Gaussians, counted with
`HostSyncCounter` on CPU members (on a GPU, `torch.cuda.set_sync_debug_mode` also sees the syncs of
dynamic-shape ops, which this counter does not):

    .venv/bin/python benchmarks/host_syncs.py --gaussians 20000 --devices cpu cpu:4 cpu:8

writes benchmarks/results/host_syncs.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import List

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

import stepbench  # noqa: E402
from ms_splatfacto.backend.host_syncs import HostSyncCounter  # noqa: E402
from ms_splatfacto.checkpoints import first_nonfinite  # noqa: E402


def step_with_guard(model, optimizers, camera_index: int) -> None:
    camera, batch = stepbench.camera_batch(camera_index)
    loss = sum(model.get_loss_dict(model.get_outputs(camera), batch).values())
    for optimizer in optimizers.values():
        optimizer.zero_grad()
    loss.backward()
    assert first_nonfinite([("the loss", loss), *((n, p.grad) for n, p in model.named_parameters())]) is None
    for optimizer in optimizers.values():
        optimizer.step()
    model.step_post_backward(stepbench.STEP)


def count(devices: str, gaussians: int, steps: int) -> dict:
    model = stepbench.build_model(devices)
    optimizers = stepbench.load(model, stepbench.synthetic_gaussians(gaussians))
    step_with_guard(model, optimizers, 0)
    per_step = []
    for i in range(steps):
        with HostSyncCounter() as syncs:
            step_with_guard(model, optimizers, 1 + i)
        per_step.append({"total": syncs.total, "sites": dict(syncs.sites)})
    return {"devices": devices, "members": len(model.members), "steps": per_step}


def main(argv: List[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gaussians", type=int, default=20000)
    parser.add_argument("--devices", nargs="+", default=["cpu", "cpu:4", "cpu:8"])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--output", type=Path, default=REPO / "benchmarks" / "results" / "host_syncs.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows = [count(d, args.gaussians, args.steps) for d in args.devices]
    result = {"gaussians": args.gaussians, "threads": 1, "runs": rows}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=1) + "\n")
    table = Table(title=f"Host syncs per training step ({args.gaussians} Gaussians)")
    for column in ("devices", "per step", "sites (last step)"):
        table.add_column(column)
    for row in rows:
        last = row["steps"][-1]["sites"]
        table.add_row(row["devices"], ", ".join(str(s["total"]) for s in row["steps"]), ", ".join(f"{k} x{v}" for k, v in last.items()))
    Console().print(table)


if __name__ == "__main__":
    main()
