"""Collect the pareto run (its steps computed by several `qkvconv run` processes over one content-keyed step cache,
copied into /work/runs-out/pareto-cpu/steps) into one results.json for the full recipe, then render the report.
Steps not finished yet show as pending. Nothing is run."""
import json, sys, time
from pathlib import Path
from qkvconv.recipe import load_recipe
from qkvconv.runner import Runner, make_plan, RECORD
from qkvconv.experiment_report import render

recipe_path, run_dir = Path(sys.argv[1]), Path(sys.argv[2])
recipe, text = load_recipe(recipe_path)
plan = make_plan(recipe)
runner = Runner(plan, run_dir, text)
(run_dir / "recipe.yaml").write_text(text)
first, last = None, None
for s in plan.steps:
    d = runner.steps_dir / s.dirname
    if d.is_dir():
        rec = json.loads((d / RECORD).read_text())
        # computed by one of this run's processes (the three share-kv conversions came from the cache-ladder run)
        runner.records[s.key] = {**rec, "cached": rec["started"] < "2026-11-26T13:40"}
res = runner.results()
started = [r["started"] for r in runner.records.values() if not r["cached"]]
finished = [r["finished"] for r in runner.records.values() if not r["cached"]]
from datetime import datetime
if started:
    res["wall_s"] = (datetime.fromisoformat(max(finished)) - datetime.fromisoformat(min(started))).total_seconds()
from qkvconv.evaluate import write_json
write_json(run_dir / "results.json", res)
print(render(run_dir))
print("pending:", [s.dirname for s in plan.steps if s.key not in runner.records])
