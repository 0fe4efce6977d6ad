"""Corpus -> token ids on disk (memory-mapped) -> random training windows.

The built-in corpus is this interpreter's standard-library source (no download). Token ids are
written once to `train.bin` / `val.bin` in a cache directory keyed by everything that shapes them,
and read back with numpy.memmap, so a corpus larger than RAM is fine. The windows of step s come
from a generator seeded with (seed, s): the step number is the whole sampler state.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sysconfig
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from train.config import ConfigError, DataConfig
from train.data.tokenizer import TOKENIZER_FILE, BPETokenizer, ByteTokenizer, load_tokenizer

STDLIB_SKIP = {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "turtledemo", "__pycache__"}
TEXT_SUFFIXES = {".txt", ".md", ".rst", ".py", ".json", ".csv", ".html", ".xml", ".tex", ".c", ".h"}
MIN_DOCS_FOR_DOCUMENT_SPLIT = 20
log = logging.getLogger(__name__)


def stdlib_files() -> list[Path]:
    """The standard library's `.py` files, sorted (tests, IDLE and 2to3 left out)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return [p for p in sorted(root.rglob("*.py")) if not set(p.relative_to(root).parts[:-1]) & STDLIB_SKIP]


def text_files(path: str) -> list[Path]:
    """`path` itself, or the text files below a directory, sorted.

    Raises:
        ConfigError: the path does not exist, is neither a regular file nor a directory (a device,
            a pipe), or a directory holds no text file.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise ConfigError(f"data.path = {path!r} does not exist")
    if p.is_file():
        return [p]
    if not p.is_dir():
        raise ConfigError(f"data.path = {path!r} is not a regular file or a directory")
    files = [f for f in sorted(p.rglob("*")) if f.is_file() and f.suffix.lower() in TEXT_SUFFIXES]
    if not files:
        raise ConfigError(f"data.path = {path!r} holds no text files ({', '.join(sorted(TEXT_SUFFIXES))})")
    return files


def _hf_documents(cfg: DataConfig) -> Iterator[tuple[str, bytes]]:
    try:
        import datasets
    except ImportError as e:
        raise ConfigError("data.source = 'hf' needs the datasets package: pip install -e '.[hf]'") from e
    ds = datasets.load_dataset(cfg.hf_name, cfg.hf_config, split=cfg.hf_split, streaming=True)
    for i, row in enumerate(ds):
        yield f"{i:09d}", str(row[cfg.hf_text_field]).encode("utf-8")


def documents(cfg: DataConfig) -> Iterator[tuple[str, bytes]]:
    """`(name, raw bytes)` of every document, in a fixed order, up to `cfg.max_bytes` in total."""
    if cfg.source == "hf":
        source = _hf_documents(cfg)
    else:
        files = stdlib_files() if cfg.source == "stdlib" else text_files(cfg.path)
        source = ((str(f), f.read_bytes()) for f in files)
    total = 0
    for name, data in source:
        if cfg.max_bytes and total + len(data) > cfg.max_bytes:
            data = data[: cfg.max_bytes - total]
        total += len(data)
        if data:
            yield name, data
        if cfg.max_bytes and total >= cfg.max_bytes:
            return


def cache_key(cfg: DataConfig) -> str:
    """A hash of everything that shapes the token files (for files: names, sizes, mtimes)."""
    parts = {
        k: getattr(cfg, k)
        for k in (
            "source",
            "path",
            "hf_name",
            "hf_config",
            "hf_split",
            "hf_text_field",
            "tokenizer",
            "bpe_vocab_size",
            "val_fraction",
            "max_bytes",
        )
    }
    if cfg.tokenizer_file:
        parts["tokenizer_file"] = hashlib.sha256(Path(cfg.tokenizer_file).expanduser().read_bytes()).hexdigest()
    if cfg.source != "hf":
        files = stdlib_files() if cfg.source == "stdlib" else text_files(cfg.path)
        parts["files"] = [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def default_cache_root() -> Path:
    return Path(os.environ.get("TP_ATTENTION_CACHE", Path.home() / ".cache" / "tp-attention"))


def _is_val(name: str, fraction: float) -> bool:
    return int(hashlib.sha1(name.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF < fraction


def build_token_files(cfg: DataConfig, directory: Path) -> None:
    """Tokenize the corpus into `directory` (train.bin, val.bin, meta.json, tokenizer.json for BPE).

    Many documents are split whole, by a hash of their name; a few (one big file) by position:
    the last `val_fraction` of the tokens is validation. A document split that leaves one side empty
    falls back to the position split, with a warning.
    """
    docs = list(documents(cfg))
    if not docs or not any(data.strip() for _, data in docs):
        raise ConfigError(f"the {cfg.source} corpus is empty (data.path = {cfg.path!r})")
    if cfg.tokenizer_file:
        tokenizer = BPETokenizer.load(Path(cfg.tokenizer_file).expanduser())
    elif cfg.tokenizer == "bpe":
        tokenizer = BPETokenizer.train((d.decode("utf-8", errors="replace") for _, d in docs), cfg.bpe_vocab_size)
        if tokenizer.vocab_size <= 256:
            raise ConfigError(
                f"BPE learned only {tokenizer.vocab_size} tokens: the corpus is too small for "
                f"data.bpe_vocab_size = {cfg.bpe_vocab_size}"
            )
    else:
        tokenizer = ByteTokenizer()
    dtype = np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32
    ids = [np.asarray(tokenizer.encode(data), dtype=dtype) for _, data in docs]
    val_mask = [_is_val(name, cfg.val_fraction) for name, _ in docs]
    if len(docs) >= MIN_DOCS_FOR_DOCUMENT_SPLIT and 0 < sum(val_mask) < len(docs):
        train = np.concatenate([t for t, v in zip(ids, val_mask, strict=True) if not v] or [np.zeros(0, dtype)])
        val = np.concatenate([t for t, v in zip(ids, val_mask, strict=True) if v] or [np.zeros(0, dtype)])
    else:
        if len(docs) >= MIN_DOCS_FOR_DOCUMENT_SPLIT:
            side = "every one" if sum(val_mask) else "none"
            log.warning(
                "%s of the %d documents hashes into the validation split: splitting by position instead",
                side,
                len(docs),
            )
        everything = np.concatenate(ids)
        cut = int(len(everything) * (1 - cfg.val_fraction))
        train, val = everything[:cut], everything[cut:]
    directory.mkdir(parents=True, exist_ok=True)
    train.tofile(directory / "train.bin")
    val.tofile(directory / "val.bin")
    tokenizer.save(directory)
    meta = {
        "dtype": np.dtype(dtype).name,
        "train_tokens": len(train),
        "val_tokens": len(val),
        "documents": len(docs),
        "bytes": sum(len(d) for _, d in docs),
        "tokenizer": cfg.tokenizer_file or cfg.tokenizer,
        "vocab_size": tokenizer.vocab_size,
    }
    (directory / "meta.json").write_text(json.dumps(meta, indent=2))


@dataclass
class TokenData:
    """Memory-mapped train/val token ids and their tokenizer."""

    train: np.ndarray
    val: np.ndarray
    tokenizer: ByteTokenizer | BPETokenizer
    directory: Path

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size


def prepare_data(cfg: DataConfig, is_main: bool, barrier: Callable[[], None], seq_len: int) -> TokenData:
    """Build the token files once (main process, atomically), then memory-map them everywhere.

    Raises:
        ConfigError: a missing or empty corpus, or a split shorter than one `seq_len + 1` window.
    """
    root = Path(cfg.cache_dir).expanduser() if cfg.cache_dir else default_cache_root()
    directory = root / f"{cfg.source}-{'file' if cfg.tokenizer_file else cfg.tokenizer}-{cache_key(cfg)}"
    error = None
    if is_main and not (directory / "meta.json").is_file():
        tmp = directory.with_name(directory.name + f".tmp{os.getpid()}")
        try:
            build_token_files(cfg, tmp)
            os.replace(tmp, directory) if not directory.exists() else shutil.rmtree(tmp)
        except ConfigError as e:
            error = e
            shutil.rmtree(tmp, ignore_errors=True)
    barrier()
    if error is not None:
        raise error
    if not (directory / "meta.json").is_file():
        raise ConfigError(f"the token files in {directory} were not built (see the main process's error)")
    meta = json.loads((directory / "meta.json").read_text())
    for split, key in (("train", "train_tokens"), ("validation", "val_tokens")):
        if meta[key] < seq_len + 1:
            raise ConfigError(
                f"the {split} split has {meta[key]} tokens, fewer than one window of "
                f"trainer.seq_len + 1 = {seq_len + 1}; use more text or a shorter seq_len"
            )
    dtype = np.dtype(meta["dtype"])
    train = np.memmap(directory / "train.bin", dtype=dtype, mode="r")
    val = np.memmap(directory / "val.bin", dtype=dtype, mode="r")
    tokenizer = load_tokenizer(directory) if (directory / TOKENIZER_FILE).is_file() else ByteTokenizer()
    return TokenData(train, val, tokenizer, directory)


def windows(tokens: np.ndarray, count: int, seq_len: int, rng: np.random.Generator) -> tuple[torch.Tensor, ...]:
    """`count` random windows: inputs and next-token targets, each `[count, seq_len]` int64."""
    starts = rng.integers(0, len(tokens) - seq_len, size=count)
    chunk = np.stack([np.asarray(tokens[s : s + seq_len + 1], dtype=np.int64) for s in starts])
    chunk = torch.from_numpy(chunk)
    return chunk[:, :-1], chunk[:, 1:]


def step_batch(
    tokens: np.ndarray,
    step: int,
    seed: int,
    micro_batch: int,
    grad_accum: int,
    seq_len: int,
    dp_rank: int,
    dp_size: int,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """This DP rank's micro-batches of training step `step`.

    The global batch (`micro_batch * grad_accum * dp_size` windows) depends only on (seed, step);
    DP rank r takes its consecutive share, so any (dp, grad_accum) with the same product sees the
    same windows, and every TP rank of a group sees the same ones.
    """
    per_rank = micro_batch * grad_accum
    x, y = windows(tokens, per_rank * dp_size, seq_len, np.random.default_rng([seed, step]))
    x, y = x[dp_rank * per_rank : (dp_rank + 1) * per_rank], y[dp_rank * per_rank : (dp_rank + 1) * per_rank]
    return list(zip(x.split(micro_batch), y.split(micro_batch), strict=True))


def eval_batches(tokens: np.ndarray, count: int, seed: int, micro_batch: int, seq_len: int):
    """The same `count` validation windows at every evaluation (whatever the layout), in micro-batches."""
    x, y = windows(tokens, count, seq_len, np.random.default_rng([seed, 2**31]))
    return list(zip(x.split(micro_batch), y.split(micro_batch), strict=True))
