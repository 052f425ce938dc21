"""The experiment report: a hand-built results.json (numbers known), a partial run, bad files, the CLI, and a
results.json built from a real (tiny) lm-eval run with per-sample output."""

from __future__ import annotations

import copy
import hashlib
import json
import math
import random
import re
from pathlib import Path

import pytest

from qkvconv.errors import QkvconvError

ITERS = 400  # bootstrap resamples in these tests (the report's default is 10,000)
SEED = 1234

# KV ladder of a 2-layer model: base 1,024 B/token; K=V halves it, pooling to 1 KV head of 2 halves it again
MODELS = [
    # name, role, reference, kv bytes, acc shift, loglikelihood shift per doc, healed
    ("base", "base", "base", 1024, 0.0, 0.0, False),
    ("control", "control", "base", 1024, 0.0, 0.05, True),
    ("kv-half", "variant", "control", 512, -0.02, 0.0, True),
    ("kv-quarter", "variant", "control", 256, -0.25, -0.6, True),
    ("kv-half-raw", "variant", "base", 512, -0.3, -1.5, False),
]
RECIPE_TEXT = "name: ladder\nbase: tiny\nvariants:\n  - name: kv-half\n    transforms: [{share-kv: {mode: k=v}}]\n"


def _model(name, role, ref, kv, acc_shift, ll_shift, healed, rng, docs=120, pages=12):
    from lm_eval.api.metrics import bits_per_byte, mean, perplexity, weighted_perplexity

    base_rng = random.Random(0)  # the same documents for every model: a shared per-document difficulty
    difficulty = [base_rng.random() for _ in range(docs)]
    acc = [int(d + acc_shift + 0.15 * rng.gauss(0, 1) > 0.45) for d in difficulty]
    ll = [-1.0 - 3 * d + ll_shift + 0.1 * rng.gauss(0, 1) for d in difficulty]
    words = [base_rng.randint(80, 160) for _ in range(pages)]
    page_ll = [-4.0 * w * (1 + 0.1 * base_rng.random()) + ll_shift * w + rng.gauss(0, 3) for w in words]
    nbytes = [5 * w for w in words]
    wp = [[x, w] for x, w in zip(page_ll, words)]
    bp = [[x, b] for x, b in zip(page_ll, nbytes)]
    metrics = {
        "lambada_openai": {
            "perplexity": {"value": perplexity(ll), "stderr": 0.1 * perplexity(ll), "higher_is_better": False},
            "acc": {"value": mean(acc), "stderr": math.sqrt(mean(acc) * (1 - mean(acc)) / docs),
                    "higher_is_better": True},
        },
        "wikitext": {
            "word_perplexity": {"value": weighted_perplexity(wp), "stderr": None, "higher_is_better": False},
            "bits_per_byte": {"value": bits_per_byte(bp), "stderr": None, "higher_is_better": False},
        },
    }
    # lambada's documents are given out of order and one is missing for kv-quarter: pairing is by doc_id
    ids = list(range(docs))
    order = ids[::-1] if name == "kv-quarter" else ids
    keep = [i for i in order if not (name == "kv-quarter" and i == 7)]
    samples = {
        "lambada_openai": {"doc_ids": keep, "metrics": {
            "perplexity": {"aggregation": "perplexity", "values": [ll[i] for i in keep]},
            "acc": {"aggregation": "mean", "values": [acc[i] for i in keep]},
        }},
        "wikitext": {"doc_ids": list(range(pages)), "metrics": {
            "word_perplexity": {"aggregation": "weighted_perplexity", "values": wp},
            "bits_per_byte": {"aggregation": "bits_per_byte", "values": bp},
        }},
    }
    curve = []
    if healed:
        for step in range(0, 101, 20):
            curve.append({"step": step, "tokens": step * 4096, "eval_loss": 3.0 - ll_shift + 2.0 / (1 + step / 10),
                          "kl": None if role == "control" else 0.5 / (1 + step / 20) - ll_shift / 10})
    share = {"transform": "share-kv", "mode": "k=v", "kv_heads": None, "init": "key"}
    transforms = [share] if role == "variant" else []
    return {
        "name": name, "role": role, "transforms": transforms,
        "heal": {"tokens": 409600, "train": "attention", "lr": 1e-4} if healed else None,
        "reference": ref, "params": 100_000 - (4096 if role == "variant" else 0), "kv_cache_bytes_per_token": kv,
        "metrics": metrics, "samples": samples, "heal_curve": curve, "steps": [f"{name}-convert", f"{name}-eval"],
    }


def fake_results() -> dict:
    rng = random.Random(42)
    models = [_model(*spec, rng) for spec in MODELS]
    steps = []
    for i, m in enumerate(models):
        for kind in ("convert", "finetune", "eval"):
            steps.append({"key": f"{m['name']}-{kind}" + "0" * 12, "kind": kind, "model": m["name"], "options": {},
                          "dir": f"steps/{m['name']}-{kind}", "wall_s": 12.5 * (i + 1), "device": "cpu",
                          "cached": i == 0, "started": "2026-01-01T00:00:00+00:00",
                          "finished": "2026-01-01T00:01:00+00:00"})
    return {
        "format": "qkvconv.run/1", "name": "ladder", "recipe": {"name": "ladder"}, "recipe_text": RECIPE_TEXT,
        "manifest": {"versions": {"python": "3.11", "torch": "2.13", "lm_eval": "0.4.13"},
                     "environment": {"device": "cpu (2 threads)"}, "machine": "test-box x86_64",
                     "created": "2026-01-01T00:00:00+00:00", "seeds": {"eval": 1234}},
        "device": "cpu", "wall_s": 3723.0, "models": models, "steps": steps,
    }


def write_run(tmp_path: Path, data: dict, name: str = "run") -> Path:
    run = tmp_path / name
    run.mkdir()
    (run / "results.json").write_text(json.dumps(data, indent=1), encoding="utf-8")
    return run


def _rows(report: str) -> dict[str, list[str]]:
    """model name -> its cells in the first (main) table of report.md."""
    table = report.split("## Results")[1].split("\n\n")[2]
    rows = {}
    for line in table.splitlines()[2:]:
        cells = [c.strip() for c in line.strip("|").split(" | ")]
        rows[cells[0].split(" (")[0]] = cells
    return rows


def _aligned(data, name, ref, task, metric):
    from qkvconv.stats import paired_values

    a = next(m for m in data["models"] if m["name"] == name)["samples"][task]
    b = next(m for m in data["models"] if m["name"] == ref)["samples"][task]
    return paired_values(a["doc_ids"], a["metrics"][metric]["values"], b["doc_ids"], b["metrics"][metric]["values"])


def _png_ok(path: Path) -> tuple[int, int]:
    from PIL import Image

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        return im.size


def test_report_numbers_match_the_paired_tests(tmp_path):
    from qkvconv.experiment_report import _p, render
    from qkvconv.report import format_delta
    from qkvconv.stats import paired_test

    data = fake_results()
    run = write_run(tmp_path, data)
    before = hashlib.sha256((run / "results.json").read_bytes()).hexdigest()
    path = render(run, iters=ITERS, seed=SEED)
    assert path == run / "report.md"
    assert hashlib.sha256((run / "results.json").read_bytes()).hexdigest() == before  # input untouched
    report = path.read_text()
    rows = _rows(report)
    assert list(rows) == ["base", "control", "kv-half", "kv-quarter", "kv-half-raw"]
    header = report.split("## Results")[1].split("\n\n")[2].splitlines()[0]
    assert "lambada_openai<br>acc ↑<br>(McNemar exact)" in header
    assert "lambada_openai<br>ppl ↓<br>(paired bootstrap)" in header
    assert "wikitext<br>word ppl ↓<br>(paired bootstrap)" in header
    assert "bits_per_byte" not in header  # not a main metric: in "Other metrics"
    assert "### Other metrics" in report and "bits/byte" in report.split("### Other metrics")[1]
    columns = {"acc": 4, "perplexity": 5, "word_perplexity": 6}  # model, ref, params, KV, then main metrics
    tasks = {"acc": "lambada_openai", "perplexity": "lambada_openai", "word_perplexity": "wikitext"}

    significant = 0
    for name, _, ref, kv, *_ in MODELS:
        cells = rows[name]
        assert cells[3].startswith(f"{kv:,}<br>{kv / 1024:.0%}")
        if name == ref:
            assert cells[1] == "–" and "Δ" not in " ".join(cells)
            continue
        assert cells[1] == ref
        model = next(m for m in data["models"] if m["name"] == name)
        reference = next(m for m in data["models"] if m["name"] == ref)
        for metric, col in columns.items():
            task = tasks[metric]
            a, b = _aligned(data, name, ref, task, metric)
            agg = model["samples"][task]["metrics"][metric]["aggregation"]
            t = paired_test(a, b, agg, iters=ITERS, seed=SEED)
            value, ref_value = model["metrics"][task][metric]["value"], reference["metrics"][task][metric]["value"]
            floor = "≤ " if t.test == "paired bootstrap" and t.p_value == 1 / (ITERS + 1) else ""
            expected = f"Δ {format_delta(value - ref_value, ref_value)}, p {floor}{_p(t.p_value)}"
            assert expected in cells[col], (name, metric, cells[col], expected)
            assert ("✱" in cells[col]) == (t.p_value < 0.05)
            significant += t.p_value < 0.05
            if metric == "acc":
                assert t.test == "McNemar exact"
                assert f"({t.discordant[0]}:{t.discordant[1]} discordant)" in report
    assert significant >= 4  # the damaged variants differ for real; kv-half mostly does not
    # kv-quarter misses doc 7 and lists its documents in reverse: 119 pairs, matched by doc_id
    assert "| kv-quarter | control | lambada_openai | acc | 119 |" in report

    # which should I use: the best acc at or under each budget
    use = report.split("## Which should I use")[1].split("\n\n")[2].splitlines()
    assert [line.split("`")[1] for line in use] == [
        max((m for m in data["models"] if m["kv_cache_bytes_per_token"] <= budget),
            key=lambda m: m["metrics"]["lambada_openai"]["acc"]["value"])["name"]
        for budget in (1024, 512, 256)
    ]
    assert use[0].startswith("- **≤ 1,024 B/token** (100% of base)")

    for text in (f"({ITERS} resamples, seed {SEED}", RECIPE_TEXT.strip(), "test-box x86_64", "torch 2.13",
                 "cpu (2 threads)", "wall time 62.0 min", 'seeds: `{"eval": 1234}`'):
        assert text in report, text
    assert report.count("| convert |") == 5 and "| 37.5 s |" in report
    assert "![Quality against KV-cache size](quality_vs_kv.png)" in report
    assert "![Heal curves](heal_curves.png)" in report
    w, h = _png_ok(run / "quality_vs_kv.png")
    assert w > 3 * h  # one panel per main metric: three side by side
    _png_ok(run / "heal_curves.png")
    assert sorted(p.name for p in run.iterdir()) == [  # and no temporary folder left
        "heal_curves.png", "quality_vs_kv.png", "report.md", "results.json"]


def test_pareto_front():
    from qkvconv.experiment_report import pareto_front

    # (KV bytes, acc): the 512-byte point at 0.5 is beaten by the 256-byte point at 0.6
    pts = [(1024, 0.7), (512, 0.5), (256, 0.6), (128, 0.2), (512, 0.65)]
    assert pareto_front(pts, higher_is_better=True) == [3, 2, 4, 0]
    ppl = [(1024, 10.0), (512, 12.0), (256, 11.0)]
    assert pareto_front(ppl, higher_is_better=False) == [2, 0]


def test_partial_run_renders_with_pending_models(tmp_path):
    from qkvconv.experiment_report import render

    data = fake_results()
    run = write_run(tmp_path, data)
    render(run, iters=50)
    assert (run / "heal_curves.png").exists()
    partial = copy.deepcopy(data)
    for m in partial["models"][2:]:  # variants not converted or evaluated yet
        m.update(metrics={}, samples={}, heal_curve=[], params=None, kv_cache_bytes_per_token=None)
    partial["models"][1].update(heal_curve=[])  # and no heal curve written yet
    partial["wall_s"] = None
    (run / "results.json").write_text(json.dumps(partial))
    report = render(run, iters=50).read_text()
    rows = _rows(report)
    assert rows["kv-half"][2:] == ["pending"] * 5  # params, KV bytes, 3 main metrics
    assert "partial: pending kv-half, kv-quarter, kv-half-raw" in report
    assert not (run / "heal_curves.png").exists()  # stale plot removed, and no link to it
    assert "heal_curves.png" not in report
    _png_ok(run / "quality_vs_kv.png")

    nothing = copy.deepcopy(partial)
    for m in nothing["models"]:
        m.update(metrics={}, samples={}, heal_curve=[])
    (run / "results.json").write_text(json.dumps(nothing))
    report = render(run, iters=50).read_text()
    assert "pending" in report and not (run / "quality_vs_kv.png").exists()


def test_a_control_that_is_the_base_says_so(tmp_path):
    """A pure-distillation recipe's control is the base (runner.self_distillation: its steps are the base's): the
    report says why, in the Δ sentence and in the model list, instead of calling it healed."""
    from qkvconv.experiment_report import render

    data = fake_results()
    base = next(m for m in data["models"] if m["role"] == "base")
    control = next(m for m in data["models"] if m["role"] == "control")
    report = render(write_run(tmp_path, data, "half"), iters=50).read_text()
    assert "the control is the base itself" not in report and "| control | control | unmodified; healed |" in report
    own_steps = control["steps"]
    control.update(heal={"distill": 1.0, "teacher": None, "train": "attention"}, steps=base["steps"])
    report = render(write_run(tmp_path, data, "pure"), iters=50).read_text()
    assert "pure distillation from the base, so the control is the base itself" in report
    assert "| control | control | unmodified; the base itself (the heal is pure distillation" in report
    control.update(steps=own_steps)  # distilled from another model (teacher other/model): healed, steps of its own
    control["heal"]["teacher"] = "other/model"
    report = render(write_run(tmp_path, data, "other"), iters=50).read_text()
    assert "the control is the base itself" not in report


@pytest.mark.parametrize(("change", "message"), [
    (lambda d: d.pop("models"), r"results.json is not a qkvconv.run/1 results file: models: Field required"),
    (lambda d: d["models"][1].update(params="many"), r"models.1.params: Input should be a valid integer"),
    (lambda d: d["models"][0].update(colour="red"), r"models.0.colour: Extra inputs are not permitted"),
    (lambda d: d.update(format="qkvconv.run/9"), r"has format 'qkvconv.run/9'; this qkvconv reads 'qkvconv.run/1'"),
    (lambda d: d["models"][2].update(reference="nobody"), r"models.2.reference: Input should be 'base' or 'control'"),
    (lambda d: d["models"][2].update(name="base"), r"model names must be unique"),
])
def test_bad_results_file_is_one_clear_error(tmp_path, change, message):
    from qkvconv.experiment_report import render

    data = fake_results()
    change(data)
    run = write_run(tmp_path, data)
    with pytest.raises(QkvconvError, match=message) as e:
        render(run)
    assert "\n" not in str(e.value)
    assert not (run / "report.md").exists()


def test_missing_or_broken_files(tmp_path):
    from qkvconv.experiment_report import render

    with pytest.raises(QkvconvError, match="does not exist"):
        render(tmp_path / "nope")
    with pytest.raises(QkvconvError, match="results.json not found"):
        render(tmp_path)
    (tmp_path / "results.json").write_text("{not json")
    with pytest.raises(QkvconvError, match="is not valid JSON"):
        render(tmp_path)


def test_cli_report(tmp_path):
    from typer.testing import CliRunner

    from qkvconv.cli import app

    run = write_run(tmp_path, fake_results())
    res = CliRunner().invoke(app, ["report", str(run), "--iters", "200"], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    for text in ("ladder", "kv-quarter", "McNemar", "✱", "wrote", "report.md"):
        assert text in res.output, text
    assert (run / "report.md").exists()

    bad = write_run(tmp_path, {"format": "qkvconv.run/1"}, name="bad")
    res = CliRunner().invoke(app, ["report", str(bad)])
    assert res.exit_code == 1
    assert re.search(r"error: .*results.json is not a qkvconv.run/1 results file", " ".join(res.output.split()))


# ----------------------------------------------------------------------------- a real (tiny) lm-eval run


def _lm_eval_with_samples(model_dir: Path, data_dir: Path) -> dict:
    """lm-eval on a tiny model with per-sample output, through qkvconv.evaluate's task resolution (local copies of
    lambada_openai and wikitext) and its quiet context; the results as JSON, as qkvconv stores them."""
    import transformers
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    from qkvconv.evaluate import _jsonable, _quiet_lm_eval, resolve_tasks

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager").eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    manager, names = resolve_tasks(["lambada_openai", "wikitext"], data_dir)
    with _quiet_lm_eval():
        results = simple_evaluate(
            model=HFLM(pretrained=model, tokenizer=tokenizer, batch_size=4), tasks=names, task_manager=manager,
            limit=6, log_samples=True, bootstrap_iters=20, random_seed=0, numpy_random_seed=0, torch_random_seed=0,
            fewshot_random_seed=0,
        )
    return _jsonable(results)


def test_results_from_a_real_lm_eval_run_render(tmp_path):
    from lm_eval.api.registry import get_aggregation

    from common import build_tiny
    from test_evaluate import PASSAGES, WIKI

    from qkvconv.evaluate import extract_metrics
    from qkvconv.experiment_report import render, samples_from_lm_eval

    data_dir = tmp_path / "data"
    (data_dir / "lambada_openai").mkdir(parents=True)
    lambada = "".join(json.dumps({"text": p}) + "\n" for p in PASSAGES)
    (data_dir / "lambada_openai" / "lambada_test.jsonl").write_text(lambada)
    (data_dir / "wikitext-2-raw-v1").mkdir()
    (data_dir / "wikitext-2-raw-v1" / "wiki.test.raw").write_text(WIKI)

    models = []
    for seed, (name, role, ref) in enumerate([("base", "base", "base"), ("kv-half-raw", "variant", "base")]):
        results = _lm_eval_with_samples(build_tiny("llama", tmp_path / name, seed=seed), data_dir)
        samples = samples_from_lm_eval(results)
        json.dumps(samples, allow_nan=False)  # JSON-ready
        lam, wiki = samples["lambada_openai"], samples["wikitext"]
        assert lam["doc_ids"] == list(range(6)) and wiki["doc_ids"] == [0, 1]
        assert {k: v["aggregation"] for k, v in lam["metrics"].items()} == {"perplexity": "perplexity", "acc": "mean"}
        assert {k: v["aggregation"] for k, v in wiki["metrics"].items()} == {
            "word_perplexity": "weighted_perplexity", "byte_perplexity": "weighted_perplexity",
            "bits_per_byte": "bits_per_byte"}
        assert set(lam["metrics"]["acc"]["values"]) <= {0, 1}
        assert all(len(v) == 2 for v in wiki["metrics"]["word_perplexity"]["values"])
        metrics: dict = {}
        for m in extract_metrics(results):
            metrics.setdefault(m.task, {})[m.name] = {"value": m.value, "stderr": m.stderr,
                                                      "higher_is_better": m.higher_is_better}
        # the per-document values, aggregated by lm-eval's function, give back lm-eval's own number
        for task, block in samples.items():
            for metric, s in block["metrics"].items():
                items = [tuple(v) if isinstance(v, list) else v for v in s["values"]]
                assert get_aggregation(s["aggregation"])(items) == pytest.approx(metrics[task][metric]["value"]), metric
        models.append({"name": name, "role": role, "transforms": [], "heal": None, "reference": ref,
                       "params": 100, "kv_cache_bytes_per_token": 1024 if role == "base" else 512,
                       "metrics": metrics, "samples": samples, "heal_curve": [], "steps": []})

    data = fake_results()
    data.update(models=models, steps=[])
    run = write_run(tmp_path, data)
    report = render(run, iters=200).read_text()
    rows = _rows(report)
    assert set(rows) == {"base", "kv-half-raw"}
    assert "| kv-half-raw | base | lambada_openai | acc | 6 |" in report
    assert "| kv-half-raw | base | wikitext | word_perplexity | 2 |" in report
    _png_ok(run / "quality_vs_kv.png")
    assert not (run / "heal_curves.png").exists()


def test_plot_helpers_for_many_variants():
    """Cache fractions read as the budgets they were chosen as; models on one budget are spread around it, the
    others stay put; each chain of transforms has its own marker, its healed models hollow in the same colour."""
    from qkvconv.experiment_report import ModelResult, _dodged, _fraction, _variant_groups

    assert [_fraction(f) for f in (1.0, 0.5, 1 / 3, 0.25, 1 / 6, 1 / 12, 0.4)] == \
        ["1", "1/2", "1/3", "1/4", "1/6", "1/12", "40%"]
    xs = [46080, 7680, 7680, 7680, 23040]
    log = _dodged(xs, True)
    assert log[0] == 46080 and log[4] == 23040 and log[2] == pytest.approx(7680)
    assert log[1] < log[2] < log[3] and log[3] / log[2] == pytest.approx(1.03)
    lin = _dodged([10, 10, 20], False)
    assert lin[0] < 10 < lin[1] and lin[2] == 20

    def m(name, role, chain, heal=None):
        return ModelResult(name=name, role=role, transforms=[{"transform": t} for t in chain], heal=heal,
                           reference=None if role == "base" else "base")

    groups = _variant_groups([m("base", "base", []), m("a", "variant", ["share-kv"]), m("b", "variant", ["latent-kv"]),
                              m("c", "variant", ["latent-kv"], {"steps": 1}), m("d", "variant", ["share-kv", "latent-kv"])])
    assert list(groups) == ["base", "control", "share-kv", "latent-kv", "latent-kv, healed", "share-kv → latent-kv"]
    assert groups["latent-kv"][1] == groups["latent-kv, healed"][1] and groups["latent-kv, healed"][2] is False
    assert len({g[0] for g in groups.values()}) == len(groups) - 1  # healed shares its chain's marker
