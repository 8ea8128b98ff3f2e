"""Tokenizers: the checkpoint's ``tokenizer.json`` through the ``tokenizers`` library, or bytes."""

from __future__ import annotations

from pathlib import Path

from ..model.transformer import InputError


class ByteTokenizer:
    """Byte-level tokenizer of the built-in demo model: 0 = BOS, 1 = EOS, 2 = pad, byte b -> b + 3."""

    offset = 3
    vocab_size = 256 + offset
    bos_id, eos_id = 0, 1

    def encode(self, text: str) -> list[int]:
        return [self.bos_id] + [b + self.offset for b in text.encode("utf-8")]

    def decode(self, ids) -> str:
        return bytes(i - self.offset for i in ids if i >= self.offset).decode("utf-8", errors="replace")


class HFTokenizer:
    """A ``tokenizer.json`` (DeepSeek ships one with every checkpoint)."""

    def __init__(self, path: Path):
        from tokenizers import Tokenizer

        self._tok = Tokenizer.from_file(str(path))

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text).ids

    def decode(self, ids) -> str:
        return self._tok.decode(list(ids))


TOKENIZER_FILE = "tokenizer.json"


def has_tokenizer(checkpoint_dir: str | Path) -> bool:
    return (Path(checkpoint_dir) / TOKENIZER_FILE).exists()


def load_tokenizer(checkpoint_dir: str | Path) -> HFTokenizer:
    """The checkpoint's ``tokenizer.json``; a checkpoint without one is an InputError (pass token ids)."""
    if not has_tokenizer(checkpoint_dir):
        raise InputError(f"checkpoint directory {checkpoint_dir} has no {TOKENIZER_FILE}; pass token ids "
                         "instead of text (the demo model's tokenizer: dsv4_jax.runtime.demo.demo_model())")
    return HFTokenizer(Path(checkpoint_dir) / TOKENIZER_FILE)
