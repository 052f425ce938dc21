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
