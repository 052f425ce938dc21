"""The real commands, driven end to end on tiny checkpoints, and every kind of bad input."""

from __future__ import annotations

import json
import shutil

import pytest
from typer.testing import CliRunner

from qkvconv.cli import app

runner = CliRunner()


def run(*args: str):
    result = runner.invoke(app, [str(a) for a in args], env={"COLUMNS": "200"})
    return result


def one_error_line(result) -> str:
    text = (result.stderr if hasattr(result, "stderr") else result.output).strip()
    lines = [ln for ln in text.splitlines() if ln.strip()]
    assert len(lines) == 1, text
    assert lines[0].startswith("error:"), text
    return lines[0]


def test_inspect_json_has_the_promised_keys(tiny_models):
    result = run("inspect", tiny_models["qwen3"], "--json")
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    for key in ("architecture", "num_layers", "hidden_size", "num_attention_heads", "num_key_value_heads",
                "head_dim", "num_parameters", "kv_cache_bytes_per_token", "wq_condition"):
        assert key in info
    assert set(info["wq_condition"]) >= {"min", "median", "max"}
    assert info["num_key_value_heads"] == 2 and info["qk_norm"] is True
    # 2 layers × (k, v) × 2 KV heads × 16 head_dim × 4 bytes
    assert info["kv_cache_bytes_per_token"] == 2 * 2 * 2 * 16 * 4


def test_inspect_table(tiny_models):
    result = run("inspect", tiny_models["gpt2"])
    assert result.exit_code == 0, result.output
    assert "cond(W_Q)" in result.stdout and "absorb-query" in result.stdout


def test_absorb_query_end_to_end(tiny_models, tmp_path):
    out = tmp_path / "noq"
    result = run("absorb-query", tiny_models["gpt_neox"], "--output", out, "--num-seqs", "2", "--seq-len", "32")
    assert result.exit_code == 0, result.output
    assert "max |Δlogit|" in result.stdout and "top-1" in result.stdout
    record = json.loads((out / "qkvconv.json").read_text())
    entry = record["history"][-1]
    assert entry["transform"] == "absorb-query" and entry["verification"]["top1_agreement"] == 1.0
    assert entry["source"]["sha256"] and record["manifest"]["versions"]["torch"]
    again = run("inspect", out, "--json")
    assert json.loads(again.stdout)["transforms"]["absorb-query --mode exact"]["applies"] is False


def test_drop_mode_end_to_end(tiny_models, tmp_path):
    result = run("absorb-query", tiny_models["llama"], "-o", tmp_path / "d", "--mode", "drop", "--num-seqs", "2",
                 "--seq-len", "32")
    assert result.exit_code == 0, result.output
    assert "lossy" in result.stdout


def test_calibration_from_a_file(tiny_models, tmp_path):
    text = tmp_path / "calib.txt"
    text.write_text("The cat sat on the mat. " * 40)
    result = run("absorb-query", tiny_models["mistral"], "-o", tmp_path / "o", "--calib", text, "--num-seqs", "2",
                 "--seq-len", "64")
    assert result.exit_code == 0, result.output
    assert "file:calib.txt" in result.stdout


# ------------------------------------------------------------------------------------- bad input
def test_missing_path(tmp_path):
    result = run("absorb-query", tmp_path / "nope", "-o", tmp_path / "out")
    assert result.exit_code != 0
    assert "no such file" in one_error_line(result)
    assert not (tmp_path / "out").exists()


def test_truncated_safetensors(tiny_models, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_models["llama"], bad)
    f = bad / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    result = run("absorb-query", bad, "-o", tmp_path / "out")
    assert result.exit_code != 0
    assert "truncated" in one_error_line(result)
    assert not (tmp_path / "out").exists()


def test_corrupt_gguf(tmp_path):
    f = tmp_path / "model.gguf"
    f.write_bytes(b"NOPE" + b"\0" * 100)
    result = run("inspect", f)
    assert result.exit_code != 0
    assert "not a valid GGUF" in one_error_line(result)


def test_unsupported_architecture(tiny_models, tmp_path):
    other = tmp_path / "bert"
    shutil.copytree(tiny_models["llama"], other)
    cfg = json.loads((other / "config.json").read_text())
    cfg["model_type"] = "bert"
    (other / "config.json").write_text(json.dumps(cfg))
    result = run("absorb-query", other, "-o", tmp_path / "out")
    assert result.exit_code != 0
    line = one_error_line(result)
    assert "unsupported architecture" in line and "llama" in line
    assert not (tmp_path / "out").exists()


def test_non_square_wq(tmp_path):
    import transformers
    from common import build_tiny

    path = build_tiny("llama", tmp_path / "ns")
    cfg = transformers.AutoConfig.from_pretrained(path)
    cfg.head_dim = 8
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)
    result = run("absorb-query", path, "-o", tmp_path / "out")
    assert result.exit_code != 0
    assert "not square" in one_error_line(result)
    assert not (tmp_path / "out").exists()


def test_existing_output_refused_without_force(tiny_models, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = run("absorb-query", tiny_models["llama"], "-o", out)
    assert result.exit_code != 0
    assert "--force" in one_error_line(result)
    assert (out / "keep.txt").read_text() == "mine"
    forced = run("absorb-query", tiny_models["llama"], "-o", out, "--force", "--num-seqs", "1", "--seq-len", "16")
    assert forced.exit_code == 0, forced.output
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").exists()


@pytest.mark.parametrize("command", [["absorb-query"], ["share-kv", "--mode", "k=v"], ["latent-kv", "--kv-rank", "16"]])
def test_a_device_this_torch_cannot_use_is_refused_in_one_line(tiny_models, tmp_path, command):
    import torch

    cases = [("gpu", "unknown --device"), ("mps", "cpu or cuda")]
    if not torch.cuda.is_available():  # a CPU-only machine (CI): --device cuda is named as the problem
        cases.append(("cuda", "--device cuda"))
    else:
        cases.append((f"cuda:{torch.cuda.device_count()}", "numbered from 0"))
    for device, says in cases:
        out = tmp_path / device.replace(":", "-")
        result = run(command[0], tiny_models["llama"], "-o", out, *command[1:], "--device", device)
        assert result.exit_code == 1, result.output
        assert says in one_error_line(result)
        assert not out.exists()


def test_output_inside_input_refused(tiny_models):
    result = run("absorb-query", tiny_models["llama"], "-o", tiny_models["llama"] / "sub")
    assert result.exit_code != 0
    assert "input" in one_error_line(result)


def test_pickle_only_checkpoint_needs_flag(tiny_models, tmp_path):
    import torch
    from safetensors.torch import load_file

    pk = tmp_path / "pk"
    shutil.copytree(tiny_models["llama"], pk)
    torch.save(load_file(pk / "model.safetensors"), pk / "pytorch_model.bin")
    (pk / "model.safetensors").unlink()
    result = run("inspect", pk)
    assert result.exit_code != 0
    assert "--allow-pickle" in one_error_line(result)
    assert run("inspect", pk, "--allow-pickle").exit_code == 0


def test_interrupted_write_leaves_nothing(tiny_models, tmp_path, monkeypatch):
    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr("qkvconv.convert.write_metadata", boom)  # after the weights, before the rename
    result = run("absorb-query", tiny_models["llama"], "-o", tmp_path / "out", "--num-seqs", "1", "--seq-len", "16")
    assert result.exit_code == 130
    assert list(tmp_path.iterdir()) == []  # no output, no temporary directory


def test_bad_mode(tiny_models, tmp_path):
    result = run("absorb-query", tiny_models["llama"], "-o", tmp_path / "o", "--mode", "sideways")
    assert result.exit_code != 0
    assert "--mode" in one_error_line(result)


def test_inspect_says_why_a_transform_does_not_apply(tiny_models, tmp_path):
    out = tmp_path / "noq"
    assert run("absorb-query", tiny_models["llama"], "-o", out, "--num-seqs", "1", "--seq-len", "16").exit_code == 0
    verdicts = json.loads(run("inspect", out, "--json").stdout)["transforms"]
    assert not verdicts["absorb-query --mode drop"]["applies"]
    assert "already the identity" in verdicts["absorb-query --mode drop"]["why"]


def _imported(stdout: str) -> set[str]:
    """The module names of a script's `IMPORTED [...]` line."""
    import ast

    return set(ast.literal_eval(next(ln for ln in stdout.splitlines() if ln.startswith("IMPORTED ")).split(" ", 1)[1]))


def test_a_conversion_imports_no_dataset_library_and_datasets_stays_quiet(tiny_models, tmp_path):
    """A conversion reads no dataset: datasets, pandas and pyarrow stay unimported (importing datasets to switch its
    bars off cost 0.5 s and 83 MB of RSS). Its bars are still off when something imports it later in the process.
    Some transformers versions import pandas themselves (5.0's generation utilities import scikit-learn when it is
    installed, which imports pandas and pyarrow): what transformers' own modules import is the floor, measured in a
    separate process, and the conversion may import nothing beyond it."""
    import subprocess
    import sys
    import textwrap

    floor_script = textwrap.dedent("""
        import sys
        import transformers.generation.utils
        from transformers import AutoModelForCausalLM, AutoTokenizer
        print("IMPORTED", sorted(m for m in ("datasets", "pandas", "pyarrow") if m in sys.modules))
    """)
    floor = subprocess.run([sys.executable, "-c", floor_script], capture_output=True, text=True, timeout=600)
    assert floor.returncode == 0, floor.stderr[-2000:]
    floor_set = _imported(floor.stdout)
    assert "datasets" not in floor_set, floor_set

    script = textwrap.dedent(f"""
        import sys
        from qkvconv.cli import app
        app(["absorb-query", {str(tiny_models["llama"])!r}, "-o", {str(tmp_path / "out")!r}], standalone_mode=False)
        print("IMPORTED", sorted(m for m in ("datasets", "pandas", "pyarrow") if m in sys.modules))
        import datasets
        print("QUIET", datasets.utils.are_progress_bars_disabled())
    """)
    env = {k: v for k, v in __import__("os").environ.items() if k != "HF_DATASETS_DISABLE_PROGRESS_BARS"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert _imported(out.stdout) <= floor_set, (floor_set, out.stdout[-2000:])
    assert "QUIET True" in out.stdout, out.stdout[-2000:]
