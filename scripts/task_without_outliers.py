"""Evaluate a finished task run again without the ensemble members ``outlying_members`` names.

An ensemble weights its members equally, so one member that diverged or stalled early spoils the
mixture; training warns about it (README, "Training runs"). This measures the task's targets with
such members left out, beside the report of the whole ensemble:

    python scripts/task_without_outliers.py runs/photoz_m8     # writes without_outliers.json there

OUT is a ``tfgalflow task run`` directory (task.json, run/, report.json). Writes
OUT/without_outliers.json: the members left out, the members kept, every target with its
measured figure, threshold and ``met``, and the task's metrics. Exit 2 with a one-line message
when OUT is not a task directory or no member is outlying.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tfgalflow.atomic import json_ready, write_json
from tfgalflow.errors import FileError, InputError


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", help="a tfgalflow task run directory")
    args = p.parse_args()
    out = Path(args.out)
    try:
        task_file = json.loads((out / "task.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        print(f"{out}/task.json: not a task run directory ({exc})", file=sys.stderr)
        return 2

    from tfgalflow.model import Ensemble
    from tfgalflow.tasks import get_task
    from tfgalflow.training import load_run, member_name, outlying_members

    try:
        odd = {o["member"] for o in outlying_members(out / "run")}
        if not odd:
            raise InputError(f"{out}/run: no outlying member (nothing to leave out)")
        full = load_run(out / "run")
    except (FileError, InputError) as exc:
        print(exc, file=sys.stderr)
        return 2
    keep = [m for k, m in enumerate(full.members) if member_name(k) not in odd]
    task = get_task(task_file["task"], **task_file["config"])
    metrics = task.evaluate(Ensemble(keep))
    targets = {k: t.to_dict() for k, t in task.targets(metrics).items()}
    write_json(out / "without_outliers.json",
               {"left_out": sorted(odd), "members_kept": len(keep), "targets": targets,
                "metrics": json_ready(metrics, nonfinite_as_null=False)})
    print(json.dumps({k: [v["measured"], v["met"]] for k, v in targets.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
