"""The end of `make demo`: stage-1 retrieval, step timings, and where everything is.

python -m demo.summary logs/demo
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

from sparqle.cli import reports_user_errors


@reports_user_errors
def main(argv: list[str] | None = None) -> None:
    logs = Path((argv or sys.argv[1:])[0])
    metrics = logs / "pretrain" / "csv" / "version_0" / "metrics.csv"
    rows = list(csv.DictReader(metrics.open())) if metrics.is_file() else []  # not run: no stage 1
    r1 = [float(r["val/r_at_1_in_batch"]) for r in rows if r.get("val/r_at_1_in_batch")]
    if r1:
        print(
            f"stage-1 speech->text retrieval R@1 within held-out batches of 16: {r1[-1]:.0%} (chance: 6%)"
        )
    timings = (logs / "timings.txt").read_text().splitlines()
    total = sum(int(line.rsplit(":", 1)[1].split()[0]) for line in timings)
    print("\n".join(timings) + f"\n[demo] total: {total} s ({total / 60:.1f} min)")
    ckpts = ", ".join(str(logs / s) for s in ("pretrain", "instruct") if (logs / s).is_dir())
    print(f"report: {logs}/report/report.md  checkpoints: {ckpts}  logs: {logs}")


if __name__ == "__main__":
    main()
