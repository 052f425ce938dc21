"""Streaming conversion (qkvconv.stream): sharded input and output, streamed verification equal to the in-memory
one, checks as the stream passes, atomic output under signals and a full disk, dry runs."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import qkvconv
from qkvconv.archs import dims_of
from qkvconv.checkpoint import load, resolve_source
from qkvconv.convert import absorb_query_checkpoint, share_kv_checkpoint
from qkvconv.transforms import absorb_query
from qkvconv.verify import calibration_ids, compare_model, logits_of

from test_cli import one_error_line, run

FAST = {"num_seqs": 3, "seq_len": 32}


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _reshard(src: Path, dst: Path, shards: int = 3) -> Path:
    """The checkpoint as `shards` safetensors files plus an index (the layout of every large hub model)."""
    dst.mkdir()
    for f in src.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, dst / f.name)
    sd = load_file(src / "model.safetensors")
    keys = list(sd)
    parts = [keys[i::shards] for i in range(shards)]
    weight_map = {}
    for j, part in enumerate(parts, 1):
        name = f"model-{j:05d}-of-{shards:05d}.safetensors"
        save_file({k: sd[k] for k in part}, dst / name, metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return dst


def _edit_weights(path: Path, fn) -> None:
    f = path / "model.safetensors"
    sd = load_file(f)
    fn(sd)
    save_file(sd, f, metadata={"format": "pt"})


def _snapshot(path: Path) -> dict[str, tuple[int, float]]:
    return {str(p.relative_to(path)): (p.stat().st_size, p.stat().st_mtime) for p in sorted(path.rglob("*"))}


# ------------------------------------------------------------------------------------------ equality
def test_streamed_output_equals_the_in_memory_transform_across_shards(tiny_models, tmp_path, monkeypatch):
    """A 3-shard input converted with 1-KB output shards: every output tensor equals the whole-model transform's
    (float64 algebra, one cast; the folded maps kept in float64), the output is a valid sharded checkpoint, and the
    input is untouched."""
    src = _reshard(tiny_models["llama"], tmp_path / "sharded")
    before = _snapshot(src)
    monkeypatch.setattr("qkvconv.checkpoint.DEFAULT_SHARD_BYTES", 1024)
    report = absorb_query_checkpoint(src, tmp_path / "o", **FAST)
    assert _snapshot(src) == before
    out = tmp_path / "o"
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 3 and (out / "model.safetensors.index.json").is_file()
    streamed = {}
    for s in shards:
        with safe_open(str(s), "pt") as f:
            streamed.update({k: f.get_tensor(k) for k in f.keys()})
    loaded = load(src, dtype=torch.float64)
    whole = absorb_query(loaded.model.state_dict(), loaded.spec, dims_of(loaded.config, loaded.spec))
    assert set(streamed) == set(whole.state_dict)
    folded = set(whole.folded)
    for k, v in whole.state_dict.items():
        assert torch.equal(streamed[k], v if k in folded else v.to(torch.float32)), k
    assert report.exactness.passed and qkvconv.load(out)


@pytest.mark.parametrize("how", ["absorb-query", "share-kv"])
def test_streamed_verification_equals_the_in_memory_verification(tiny_models, tmp_path, how):
    """The LogitError measured layer by layer while streaming equals the one of the two whole models loaded from
    disk and compared on the same tokens."""
    src = tiny_models["qwen2"]
    if how == "absorb-query":
        report = absorb_query_checkpoint(src, tmp_path / "o", **FAST)
    else:
        report = share_kv_checkpoint(src, tmp_path / "o", mode="k=v", kv_heads=1, **FAST)
    original = load(src)
    converted = load(tmp_path / "o")
    ids, source = calibration_ids(original.model, original.tokenizer, **FAST)
    memory = compare_model(logits_of(original.model, ids), converted.model, ids, source)
    streamed = report.error
    print(f"\n{how}: streamed {streamed.as_dict()}\n   in memory {memory.as_dict()}")
    assert streamed.tokens == memory.tokens
    for field in ("max_abs", "mean_abs", "kl"):
        a, b = getattr(streamed, field), getattr(memory, field)
        assert abs(a - b) <= 1e-4 * max(abs(b), 1e-3), (field, a, b)
    assert abs(streamed.top1_agreement - memory.top1_agreement) <= 1 / memory.tokens


def test_bf16_in_bf16_out(tiny_models, tmp_path):
    src = tmp_path / "bf16"
    loaded = load(tiny_models["llama"], dtype=torch.bfloat16)
    loaded.model.save_pretrained(src)
    loaded.tokenizer.save_pretrained(src)
    report = share_kv_checkpoint(src, tmp_path / "o", mode="k=v", **FAST)
    assert report.options["dtype"] == "bfloat16"
    with safe_open(str(tmp_path / "o" / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}


def test_no_verify_converts_without_calibration(tiny_models, tmp_path):
    report = absorb_query_checkpoint(tiny_models["llama"], tmp_path / "o", verify=False)
    assert report.error is None and report.decoding is None
    model, _ = qkvconv.load(tmp_path / "o")
    record = json.loads((tmp_path / "o" / "qkvconv.json").read_text())["history"][-1]
    assert record["verification"] is None and record["decoding"] == {"skipped": "verification off (--no-verify)"}


@pytest.mark.parametrize("verify", [True, False])
def test_the_tokenizer_is_written_before_the_layers_and_let_go(tiny_models, tmp_path, monkeypatch, verify):
    """The calibration ids are made before the layers, so the tokenizer is written into the output then and the plan
    lets it go: SmolLM2's BPE tokenizer held 40-75 MB of heap through every layer. The output's tokenizer encodes as
    the input's does."""
    from transformers import AutoTokenizer

    import qkvconv.stream as stream

    held = []
    real = stream.stream_convert

    def spy(plan, *args, **kwargs):
        held.append(plan.tokenizer)
        return real(plan, *args, **kwargs)

    monkeypatch.setattr(stream, "stream_convert", spy)
    out = tmp_path / "o"
    absorb_query_checkpoint(tiny_models["llama"], out, verify=verify)
    assert held == [None]
    text = "the cat sat on the mat, 42 times."
    assert (AutoTokenizer.from_pretrained(out)(text).input_ids
            == AutoTokenizer.from_pretrained(tiny_models["llama"])(text).input_ids)


# ------------------------------------------------------------------------------------- checks, one line
def _refused(result, tmp_path: Path, out: Path, match: str) -> str:
    assert result.exit_code == 1, result.output
    line = one_error_line(result)
    assert match in line, line
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if "qkvconv-tmp" in p.name]
    return line


def test_config_claiming_more_layers_than_the_weights_is_refused(tiny_models, tmp_path):
    src = _copy(tiny_models["llama"], tmp_path / "in")
    cfg = json.loads((src / "config.json").read_text())
    cfg["num_hidden_layers"] = 3
    (src / "config.json").write_text(json.dumps(cfg))
    line = _refused(run("absorb-query", src, "-o", tmp_path / "o"), tmp_path, tmp_path / "o",
                    "model.layers.2.")
    print("\n" + line)
    assert "config says 3 layers" in line


def test_tensors_the_config_does_not_explain_are_refused(tiny_models, tmp_path):
    src = _copy(tiny_models["llama"], tmp_path / "in")
    cfg = json.loads((src / "config.json").read_text())
    cfg["num_hidden_layers"] = 1
    (src / "config.json").write_text(json.dumps(cfg))
    line = _refused(run("share-kv", src, "-o", tmp_path / "o", "--mode", "k=v"), tmp_path, tmp_path / "o",
                    "does not explain")
    assert "model.layers.1." in line


def test_nan_weight_is_named(tiny_models, tmp_path):
    src = _copy(tiny_models["llama"], tmp_path / "in")

    def poison(sd):
        sd["model.layers.1.mlp.down_proj.weight"][3, 5] = float("nan")

    _edit_weights(src, poison)
    line = _refused(run("absorb-query", src, "-o", tmp_path / "o"), tmp_path, tmp_path / "o",
                    "model.layers.1.mlp.down_proj.weight holds 1 NaN/Inf value")
    print("\n" + line)


def _mapping_rss_kib(t: torch.Tensor) -> int:
    """Resident KiB of the /proc/self/smaps mapping that holds t."""
    p, rss, inside = t.data_ptr(), None, False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo <= p < hi
            elif inside and head == "Rss:":
                rss = int(line.split()[1])
    return rss


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="needs Linux /proc")
def test_read_ahead_pages_are_released_after_the_finite_check_and_nothing_else_is(tmp_path):
    """The reader thread checks layer i + 1 while layer i converts; its file pages leave this process's RSS once
    checked (MADV_DONTNEED on the safetensors mapping) and read back intact. An anonymous tensor is never released
    (there MADV_DONTNEED would zero it)."""
    from qkvconv.stream import SafetensorsSource, _in_file_mapping, check_finite

    w = torch.randn(1024, 1024)
    save_file({"w": w}, str(tmp_path / "model.safetensors"))
    src = SafetensorsSource(tmp_path)
    t = src.get("w")
    assert _in_file_mapping(t) and torch.equal(t, w)  # the comparison maps every page
    before = _mapping_rss_kib(t)
    check_finite("w", t, release=True)
    after = _mapping_rss_kib(t)
    print(f"file mapping RSS {before} KiB -> {after} KiB after the check")
    assert before >= 4000 and after <= 8, (before, after)
    assert torch.equal(t, w)  # mapped again from the page cache
    anon = w.clone()
    assert not _in_file_mapping(anon)
    check_finite("anon", anon, release=True)
    assert torch.equal(anon, w)


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="needs Linux /proc")
def test_the_transforms_float64_reads_leave_the_input_pages_unmapped(tmp_path):
    """A layer's tensor upcast for the transform (Float64View, cached or fresh) leaves its file pages unmapped once
    copied, as the read-ahead check does: they would otherwise stay in RSS for the rest of the pass. A float64 file
    tensor is its own upcast (the copy shares its pages) and stays mapped."""
    from qkvconv.stream import Float64View, SafetensorsSource

    w = torch.randn(1024, 1024)
    tensors = {}
    for key, t in {"bf": w.bfloat16(), "fresh": w.bfloat16(), "f64": w.double()}.items():  # a file (mapping) each
        (tmp_path / key).mkdir()
        save_file({key: t}, str(tmp_path / key / "model.safetensors"))
        tensors[key] = SafetensorsSource(tmp_path / key).get(key)
    view = Float64View(tensors)
    for key in ("bf", "fresh"):
        assert torch.equal(tensors[key], w.bfloat16())  # the comparison maps every page
        before = _mapping_rss_kib(tensors[key])
        up = view[key] if key == "bf" else view.fresh(key)
        after = _mapping_rss_kib(tensors[key])
        print(f"{key}: file mapping RSS {before} KiB -> {after} KiB after the upcast")
        assert up.dtype == torch.float64 and torch.equal(up, w.bfloat16().double())
        assert before >= 2000 and after <= 8, (key, before, after)
        assert torch.equal(tensors[key], w.bfloat16())  # mapped again from the page cache
    assert "fresh" not in view._cache and "bf" in view._cache
    f64 = view["f64"]
    assert f64.data_ptr() == tensors["f64"].data_ptr() and torch.equal(f64, w.double())
    assert _mapping_rss_kib(f64) >= 8000  # still mapped: no copy was made, so nothing was released


def test_shape_mismatch_names_tensor_and_dimension(tiny_models, tmp_path):
    src = _copy(tiny_models["llama"], tmp_path / "in")

    def shrink(sd):
        sd["model.layers.0.self_attn.k_proj.weight"] = sd["model.layers.0.self_attn.k_proj.weight"][:16].clone()

    _edit_weights(src, shrink)
    line = _refused(run("attach-preproj", src, "-o", tmp_path / "o"), tmp_path, tmp_path / "o",
                    "model.layers.0.self_attn.k_proj.weight has shape [16, 64], config.json implies [32, 64]")
    assert "dimension 0: 16 in the weights, 32 in config.json" in line


# ---------------------------------------------------------------------------------- atomic output
def _qkvconv(*args) -> subprocess.Popen:
    exe = Path(sys.executable).with_name("qkvconv")
    return subprocess.Popen([str(exe), *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "COLUMNS": "200"})


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_mid_conversion_leaves_nothing(tiny_models, tmp_path, sig):
    """The signal arrives once the temporary output exists: the command exits non-zero with one line, removes it,
    and writes no output; the input is untouched."""
    src = tiny_models["gpt2"]
    before = _snapshot(src)
    out = tmp_path / "o"
    proc = _qkvconv("share-kv", src, "-o", out, "--mode", "k=v", "--init", "calibrated", "--num-seqs", "10",
                    "--seq-len", "64")
    deadline = time.time() + 120
    while not list(tmp_path.glob(".o.qkvconv-tmp-*")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    assert proc.poll() is None, "the conversion finished before the signal could be sent"
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=120)
    print(f"\n{sig.name}: exit {proc.returncode}: {stderr.strip()}")
    assert proc.returncode != 0
    assert "interrupted" in stderr and "nothing was written" in stderr
    assert not out.exists() and list(tmp_path.iterdir()) == []
    assert _snapshot(src) == before


def test_sigkill_leftover_is_clearly_named_and_removed_by_the_next_run(tiny_models, tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".o.qkvconv-tmp-{dead.pid}"
    stale.mkdir()
    (stale / "shard-00001.tmp").write_bytes(b"\0" * 100)
    alive = tmp_path / f".o.qkvconv-tmp-{os.getpid()}-not-ours"  # not a pid suffix: left alone
    alive.mkdir()
    absorb_query_checkpoint(tiny_models["llama"], tmp_path / "o", verify=False)
    assert not stale.exists() and alive.exists() and (tmp_path / "o").is_dir()


def _tmpfs(path: Path, size: str) -> bool:
    path.mkdir()
    if os.geteuid() != 0 or not shutil.which("mount"):
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


@pytest.fixture
def small_disk(tmp_path):
    disk = tmp_path / "disk"
    if not _tmpfs(disk, "160k"):
        pytest.skip("mounting a tmpfs needs root")
    yield disk
    subprocess.run(["umount", str(disk)], check=False)


def test_full_disk_is_refused_up_front(tiny_models, small_disk):
    result = run("absorb-query", tiny_models["llama"], "-o", small_disk / "o", "--no-verify")
    line = one_error_line(result)
    print("\n" + line)
    assert "not enough disk space" in line and list(small_disk.iterdir()) == []


def test_disk_filling_up_mid_write_is_one_line(tiny_models, small_disk, monkeypatch):
    """With the up-front check fooled, the disk fills during the write: one line, the temporary files removed."""
    monkeypatch.setattr("qkvconv.stream.disk_free", lambda path: 1 << 40)
    result = run("absorb-query", tiny_models["llama"], "-o", small_disk / "o", "--no-verify")
    line = one_error_line(result)
    print("\n" + line)
    assert "no space left on the device" in line and list(small_disk.iterdir()) == []


def _loop_ext4(path: Path, size_mb: int) -> bool:
    """An ext4 file system of size_mb at `path` (loop-mounted: it has O_DIRECT, which tmpfs lacks)."""
    path.mkdir()
    img = path.with_suffix(".img")
    if os.geteuid() != 0 or not (shutil.which("mount") and shutil.which("mkfs.ext4")):
        return False
    with open(img, "wb") as f:
        f.truncate(size_mb << 20)
    made = subprocess.run(["mkfs.ext4", "-q", str(img)], capture_output=True).returncode == 0
    return made and subprocess.run(["mount", "-o", "loop", str(img), str(path)], capture_output=True).returncode == 0


@pytest.fixture
def small_ext4(tmp_path):
    disk = tmp_path / "ext4"
    if not _loop_ext4(disk, 4):
        pytest.skip("loop-mounting an ext4 image needs root, mkfs.ext4 and a loop device")
    yield disk
    subprocess.run(["umount", str(disk)], check=False)


def _o_direct_works(directory: Path) -> bool:
    probe = directory / "o_direct_probe"
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o644))
        return True
    except (OSError, AttributeError):
        return False
    finally:
        probe.unlink(missing_ok=True)


def _awkward_tensors() -> dict[str, torch.Tensor]:
    """Sizes around the 4 KiB O_DIRECT block and across the (shrunk) staging buffer, a scalar, an empty tensor."""
    g = torch.Generator().manual_seed(0)
    return {
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 4),
        "one_byte": torch.tensor([7], dtype=torch.uint8),
        "block_minus_1": torch.randint(0, 255, (4095,), dtype=torch.uint8, generator=g),
        "block_plus_1": torch.randint(0, 255, (4097,), dtype=torch.uint8, generator=g),
        "bf16": torch.randn(37, 51, generator=g).bfloat16(),
        "big": torch.randn(300, 257, generator=g, dtype=torch.float64),  # 617 KB: many staging buffers
        "f32": torch.randn(1000, generator=g),
    }


def test_heap_is_trimmed_only_past_its_slack(monkeypatch):
    """HeapTrimmer gives freed pages back only once anonymous memory grew past the slack since the last trim (and
    after every layer where /proc cannot say)."""
    from qkvconv import stream

    anon, trims = [1000], []
    monkeypatch.setattr(stream, "_anonymous_bytes", lambda: anon[0])
    monkeypatch.setattr(stream, "return_freed_memory", lambda: (trims.append(anon[0]), anon.__setitem__(0, 1000)))
    heap = stream.HeapTrimmer(slack=500)
    for grown in (1200, 1500, 1501, 1400, 1600):
        anon[0] = grown
        heap.layer_done()
    assert trims == [1501, 1600]
    monkeypatch.setattr(stream, "_anonymous_bytes", lambda: None)
    heap = stream.HeapTrimmer(slack=500)
    heap.layer_done()
    heap.layer_done()
    assert len(trims) == 4
    # within a layer (phase_done): only in a pass over large layers
    stream.HeapTrimmer(slack=500, phases=False).phase_done()
    assert len(trims) == 4
    stream.HeapTrimmer(slack=500).phase_done()
    assert len(trims) == 5


def test_heap_is_trimmed_within_a_layer_only_during_a_streamed_pass(tiny_models, tmp_path, monkeypatch):
    """trim_heap (between the phases of a layer's transform) uses the pass's own trimmer: a calibrated share-kv fit
    trims at least three times a layer (where every check trims and layers count as large); outside a pass, and
    after it, it does nothing."""
    from qkvconv import stream

    trims = []
    monkeypatch.setattr(stream, "return_freed_memory", lambda: trims.append(stream._pass_heap))
    stream.trim_heap()
    assert trims == []
    monkeypatch.setattr(stream, "_anonymous_bytes", lambda: None)  # no /proc: every check trims
    monkeypatch.setattr(stream, "PHASE_TRIM_LAYER_BYTES", 0)  # however small the layers
    share_kv_checkpoint(tiny_models["llama"], tmp_path / "kv", mode="k=v", init="calibrated", num_seqs=5,
                        seq_len=32, verify=False)
    n_layers = 2
    assert trims[0] is None  # the trim before the first layer (layer_heap), before the pass's trimmer exists
    assert len(trims) >= 1 + 3 * n_layers and all(t is not None for t in trims[1:])  # candidates, score, float64 fit
    assert stream._pass_heap is None
    before = len(trims)
    stream.trim_heap()
    assert len(trims) == before


def test_a_pass_starts_on_a_trimmed_heap_and_maps_large_temporaries_over_large_layers(tiny_models, monkeypatch):
    """layer_heap trims before the pass's first layer (its slack then counts from what the pass holds, not from what
    opening and calibration left freed on the heap), and over layers of PHASE_TRIM_LAYER_BYTES or more sets glibc's
    mmap threshold to LARGE_TEMPORARY_BYTES; over small layers it leaves the threshold where heap_for_temporaries
    put it. heap_for_temporaries sets the default back on exit."""
    from qkvconv import stream

    calls = []

    class Lib:
        def mallopt(self, param, value):
            calls.append(("mallopt", param, value))

        def malloc_trim(self, pad):
            calls.append(("trim",))

    monkeypatch.setattr(stream, "_glibc", lambda: Lib())
    plan = stream.open_plan(resolve_source(tiny_models["llama"]))
    with stream.heap_for_temporaries():
        calls.clear()
        stream.layer_heap(plan)
        assert calls == [("trim",)]  # small layers: the heap keeps every temporary
        monkeypatch.setattr(stream, "PHASE_TRIM_LAYER_BYTES", 0)
        calls.clear()
        heap = stream.layer_heap(plan)
        assert calls == [("trim",), ("mallopt", stream._M_MMAP_THRESHOLD, stream.LARGE_TEMPORARY_BYTES)]
        assert heap.phases and heap.slack == stream.MAPPED_PASS_SLACK_BYTES
    assert ("mallopt", stream._M_MMAP_THRESHOLD, stream._GLIBC_DEFAULT_THRESHOLD) in calls
    assert stream._pass_heap is None


def test_direct_shards_are_byte_identical_to_buffered_ones(tmp_path, monkeypatch):
    """The O_DIRECT writer (staged, written in aligned blocks, tail and header through an ordinary descriptor) writes
    the same bytes as the buffered one, for tensors that straddle blocks and the staging buffer, across shards."""
    from qkvconv import stream

    if not _o_direct_works(tmp_path):
        pytest.skip(f"{tmp_path}'s file system has no O_DIRECT")
    monkeypatch.setattr(stream, "_STAGE_BYTES", 3 * stream._BLOCK)
    made, real = [], stream._DirectShardFile
    monkeypatch.setattr(stream, "_DirectShardFile", lambda path: (made.append(path), real(path))[1])
    tensors = _awkward_tensors()
    for direct in (False, True):
        out = tmp_path / f"direct-{direct}"
        out.mkdir()
        w = stream.ShardWriter(out, max_shard_bytes=300_000, direct=direct)
        for k, t in tensors.items():
            w.add(k, t)
        w.finish()
    names = sorted(p.name for p in (tmp_path / "direct-True").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "direct-False").iterdir())
    assert len([n for n in names if n.endswith(".safetensors")]) >= 3 and len(made) >= 3  # direct files were made
    for n in names:
        assert (tmp_path / "direct-True" / n).read_bytes() == (tmp_path / "direct-False" / n).read_bytes(), n
    index = json.loads((tmp_path / "direct-True" / "model.safetensors.index.json").read_text())
    for k, t in tensors.items():
        with safe_open(tmp_path / "direct-True" / index["weight_map"][k], "pt") as f:
            assert torch.equal(f.get_tensor(k), t), k


def test_direct_writes_fall_back_where_the_file_system_has_none(tmp_path, monkeypatch):
    """Where O_DIRECT is refused (tmpfs: EINVAL at open), the shard is written through the page cache instead."""
    from qkvconv import stream

    real_open = os.open

    def no_direct(path, flags, *a):
        if flags & getattr(os, "O_DIRECT", 0):
            raise OSError(22, "Invalid argument")
        return real_open(path, flags, *a)

    monkeypatch.setattr(stream.os, "open", no_direct)
    tensors = _awkward_tensors()
    w = stream.ShardWriter(tmp_path, max_shard_bytes=1 << 30, direct=True)
    for k, t in tensors.items():
        w.add(k, t)
    assert w.finish() == ["model.safetensors"]
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        assert all(torch.equal(f.get_tensor(k), t) for k, t in tensors.items())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]


def test_a_direct_write_refused_mid_shard_goes_on_through_the_page_cache(tmp_path, monkeypatch):
    """A file system that opens with O_DIRECT but refuses a direct write (EINVAL) gets the rest buffered."""
    from qkvconv import stream

    if not _o_direct_works(tmp_path):
        pytest.skip(f"{tmp_path}'s file system has no O_DIRECT")
    monkeypatch.setattr(stream, "_STAGE_BYTES", 2 * stream._BLOCK)
    real_write, refused = os.write, []

    def picky(fd, data):
        import fcntl

        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            refused.append(len(data))
            raise OSError(22, "Invalid argument")
        return real_write(fd, data)

    monkeypatch.setattr(stream.os, "write", picky)
    tensors = _awkward_tensors()
    w = stream.ShardWriter(tmp_path, max_shard_bytes=1 << 30, direct=True)
    for k, t in tensors.items():
        w.add(k, t)
    w.finish()
    assert refused  # the direct write was tried, refused once, and the shard finished buffered
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        assert all(torch.equal(f.get_tensor(k), t) for k, t in tensors.items())


def test_disk_filling_up_mid_direct_write_is_one_line(tiny_models, small_ext4, monkeypatch):
    """The same on a file system with O_DIRECT (a loop-mounted ext4), which --no-verify writes around the page cache:
    one line, the temporary files removed, the disk as it was."""
    from qkvconv import stream

    monkeypatch.setattr(stream, "disk_free", lambda path: 1 << 40)
    made, real = [], stream._DirectShardFile
    monkeypatch.setattr(stream, "_DirectShardFile", lambda path: (made.append(path), real(path))[1])
    fd = os.open(small_ext4 / "filler", os.O_WRONLY | os.O_CREAT, 0o644)
    try:  # leave ~64 KB free: less than the tiny model's output
        os.posix_fallocate(fd, 0, shutil.disk_usage(small_ext4).free - (64 << 10))
    finally:
        os.close(fd)
    assert shutil.disk_usage(small_ext4).free < 256 << 10
    result = run("absorb-query", tiny_models["llama"], "-o", small_ext4 / "o", "--no-verify")
    line = one_error_line(result)
    print("\n" + line)
    assert "no space left on the device" in line and made  # the direct writer met the full disk
    assert sorted(p.name for p in small_ext4.iterdir()) == ["filler", "lost+found"]


# ------------------------------------------------------------------------------------------ dry run
def test_dry_run_reports_and_writes_nothing(tiny_models, tmp_path):
    src = tiny_models["llama"]
    before = _snapshot(src)
    result = run("share-kv", src, "-o", tmp_path / "o", "--mode", "k=v", "--kv-heads", "1", "--dry-run")
    assert result.exit_code == 0, result.output
    text = result.stdout
    print("\n" + text)
    for words in ("tensors removed per layer", "self_attn.k_proj.weight", "self_attn.s_proj.weight", "KV cache per token",
                  "estimated peak memory", "plain copy (estimate)", "nothing written"):
        assert words in text, words
    assert "(25.0%)" in text  # k=v and 2 → 1 heads: a quarter of the cache
    assert list(tmp_path.iterdir()) == [] and _snapshot(src) == before


def test_dry_run_parameter_delta_matches_the_real_conversion(tiny_models, tmp_path):
    from qkvconv.convert import attach_query_mlp_checkpoint

    dry = attach_query_mlp_checkpoint(tiny_models["llama"], tmp_path / "o", dry_run=True)
    real = attach_query_mlp_checkpoint(tiny_models["llama"], tmp_path / "o", verify=False)
    assert dry.params_after - dry.params_before == real.added["query_mlp"]
    assert abs(dry.output_bytes - real.output_bytes) <= 0.01 * real.output_bytes


def test_calibrated_fits_run_without_verification(tiny_models, tmp_path):
    """--no-verify still pushes the calibration tokens through the original (the fits need them), but no
    converted stream, no logits and no decode check."""
    r = share_kv_checkpoint(tiny_models["llama"], tmp_path / "kv", mode="k=v", init="calibrated", num_seqs=5,
                            seq_len=32, verify=False)
    assert r.error is None and len(r.fit) == 2
    r = absorb_query_checkpoint(tiny_models["qwen2"], tmp_path / "drop", mode="drop", verify=False, **FAST)
    assert r.error is None and qkvconv.load(tmp_path / "drop")


def test_interrupt_wrapped_by_a_library_is_still_an_interrupt(tiny_models, tmp_path, monkeypatch):
    """A signal that lands inside safetensors' slicing surfaces as a ValueError (seen under load in CI): the command
    still says it was interrupted, exits 130 and leaves nothing."""
    from typer.testing import CliRunner

    import qkvconv.stream as stream
    from qkvconv.cli import app
    from qkvconv.errors import interrupted_by

    def take_rows(self, key, index):
        interrupted_by.append(signal.SIGINT)
        raise ValueError("could not determine the shape of object type 'torch.storage.UntypedStorage'")

    monkeypatch.setattr(stream.SafetensorsSource, "take_rows", take_rows)
    out = tmp_path / "o"
    result = CliRunner().invoke(app, ["share-kv", str(tiny_models["llama"]), "-o", str(out), "--mode", "k=v"])
    assert result.exit_code == 130 and "interrupted" in result.output, result.output
    assert list(tmp_path.iterdir()) == []


def test_logit_statistics_over_position_blocks_equal_the_whole_tensor_at_once(monkeypatch):
    """The verification's LogitError is accumulated over blocks of positions (_Accumulator.POSITIONS) so no
    (batch, positions, vocab) float64 tensor is held: max, mean |Δlogit|, KL and top-1 equal one float64 pass over
    the whole tensor (a block size that does not divide the positions, and one wider than them)."""
    from qkvconv.verify import _Accumulator, compare_logits

    g = torch.Generator().manual_seed(0)
    ref = torch.randn(3, 70, 50, generator=g)
    new = ref + 0.3 * torch.randn(3, 70, 50, generator=g)
    r, n = ref.double(), new.double()
    lp, lq = r.log_softmax(-1), n.log_softmax(-1)
    want = dict(max_abs=float((r - n).abs().max()), mean_abs=float((r - n).abs().mean()),
                kl=float((lp.exp() * (lp - lq)).sum(-1).mean()),
                top1=float((r.argmax(-1) == n.argmax(-1)).double().mean()))
    for block in (32, 1000):
        monkeypatch.setattr(_Accumulator, "POSITIONS", block)
        got = compare_logits(ref, new, "test")
        print(f"block {block}: kl {got.kl:.6f} (whole {want['kl']:.6f}), top-1 {got.top1_agreement:.4f}")
        assert got.tokens == 3 * 70 and got.max_abs == want["max_abs"] and got.top1_agreement == want["top1"]
        assert got.mean_abs == pytest.approx(want["mean_abs"], rel=1e-12)
        assert got.kl == pytest.approx(want["kl"], rel=1e-12)


# ------------------------------------------------------------------------------- half precision on the CPU
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_linears_in_float32_round_like_a_half_gemm(dtype, monkeypatch):
    """float32_linears: a bf16/fp16 nn.Linear computed in float32 and rounded once gives what the half GEMM gives
    (products exact in float32, float32 sums, one rounding): every output within one rounding of the float64 product
    plus what two float32 summation orders can differ by; the module is as before afterwards, and a float32 linear
    beside it is left alone. The weight is made float32 100 output rows at a time (not a divisor of 384)."""
    import qkvconv.stream as stream
    from qkvconv.stream import float32_linears

    monkeypatch.setattr(stream, "FLOAT32_WEIGHT_BYTES", 4 * 512 * 100)

    g = torch.Generator().manual_seed(0)
    half = torch.nn.Linear(512, 384, bias=True).to(dtype)
    full = torch.nn.Linear(384, 64)
    model = torch.nn.Sequential(half, full)
    x = torch.randn(64, 512, generator=g).to(dtype)
    with torch.no_grad():
        native = half(x)
        with float32_linears(model, enabled=True):
            assert "forward" in half.__dict__ and "forward" not in full.__dict__
            emulated = half(x)
        again = half(x)
        ref = torch.nn.functional.linear(x.double(), half.weight.double(), half.bias.double())
        sums = torch.nn.functional.linear(x.double().abs(), half.weight.double().abs(), half.bias.double().abs())
    assert "forward" not in half.__dict__ and torch.equal(again, native)
    assert emulated.dtype == dtype
    eps = torch.finfo(dtype).eps
    bound = eps * ref.abs() + 2 * 512 * torch.finfo(torch.float32).eps * sums  # one rounding + float32 sums
    for name, out in (("native", native), ("float32", emulated)):
        err = (out.double() - ref).abs()
        print(f"{dtype} {name}: max error / bound {float((err / bound).max()):.3f}, "
              f"{float((emulated != native).double().mean()):.2%} of outputs differ between the two")
        assert bool((err <= bound).all()), name


def test_bf16_verification_is_the_same_with_float32_linears(tiny_models, tmp_path, monkeypatch):
    """A bf16 checkpoint's streamed verification measures the same error whether its linears run as bf16 GEMMs or in
    float32 rounded once (what a CPU without native bf16 gets, slow_half_matmul): only summation orders differ."""
    import qkvconv.stream as stream

    src = tmp_path / "bf16"
    loaded = load(tiny_models["llama"], dtype=torch.bfloat16)
    loaded.model.save_pretrained(src)
    loaded.tokenizer.save_pretrained(src)
    errors = {}
    for emulate in (False, True):
        monkeypatch.setattr(stream, "slow_half_matmul", lambda dtype, on=emulate: on)
        errors[emulate] = share_kv_checkpoint(src, None, mode="k=v", decode="never", **FAST).error
        print(f"float32 linears {emulate}: {errors[emulate].as_dict()}")
    a, b = errors[False], errors[True]
    assert a.tokens == b.tokens
    assert b.kl == pytest.approx(a.kl, rel=0.05) and b.mean_abs == pytest.approx(a.mean_abs, rel=0.05)
    assert abs(a.top1_agreement - b.top1_agreement) <= 3 / a.tokens


def test_calibration_inputs_are_gathered_batch_by_batch_in_calibration_order():
    """The original pass's attention inputs of the calibration rows, taken from each batch as it runs: the same as
    concatenating every batch and selecting the rows, in the calibration rows' order (not the stream's)."""
    from qkvconv.errors import TransformError
    from qkvconv.stream import _CalibrationInputs

    x = torch.randn(10, 3, 4)
    rows = [7, 0, 4, 5, 9]
    got = _CalibrationInputs(rows)
    for s in range(0, 10, 4):  # batches of 4, 4, 2
        got.add(x[s : s + 4])
    assert torch.equal(got.rows(), x[rows].reshape(-1, 4))
    short = _CalibrationInputs(rows)
    short.add(x[:8])  # row 9 never seen
    with pytest.raises(TransformError, match="not all captured"):
        short.rows()
