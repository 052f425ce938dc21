"""lm-eval evaluation: local (offline) task copies, the report and its table, task resolution errors."""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import pytest

from qkvconv.compat import task_yaml_path
from qkvconv.errors import QkvconvError

SHARED_DATA = Path(os.environ.get("QKVCONV_DATA_DIR") or Path(__file__).parents[2] / "shared" / "data")

# short passages: the tiny models have 256 positions and a character-level tokenizer
PASSAGES = [
    "The cat sat on the warm mat by the door and purred at the dog",
    "She opened the old box and found a letter from her grandmother",
    "After the storm the sailors counted the barrels left on the deck",
    "He lit the candle because the power had been out since noon",
    "The children ran to the river to watch the boats go by the bridge",
    "Every morning the baker sold the first loaf to the old teacher",
    "They walked home slowly under the stars talking about the game",
    "The key was hidden under the third stone beside the garden gate",
]
WIKI = (
    " \n = Alpha Tower = \n \n Alpha Tower is a building in the city . It was built in 1901 . \n \n"
    " = = History = = \n \n The tower was designed by a local architect @-@ engineer . \n \n"
    " = Beta River = \n \n The Beta River is a river . It is 12 @,@ 000 m long . \n \n"
)


@pytest.fixture(scope="module")
def tiny_data_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    (root / "lambada_openai").mkdir()
    (root / "lambada_openai" / "lambada_test.jsonl").write_text(
        "".join(json.dumps({"text": p}) + "\n" for p in PASSAGES), encoding="utf-8"
    )
    (root / "wikitext-2-raw-v1").mkdir()
    (root / "wikitext-2-raw-v1" / "wiki.test.raw").write_text(WIKI, encoding="utf-8")
    (root / "gutenberg_en").mkdir()
    (root / "gutenberg_en" / "gutenberg_en_valid.txt").write_text(
        "CHAPTER I\n\nThe old man sat by the fire.\nHe was tired.\n\n\nA second book begins here.\n", encoding="utf-8"
    )
    return root


def _entry(name: str, path: Path):
    import transformers

    from qkvconv.evaluate import EvalEntry

    def load():
        return (
            transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager"),
            transformers.AutoTokenizer.from_pretrained(path),
        )

    config = transformers.AutoConfig.from_pretrained(path)
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = config.hidden_size // config.num_attention_heads
    return EvalEntry(
        name=name, load=load, num_parameters=sum(p.numel() for p in load()[0].parameters()),
        kv_cache_bytes_per_token=2 * config.num_hidden_layers * kv_heads * head_dim * 4,
        source_hash="test", extra={"family": name},
    )


def test_evaluate_models_on_local_tasks(tiny_models, tiny_data_dir, tmp_path):
    from rich.console import Console

    from qkvconv.evaluate import evaluate_models
    from qkvconv.report import eval_table

    entries = [_entry("llama", tiny_models["llama"]), _entry("gpt2", tiny_models["gpt2"])]
    out = tmp_path / "eval.json"
    report = evaluate_models(
        entries, tasks=["lambada_openai", "wikitext", "gutenberg_en"], limit=4, batch_size=2, device="cpu",
        data_dir=tiny_data_dir, include_path=[], output=out, seed=1234, bootstrap_iters=50,
        console=Console(stderr=True, quiet=True), task_limits={"wikitext": 1},
    )

    assert report.tasks == ["lambada_openai", "wikitext", "gutenberg_en"]
    assert report.sources == {
        "lambada_openai": f"local:{(tiny_data_dir / 'lambada_openai' / 'lambada_test.jsonl').resolve()}",
        "wikitext": f"local:{(tiny_data_dir / 'wikitext-2-raw-v1' / 'wiki.test.raw').resolve()}",
        "gutenberg_en": f"local:{(tiny_data_dir / 'gutenberg_en' / 'gutenberg_en_valid.txt').resolve()}",
    }
    for row in report.rows:
        for task, metric in [("lambada_openai", "acc"), ("lambada_openai", "perplexity"), ("wikitext", "word_perplexity")]:
            m = row.metric(task, metric)
            assert m is not None and math.isfinite(m.value), (row.name, task, metric)
        assert 0 <= row.metric("lambada_openai", "acc").value <= 1
        assert row.metric("lambada_openai", "acc").stderr is not None
    for results in report.results:
        assert results["n-samples"]["lambada_openai"]["effective"] == 4
        assert results["n-samples"]["wikitext"]["effective"] == 1  # its own limit (the raw file has 2 articles)
        assert results["n-samples"]["gutenberg_en"]["effective"] == 1  # one piece: the file has < 1,000 words
        assert math.isfinite(results["results"]["gutenberg_en"]["word_perplexity,none"])
        assert results["config"]["batch_size"] == 2

    data = json.loads(out.read_text())
    manifest = data["manifest"]
    for key in ("versions", "argv", "created", "task_versions", "limit", "seed", "batch_size", "device", "inputs"):
        assert key in manifest, key
    assert manifest["task_versions"] == {"lambada_openai": 1.0, "wikitext": 2.0, "gutenberg_en": 1.0}
    assert manifest["task_limits"] == {"wikitext": 1}
    assert (manifest["limit"], manifest["seed"], manifest["batch_size"]) == (4, 1234, 2)
    assert manifest["inputs"]["models"] == {"llama": "test", "gpt2": "test"}
    assert len(manifest["inputs"]["data"]) == 3
    assert [m["name"] for m in data["models"]] == ["llama", "gpt2"]
    assert "acc" in data["models"][1]["delta_vs_first"]["lambada_openai"]
    assert "acc,none" in data["models"][0]["lm_eval"]["results"]["lambada_openai"]

    console = Console(record=True, width=120)
    console.print(eval_table(report))
    text = console.export_text()
    assert "llama" in text and "gpt2" in text and "word ppl" in text and "±" in text
    assert max(len(line) for line in text.splitlines()) <= 120


def test_local_task_yamls_mirror_lm_eval():
    """Only where the data comes from differs from lm-eval's own task configs."""
    import inspect

    import lm_eval.tasks

    from qkvconv.compat import load_task_yaml as load_yaml
    from qkvconv.evaluate import LOCAL_TASKS, TASK_TEMPLATES

    def normal(cfg: dict) -> dict:
        return {
            k: (v.__module__, v.__qualname__, inspect.getsourcefile(v)) if callable(v) else v
            for k, v in cfg.items() if k not in ("custom_dataset", "dataset_kwargs", "tag")
        }

    theirs = {"lambada_openai": "lambada/lambada_openai.yaml", "wikitext": "wikitext/wikitext.yaml"}
    for task, spec in LOCAL_TASKS.items():
        if task not in theirs:  # qkvconv's own task (gutenberg_en), no lm-eval original
            continue
        ours = load_yaml(TASK_TEMPLATES / spec.template)
        reference = load_yaml(Path(lm_eval.tasks.__file__).parent / theirs[task])
        assert normal(ours) == normal(reference), task
        assert callable(ours["custom_dataset"])


def test_split_wikitext_documents_keeps_whitespace():
    from qkvconv.tasks.local_data import split_wikitext_documents

    docs = split_wikitext_documents(WIKI)
    assert len(docs) == 2  # "= = History = =" is a section, not an article
    assert docs[0].startswith(" = Alpha Tower = \n \n Alpha Tower")
    assert docs[0].endswith("architect @-@ engineer . \n ")  # the blank " " line before the next article
    assert docs[1] == " = Beta River = \n \n The Beta River is a river . It is 12 @,@ 000 m long . \n \n"


@pytest.mark.parametrize(("split", "documents"), [("test", 62), ("valid", 60)])
def test_wikitext2_raw_splits_into_hub_documents(split, documents):
    """EleutherAI/wikitext_document_level wikitext-2-raw-v1 has 62 test and 60 validation rows."""
    from qkvconv.tasks.local_data import split_wikitext_documents

    raw = SHARED_DATA / "wikitext-2-raw-v1" / f"wiki.{split}.raw"
    if not raw.is_file():
        pytest.skip(f"no shared data at {raw}")
    text = raw.read_text(encoding="utf-8")
    docs = split_wikitext_documents(text)
    assert len(docs) == documents
    assert sum(len(re.findall(r"^ = [^=].* = $", d, flags=re.M)) for d in docs) == documents
    assert "\n".join(docs) == text[len(" \n"):]  # nothing dropped but the leading blank line


def test_resolve_tasks_local_user_yaml_glob_and_unknown(tmp_path, tiny_data_dir):
    from qkvconv.evaluate import expand_task_names, resolve_tasks

    user = tmp_path / "user_tasks"
    user.mkdir()
    (user / "my_task.yaml").write_text(
        "task: my_task\ndataset_path: json\noutput_type: loglikelihood\ntest_split: train\n"
        "doc_to_text: '{{text}}'\ndoc_to_target: ' x'\nmetric_list:\n  - metric: acc\n"
    )
    (user / "my_wikitext.yaml").write_text(  # a user's own task of a local task's name wins
        "task: wikitext\ndataset_path: json\noutput_type: loglikelihood_rolling\ntest_split: train\n"
        "doc_to_text: ''\ndoc_to_target: '{{text}}'\nmetric_list:\n  - metric: word_perplexity\n"
    )
    manager, names = resolve_tasks(["my_task,lambada_open*", "hellaswag", "my_task"], tiny_data_dir, [user])
    assert names[0] == "my_task" and "lambada_openai" in names and names[-1] == "hellaswag"
    assert len(names) == len(set(names))
    where = {t: Path(task_yaml_path(manager.task_index[t])) for t in ("lambada_openai", "wikitext", "my_task", "hellaswag")}
    assert where["lambada_openai"].parent.name.startswith("qkvconv-tasks-")  # the generated local copy
    assert where["wikitext"] == user / "my_wikitext.yaml"
    assert where["my_task"] == user / "my_task.yaml"
    assert "lm_eval" in where["hellaswag"].parts  # untouched lm-eval task (needs the hub to run)
    assert str((tiny_data_dir / "lambada_openai" / "lambada_test.jsonl").resolve()) in where["lambada_openai"].read_text()

    with pytest.raises(QkvconvError, match=r"^unknown lm-eval task 'lambada_opnai' \(did you mean lambada_openai"):
        expand_task_names(manager, ["lambada_opnai"])
    with pytest.raises(QkvconvError, match="unknown lm-eval task 'nope_\\*'"):
        expand_task_names(manager, ["nope_*"])


def test_resolve_tasks_rejects_bad_paths(tmp_path):
    from qkvconv.evaluate import resolve_tasks

    with pytest.raises(QkvconvError, match="not a directory"):
        resolve_tasks(["wikitext"], None, [tmp_path / "missing"])
    with pytest.raises(QkvconvError, match="data dir .* does not exist"):
        resolve_tasks(["wikitext"], tmp_path / "missing", [])
    with pytest.raises(QkvconvError, match="no tasks given"):
        resolve_tasks([" , "], None, [])


def test_split_gutenberg_documents_takes_pieces_across_the_file():
    from qkvconv.tasks.local_data import split_gutenberg_documents

    paras = [f"Paragraph {i} " + "word " * 40 for i in range(100)]  # 42 words each
    docs = split_gutenberg_documents("\n\n".join(paras), n_docs=5, min_words=100)
    assert len(docs) == 5
    assert all(len(d.split()) >= 100 for d in docs)
    assert docs[0].startswith("Paragraph 0 ") and "Paragraph 0 " not in docs[1]
    assert any(f"Paragraph {i} " in docs[-1] for i in range(75, 100))  # the end of the file is covered
    assert split_gutenberg_documents("short text", n_docs=5, min_words=100) == ["short text"]


def test_task_limit_errors(tiny_models, tiny_data_dir):
    from qkvconv.cli import _task_limits
    from qkvconv.evaluate import evaluate_models

    assert _task_limits(["wikitext=10", "lambada_openai=3"]) == {"wikitext": 10, "lambada_openai": 3}
    for bad in ("wikitext", "wikitext=0", "=3", "wikitext=x"):
        with pytest.raises(QkvconvError, match="TASK=N"):
            _task_limits([bad])
    with pytest.raises(QkvconvError, match="not among the tasks"):
        evaluate_models([_entry("llama", tiny_models["llama"])], tasks=["lambada_openai"], limit=2, batch_size=1,
                        device="cpu", data_dir=tiny_data_dir, task_limits={"wikitext": 1})


def test_cli_eval_output_is_clean_and_ends_with_the_table(tiny_models, tiny_data_dir, tmp_path):
    """As a log file shows it: qkvconv's own lines and the table last; no lm-eval bar, print or git message, no
    carriage return. With --verbose the third-party output comes back (so the check above can fail)."""
    import subprocess
    import sys

    def run(*extra):
        cmd = [sys.executable, "-m", "qkvconv.cli", *extra, "eval", str(tiny_models["llama"]), "--tasks",
               "lambada_openai,wikitext", "--limit", "2", "--batch-size", "2", "--data-dir", str(tiny_data_dir),
               "--output", str(tmp_path / f"r{len(extra)}.json")]
        # one stream, as a terminal or a log file gets it; cwd is not a git repository
        res = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path,
                             timeout=600)
        assert res.returncode == 0, res.stdout[-2000:]
        return res.stdout

    both = run()
    for noise in ("bootstrapping", "it/s", "Running loglikelihood", "fatal:", "\r"):
        assert noise not in both, noise
    lines = both.splitlines()
    header = next(i for i, line in enumerate(lines) if "Model" in line and "Params" in line)
    assert not any(line.startswith(("[", "wrote")) for line in lines[header:])  # nothing of ours after the table
    verbose = run("--verbose")
    assert "Running loglikelihood" in verbose or "it/s" in verbose
