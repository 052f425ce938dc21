"""`qkvconv run RECIPE`: expand a recipe into cached steps, run what is missing, write results.json.

The plan: for every variant its chain of conversions, then its heal; the control (the unmodified base healed with
the same budget); then an evaluation of the base, the control and every variant. Each step's output lives in
RUN_DIR/steps/<kind>-<key>/, where key hashes the keys of the steps it reads, its own options and qkvconv's
version: a step is done when its folder exists (built in a temporary folder, then renamed), so a re-run skips it,
a killed run (SIGTERM, kill -9) loses at most the step it was in (stale temporary folders are removed at start; a
heal resumes from its last saved state, kept in RUN_DIR/steps/.work-finetune-<key>/), and a changed option changes
the keys of that step and of the steps after it only. RUN_DIR/results.json (format "qkvconv.run/1", the contract
in docs of issue 12) is rewritten atomically after every step, so a report renders from a partial run too.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from qkvconv.errors import QkvconvError
from qkvconv.options import EvalOptions, FinetuneOptions
from qkvconv.recipe import Recipe, Variant, load_recipe

FORMAT = "qkvconv.run/1"
STEPS = "steps"
TMP_PREFIX = ".tmp-"
WORK_PREFIX = ".work-"
RECORD = "step.json"


@dataclass
class Step:
    """One unit of work: kind convert | finetune | eval, for one model; `inputs` are the keys it reads."""

    kind: str
    model: str
    options: dict[str, Any]
    inputs: list[str]
    key: str = ""
    title: str = ""
    action: Callable | None = field(default=None, repr=False)

    @property
    def dirname(self) -> str:
        return f"{self.kind}-{self.key}"


@dataclass
class Plan:
    recipe: Recipe
    base: str  # the resolved base checkpoint
    steps: list[Step]
    models: list[dict]  # name, role, transforms, heal (options dict | None), reference, steps (keys): in results order


def step_key(kind: str, inputs: list[str], options: dict) -> str:
    """sha256 of (kind, input keys, options, qkvconv version), 16 hex digits."""
    from qkvconv import __version__

    blob = json.dumps({"kind": kind, "inputs": inputs, "options": options, "qkvconv": __version__}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _expand(path: str | None) -> str | None:
    """$VARS and ~ in a recipe path (heal data, teacher, a step's calibration text)."""
    return None if path is None else os.path.expanduser(os.path.expandvars(path))


def resolve_base(base: str) -> str:
    if base == "default":
        from qkvconv.defaults import default_checkpoint

        return str(default_checkpoint())
    return _expand(base)


def base_identity(base: str) -> str:
    """What the base's key hashes: its content (sha256 of the file / checkpoint files), or the hub id."""
    from qkvconv.manifest import hash_path

    return hash_path(base)


def control_train(recipe: Recipe) -> str:
    """--train of the control: the recipe's control.train, else the heal's (attention when that is new: the
    unmodified model has no added modules to train)."""
    if recipe.control.train:
        return recipe.control.train
    return "attention" if recipe.heal.train == "new" else recipe.heal.train


def self_distillation(heal: FinetuneOptions) -> bool:
    """Whether healing the unmodified base with `heal` would only distil it into itself: pure distillation
    (distill 1) from the default teacher, the base. Its fixed point is the base, so the base is the control. Running
    it is not a no-op but noise: teacher and student logits differ only by rounding, and Adam scales those gradients
    (norm 6.4e-5 at the first step on SmolLM2-135M) to steps of the learning rate's size, so the control drifts away
    from the base (held-out KL 0.058 after 2 steps of lr 3e-4, 0.070 after 4) for no reason a reader could see."""
    return heal.distill >= 1.0 and heal.teacher is None


def _heal_of(recipe: Recipe, variant: Variant | None) -> FinetuneOptions | None:
    if recipe.heal is None or (variant is not None and variant.heal == "none"):
        return None
    train = control_train(recipe) if variant is None else (variant.train or recipe.heal.train)
    seed = recipe.heal.seed if "seed" in recipe.heal.model_fields_set else recipe.seed
    update = {"train": train, "seed": seed} | ({"lr_new": None} if variant is None else {})  # the control adds nothing
    return recipe.heal.model_copy(update=update)


def _device(recipe: Recipe) -> str:
    from qkvconv.evaluate import pick_device

    return pick_device(recipe.device)


def make_plan(recipe: Recipe, *, base_id: str | None = None) -> Plan:
    """Every step of the recipe in run order, with its key; no work is done (base_id: the base's identity)."""
    base = resolve_base(recipe.base)
    base_key = step_key("base", [], {"checkpoint": base_id if base_id is not None else base_identity(base)})
    device = _device(recipe)
    steps: list[Step] = []
    models: list[dict] = []
    evals = recipe.eval.model_copy(update={"device": recipe.eval.device or device})

    def add(step: Step) -> str:
        step.key = step_key(step.kind, step.inputs, step.options)
        if all(s.key != step.key for s in steps):  # two variants may share a prefix of their chain
            steps.append(step)
        return step.key

    def heal_step(name: str, source_key: str, heal: FinetuneOptions, control: bool) -> str:
        options = heal.model_dump(mode="json") | {"device": heal.device if "device" in heal.model_fields_set
                                                   else device}
        eval_kl = heal.eval_kl if "eval_kl" in heal.model_fields_set else True  # a run's heal curves show KL
        options = {**options, "data": _expand(options["data"]), "eval_data": _expand(options["eval_data"]),
                   "eval_kl": eval_kl,
                   "teacher": _expand(options["teacher"]) or (base if heal.distill or eval_kl else None)}
        if options["lr_new"] is None:  # unset: the step keeps the key it had before the option existed
            del options["lr_new"]
        return add(Step("finetune", name, options, [source_key], title=f"heal {name}" + (" (control)" * control)))

    def eval_step(name: str, source_key: str) -> str:
        return add(Step("eval", name, evals.model_dump(mode="json"), [source_key], title=f"eval {name}"))

    chains = []
    for v in recipe.variants:
        key, keys, transforms = base_key, [], []
        for s in v.steps:
            opts = s.options
            unset = {"device": device, "seed": recipe.seed}  # the recipe's, where the step does not say
            opts = opts.model_copy(update={k: v for k, v in unset.items() if k not in opts.model_fields_set})
            options = {"transform": s.transform, **opts.model_dump(mode="json")}
            options["calib"] = _expand(options["calib"])  # $VARS and ~, as in the heal data (None, "sample" stay)
            key = add(Step("convert", v.name, options, [key], title=f"{s.transform} → {v.name}"))
            keys.append(key)
            transforms.append(s.describe())
        heal = _heal_of(recipe, v)
        if heal is not None:
            key = heal_step(v.name, key, heal, control=False)
            keys.append(key)
        chains.append((v, keys, key, transforms, heal))

    control = _heal_of(recipe, None)
    entries = [("base", "base", [], None, [], base_key)]
    if control is not None and self_distillation(control):  # the base is the control: nothing to heal
        entries.append(("control", "control", [], control, [], base_key))
    elif control is not None:
        ckey = heal_step("control", base_key, control, control=True)
        entries.append(("control", "control", [], control, [ckey], ckey))
    for v, keys, key, transforms, heal in chains:
        entries.append((v.name, "variant", transforms, heal, keys, key))
    for name, role, transforms, heal, keys, key in entries:
        ekey = eval_step(name, key)
        models.append({"name": name, "role": role, "transforms": transforms,
                       "heal": heal.model_dump(mode="json") if heal is not None else None,
                       "reference": "control" if heal is not None else "base", "steps": keys + [ekey],
                       "source_key": key, "eval_key": ekey})
    return Plan(recipe, base, steps, models)


# ------------------------------------------------------------------------------------------------- running
def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def device_label(device: str) -> str:
    """"cpu", or "cuda:0 (NVIDIA H100 80GB HBM3)"."""
    if not device.startswith("cuda"):
        return device
    import torch

    index = int(device.split(":")[1]) if ":" in device else torch.cuda.current_device()
    return f"cuda:{index} ({torch.cuda.get_device_name(index)})"


class Runner:
    """Runs a Plan in RUN_DIR; `display` gets (event, **info) calls to draw progress (see cli.run)."""

    def __init__(self, plan: Plan, run_dir: Path, recipe_text: str, *, display=None):
        self.plan, self.run_dir, self.recipe_text = plan, Path(run_dir), recipe_text
        self.steps_dir = self.run_dir / STEPS
        self.display = display or (lambda event, **info: None)
        self.records: dict[str, dict] = {}
        self.t0 = time.perf_counter()
        self.device = _device(plan.recipe)
        self._resolved: dict[str, tuple] = {}

    def dir_of(self, key: str) -> Path | None:
        """The finished folder of step `key` (None: not run yet); the base is its checkpoint."""
        step = next((s for s in self.plan.steps if s.key == key), None)
        if step is None:
            return None
        d = self.steps_dir / step.dirname
        return d if d.is_dir() else None

    def model_path(self, key: str) -> str:
        if key == self._base_key():
            return self.plan.base
        return str(self.steps_dir / next(s for s in self.plan.steps if s.key == key).dirname / "model")

    def _base_key(self) -> str:
        return self.plan.models[0]["source_key"]

    def cached(self) -> dict[str, bool]:
        return {s.key: (self.steps_dir / s.dirname).is_dir() for s in self.plan.steps}

    def run(self) -> Path:
        self.steps_dir.mkdir(parents=True, exist_ok=True)
        for stale in self.steps_dir.glob(TMP_PREFIX + "*"):  # a killed step's half-written output
            shutil.rmtree(stale, ignore_errors=True)
        (self.run_dir / "recipe.yaml").write_text(self.recipe_text, encoding="utf-8")
        n = len(self.plan.steps)
        self.display("start", total=n, cached=sum(self.cached().values()))
        for i, step in enumerate(self.plan.steps, 1):
            final = self.steps_dir / step.dirname
            if final.is_dir():
                self.records[step.key] = {**json.loads((final / RECORD).read_text()), "cached": True}
                self.display("cached", index=i, total=n, step=step)
                continue
            self.display("begin", index=i, total=n, step=step)
            tmp = self.steps_dir / f"{TMP_PREFIX}{step.dirname}-{os.getpid()}"
            tmp.mkdir()
            started, t = _now(), time.perf_counter()
            getattr(self, f"_{step.kind}")(step, tmp)
            record = {"key": step.key, "kind": step.kind, "model": step.model, "options": step.options,
                      "dir": f"{STEPS}/{step.dirname}", "wall_s": round(time.perf_counter() - t, 3),
                      "device": device_label(step.options.get("device") or self.device), "started": started,
                      "finished": _now()}
            (tmp / RECORD).write_text(json.dumps(record, indent=2))
            os.replace(tmp, final)  # the step is done exactly when its folder exists
            self.records[step.key] = {**record, "cached": False}
            work = self.steps_dir / f"{WORK_PREFIX}{step.dirname}"
            shutil.rmtree(work, ignore_errors=True)
            self.write_results()
            self.display("end", index=i, total=n, step=step, record=record)
        path = self.write_results()
        self.display("done", path=path)
        return path

    # -------------------------------------------------------------------------------------------- steps
    def _convert(self, step: Step, tmp: Path) -> None:
        from qkvconv.options import TRANSFORMS

        options = dict(step.options)
        cls = TRANSFORMS[options.pop("transform")]
        cls(**options).convert(self.model_path(step.inputs[0]), tmp / "model",
                               progress=lambda what: self.display("progress", text=what))

    def _finetune(self, step: Step, tmp: Path) -> None:
        from qkvconv.finetune import STATE_FILE, finetune

        options = FinetuneOptions(**step.options)
        work = self.steps_dir / f"{WORK_PREFIX}{step.dirname}"  # survives a kill: the heal resumes from here
        resume = (work / STATE_FILE).is_file()
        cfg = options.config()
        steps_total = cfg.steps
        self.display("progress", text="loading", total=steps_total)
        finetune(self.model_path(step.inputs[0]), tmp / "model", cfg, run_dir=work, resume=resume,
                 device=options.device, on_step=lambda s: self.display("advance", completed=s))
        shutil.copytree(work, tmp / "run", ignore=shutil.ignore_patterns(STATE_FILE))

    def _eval(self, step: Step, tmp: Path) -> None:
        from qkvconv.checkpoint import load, resolve_source
        from qkvconv.describe import kv_cache_bytes_per_token, parameter_counts
        from qkvconv.evaluate import EvalEntry
        from qkvconv.manifest import hash_path
        from qkvconv.options import torch_dtype

        options = EvalOptions(**step.options)
        dtype = torch_dtype(options.dtype)
        source = resolve_source(self.model_path(step.inputs[0]))
        sizes: dict[str, int] = {}

        def _load():
            loaded = load(source, dtype=dtype)
            sizes["params"] = parameter_counts(loaded.model, loaded.spec)["total"]
            sizes["kv"] = kv_cache_bytes_per_token(loaded.config, loaded.spec, dtype)
            return loaded.model, loaded.tokenizer

        entry = EvalEntry(name=step.model, load=_load, num_parameters=0, kv_cache_bytes_per_token=0,
                          source_hash=hash_path(source.path) if source.kind != "hub" else None)
        self.display("progress", text=f"lm-eval {', '.join(options.tasks)}")
        tasks = json.dumps(step.options, sort_keys=True)
        if tasks not in self._resolved:  # one lm-eval task index per run (building one takes seconds)
            self._resolved[tasks] = options.resolve()
        report = options.evaluate([entry], console=_Quiet(), log_samples=True, resolved=self._resolved[tasks])
        row, results = report.rows[0], report.results[0]
        metrics: dict[str, dict] = {}
        for m in row.metrics:
            metrics.setdefault(m.task, {})[m.name] = {"value": m.value, "stderr": m.stderr,
                                                      "higher_is_better": m.higher_is_better}
        out = {"params": sizes["params"], "kv_cache_bytes_per_token": sizes["kv"], "metrics": metrics,
               "samples": results.get("samples") or {}, "task_versions": results.get("versions") or {},
               "data_sources": report.sources, "settings": report.settings, "eval_s": row.eval_seconds,
               "dtype": str(dtype).removeprefix("torch.")}
        (tmp / "eval.json").write_text(json.dumps(out, allow_nan=False))

    # ------------------------------------------------------------------------------------------ results
    def _heal_curve(self, key: str) -> list[dict]:
        d = self.dir_of(key)
        log = d / "run" / "eval.jsonl" if d else None
        if log is None or not log.is_file():
            return []
        rows = [json.loads(x) for x in log.read_text().splitlines() if x.strip()]
        return [{"step": r["step"], "tokens": r["tokens"], "eval_loss": r["loss"], "kl": r.get("kl")} for r in rows]

    def results(self) -> dict:
        from qkvconv.manifest import manifest

        recipe = self.plan.recipe
        models = []
        for m in self.plan.models:
            d = self.dir_of(m["eval_key"])
            ev = json.loads((d / "eval.json").read_text()) if d else {}
            heal_key = next((k for k in m["steps"] if self._kind(k) == "finetune"), None)
            models.append({
                "name": m["name"], "role": m["role"], "transforms": m["transforms"], "heal": m["heal"],
                "reference": m["reference"], "params": ev.get("params"),
                "kv_cache_bytes_per_token": ev.get("kv_cache_bytes_per_token"), "metrics": ev.get("metrics", {}),
                "samples": ev.get("samples", {}), "heal_curve": self._heal_curve(heal_key) if heal_key else [],
                "steps": m["steps"],
            })
        steps = [self.records[s.key] for s in self.plan.steps if s.key in self.records]
        versions = {}
        for m in self.plan.models:
            d = self.dir_of(m["eval_key"])
            if d:
                versions.update(json.loads((d / "eval.json").read_text()).get("task_versions") or {})
        return {
            "format": FORMAT, "name": recipe.name, "recipe": recipe_json(recipe),
            "recipe_text": self.recipe_text,
            "manifest": manifest(command="run", recipe=recipe.name, seed=recipe.seed, task_versions=versions,
                                 inputs={"base": {"path": self.plan.base, "key": self._base_key()}}),
            "device": device_label(self.device), "wall_s": round(time.perf_counter() - self.t0, 3),
            "models": models, "steps": steps,
        }

    def _kind(self, key: str) -> str | None:
        return next((s.kind for s in self.plan.steps if s.key == key), None)

    def write_results(self) -> Path:
        from qkvconv.evaluate import write_json

        path = self.run_dir / "results.json"
        write_json(path, self.results())
        return path


def recipe_json(recipe: Recipe) -> dict:
    """recipe.model_dump(mode="json"), each step as {transform: its options} (as written in a recipe)."""
    out = recipe.model_dump(mode="json", by_alias=True)
    for v, dumped in zip(recipe.variants, out["variants"]):
        dumped["steps"] = [{s.transform: s.options.model_dump(mode="json")} for s in v.steps]
    return out


class _Quiet:
    """A console for evaluate_models that prints nothing (the run's own display shows the step)."""

    def print(self, *args, **kwargs) -> None:
        pass


def run_recipe(recipe_path: str | Path, run_dir: str | Path | None = None, *, resume: bool = False,
               dry_run: bool = False, display=None) -> tuple[Plan, Runner, Path | None]:
    """Load, plan and (unless dry_run) run a recipe; returns the plan, the runner and results.json's path.

    An existing run_dir is refused without `resume` (which reuses every finished step whose key still matches)."""
    recipe, text = load_recipe(recipe_path)
    run_dir = Path(run_dir) if run_dir is not None else Path("runs") / recipe.name
    if run_dir.exists() and not resume and not dry_run:
        raise QkvconvError(f"{run_dir} exists; pass --resume to continue it (finished steps are kept) or choose "
                           "another --output")
    if resume and not run_dir.exists():
        raise QkvconvError(f"--resume: {run_dir} does not exist; run without --resume to start it")
    plan = make_plan(recipe)
    runner = Runner(plan, run_dir, text, display=display)
    if dry_run:
        return plan, runner, None
    path = runner.run()
    from qkvconv import experiment_report

    experiment_report.render(run_dir)
    runner.display("note", text=f"rendered {run_dir / 'report.md'}")
    return plan, runner, path
