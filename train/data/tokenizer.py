"""Tokenizers: byte-level (vocab 256, nothing to train) and byte-level BPE from `tokenizers`."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

TOKENIZER_FILE = "tokenizer.json"


class ByteTokenizer:
    """UTF-8 bytes as token ids: accepts any text or bytes, decodes with replacement characters."""

    vocab_size = 256

    def encode(self, text: str | bytes) -> list[int]:
        return list(text.encode("utf-8") if isinstance(text, str) else text)

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(ids).decode("utf-8", errors="replace")

    def save(self, directory: str | Path) -> None:
        """Nothing to write: a directory without tokenizer.json means bytes."""


class BPETokenizer:
    """Byte-level BPE (GPT-2 style) trained on the corpus with the `tokenizers` library."""

    def __init__(self, tokenizer) -> None:
        self._tokenizer = tokenizer
        self.vocab_size = tokenizer.get_vocab_size()

    @classmethod
    def train(cls, texts: Iterator[str], vocab_size: int) -> BPETokenizer:
        """Learn `vocab_size` tokens from `texts`.

        Raises:
            ValueError: vocab_size is below 257 (the 256 bytes plus one merge).
        """
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        if vocab_size <= 256:
            raise ValueError(f"BPE vocab_size = {vocab_size} must exceed 256 (the byte alphabet)")
        tokenizer = Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
        )
        tokenizer.train_from_iterator(texts, trainer=trainer)
        return cls(tokenizer)

    @classmethod
    def load(cls, path: str | Path) -> BPETokenizer:
        from tokenizers import Tokenizer

        return cls(Tokenizer.from_file(str(path)))

    def encode(self, text: str | bytes) -> list[int]:
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        return self._tokenizer.encode(text).ids

    def decode(self, ids: Iterable[int]) -> str:
        return self._tokenizer.decode(list(ids))

    def save(self, directory: str | Path) -> None:
        self._tokenizer.save(str(Path(directory) / TOKENIZER_FILE))


def load_tokenizer(directory: str | Path) -> ByteTokenizer | BPETokenizer:
    """The tokenizer saved next to a model: `tokenizer.json` if present, else bytes."""
    path = Path(directory) / TOKENIZER_FILE
    return BPETokenizer.load(path) if path.is_file() else ByteTokenizer()
