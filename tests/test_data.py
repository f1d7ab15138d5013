"""pipelines.data: DuckDB preprocessing (dedup, tokenization, packing) and the sharded loader."""

import os
import sys

import jax
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jaxinfra.testing import run_multiprocess

# run_multiprocess workers import this file by path, without conftest: the
# checkout (for `pipelines`) goes at the end of sys.path, as conftest does.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
  sys.path.append(_ROOT)

from pipelines import data  # pylint: disable=g-import-not-at-top,wrong-import-position


def _mesh(shape, names):
  return jax.make_mesh(shape, names, axis_types=(jax.sharding.AxisType.Explicit,) * len(shape))


def _write(path, content: bytes):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "wb") as f:
    f.write(content)


@pytest.fixture()
def corpus(tmp_path):
  """A corpus with exact duplicates (across files and parquet rows), near
  duplicates, empty documents, NULLs and bytes that are not UTF-8. Returns the
  sources (in order) and every document of it in corpus order (None: NULL)."""
  rng = np.random.default_rng(0)
  text_dir = tmp_path / "text"
  files = {
      "a.txt": b"def f(x):\n    return x + 1\n",
      "b.txt": b"def f(x):\n    return x + 1\n",        # duplicate of a
      "c.txt": b"def f(x):\n    return x + 1\n ",       # one byte more: not a duplicate
      "d.txt": b"",                                      # empty
      "e.txt": bytes(rng.integers(0, 256, 300, dtype=np.uint8)),  # binary, invalid UTF-8
      "sub/f.txt": "caf\u00e9 \u2603 na\u00efve\n".encode(),
      "sub/g.txt": b"def f(x):\n    return x + 1\n",    # duplicate of a, in a subdirectory
  }
  for name, content in files.items():
    _write(str(text_dir / name), content)
  parquet_path = str(tmp_path / "rows.parquet")
  rows = ["caf\u00e9 \u2603 na\u00efve\n", "second row", None, "", "second row",
          "def f(x):\n    return x + 1\n", "third\trow\n" * 20]
  pq.write_table(pa.table({"id": list(range(len(rows))), "text": rows}), parquet_path,
                 row_group_size=3)
  documents = [files[n] for n in sorted(files)]  # directory sources are sorted
  documents += [None if r is None else r.encode() for r in rows]
  return [str(text_dir), parquet_path], documents


def _reference_documents(documents, dedup=True):
  """Plain Python: non-empty documents, first occurrence of each kept."""
  seen, kept = set(), []
  for doc in documents:
    if not doc or (dedup and doc in seen):
      continue
    seen.add(doc)
    kept.append(doc)
  return kept


def _stream(directory):
  """The packed rows (read with pyarrow, not the module's reader) and their
  concatenation without the tail padding."""
  meta = data.Metadata.load(directory)
  rows = np.concatenate([
      np.asarray(pq.read_table(os.path.join(directory, s["file"])).column("tokens")
                 .to_pylist(), np.int64).reshape(-1, meta.seq_len) for s in meta.shards])
  flat = rows.reshape(-1)
  end = len(flat)
  while end and flat[end - 1] == meta.tokenizer["pad_id"]:
    end -= 1
  return rows, flat[:end]


def _split_documents(stream, bos, eos):
  """Documents of a BOS doc EOS BOS doc EOS ... stream; asserts its structure."""
  docs, i = [], 0
  while i < len(stream):
    assert stream[i] == bos, f"expected BOS at {i}, got {stream[i]}"
    j = i + 1
    while stream[j] != eos:
      assert stream[j] != bos, f"BOS inside a document at {j}"
      j += 1
    docs.append(stream[i + 1:j])
    i = j + 1
  return docs


@pytest.mark.parametrize("dedup", [True, False])
def test_dedup_matches_python_reference(corpus, tmp_path, dedup):
  sources, documents = corpus
  out = tmp_path / "ds"
  meta = data.preprocess(sources, out, seq_len=16, dedup=dedup, progress=False)
  expected = _reference_documents(documents, dedup)
  _, stream = _stream(out)
  got = [bytes(d.astype(np.uint8)) for d in _split_documents(stream, data.BOS_ID, data.EOS_ID)]
  assert got == expected
  assert meta.documents["read"] == len(documents)
  assert meta.documents["empty"] == sum(1 for d in documents if not d)
  assert meta.documents["kept"] == len(expected)
  assert meta.documents["duplicates"] == len(documents) - meta.documents["empty"] - len(expected)
  assert meta.documents["bytes"] == sum(len(d) for d in expected)
  if dedup:
    assert meta.documents["duplicates"] == 5


def test_byte_tokenizer_round_trip():
  tok = data.ByteTokenizer()
  rng = np.random.default_rng(1)
  for raw in (bytes(range(256)), bytes(rng.integers(0, 256, 1000, dtype=np.uint8)), b""):
    ids = tok.encode(raw)
    assert ids.dtype == np.int32 and ids.shape == (len(raw),)
    np.testing.assert_array_equal(ids, list(raw))
    assert tok.decode(ids) == raw
    # Special tokens are not bytes: decode drops them.
    assert tok.decode(np.concatenate([[data.BOS_ID], ids, [data.EOS_ID, data.PAD_ID]])) == raw
  text = "na\u00efve \u2603"
  assert tok.decode(tok.encode(text)).decode("utf-8") == text
  assert (tok.vocab_size, tok.pad_id, tok.bos_id, tok.eos_id) == (259, 256, 257, 258)
  with pytest.raises(ValueError, match="ids must be in"):
    tok.decode([300])


def _word_tokenizer():
  """A supplied tokenizer: whitespace words from a fixed vocabulary, 0 = unknown."""
  words = ["<pad>", "<s>", "</s>", "<unk>", "def", "f(x):", "return", "x", "+", "1", "second",
           "row"]
  index = {w: i for i, w in enumerate(words)}
  return data.FunctionTokenizer(
      lambda text: [index.get(w, 3) for w in text.split()], vocab_size=len(words), pad_id=0,
      bos_id=1, eos_id=2, name="words", decode=lambda ids: " ".join(words[i] for i in ids))


def test_supplied_tokenizer(tmp_path):
  tok = _word_tokenizer()
  docs = ["def f(x): return x + 1", "second row", "def f(x): return x + 1", "unknown words"]
  pq.write_table(pa.table({"text": docs}), tmp_path / "c.parquet")
  data.preprocess(tmp_path / "c.parquet", tmp_path / "ds", seq_len=5, tokenizer=tok,
                  progress=False)
  meta = data.Metadata.load(tmp_path / "ds")
  assert meta.tokenizer == {"name": "words", "vocab_size": 12, "pad_id": 0, "bos_id": 1,
                            "eos_id": 2}
  _, stream = _stream(tmp_path / "ds")
  expected = []
  for doc in _reference_documents([d.encode() for d in docs]):
    expected += [1] + tok.encode(doc).tolist() + [2]
  np.testing.assert_array_equal(stream, expected)
  assert tok.decode(tok.encode("def f(x): row")) == "def f(x): row"
  # A text tokenizer needs UTF-8: an undecodable document is an error, not mangled.
  _write(str(tmp_path / "bad" / "x.txt"), b"\xff\xfe def")
  with pytest.raises(ValueError, match="not valid UTF-8"):
    data.preprocess(tmp_path / "bad", tmp_path / "ds2", seq_len=5, tokenizer=tok, progress=False)
  assert not os.path.exists(tmp_path / "ds2")
  out_of_range = data.FunctionTokenizer(lambda t: [99], vocab_size=10, pad_id=0, bos_id=1,
                                        eos_id=2)
  with pytest.raises(ValueError, match="outside its vocabulary"):
    data.preprocess(tmp_path / "c.parquet", tmp_path / "ds3", seq_len=5, tokenizer=out_of_range,
                    progress=False)
  with pytest.raises(ValueError, match="must differ"):
    data.FunctionTokenizer(lambda t: [], vocab_size=10, pad_id=0, bos_id=0, eos_id=2)


def test_load_tokenizer_from_module():
  tok = data.load_tokenizer("pipelines.data:ByteTokenizer")
  assert isinstance(tok, data.ByteTokenizer)
  with pytest.raises(ValueError, match="module:factory"):
    data.load_tokenizer("nonsense")


def test_hf_tokenizer_json(tmp_path):
  tokenizers = pytest.importorskip("tokenizers")
  vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "[UNK]": 3, "hello": 4, "world": 5}
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  tok.save(str(tmp_path / "tokenizer.json"))
  loaded = data.load_tokenizer(str(tmp_path / "tokenizer.json"))
  assert (loaded.vocab_size, loaded.pad_id, loaded.bos_id, loaded.eos_id) == (6, 0, 1, 2)
  np.testing.assert_array_equal(loaded.encode(b"hello world again"), [4, 5, 3])


@pytest.mark.parametrize("seq_len,rows_per_shard,rows_per_group", [(7, 3, 2), (64, 4096, 64)])
def test_packing(corpus, tmp_path, seq_len, rows_per_shard, rows_per_group):
  sources, documents = corpus
  out = tmp_path / "ds"
  meta = data.preprocess(sources, out, seq_len=seq_len, rows_per_shard=rows_per_shard,
                         rows_per_group=rows_per_group, progress=False)
  expected = []
  for doc in _reference_documents(documents):
    expected += [data.BOS_ID] + list(doc) + [data.EOS_ID]
  rows, stream = _stream(out)
  # Every token once, in order; rows of seq_len; padding only after the last token.
  assert rows.shape == (-(-len(expected) // seq_len), seq_len)
  np.testing.assert_array_equal(stream, expected)
  assert np.all(rows.reshape(-1)[len(expected):] == data.PAD_ID)
  assert meta.num_tokens == len(expected) and meta.num_sequences == len(rows)
  assert [s["rows"] for s in meta.shards] == [
      min(rows_per_shard, len(rows) - i) for i in range(0, len(rows), rows_per_shard)]
  np.testing.assert_array_equal(data.read_sequences(out), rows)
  # The loader's reader (row groups, cache) returns the same rows.
  reader = data._RowReader(str(out), meta, cache_bytes=1)  # pylint: disable=protected-access
  order = np.random.default_rng(0).permutation(len(rows))
  np.testing.assert_array_equal(reader.read(order), rows[order])


def test_max_documents_and_reuse(corpus, tmp_path):
  sources, documents = corpus
  out = tmp_path / "ds"
  data.preprocess(sources, out, seq_len=8, max_documents=2, progress=False)
  _, stream = _stream(out)
  got = [bytes(d.astype(np.uint8)) for d in _split_documents(stream, data.BOS_ID, data.EOS_ID)]
  assert got == _reference_documents(documents)[:2]
  # Same settings: the existing dataset is returned untouched; other settings: an error.
  mtime = os.path.getmtime(out / "metadata.json")
  data.preprocess(sources, out, seq_len=8, max_documents=2, progress=False)
  assert os.path.getmtime(out / "metadata.json") == mtime
  with pytest.raises(ValueError, match="other settings"):
    data.preprocess(sources, out, seq_len=16, progress=False)
  meta = data.preprocess(sources, out, seq_len=16, overwrite=True, progress=False)
  assert meta.seq_len == 16 and data.Metadata.load(out).seq_len == 16


def test_default_corpus_is_stdlib():
  files = data.default_corpus()
  assert len(files) > 100 and all(f.endswith(".py") for f in files)
  assert any(f.endswith(os.path.join("json", "decoder.py")) for f in files)
  assert not any("site-packages" in f.split(os.sep) for f in files)


def test_bad_input_fails_before_reading(tmp_path, monkeypatch):
  import duckdb  # pylint: disable=g-import-not-at-top

  def no_duckdb(*args, **kwargs):
    raise AssertionError("DuckDB started on bad input")

  monkeypatch.setattr(duckdb, "connect", no_duckdb)
  out = tmp_path / "ds"
  with pytest.raises(FileNotFoundError, match="does not exist"):
    data.preprocess(tmp_path / "missing", out, seq_len=8)
  with pytest.raises(FileNotFoundError, match="matches no file"):
    data.preprocess(str(tmp_path / "*.nothing"), out, seq_len=8)
  (tmp_path / "emptydir").mkdir()
  with pytest.raises(ValueError, match="contains no files"):
    data.preprocess(tmp_path / "emptydir", out, seq_len=8)
  _write(str(tmp_path / "empty" / "a.txt"), b"")
  pq.write_table(pa.table({"text": pa.array([], pa.string())}), tmp_path / "empty" / "b.parquet")
  with pytest.raises(ValueError, match="corpus is empty"):
    data.preprocess(tmp_path / "empty", out, seq_len=8)
  _write(str(tmp_path / "ok" / "a.txt"), b"hello")
  for seq_len in (1, 0, -3, 2.5):
    with pytest.raises(ValueError, match="seq_len must be an integer >= 2"):
      data.preprocess(tmp_path / "ok", out, seq_len=seq_len)
  pq.write_table(pa.table({"body": ["x"]}), tmp_path / "nocol.parquet")
  with pytest.raises(ValueError, match="has no column 'text'"):
    data.preprocess(tmp_path / "nocol.parquet", out, seq_len=8)
  assert not os.path.exists(out)


def test_empty_documents_only(tmp_path):
  pq.write_table(pa.table({"text": ["", None, ""]}), tmp_path / "a.parquet")
  with pytest.raises(ValueError, match="all 3 documents are empty"):
    data.preprocess(tmp_path / "a.parquet", tmp_path / "ds", seq_len=8, progress=False)
  assert not os.path.exists(tmp_path / "ds")


def test_cli(corpus, tmp_path, capsys):
  sources, _ = corpus
  assert data.main([*sources, "--out", str(tmp_path / "ds"), "--seq-len", "32", "--show", "1"]) == 0
  assert "documents kept" in capsys.readouterr().out
  assert data.main([str(tmp_path / "missing"), "--out", str(tmp_path / "x")]) == 2
  assert "does not exist" in capsys.readouterr().err


@pytest.fixture()
def dataset(tmp_path):
  """~40 rows of 32 tokens from three stdlib modules."""
  import json as json_module  # pylint: disable=g-import-not-at-top
  root = os.path.dirname(json_module.__file__)
  data.preprocess([os.path.join(root, "decoder.py"), os.path.join(root, "encoder.py")],
                  tmp_path / "ds", seq_len=32, rows_per_shard=128, rows_per_group=16,
                  progress=False)
  return str(tmp_path / "ds")


def _segments_reference(row, bos, pad):
  seg, pos, s, start = [], [], 0 if row[0] == bos else 1, 0
  for i, t in enumerate(row):
    if t == bos:
      s, start = s + 1, i
    seg.append(0 if t == pad else s)
    pos.append(0 if t == pad else i - start)
  return seg, pos


@pytest.mark.parametrize("shape,names,batch_axes", [
    ((4, 2), ("data", "pipe"), "data"),
    ((2, 4), ("data", "expert"), ("data", "expert")),
    ((8,), ("data",), "data"),
])
def test_loader_sharding(dataset, shape, names, batch_axes):
  mesh = _mesh(shape, names)
  loader = data.DataLoader(dataset, mesh, 16, batch_axes=batch_axes, seed=3)
  rows, _ = _stream(dataset)
  assert loader.seq_len == 32 and loader.vocab_size == 259
  spec = jax.sharding.PartitionSpec(batch_axes, None)
  for step in (0, 1, loader.steps_per_epoch + 1):
    batch = loader.batch(step)
    expected = rows[loader.rows(step)]
    for name in ("tokens", "segment_ids", "positions"):
      array = batch[name]
      assert array.shape == (16, 32) and array.dtype == np.int32
      assert array.sharding == jax.sharding.NamedSharding(mesh, spec)
    for shard in batch["tokens"].addressable_shards:
      np.testing.assert_array_equal(np.asarray(shard.data), expected[shard.index])
    np.testing.assert_array_equal(np.asarray(batch["tokens"]), expected)
    for r, row in enumerate(expected):
      seg, pos = _segments_reference(row.tolist(), data.BOS_ID, data.PAD_ID)
      np.testing.assert_array_equal(np.asarray(batch["segment_ids"])[r], seg)
      np.testing.assert_array_equal(np.asarray(batch["positions"])[r], pos)


def test_loader_determinism_and_resume(dataset):
  mesh = _mesh((8,), ("data",))
  loader = data.DataLoader(dataset, mesh, 8, seed=7)
  n, spe = loader.num_sequences, loader.steps_per_epoch
  assert spe == n // 8
  run = [np.asarray(b["tokens"]) for _, b in loader.iterate(0, 2 * spe + 1)]
  # A fresh loader resuming at step k gives exactly the uninterrupted run's batches.
  resumed = data.DataLoader(dataset, mesh, 8, seed=7)
  for step, batch in resumed.iterate(spe - 1, 3):
    np.testing.assert_array_equal(np.asarray(batch["tokens"]), run[step])
  # Each epoch visits distinct rows (a permutation); epochs and seeds differ in order.
  epoch0 = np.concatenate([loader.rows(s) for s in range(spe)])
  epoch1 = np.concatenate([loader.rows(s) for s in range(spe, 2 * spe)])
  assert len(set(epoch0.tolist())) == spe * 8 and len(set(epoch1.tolist())) == spe * 8
  assert sorted(data.epoch_permutation(n, 7, 0).tolist()) == list(range(n))
  assert not np.array_equal(epoch0, epoch1)
  other = data.DataLoader(dataset, mesh, 8, seed=8)
  assert not np.array_equal(other.rows(0), loader.rows(0))
  ordered = data.DataLoader(dataset, mesh, 8, shuffle=False)
  np.testing.assert_array_equal(ordered.rows(1), np.arange(8, 16))
  np.testing.assert_array_equal(np.asarray(ordered.batch(1)["tokens"]),
                                data.read_sequences(dataset)[8:16])
  # Integer hashing, not a NumPy generator: pinned values stay valid across versions.
  assert data.epoch_permutation(10, 0, 0).tolist() == [1, 4, 5, 7, 6, 9, 0, 3, 2, 8]
  assert data.epoch_permutation(10, 0, 1).tolist() == [2, 6, 9, 0, 5, 7, 1, 4, 3, 8]


def test_loader_bad_arguments(dataset, tmp_path):
  mesh = _mesh((4, 2), ("data", "pipe"))
  with pytest.raises(ValueError, match="multiple of the batch axes' size 4"):
    data.DataLoader(dataset, mesh, 6)
  with pytest.raises(ValueError, match=r"\['expert'\] not in the mesh"):
    data.DataLoader(dataset, mesh, 8, batch_axes=("data", "expert"))
  with pytest.raises(ValueError, match="exceeds the dataset"):
    data.DataLoader(dataset, mesh, 4096)
  with pytest.raises(FileNotFoundError, match="metadata.json does not exist"):
    data.DataLoader(tmp_path / "nothing", mesh, 8)
  with pytest.raises(ValueError, match="step must be >= 0"):
    data.DataLoader(dataset, mesh, 8).batch(-1)


def _two_process_loader(directory):
  """One process of 2 x 4 CPU devices: its shards of three batches on two meshes."""
  from pipelines import data as data_lib  # pylint: disable=g-import-not-at-top,reimported
  import jax as jax_lib  # pylint: disable=g-import-not-at-top,reimported
  out = {}
  for name, shape, names in (("data8", (8,), ("data",)), ("pipe2", (2, 4), ("pipe", "data"))):
    mesh = jax_lib.make_mesh(shape, names,
                             axis_types=(jax_lib.sharding.AxisType.Explicit,) * len(shape))
    loader = data_lib.DataLoader(directory, mesh, 16, batch_axes="data", seed=5)
    steps = []
    for step, batch in loader.iterate(2, 3):
      shards = [{"rows": [s.index[0].start, s.index[0].stop],
                 "tokens": np.asarray(s.data).tolist()}
                for s in batch["tokens"].addressable_shards]
      steps.append({"step": step, "read": sorted(loader.last_rows.tolist()), "shards": shards})
    out[name] = steps
  return out


@pytest.mark.multiprocess
def test_loader_two_processes(dataset):
  results = run_multiprocess(_two_process_loader, num_processes=2, devices_per_process=4,
                             args=[dataset])
  reference = data.DataLoader(dataset, _mesh((8,), ("data",)), 16, seed=5)
  rows = data.read_sequences(dataset)
  for name in ("data8", "pipe2"):
    for k, step in enumerate(range(2, 5)):
      batch_rows = reference.rows(step)
      reads = [set(r[name][k]["read"]) for r in results]
      for result in results:
        got = result[name][k]
        assert got["step"] == step
        for shard in got["shards"]:
          lo, hi = shard["rows"]
          np.testing.assert_array_equal(shard["tokens"], rows[batch_rows[lo:hi]])
        # A process reads exactly the rows its devices hold.
        held = {int(r) for s in got["shards"] for r in batch_rows[s["rows"][0]:s["rows"][1]]}
        assert set(got["read"]) == held
      if name == "data8":  # the batch is split between the processes
        assert reads[0].isdisjoint(reads[1]) and reads[0] | reads[1] == set(batch_rows.tolist())
      else:  # each process holds one pipe stage: the whole batch
        assert reads[0] == reads[1] == set(batch_rows.tolist())
