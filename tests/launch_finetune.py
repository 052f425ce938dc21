"""Run qkvconv.finetune.finetune in each launched process (torchrun / accelerate launch), from a JSON job file.

    torchrun --nproc-per-node 2 tests/launch_finetune.py JOB.json

JOB: {"model", "output", "run_dir", "config": {FinetuneConfig fields}, "resume": bool, "kill_at": step or null}.
kill_at stops every process right after that optimizer step (a simulated kill, exit code 3), as a test needs.
"""

from __future__ import annotations

import json
import sys

from qkvconv.finetune import FinetuneConfig, finetune


def main() -> None:
    job = json.loads(open(sys.argv[1]).read())

    def kill(step: int) -> None:
        if step == job.get("kill_at"):
            sys.exit(3)

    finetune(job["model"], job.get("output"), FinetuneConfig(**job["config"]), run_dir=job.get("run_dir"),
             resume=job.get("resume", False), device="cpu", on_step=kill)


if __name__ == "__main__":
    main()
