"""Recipes: validation errors name the file, the line and the key; invalid chains are refused at load; the CLI's
flags and the option models behind them (and behind recipe steps) cannot drift apart."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
from typer.testing import CliRunner

from qkvconv.cli import app
from qkvconv.options import TRANSFORMS, EvalOptions, FinetuneOptions, ShareKvOptions
from qkvconv.recipe import RecipeError, load_recipe

GOOD = """\
name: demo
base: default
heal:
  data: corpus.txt
  steps: 10
  train: attention
eval:
  tasks: lambada_openai,wikitext
  limit: 5
variants:
  - name: kv
    steps:
      - share-kv: {mode: k=v}
  - name: probe
    heal: none
    steps:
      - absorb-query
      - attach-query-mlp: {rank: 8}
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return path


def error_of(tmp_path: Path, text: str) -> str:
    with pytest.raises(RecipeError) as e:
        load_recipe(write(tmp_path, text))
    return str(e.value)


def test_a_good_recipe_loads_with_the_commands_own_defaults(tmp_path):
    recipe, text = load_recipe(write(tmp_path, GOOD))
    assert text == GOOD
    kv, probe = recipe.variants
    assert kv.steps[0].options == ShareKvOptions(mode="k=v")
    assert [s.transform for s in probe.steps] == ["absorb-query", "attach-query-mlp"]
    assert probe.steps[0].options.mode == "exact" and probe.steps[1].options.rank == 8
    assert probe.heal == "none"
    assert recipe.eval.tasks == ["lambada_openai", "wikitext"]
    assert recipe.heal == FinetuneOptions(data="corpus.txt", steps=10, train="attention")


@pytest.mark.parametrize("old,new,line,where,what", [
    ("      - share-kv: {mode: k=v}", "      - share-kv:\n          kv_head: 3", 14,
     "variants[0].steps[0].share-kv.kv_head", "unknown key"),
    ("  limit: 5", "  limit: 5\n  limits: 7", 10, "eval.limits", "unknown key"),
    ("  steps: 10", "  steps: ten", 5, "heal.steps", "valid integer"),
    ("      - absorb-query", "      - absorb-query: {mode: lossy}", 17, "variants[1].steps[0].absorb-query.mode",
     "'exact' or 'drop'"),
    ("      - absorb-query", "      - absorb-querry", 17, "variants[1].steps[0].absorb-querry", "unknown key"),
    ("base: default\n", "", 1, "base", "required key missing"),
])
def test_validation_errors_name_file_line_and_key(tmp_path, old, new, line, where, what):
    assert old in GOOD
    message = error_of(tmp_path, GOOD.replace(old, new))
    assert message.startswith(f"{tmp_path / 'r.yaml'}:{line}: {where}: "), message
    assert what in message
    assert "\n" not in message


@pytest.mark.parametrize("chain,index,why", [
    ("[{share-kv: {mode: k=v}}, {share-kv: {kv_heads: 1}}]", 1, "applies once"),
    ("[attach-preproj, {share-kv: {mode: k=v}}]", 1, "put it first"),
    ("[{share-kv: {mode: q=k}}, absorb-query]", 1, "cannot follow share-kv"),
    ("[attach-query-mlp, absorb-query]", 1, "before the attach"),
])
def test_invalid_chains_are_refused_at_load(tmp_path, chain, index, why):
    text = GOOD.replace("    steps:\n      - share-kv: {mode: k=v}", f"    steps: {chain}")
    message = error_of(tmp_path, text)
    assert f":12: variants[0].steps[{index}]." in message and why in message, message


def test_other_refusals(tmp_path):
    assert "unique" in error_of(tmp_path, GOOD.replace("name: probe", "name: kv"))
    assert "variants[1].name" in error_of(tmp_path, GOOD.replace("name: probe", "name: control"))
    assert "one transform" in error_of(tmp_path, GOOD.replace("- share-kv: {mode: k=v}",
                                                              "- {share-kv: {mode: k=v}, absorb-query: {}}"))
    assert ":4: not valid YAML" in error_of(tmp_path, "name: x\nbase: y\nvariants: [\n")
    # a per-variant train on a variant that is not healed
    assert "variants[1].train: this variant is not healed" in error_of(
        tmp_path, GOOD.replace("    heal: none\n", "    heal: none\n    train: all\n"))


def test_cli_prints_one_line_and_exits_2(tmp_path):
    path = write(tmp_path, GOOD.replace("{mode: k=v}", "{mode: k=v, kv_head: 2}"))
    result = CliRunner().invoke(app, ["run", str(path), "--dry-run"])
    assert result.exit_code == 2, result.output
    lines = [x for x in result.output.splitlines() if x.strip()]
    assert len(lines) == 1 and "r.yaml:13: variants[0].steps[0].share-kv.kv_head: unknown key" in lines[0]


# ------------------------------------------------------------------------------- CLI flags = option fields
def _commands():
    for info in app.registered_commands:
        fn = info.callback
        while hasattr(fn, "__wrapped__") and not hasattr(fn, "qkvconv_options"):
            fn = fn.__wrapped__
        yield info.name or info.callback.__name__, info.callback, getattr(fn, "qkvconv_options", None)


def test_every_converting_heal_and_eval_command_declares_its_options_model():
    declared = {name: spec[0] for name, _, spec in _commands() if spec}
    assert declared == {**{t: cls for t, cls in TRANSFORMS.items()}, "finetune": FinetuneOptions, "eval": EvalOptions}


@pytest.mark.parametrize("name", [*TRANSFORMS, "finetune", "eval"])
def test_cli_flags_and_option_fields_do_not_drift(name):
    _, callback, (model, invocation, renamed) = next(c for c in _commands() if c[0] == name)
    params = set(inspect.signature(callback).parameters)
    assert invocation <= params, f"{name}: invocation parameters {invocation - params} are not flags"
    flags = {renamed.get(p, p) for p in params - invocation}
    fields = set(model.model_fields)
    assert flags == fields, (f"{name}: flags without a field {sorted(flags - fields)}, "
                             f"fields without a flag {sorted(fields - flags)}")


def test_a_flag_the_model_refuses_is_one_line_exit_1(tiny_models, tmp_path):
    result = CliRunner().invoke(app, ["absorb-query", str(tiny_models["llama"]), "-o", str(tmp_path / "x"),
                                      "--mode", "lossy"])
    assert result.exit_code == 1
    assert "--mode lossy" in result.output and "'exact' or 'drop'" in result.output
    assert not (tmp_path / "x").exists()
