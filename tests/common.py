"""Tiny random checkpoints of every supported family, built in-test (no downloads)."""

from __future__ import annotations

import string
from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gpt2", "gpt_neox")
SPECIALS = ["<unk>", "<s>", "</s>"]


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer: 3 specials + the printable ASCII characters (vocab 103)."""
    vocab = {t: i for i, t in enumerate(SPECIALS + sorted(set(string.printable)))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="</s>"
    )


def tiny_config(family: str):
    vocab = len(SPECIALS) + len(set(string.printable))
    common = dict(vocab_size=vocab, bos_token_id=1, eos_token_id=2, pad_token_id=2, initializer_range=0.15)
    llama_like = dict(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False, **common,
    )
    if family == "llama":
        return transformers.LlamaConfig(**llama_like)
    if family == "mistral":
        return transformers.MistralConfig(sliding_window=None, **llama_like)
    if family == "qwen2":
        return transformers.Qwen2Config(**llama_like)  # q/k/v biases
    if family == "qwen3":
        return transformers.Qwen3Config(head_dim=16, **llama_like)  # per-head q/k norms
    if family == "gpt2":
        return transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=256, **common)
    if family == "gpt_neox":
        return transformers.GPTNeoXConfig(
            hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=256, rotary_pct=0.5, use_parallel_residual=True,
            tie_word_embeddings=False, **common,
        )
    raise ValueError(family)


def build_tiny(family: str, path: Path, seed: int = 0) -> Path:
    """Save a seeded random fp32 model of `family` (with tokenizer) as an HF directory."""
    return save_random(tiny_config(family), path, seed)


def save_random(config, path: Path, seed: int = 0) -> Path:
    """Save a seeded random fp32 eager model of `config` (with the tiny tokenizer) as an HF directory."""
    torch.manual_seed(seed)
    config._attn_implementation = "eager"
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").float().eval()
    with torch.no_grad():  # random biases, norm gains (γ of gemma's 1 + γ too) and sinks: every term of the algebra
        for name, p in model.named_parameters():
            if name.endswith(("bias", "sinks")) or "norm" in name or "ln_" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def _gpt2_byte_symbols() -> list[str]:
    """GPT-2's byte-level alphabet: the 256 symbols its BPE vocabularies start from."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, extra = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + extra)
            extra += 1
    return [chr(c) for c in cs]


def build_tiny_gguf(path, layers: int = 2, d: int = 32, ff: int = 64, heads: int = 4, kv_heads: int = 2):
    """A tiny LLaMA GGUF written with gguf's own writer: float32 random weights in GGUF's tensor names, a byte-level
    BPE tokenizer (the byte alphabet, three special tokens, a few merges) and the metadata transformers reads."""
    import gguf
    import numpy as np

    merges = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a"]
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + _gpt2_byte_symbols() + [m.replace(" ", "") for m in merges]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny")
    w.add_block_count(layers)
    w.add_context_length(128)
    w.add_embedding_length(d)
    w.add_feed_forward_length(ff)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(d // heads)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3, 3, 3] + [1] * (len(tokens) - 3))
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(2)
    g = np.random.default_rng(0)

    def t(*shape: int):
        return (g.standard_normal(shape) * 0.05).astype(np.float32)

    dh = d // heads
    w.add_tensor("token_embd.weight", t(len(tokens), d))
    w.add_tensor("output_norm.weight", 1 + t(d))
    w.add_tensor("output.weight", t(len(tokens), d))
    for i in range(layers):
        for name, shape in (("attn_norm", (d,)), ("ffn_norm", (d,)), ("attn_q", (d, d)), ("attn_k", (kv_heads * dh, d)),
                            ("attn_v", (kv_heads * dh, d)), ("attn_output", (d, d)), ("ffn_gate", (ff, d)),
                            ("ffn_up", (ff, d)), ("ffn_down", (d, ff))):
            w.add_tensor(f"blk.{i}.{name}.weight", (1 + t(*shape)) if len(shape) == 1 else t(*shape))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
