"""Training data: DuckDB preprocessing into packed parquet shards, and a loader of global batches.

Preprocessing (once, before training; deterministic)::

    python -m pipelines.data --out /tmp/jaxinfra-data --seq-len 256          # the stdlib's .py files
    python -m pipelines.data corpus/ more.parquet --out DIR --seq-len 1024   # text files and parquet

1. Sources: text files (each file is one document, read as raw bytes) and
   parquet files (each row's ``text_column`` is one document), read by DuckDB
   (``read_blob``, ``read_parquet``). Documents keep the order of the sources
   given, files sorted within a directory or glob, rows in file order.
2. Exact deduplication (DuckDB ``GROUP BY content`` on the full bytes): the
   first occurrence of each distinct document is kept, in order. Empty and
   NULL documents are dropped and counted.
3. Tokenization: byte-level by default (ids 0..255 are bytes, then
   :data:`PAD_ID`, :data:`BOS_ID`, :data:`EOS_ID`; vocabulary 259), or any
   :class:`Tokenizer` (for example :class:`FunctionTokenizer` around a callable,
   or a Hugging Face ``tokenizer.json`` through :func:`load_tokenizer`).
4. Packing: the documents become one stream ``BOS doc EOS BOS doc EOS ...`` cut
   into rows of ``seq_len`` tokens (documents continue across rows); only the
   last row is padded with PAD. Every token appears exactly once, in order.
5. Output: ``DIR/shard-00000.parquet ...`` (column ``tokens``:
   ``fixed_size_list<int32>[seq_len]``) and ``DIR/metadata.json``, written to a
   temporary directory and renamed into place, so a finished dataset is never
   half-written.

Loading::

    loader = DataLoader(DIR, mesh, global_batch_size=32, batch_axes="data", seed=0)
    for step, batch in loader.iterate(start_step):   # resumes exactly at a step
      batch["tokens"]        # int32 [32, seq_len], a global jax.Array sharded over "data"

Batch ``s`` is a pure function of ``(seed, s)``: each epoch is a seeded
permutation of the rows (the last incomplete batch of an epoch is skipped), so
resuming from a checkpoint at step ``s`` continues with exactly the batches an
uninterrupted run would have seen. Each process reads only the rows of its
addressable devices' shards (``jax.make_array_from_callback``), so the same code
runs in one process or many.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import glob
import importlib
import json
import math
import os
import shutil
import sys
import sysconfig
import tempfile
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

import numpy as np

PAD_ID = 256
BOS_ID = 257
EOS_ID = 258
BYTE_VOCAB_SIZE = 259
MIN_SEQ_LEN = 2  # at least one next-token target per row
FORMAT = "jaxinfra-packed-v1"
METADATA = "metadata.json"

PathLike = str | os.PathLike


# ----------------------------------------------------------------------------
# Tokenizers


class Tokenizer(Protocol):
  """What preprocessing needs from a tokenizer.

  ``encode`` maps one document (raw bytes, or its UTF-8 text) to token ids in
  ``[0, vocab_size)``; it adds no BOS/EOS (packing does).
  """
  name: str
  vocab_size: int
  pad_id: int
  bos_id: int
  eos_id: int

  def encode(self, document: bytes) -> np.ndarray: ...


class ByteTokenizer:
  """Byte-level tokenizer: ids 0..255 are the document's bytes (any encoding).

  ``encode(b) -> int32 [len(b)]``; ``decode(ids) -> bytes`` drops the special ids.
  Lossless for every byte string, including invalid UTF-8.
  """
  name = "bytes"
  vocab_size = BYTE_VOCAB_SIZE
  pad_id = PAD_ID
  bos_id = BOS_ID
  eos_id = EOS_ID

  def encode(self, document: bytes | str) -> np.ndarray:
    if isinstance(document, str):
      document = document.encode("utf-8")
    return np.frombuffer(document, dtype=np.uint8).astype(np.int32)

  def decode(self, ids: Sequence[int] | np.ndarray) -> bytes:
    ids = np.asarray(ids)
    if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
      raise ValueError(f"ids must be in [0, {self.vocab_size}), got range "
                       f"[{ids.min()}, {ids.max()}]")
    return ids[ids < 256].astype(np.uint8).tobytes()


class FunctionTokenizer:
  """A tokenizer from a callable ``encode(text: str) -> Sequence[int]``.

  Documents are decoded as UTF-8 (strictly: an undecodable document is an error
  that names it, never silently altered). The special ids must lie in
  ``[0, vocab_size)``; ``encode`` results outside that range are an error.
  """

  def __init__(self, encode: Callable[[str], Sequence[int]], *, vocab_size: int, bos_id: int,
               eos_id: int, pad_id: int, name: str = "custom",
               decode: Callable[[Sequence[int]], str] | None = None):
    for arg, value in (("bos_id", bos_id), ("eos_id", eos_id), ("pad_id", pad_id)):
      if not 0 <= value < vocab_size:
        raise ValueError(f"{arg}={value} is outside the vocabulary [0, {vocab_size})")
    if len({bos_id, eos_id, pad_id}) != 3:
      raise ValueError(f"bos_id, eos_id and pad_id must differ, got {bos_id}, {eos_id}, {pad_id}")
    self._encode, self._decode = encode, decode
    self.name, self.vocab_size = name, int(vocab_size)
    self.bos_id, self.eos_id, self.pad_id = int(bos_id), int(eos_id), int(pad_id)

  def encode(self, document: bytes | str) -> np.ndarray:
    text = document.decode("utf-8") if isinstance(document, bytes) else document
    ids = np.asarray(self._encode(text), dtype=np.int64).reshape(-1)
    if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
      raise ValueError(f"tokenizer {self.name!r} returned ids in [{ids.min()}, {ids.max()}], "
                       f"outside its vocabulary [0, {self.vocab_size})")
    return ids.astype(np.int32)

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    if self._decode is None:
      raise NotImplementedError(f"tokenizer {self.name!r} was given no decode function")
    specials = (self.bos_id, self.eos_id, self.pad_id)
    return self._decode([int(i) for i in np.asarray(ids).reshape(-1) if int(i) not in specials])


def load_tokenizer(spec: str | Tokenizer | None) -> Tokenizer:
  """``None`` or ``"bytes"``: :class:`ByteTokenizer`; a ``*.json`` path: a Hugging Face
  ``tokenizers`` file (needs the optional ``tokenizers`` package; BOS/EOS/PAD are
  its ``<s>``/``</s>``/``<pad>`` or ``<|bos|>``-style tokens); ``"pkg.module:factory"``:
  ``factory()`` returns a :class:`Tokenizer`; a tokenizer object is returned as is."""
  if spec is None or spec == "bytes":
    return ByteTokenizer()
  if not isinstance(spec, str):
    return spec
  if spec.endswith(".json"):
    return _hf_tokenizer(spec)
  module, sep, attr = spec.partition(":")
  if not sep:
    raise ValueError(f"tokenizer {spec!r}: expected 'bytes', a tokenizer.json path, or "
                     "'module:factory'")
  return getattr(importlib.import_module(module), attr)()


def _hf_tokenizer(path: str) -> FunctionTokenizer:
  if not os.path.isfile(path):
    raise FileNotFoundError(f"tokenizer file {path!r} does not exist")
  try:
    import tokenizers  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(f"tokenizer {path!r} needs the 'tokenizers' package "
                      "(pip install tokenizers)") from e
  tok = tokenizers.Tokenizer.from_file(path)
  vocab = tok.get_vocab(with_added_tokens=True)

  def special(*names: str) -> int:
    for n in names:
      if n in vocab:
        return vocab[n]
    raise ValueError(f"tokenizer {path!r} has none of the special tokens {names}")

  return FunctionTokenizer(
      lambda text: tok.encode(text, add_special_tokens=False).ids,
      vocab_size=tok.get_vocab_size(with_added_tokens=True),
      bos_id=special("<s>", "<|bos|>", "<bos>", "<|begin_of_text|>", "<｜begin▁of▁sentence｜>"),
      eos_id=special("</s>", "<|eos|>", "<eos>", "<|end_of_text|>", "<｜end▁of▁sentence｜>"),
      pad_id=special("<pad>", "<|pad|>", "[PAD]", "<｜▁pad▁｜>"),
      name=os.path.basename(path), decode=lambda ids: tok.decode(ids, skip_special_tokens=False))


# ----------------------------------------------------------------------------
# Sources


def default_corpus() -> list[str]:
  """The standard library's ``.py`` sources (no network needed), without
  ``site-packages``/``dist-packages``; sorted."""
  root = sysconfig.get_paths()["stdlib"]
  files = glob.glob(os.path.join(root, "**", "*.py"), recursive=True)
  skip = {"site-packages", "dist-packages"}
  return sorted(f for f in files if not skip & set(os.path.relpath(f, root).split(os.sep)))


def resolve_sources(sources: PathLike | Sequence[PathLike] | None,
                    pattern: str = "**/*") -> list[str]:
  """Expands sources to a list of files (absolute paths), checking each exists.

  A directory contributes its files matching ``pattern`` (sorted); a glob its
  matches (sorted); a file itself. ``None``: :func:`default_corpus`.

  Raises:
    FileNotFoundError: a source that does not exist (or a glob matching nothing).
    ValueError: no files at all.
  """
  if sources is None:
    files = default_corpus()
    if not files:
      raise ValueError(f"the default corpus (.py files under {sysconfig.get_paths()['stdlib']}) "
                       "is empty")
    return files
  if isinstance(sources, (str, os.PathLike)):
    sources = [sources]
  files: list[str] = []
  for source in sources:
    source = os.fspath(source)
    if glob.has_magic(source):
      matches = sorted(f for f in glob.glob(source, recursive=True) if os.path.isfile(f))
      if not matches:
        raise FileNotFoundError(f"corpus glob {source!r} matches no file")
    elif os.path.isdir(source):
      matches = sorted(f for f in glob.glob(os.path.join(source, pattern), recursive=True)
                       if os.path.isfile(f))
    elif os.path.isfile(source):
      matches = [source]
    else:
      raise FileNotFoundError(f"corpus path {source!r} does not exist")
    files.extend(os.path.abspath(f) for f in matches)
  if not files:
    raise ValueError(f"corpus {[os.fspath(s) for s in sources]} contains no files "
                     f"(directories are searched for {pattern!r})")
  return files


def _is_parquet(path: str) -> bool:
  return path.endswith(".parquet")


def _count_documents(files: list[str], text_column: str) -> int:
  """Cheap checks before any reading (parquet schemas have the column, not every
  source is empty); returns the number of documents the sources hold."""
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  documents, nonempty = 0, False
  for f in files:
    if _is_parquet(f):
      meta = pq.read_metadata(f)
      names = meta.schema.to_arrow_schema().names
      if text_column not in names:
        raise ValueError(f"parquet file {f!r} has no column {text_column!r} (columns: {names})")
      documents += meta.num_rows
      nonempty |= meta.num_rows > 0
    else:
      documents += 1
      nonempty |= os.path.getsize(f) > 0
  if not nonempty:
    raise ValueError(f"the corpus is empty: its {len(files)} file(s) hold no data")
  return documents


def _load_documents(con, files: list[str], text_column: str, dedup: bool) -> dict[str, int]:
  """Creates DuckDB table ``kept(i, content BLOB)``: the documents to tokenize,
  ``i`` = 0, 1, ... in corpus order. Returns document counts."""
  con.execute("CREATE TEMP TABLE files(file_index BIGINT, path VARCHAR)")
  con.executemany("INSERT INTO files VALUES (?, ?)", list(enumerate(files)))
  parts = []
  text = [f for f in files if not _is_parquet(f)]
  parquet = [f for f in files if _is_parquet(f)]
  if text:
    parts.append("SELECT f.file_index, 0 AS row_index, b.content "
                 "FROM read_blob($text) b JOIN files f ON b.filename = f.path")
  if parquet:
    column = '"' + text_column.replace('"', '""') + '"'
    parts.append(f"SELECT f.file_index, p.file_row_number AS row_index, "
                 f"CASE WHEN typeof(p.{column}) = 'BLOB' THEN p.{column}::BLOB "
                 f"ELSE encode(p.{column}::VARCHAR) END AS content "
                 f"FROM read_parquet($parquet, filename=true, file_row_number=true) p "
                 f"JOIN files f ON p.filename = f.path")
  params = {k: v for k, v in (("text", text), ("parquet", parquet)) if v}
  con.execute("CREATE TEMP TABLE docs AS SELECT row_number() OVER "
              "(ORDER BY file_index, row_index) AS ord, content FROM (" +
              " UNION ALL ".join(parts) + ")", params)
  read, empty = con.execute("SELECT count(*), count(*) FILTER "
                            "(WHERE content IS NULL OR octet_length(content) = 0) FROM docs"
                            ).fetchone()
  if dedup:
    first = ("SELECT min(ord) AS ord, content FROM docs WHERE octet_length(content) > 0 "
             "GROUP BY content")
  else:
    first = "SELECT ord, content FROM docs WHERE octet_length(content) > 0"
  con.execute(f"CREATE TEMP TABLE kept AS SELECT row_number() OVER (ORDER BY ord) - 1 AS i, "
              f"content FROM ({first})")
  kept, nbytes = con.execute("SELECT count(*), coalesce(sum(octet_length(content)), 0) "
                             "FROM kept").fetchone()
  con.execute("DROP TABLE docs")
  return {"read": int(read), "empty": int(empty), "duplicates": int(read - empty - kept),
          "kept": int(kept), "bytes": int(nbytes)}


# ----------------------------------------------------------------------------
# Preprocessing


@dataclasses.dataclass(frozen=True)
class Metadata:
  """What ``metadata.json`` of a packed dataset holds."""
  seq_len: int
  num_sequences: int
  num_tokens: int            # tokens before padding (BOS/EOS included)
  tokenizer: dict[str, Any]  # name, vocab_size, pad_id, bos_id, eos_id
  shards: list[dict[str, Any]]  # file, rows (in row order)
  documents: dict[str, int]  # read, empty, duplicates, kept, bytes
  sources: list[str]
  dedup: bool
  max_documents: int | None
  format: str = FORMAT

  @classmethod
  def load(cls, directory: PathLike) -> "Metadata":
    path = os.path.join(directory, METADATA)
    if not os.path.isfile(path):
      raise FileNotFoundError(f"{path} does not exist: {os.fspath(directory)!r} is not a "
                              "dataset written by `python -m pipelines.data`")
    with open(path) as f:
      raw = json.load(f)
    if raw.get("format") != FORMAT:
      raise ValueError(f"{path}: format {raw.get('format')!r}, expected {FORMAT!r}")
    return cls(**raw)


def _tokenizer_info(tok: Tokenizer) -> dict[str, Any]:
  return {"name": tok.name, "vocab_size": int(tok.vocab_size), "pad_id": int(tok.pad_id),
          "bos_id": int(tok.bos_id), "eos_id": int(tok.eos_id)}


class _ShardWriter:
  """Cuts the token stream into rows and writes full shards as they fill."""

  def __init__(self, directory: str, seq_len: int, rows_per_shard: int, rows_per_group: int,
               pad_id: int):
    self.directory, self.seq_len, self.pad_id = directory, seq_len, pad_id
    self.rows_per_shard, self.rows_per_group = rows_per_shard, rows_per_group
    self.pending: list[np.ndarray] = []
    self.pending_tokens = 0
    self.shards: list[dict[str, Any]] = []
    self.num_tokens = 0

  def add(self, tokens: np.ndarray) -> None:
    self.pending.append(tokens)
    self.pending_tokens += tokens.size
    self.num_tokens += tokens.size
    shard_tokens = self.rows_per_shard * self.seq_len
    if self.pending_tokens >= shard_tokens:
      stream = np.concatenate(self.pending)
      full = stream.size // shard_tokens * shard_tokens
      for start in range(0, full, shard_tokens):
        self._write(stream[start:start + shard_tokens])
      self.pending = [stream[full:]]
      self.pending_tokens = stream.size - full

  def finish(self) -> None:
    if self.pending_tokens:
      stream = np.concatenate(self.pending)
      rows = math.ceil(stream.size / self.seq_len)
      padded = np.full(rows * self.seq_len, self.pad_id, np.int32)
      padded[:stream.size] = stream
      self._write(padded)
    self.pending, self.pending_tokens = [], 0

  def _write(self, flat: np.ndarray) -> None:
    import pyarrow as pa  # pylint: disable=g-import-not-at-top
    import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
    name = f"shard-{len(self.shards):05d}.parquet"
    values = pa.array(flat.astype(np.int32, copy=False), type=pa.int32())
    table = pa.table({"tokens": pa.FixedSizeListArray.from_arrays(values, self.seq_len)})
    pq.write_table(table, os.path.join(self.directory, name), row_group_size=self.rows_per_group,
                   compression="zstd")
    self.shards.append({"file": name, "rows": len(table)})


def _progress(enabled: bool):
  from rich import progress as rp  # pylint: disable=g-import-not-at-top
  return rp.Progress(rp.SpinnerColumn(), rp.TextColumn("{task.description}"), rp.BarColumn(),
                     rp.MofNCompleteColumn(), rp.TimeElapsedColumn(), disable=not enabled,
                     transient=False)


def preprocess(sources: PathLike | Sequence[PathLike] | None, out_dir: PathLike, *,
               seq_len: int, tokenizer: str | Tokenizer | None = None,
               text_column: str = "text", pattern: str = "**/*", dedup: bool = True,
               max_documents: int | None = None, rows_per_shard: int = 4096,
               rows_per_group: int = 64, overwrite: bool = False,
               progress: bool = True) -> Metadata:
  """Reads, deduplicates, tokenizes and packs a corpus into parquet shards.

  Args:
    sources: files, directories, globs (see :func:`resolve_sources`); ``None``:
      the standard library's ``.py`` files.
    out_dir: the dataset directory to create.
    seq_len: tokens per packed row (>= 2).
    tokenizer: see :func:`load_tokenizer` (default: bytes).
    text_column: the document column of parquet sources.
    pattern: the glob for files inside directory sources.
    dedup: drop exact duplicate documents (first occurrence kept).
    max_documents: keep only the first N documents after deduplication.
    rows_per_shard: rows per parquet file.
    rows_per_group: rows per parquet row group (the loader's unit of reading).
    overwrite: replace an existing dataset; otherwise an existing one with the
      same settings is returned as is, and one with other settings is an error.
    progress: show rich progress bars.

  Returns:
    The dataset's :class:`Metadata`; the loader rows are ``int32 [seq_len]``.

  Raises:
    FileNotFoundError: a source path does not exist.
    ValueError: ``seq_len`` or the other sizes are too small, the corpus is
      empty, a parquet source lacks ``text_column``, a document cannot be
      tokenized (undecodable UTF-8 for a text tokenizer; ids out of range).
  """
  # Every cheap check first: nothing heavy runs on bad input.
  if not isinstance(seq_len, (int, np.integer)) or seq_len < MIN_SEQ_LEN:
    raise ValueError(f"seq_len must be an integer >= {MIN_SEQ_LEN}, got {seq_len!r}")
  for arg, value in (("rows_per_shard", rows_per_shard), ("rows_per_group", rows_per_group)):
    if value < 1:
      raise ValueError(f"{arg} must be positive, got {value}")
  if max_documents is not None and max_documents < 1:
    raise ValueError(f"max_documents must be positive, got {max_documents}")
  tok = load_tokenizer(tokenizer)
  files = resolve_sources(sources, pattern)
  expected = _count_documents(files, text_column)
  out_dir = os.path.abspath(os.fspath(out_dir))
  settings = {"seq_len": int(seq_len), "tokenizer": _tokenizer_info(tok), "sources": files,
              "dedup": dedup, "max_documents": max_documents}
  if os.path.exists(os.path.join(out_dir, METADATA)) and not overwrite:
    existing = Metadata.load(out_dir)
    if all(getattr(existing, k) == v for k, v in settings.items()):
      return existing
    raise ValueError(f"{out_dir} already holds a dataset with other settings; pass "
                     "overwrite=True (--overwrite) to replace it")

  import duckdb  # pylint: disable=g-import-not-at-top
  parent = os.path.dirname(out_dir)
  os.makedirs(parent, exist_ok=True)
  staging = tempfile.mkdtemp(prefix=".staging-" + os.path.basename(out_dir) + "-", dir=parent)
  umask = os.umask(0)
  os.umask(umask)
  os.chmod(staging, 0o777 & ~umask)  # mkdtemp's 0o700 would hide the dataset from other users
  try:
    con = duckdb.connect(":memory:")
    with _progress(progress) as bar:
      task = bar.add_task(f"DuckDB: reading {len(files)} files, dedup", total=None)
      counts = _load_documents(con, files, text_column, dedup)
      if counts["read"] != expected:  # e.g. a file name DuckDB took for a glob
        raise ValueError(f"DuckDB read {counts['read']} documents from the corpus, which holds "
                         f"{expected}; no dataset written")
      bar.update(task, total=1, completed=1)
      kept = counts["kept"] if max_documents is None else min(counts["kept"], max_documents)
      if kept == 0:
        raise ValueError(f"the corpus is empty: all {counts['read']} documents are empty")
      writer = _ShardWriter(staging, int(seq_len), rows_per_shard, rows_per_group, tok.pad_id)
      bos, eos = np.array([tok.bos_id], np.int32), np.array([tok.eos_id], np.int32)
      task = bar.add_task("tokenizing and packing", total=kept)
      chunk = 256
      for start in range(0, kept, chunk):
        rows = con.execute("SELECT i, content FROM kept WHERE i >= ? AND i < ? ORDER BY i",
                           [start, min(start + chunk, kept)]).fetchall()
        for i, content in rows:
          try:
            ids = tok.encode(bytes(content))
          except UnicodeDecodeError as e:
            raise ValueError(f"document {i} (after dedup) is not valid UTF-8, which tokenizer "
                             f"{tok.name!r} needs: {e}") from e
          writer.add(np.concatenate([bos, ids, eos]))
        bar.advance(task, len(rows))
      writer.finish()
    con.close()
    counts["kept"] = kept
    meta = Metadata(seq_len=int(seq_len),
                    num_sequences=sum(s["rows"] for s in writer.shards),
                    num_tokens=writer.num_tokens, tokenizer=settings["tokenizer"],
                    shards=writer.shards, documents=counts, sources=files, dedup=dedup,
                    max_documents=max_documents)
    with open(os.path.join(staging, METADATA), "w") as f:
      json.dump(dataclasses.asdict(meta), f, indent=1)
    if os.path.exists(out_dir):
      trash = staging + ".old"
      os.replace(out_dir, trash)
      os.replace(staging, out_dir)
      shutil.rmtree(trash)
    else:
      os.replace(staging, out_dir)
  finally:
    if os.path.exists(staging):
      shutil.rmtree(staging)
  return meta


def read_sequences(directory: PathLike) -> np.ndarray:
  """All packed rows of a dataset, in order: int32 ``[num_sequences, seq_len]``."""
  meta = Metadata.load(directory)
  return np.concatenate([_read_shard(os.path.join(directory, s["file"]), meta.seq_len)
                         for s in meta.shards])


def _read_shard(path: str, seq_len: int, row_group: int | None = None) -> np.ndarray:
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  f = pq.ParquetFile(path)
  table = f.read(columns=["tokens"]) if row_group is None else f.read_row_group(
      row_group, columns=["tokens"])
  column = table.column("tokens").combine_chunks()
  return column.flatten().to_numpy().astype(np.int32, copy=False).reshape(-1, seq_len)


# ----------------------------------------------------------------------------
# Loading


def _splitmix64(x: np.ndarray) -> np.ndarray:
  x = x + np.uint64(0x9E3779B97F4A7C15)
  x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
  x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
  return x ^ (x >> np.uint64(31))


def epoch_permutation(num_rows: int, seed: int, epoch: int) -> np.ndarray:
  """The row order of one epoch: int64 ``[num_rows]``, a permutation that depends
  only on ``(num_rows, seed, epoch)`` (integer hashing, stable across NumPy
  versions and machines)."""
  with np.errstate(over="ignore"):
    key = _splitmix64(np.array([(seed & (2**64 - 1)) ^ (epoch * 0x632BE59BD9B4E019 % 2**64)],
                               np.uint64))
    keys = _splitmix64(np.arange(num_rows, dtype=np.uint64) ^ key)
  return np.argsort(keys, kind="stable").astype(np.int64)


def segments(tokens: np.ndarray, bos_id: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
  """Document structure of packed rows.

  Args:
    tokens: int32 ``[n, seq_len]``.

  Returns:
    ``segment_ids`` int32 ``[n, seq_len]``: 1, 2, ... per document in a row
    (tokens before the row's first BOS, a document continued from the previous
    row, are segment 1), 0 for padding; ``positions`` int32 ``[n, seq_len]``:
    the offset from the segment's first token in the row (0 for padding).
  """
  tokens = np.asarray(tokens)
  is_bos = tokens == bos_id
  seg = np.cumsum(is_bos, axis=1, dtype=np.int32) + (~is_bos[:, :1]).astype(np.int32)
  index = np.broadcast_to(np.arange(tokens.shape[1], dtype=np.int32), tokens.shape)
  start = np.maximum.accumulate(np.where(is_bos, index, 0), axis=1)
  pos = index - start
  pad = tokens == pad_id
  return np.where(pad, 0, seg).astype(np.int32), np.where(pad, 0, pos).astype(np.int32)


class _RowReader:
  """Reads rows by global index: whole parquet row groups, kept in an LRU cache."""

  def __init__(self, directory: str, meta: Metadata, cache_bytes: int):
    import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
    self.seq_len = meta.seq_len
    self.paths = [os.path.join(directory, s["file"]) for s in meta.shards]
    self.shard_start = np.cumsum([0] + [s["rows"] for s in meta.shards])
    group_rows = []
    for path, shard in zip(self.paths, meta.shards):
      md = pq.read_metadata(path)
      rows = [md.row_group(g).num_rows for g in range(md.num_row_groups)]
      if sum(rows) != shard["rows"]:
        raise ValueError(f"{path} holds {sum(rows)} rows, metadata.json says {shard['rows']}")
      group_rows.append(np.cumsum([0] + rows))
    self.group_start = group_rows
    self.cache: collections.OrderedDict[tuple[int, int], np.ndarray] = collections.OrderedDict()
    self.cache_bytes, self.cached_bytes = cache_bytes, 0
    self.groups_read = 0

  def _group(self, shard: int, group: int) -> np.ndarray:
    key = (shard, group)
    if key in self.cache:
      self.cache.move_to_end(key)
      return self.cache[key]
    rows = _read_shard(self.paths[shard], self.seq_len, group)
    self.groups_read += 1
    self.cache[key] = rows
    self.cached_bytes += rows.nbytes
    while self.cached_bytes > self.cache_bytes and len(self.cache) > 1:
      _, old = self.cache.popitem(last=False)
      self.cached_bytes -= old.nbytes
    return rows

  def read(self, rows: np.ndarray) -> np.ndarray:
    """int32 ``[len(rows), seq_len]`` for global row indices ``rows``."""
    out = np.empty((len(rows), self.seq_len), np.int32)
    shard = np.searchsorted(self.shard_start, rows, side="right") - 1
    local = rows - self.shard_start[shard]
    for i, (s, r) in enumerate(zip(shard, local)):
      g = int(np.searchsorted(self.group_start[s], r, side="right") - 1)
      out[i] = self._group(int(s), g)[r - self.group_start[s][g]]
    return out


class DataLoader:
  """Global batches of a packed dataset, sharded over a mesh's batch axes.

  Each batch is a dict of global ``jax.Array`` s, all int32
  ``[global_batch_size, seq_len]`` with sharding
  ``NamedSharding(mesh, P(batch_axes, None))`` (replicated over the other mesh
  axes): ``tokens``, ``segment_ids`` and ``positions`` (see :func:`segments`).
  Inputs and targets are ``tokens[:, :-1]`` and ``tokens[:, 1:]``.

  Batch ``step`` holds rows ``epoch_permutation(N, seed, e)[k*B:(k+1)*B]`` with
  ``e, k = divmod(step, steps_per_epoch)`` (or the rows in order when
  ``shuffle=False``), so any step can be produced directly: resuming is
  ``iterate(start_step)``. Each process reads only the rows its addressable
  devices hold.

  Args:
    directory: a dataset written by :func:`preprocess`.
    mesh: the device mesh.
    global_batch_size: rows per batch over all processes; a multiple of the
      product of the batch axes' sizes, and at most the dataset's row count.
    batch_axes: mesh axis name(s) that shard the batch dimension.
    seed: the shuffling seed.
    shuffle: permute rows each epoch (else read them in order).
    cache_bytes: host memory for cached parquet row groups.
  """

  def __init__(self, directory: PathLike, mesh, global_batch_size: int, *,
               batch_axes: str | Sequence[str] = "data", seed: int = 0, shuffle: bool = True,
               cache_bytes: int = 256 << 20):
    import jax  # pylint: disable=g-import-not-at-top
    self.directory = os.fspath(directory)
    self.meta = Metadata.load(self.directory)
    axes = (batch_axes,) if isinstance(batch_axes, str) else tuple(batch_axes)
    missing = [a for a in axes if a not in mesh.shape]
    if missing:
      raise ValueError(f"batch_axes {axes}: {missing} not in the mesh's axes "
                       f"{tuple(mesh.shape)}")
    shards = math.prod(mesh.shape[a] for a in axes)
    if global_batch_size < 1 or global_batch_size % shards:
      raise ValueError(f"global_batch_size={global_batch_size} must be a positive multiple of "
                       f"the batch axes' size {shards} (mesh {dict(mesh.shape)}, batch_axes "
                       f"{axes})")
    if global_batch_size > self.meta.num_sequences:
      raise ValueError(f"global_batch_size={global_batch_size} exceeds the dataset's "
                       f"{self.meta.num_sequences} rows ({self.directory}); use a smaller "
                       "batch, a smaller seq_len or a larger corpus")
    self.mesh, self.batch_axes, self.seed, self.shuffle = mesh, axes, int(seed), shuffle
    self.global_batch_size = int(global_batch_size)
    self.sharding = jax.sharding.NamedSharding(
        mesh, jax.sharding.PartitionSpec(axes if len(axes) > 1 else axes[0], None))
    self._reader = _RowReader(self.directory, self.meta, cache_bytes)
    self._perm: tuple[int, np.ndarray] | None = None
    self.last_rows: np.ndarray = np.zeros(0, np.int64)  # rows this process read for the last batch

  @property
  def seq_len(self) -> int:
    return self.meta.seq_len

  @property
  def vocab_size(self) -> int:
    return self.meta.tokenizer["vocab_size"]

  @property
  def num_sequences(self) -> int:
    return self.meta.num_sequences

  @property
  def steps_per_epoch(self) -> int:
    return self.meta.num_sequences // self.global_batch_size

  def rows(self, step: int) -> np.ndarray:
    """Global row indices of batch ``step``: int64 ``[global_batch_size]``."""
    if step < 0:
      raise ValueError(f"step must be >= 0, got {step}")
    epoch, k = divmod(int(step), self.steps_per_epoch)
    b = self.global_batch_size
    if not self.shuffle:
      return np.arange(k * b, (k + 1) * b, dtype=np.int64)
    if self._perm is None or self._perm[0] != epoch:
      self._perm = (epoch, epoch_permutation(self.num_sequences, self.seed, epoch))
    return self._perm[1][k * b:(k + 1) * b]

  def batch(self, step: int) -> dict[str, Any]:
    """Batch ``step`` as global arrays (see the class docstring)."""
    import jax  # pylint: disable=g-import-not-at-top
    rows = self.rows(step)
    shape = (self.global_batch_size, self.seq_len)
    index_map = self.sharding.addressable_devices_indices_map(shape)
    wanted = np.zeros(len(rows), bool)
    for index in index_map.values():
      wanted[index[0]] = True
    local = np.flatnonzero(wanted)  # positions within the batch this process holds
    self.last_rows = rows[local]
    tokens = np.zeros(shape, np.int32)
    tokens[local] = self._reader.read(rows[local])
    segment_ids, positions = np.zeros(shape, np.int32), np.zeros(shape, np.int32)
    tok = self.meta.tokenizer
    segment_ids[local], positions[local] = segments(tokens[local], tok["bos_id"], tok["pad_id"])
    return {name: jax.make_array_from_callback(shape, self.sharding,
                                               lambda index, host=host: host[index])
            for name, host in (("tokens", tokens), ("segment_ids", segment_ids),
                               ("positions", positions))}

  def iterate(self, start_step: int = 0,
              num_steps: int | None = None) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yields ``(step, batch)`` from ``start_step`` on (``num_steps`` of them, or forever)."""
    step = start_step
    while num_steps is None or step < start_step + num_steps:
      yield step, self.batch(step)
      step += 1

  def __iter__(self) -> Iterator[dict[str, Any]]:
    return (batch for _, batch in self.iterate(0))


# ----------------------------------------------------------------------------
# Command line


def _print_summary(meta: Metadata, out_dir: str, show: int) -> None:
  from rich.console import Console  # pylint: disable=g-import-not-at-top
  from rich.table import Table  # pylint: disable=g-import-not-at-top
  table = Table(title=f"dataset {out_dir}")
  table.add_column("what")
  table.add_column("value", justify="right")
  d = meta.documents
  for what, value in (("source files", len(meta.sources)), ("documents read", d["read"]),
                      ("empty", d["empty"]), ("exact duplicates dropped", d["duplicates"]),
                      ("documents kept", d["kept"]), ("bytes kept", d["bytes"]),
                      ("tokenizer", f"{meta.tokenizer['name']} "
                                    f"(vocab {meta.tokenizer['vocab_size']})"),
                      ("tokens", meta.num_tokens), ("seq_len", meta.seq_len),
                      ("sequences", meta.num_sequences), ("shards", len(meta.shards))):
    table.add_row(what, str(value))
  console = Console()
  console.print(table)
  if show and meta.tokenizer["name"] == "bytes":
    rows = read_sequences(out_dir)[:show]
    for i, row in enumerate(rows):
      console.print(f"[bold]row {i}[/bold]: {ByteTokenizer().decode(row)[:200]!r}")


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m pipelines.data",
                                   description=__doc__.split("\n\n", 1)[0])
  parser.add_argument("sources", nargs="*",
                      help="text files, parquet files, directories or globs "
                           "(default: the standard library's .py files)")
  parser.add_argument("--out", required=True, help="dataset directory to write")
  parser.add_argument("--seq-len", type=int, default=256, help="tokens per packed row")
  parser.add_argument("--tokenizer", default="bytes",
                      help="'bytes', a Hugging Face tokenizer.json, or 'module:factory'")
  parser.add_argument("--text-column", default="text", help="document column of parquet files")
  parser.add_argument("--pattern", default="**/*", help="glob for files inside directories")
  parser.add_argument("--no-dedup", action="store_true", help="keep duplicate documents")
  parser.add_argument("--max-documents", type=int, default=None,
                      help="keep only the first N documents after deduplication")
  parser.add_argument("--rows-per-shard", type=int, default=4096)
  parser.add_argument("--overwrite", action="store_true", help="replace an existing dataset")
  parser.add_argument("--show", type=int, default=0, help="print the first N rows, decoded")
  args = parser.parse_args(argv)
  try:
    meta = preprocess(args.sources or None, args.out, seq_len=args.seq_len,
                      tokenizer=args.tokenizer, text_column=args.text_column,
                      pattern=args.pattern, dedup=not args.no_dedup,
                      max_documents=args.max_documents, rows_per_shard=args.rows_per_shard,
                      overwrite=args.overwrite)
  except (FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  _print_summary(meta, args.out, args.show)
  return 0


if __name__ == "__main__":
  sys.exit(main())
