"""Training windows for `finetune`: packed in memory, or streamed and packed on the fly (data larger than memory).

Both sources hand out the same thing, `take(n)` → the next n windows (n, seq_len) of one endless stream, and both
carry their position in `state_dict()`, so a resumed run continues at the very token where the saved one stopped.

  WindowCycle   every window of a small corpus in memory, reshuffled each epoch: the order is a function of
                (seed, epoch) alone, and the position is one integer (windows handed out so far).
  WindowStream  the text is read piece by piece (1 MiB of a .txt, one row of a .jsonl or an HF dataset), tokenized
                and packed as it arrives, and the windows pass through a shuffle buffer driven by a seeded
                generator. Its position is (epoch, pieces read, tokens not yet packed, the buffer, the generator
                state): resuming re-reads the first pieces without tokenizing them, then goes on exactly.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Callable, Iterator

import torch

from qkvconv.errors import QkvconvError

Texts = Callable[[], Iterator[tuple[str, bool]]]  # a fresh pass over (text, ends_a_document) pieces


@lru_cache(maxsize=4)
def sample_order(n: int, epoch: int, seed: int) -> torch.Tensor:
    """The order of the training windows in `epoch`, a function of (seed, epoch) only."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


def batch_at(windows: torch.Tensor, start: int, size: int, seed: int) -> torch.Tensor:
    """Windows number start .. start+size-1 of the endless, per-epoch shuffled stream."""
    n = len(windows)
    idx = [int(sample_order(n, i // n, seed)[i % n]) for i in range(start, start + size)]
    return windows[idx]


class WindowCycle:
    """The windows of an in-memory corpus, endlessly, in a per-epoch shuffled order."""

    def __init__(self, windows: torch.Tensor, seed: int):
        self.windows, self.seed, self.position = windows, seed, 0

    def take(self, n: int) -> torch.Tensor:
        out = batch_at(self.windows, self.position, n, self.seed)
        self.position += n
        return out

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = state["position"]


class WindowStream:
    """Windows of `seq_len` tokens packed on the fly from `texts` (EOS after each document), through a shuffle
    buffer of `buffer` windows; endless (a new epoch re-reads the text). Deterministic under `seed`."""

    def __init__(self, texts: Texts, tokenizer, seq_len: int, *, seed: int, buffer: int = 256, skip: int = 0):
        if buffer < 1:
            raise QkvconvError("--shuffle-buffer must be at least 1")
        self.texts, self.tokenizer, self.seq_len, self.capacity = texts, tokenizer, seq_len, buffer
        self.epoch, self.pieces, self.carry = 0, 0, []  # pieces of this epoch read so far; tokens not yet packed
        self.buffer: list[torch.Tensor] = []
        self.generator = torch.Generator().manual_seed(seed)
        self._reader: Iterator[tuple[str, bool]] | None = None
        self._empty_epoch = True
        if skip:
            self.head(skip)

    # -- the raw, unshuffled windows (the held-out windows are the first ones of the text)
    def _next_window(self) -> torch.Tensor:
        while len(self.carry) < self.seq_len:
            if self._reader is None:
                self._reader = self._open()
            piece = next(self._reader, None)
            if piece is None:  # end of the text: a new epoch
                if self._empty_epoch:
                    raise QkvconvError(f"the data has too little text for one window of {self.seq_len} tokens")
                self.epoch, self.pieces, self._reader, self._empty_epoch = self.epoch + 1, 0, None, True
                continue
            self.pieces += 1
            text, doc_end = piece
            if text:
                self.carry.extend(self.tokenizer(text, add_special_tokens=False).input_ids)
            if doc_end and self.tokenizer.eos_token_id is not None:
                self.carry.append(self.tokenizer.eos_token_id)
        window, self.carry = self.carry[: self.seq_len], self.carry[self.seq_len:]
        self._empty_epoch = False
        return torch.tensor(window, dtype=torch.long)

    def _open(self) -> Iterator[tuple[str, bool]]:
        reader = self.texts()
        for _ in range(self.pieces):  # resuming: skip what was read (no tokenizing), then go on
            if next(reader, None) is None:
                raise QkvconvError("--resume: the data is shorter than when the run was saved; use the same data")
        return reader

    def head(self, n: int) -> torch.Tensor:
        """The next n windows in text order, bypassing the shuffle buffer (held-out windows)."""
        return torch.stack([self._next_window() for _ in range(n)])

    # -- the shuffled training stream
    def take(self, n: int) -> torch.Tensor:
        out = []
        for _ in range(n):
            while len(self.buffer) < self.capacity:
                self.buffer.append(self._next_window())
            # a uniformly drawn window leaves the buffer; the next window of the text takes its place
            i = int(torch.randint(len(self.buffer), (1,), generator=self.generator))
            out.append(self.buffer[i])
            self.buffer[i] = self.buffer[-1]
            self.buffer.pop()
        return torch.stack(out)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pieces": self.pieces, "carry": list(self.carry),
                "buffer": torch.stack(self.buffer) if self.buffer else torch.empty(0, self.seq_len, dtype=torch.long),
                "generator": self.generator.get_state(), "empty_epoch": self._empty_epoch}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.pieces, self.carry = state["epoch"], state["pieces"], list(state["carry"])
        self.buffer = list(state["buffer"].unbind(0))
        self.generator.set_state(state["generator"])
        self._empty_epoch, self._reader = state["empty_epoch"], None
