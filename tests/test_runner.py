"""qkvconv run: a recipe on a tiny model end to end; results.json per the contract; a kill -9 mid-heal then
--resume gives the results of an uninterrupted run; a changed option reruns only the steps that depend on it."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from qkvconv.cli import app
from qkvconv.runner import FORMAT, make_plan
from qkvconv.recipe import parse_recipe

from test_evaluate import PASSAGES as _ALL_PASSAGES

PASSAGES = _ALL_PASSAGES[:6]
WORDS = "the cat sat on a mat and the dog ran to the park while small birds sang in tall green trees".split()

RECIPE = """\
name: tiny
base: {base}
device: cpu
seed: 0
heal:
  data: {corpus}
  train: attention
  steps: {steps}
  seq_len: 32
  batch_size: 2
  lr: 0.01
  eval_every: 10
  eval_seqs: 2
  save_every: 1
eval:
  tasks: [lambada_openai]
  limit: 6
  batch_size: 6
  data_dir: {data}
variants:
  - name: kv
    steps:
      - share-kv: {{mode: k=v, num_seqs: 1, seq_len: 16, seed: {kv_seed}}}
  - name: probe
    heal: none
    steps:
      - attach-query-mlp: {{num_seqs: 1, seq_len: 16}}
"""


@pytest.fixture(scope="module")
def setup(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    (root / "data" / "lambada_openai").mkdir(parents=True)
    (root / "data" / "lambada_openai" / "lambada_test.jsonl").write_text(
        "".join(json.dumps({"text": p}) + "\n" for p in PASSAGES))
    rng = random.Random(0)
    (root / "corpus.txt").write_text("\n".join(" ".join(rng.choice(WORDS) for _ in range(12)) + "." for _ in range(400)))
    return root, tiny_models["llama"]


def recipe(setup, name="r.yaml", steps=30, kv_seed=0) -> Path:
    root, base = setup
    path = root / name
    path.write_text(RECIPE.format(base=base, corpus=root / "corpus.txt", data=root / "data", steps=steps,
                                  kv_seed=kv_seed))
    return path


def run_cli(*args) -> str:
    result = CliRunner().invoke(app, ["run", *map(str, args)])
    assert result.exit_code == 0, result.output
    return result.output


def comparable(results: dict) -> dict:
    """What must not depend on how the run was interrupted: every model's figures, samples and heal curve."""
    return {m["name"]: {k: m[k] for k in ("params", "kv_cache_bytes_per_token", "metrics", "samples", "heal_curve",
                                          "steps", "transforms", "heal", "reference")}
            for m in results["models"]}


def check_contract(r: dict) -> None:
    assert r["format"] == FORMAT and r["name"] == "tiny" and r["device"] == "cpu"
    assert r["recipe"]["variants"][0]["steps"][0]["share-kv"]["mode"] == "k=v"
    assert r["recipe_text"].startswith("name: tiny") and "versions" in r["manifest"]
    assert [m["name"] for m in r["models"]] == ["base", "control", "kv", "probe"]
    assert [m["role"] for m in r["models"]] == ["base", "control", "variant", "variant"]
    assert [m["reference"] for m in r["models"]] == ["base", "control", "control", "base"]
    base, control, kv, probe = r["models"]
    assert base["transforms"] == control["transforms"] == [] and base["heal"] is None
    assert control["heal"]["train"] == "attention" and kv["heal"] == control["heal"] and probe["heal"] is None
    assert kv["transforms"][0]["transform"] == "share-kv" and kv["transforms"][0]["init"] == "key"
    assert kv["kv_cache_bytes_per_token"] * 2 == base["kv_cache_bytes_per_token"] > 0  # K=V: one tensor per layer
    assert probe["params"] > base["params"] == control["params"]
    steps = {s["key"]: s for s in r["steps"]}
    for m in r["models"]:
        assert set(m["steps"]) <= set(steps)
        acc = m["metrics"]["lambada_openai"]["acc"]
        assert set(acc) == {"value", "stderr", "higher_is_better"} and acc["higher_is_better"] is True
        s = m["samples"]["lambada_openai"]
        assert s["doc_ids"] == list(range(6))
        assert s["metrics"]["acc"]["aggregation"] == "mean"
        assert sum(s["metrics"]["acc"]["values"]) / 6 == pytest.approx(acc["value"])
        assert s["metrics"]["perplexity"]["aggregation"] == "perplexity"
        assert len(s["metrics"]["perplexity"]["values"]) == 6
        healed = m["heal"] is not None
        assert bool(m["heal_curve"]) == healed
        if healed:
            assert [c["step"] for c in m["heal_curve"]] == [0, 10, 20, 30]
            assert set(m["heal_curve"][0]) == {"step", "tokens", "eval_loss", "kl"}
    for s in r["steps"]:
        assert s["kind"] in ("convert", "finetune", "eval") and s["wall_s"] >= 0
        assert (Path(s["dir"]).parts[0] == "steps") and isinstance(s["cached"], bool)
        assert set(s) == {"key", "kind", "model", "options", "dir", "wall_s", "device", "cached", "started", "finished"}


def test_kill_9_mid_heal_then_resume_equals_an_uninterrupted_run(setup, tmp_path):
    path = recipe(setup)
    run_cli(path, "--output", tmp_path / "whole")
    whole = json.loads((tmp_path / "whole" / "results.json").read_text())
    check_contract(whole)

    killed = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    proc = subprocess.Popen([sys.executable, "-m", "qkvconv.cli", "run", str(path), "--output", str(killed)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    states = []
    while time.time() < deadline and proc.poll() is None:  # kill once the first heal has saved a state
        states = list((killed / "steps").glob(".work-finetune-*/state.pt")) if (killed / "steps").is_dir() else []
        if states:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert states, "the heal finished before it could be killed; make it longer"
    assert not list((killed / "steps").glob("finetune-*")), "the killed heal must not be marked done"

    out = run_cli(path, "--output", killed, "--resume")
    resumed = json.loads((killed / "results.json").read_text())
    assert comparable(resumed) == comparable(whole)
    assert not list((killed / "steps").glob(".tmp-*")) and not list((killed / "steps").glob(".work-*"))
    assert any(s["cached"] for s in resumed["steps"])  # the conversion finished before the kill was kept
    assert "wrote" in out

    # a changed option of one variant reruns that variant's steps only
    changed = recipe(setup, "changed.yaml", kv_seed=1)
    dry = CliRunner().invoke(app, ["run", str(changed), "--output", str(killed), "--resume", "--dry-run"])
    assert dry.exit_code == 0
    plan = make_plan(parse_recipe(changed.read_text()))
    old = {s["key"] for s in resumed["steps"]}
    rerun = [s for s in plan.steps if s.key not in old]
    assert {(s.kind, s.model) for s in rerun} == {("convert", "kv"), ("finetune", "kv"), ("eval", "kv")}
    run_cli(changed, "--output", killed, "--resume")
    after = json.loads((killed / "results.json").read_text())
    fresh = {(s["kind"], s["model"]) for s in after["steps"] if not s["cached"]}
    assert fresh == {("convert", "kv"), ("finetune", "kv"), ("eval", "kv")}
    assert comparable(after)["control"] == comparable(whole)["control"]


def test_a_steps_calibration_path_expands_like_the_heal_data(monkeypatch, tmp_path):
    """`calib: $QKVCONV_DATA_DIR/...` in a step reads the variable, as heal.data does (it was passed on verbatim)."""
    monkeypatch.setenv("QKVCONV_DATA_DIR", str(tmp_path))
    plan = make_plan(parse_recipe("name: c\nbase: some/model\nvariants:\n"
                                  "  - name: l\n    steps: [latent-kv: {kv_rank: 8, calib: $QKVCONV_DATA_DIR/g.txt}]\n"
                                  "  - name: s\n    steps: [share-kv: {mode: k=v, calib: sample}]\n"),
                     base_id="some/model")
    calibs = [s.options["calib"] for s in plan.steps if s.kind == "convert"]
    assert calibs == [str(tmp_path / "g.txt"), "sample"]


def test_lr_new_reaches_the_variants_heal_and_leaves_the_controls_key_alone():
    """heal.lr_new is the lr of the modules a conversion added: the control (the unmodified base) has none, so its heal
    step, and its key, are those of the same recipe without lr_new; the variant's heal carries it."""
    text = ("name: c\nbase: some/model\nheal: {data: d.txt, steps: 2, train: attention%s}\n"
            "variants:\n  - name: l\n    steps: [latent-kv: {kv_rank: 8}]\n")
    plain = make_plan(parse_recipe(text % ""), base_id="some/model")
    fast = make_plan(parse_recipe(text % ", lr_new: 0.001"), base_id="some/model")
    heals = {p: {s.model: s for s in plan.steps if s.kind == "finetune"} for p, plan in (("plain", plain), ("fast", fast))}
    assert heals["fast"]["control"].key == heals["plain"]["control"].key
    assert "lr_new" not in heals["fast"]["control"].options and "lr_new" not in heals["plain"]["l"].options
    assert heals["fast"]["l"].options["lr_new"] == 0.001 and heals["fast"]["l"].key != heals["plain"]["l"].key


def test_a_pure_distillation_heal_has_the_base_as_its_control():
    """distill 1 from the default teacher (the base): healing the base would only distil it into itself, so the plan
    has no control heal and the control is evaluated as the base (one eval step, the base's); any other heal (half
    distillation, or another teacher) still heals the control."""
    text = "name: c\nbase: some/model\nheal: {data: d.txt, steps: 2, train: attention%s}\n" \
           "variants:\n  - name: l\n    steps: [latent-kv: {kv_rank: 8}]\n"
    pure = make_plan(parse_recipe(text % ", distill: 1.0"), base_id="some/model")
    assert [s.model for s in pure.steps if s.kind == "finetune"] == ["l"]
    models = {m["name"]: m for m in pure.models}
    assert models["control"]["source_key"] == models["base"]["source_key"]
    assert models["control"]["eval_key"] == models["base"]["eval_key"] and models["control"]["steps"] == [
        models["base"]["eval_key"]]
    assert sum(s.kind == "eval" for s in pure.steps) == 2  # base (= control) and l
    assert models["l"]["reference"] == "control"
    for other in (", distill: 0.5", ", distill: 1.0, teacher: other/model"):
        plan = make_plan(parse_recipe(text % other), base_id="some/model")
        assert sorted(s.model for s in plan.steps if s.kind == "finetune") == ["control", "l"], other


def test_an_existing_run_dir_needs_resume(setup, tmp_path):
    (tmp_path / "x").mkdir()
    result = CliRunner().invoke(app, ["run", str(recipe(setup)), "--output", str(tmp_path / "x")])
    assert result.exit_code == 1 and "--resume" in result.output
    dry = CliRunner().invoke(app, ["run", str(recipe(setup)), "--output", str(tmp_path / "y"), "--dry-run"])
    assert dry.exit_code == 0 and "runs" in dry.output and not (tmp_path / "y").exists()
