"""slim_jax/encode.py: pooling, folder defaults, bucketing, the cache, and sentence vectors of
all-MiniLM-L6-v2 against sentence-transformers on the same folder."""

from __future__ import annotations

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from slim_jax import encode, row_chunks
from encode_fixtures import minilm_path, tiny_encoder_folder, fixture_records

# Short and long, upper case, punctuation, non-ASCII, empty, and past the 256-token limit.
SENTENCES = [
    "Title: The Legend of Zelda: Breath of the Wild; Brand: Nintendo; Categories: Video "
    "Games, Nintendo Switch, Games",
    "Toy Story (1995); genres: Animation, Children's, Comedy",
    "Organic GREEN TEA, 100 bags -- caffeine free!",
    "Café crème brûlée, naïve résumé: ça marche?",
    "",
    "a",
    "Step 1: The user prefers racing and strategy games. " * 60,
] + [r["response"] for r in fixture_records(5)]


def test_pooling_functions():
  hidden = jnp.asarray(np.arange(2 * 3 * 2, dtype=np.float32).reshape(2, 3, 2))
  mask = jnp.asarray([[1, 1, 0], [1, 0, 0]])
  np.testing.assert_allclose(encode.mean_pool(hidden, mask), [[1, 2], [6, 7]])
  np.testing.assert_allclose(encode.pool(hidden, mask, "cls"), [[0, 1], [6, 7]])
  normed = encode.l2_normalize(jnp.asarray([[3.0, 4.0], [0.0, 0.0]]))
  np.testing.assert_allclose(normed, [[0.6, 0.8], [0.0, 0.0]])
  with pytest.raises(ValueError, match="unknown pooling"):
    encode.pool(hidden, mask, "max")


def test_minilm_folder_defaults(tmp_path):
  d = encode.folder_defaults(minilm_path())
  assert (d.pooling, d.normalize, d.max_length) == ("mean", True, 256)
  assert encode.folder_defaults(str(tmp_path)) == encode.FolderDefaults("mean", False, None)
  (tmp_path / "1_Pooling").mkdir()
  (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps(
      {"pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False}))
  assert encode.folder_defaults(str(tmp_path)).pooling == "cls"
  (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps(
      {"pooling_mode_max_tokens": True}))
  with pytest.raises(ValueError, match="1_Pooling/config.json.*pass --pooling"):
    encode.folder_defaults(str(tmp_path))


def test_buckets_and_batch_plan():
  buckets = encode.bucket_lengths(256)
  assert buckets[:3] == [8, 16, 24] and buckets[-1] == 256 and len(buckets) <= 20
  assert buckets[8:10] == [80, 96]
  assert encode.bucket_lengths(20) == [8, 16, 20]
  assert [encode.batch_rows(n, 64) for n in (64, 63, 33, 32, 5, 1)] == [64, 64, 64, 32, 8, 1]
  lengths = [5, 30, 9, 200, 17, 8]
  plan = encode.plan_batches(lengths, 2, buckets)
  assert [list(i) for i, _ in plan] == [[3, 1], [4, 2], [5, 0]]
  assert [t for _, t in plan] == [208, 24, 8]
  assert sorted(np.concatenate([i for i, _ in plan]).tolist()) == list(range(6))


def test_minilm_matches_sentence_transformers():
  """Pooled, normalised vectors: cosine >= 0.99999 for every sentence, in order."""
  from sentence_transformers import SentenceTransformer
  path = minilm_path()
  ours = encode.TextEncoder(path, batch_size=4)
  assert (ours.pooling, ours.normalize, ours.max_length, ours.dim) == ("mean", True, 256, 384)
  vectors, stats = ours.encode(SENTENCES)
  theirs = SentenceTransformer(path, device="cpu").encode(SENTENCES, batch_size=4,
                                                          convert_to_numpy=True)
  cosine = (vectors * theirs).sum(-1) / (np.linalg.norm(vectors, axis=-1)
                                         * np.linalg.norm(theirs, axis=-1))
  assert cosine.min() >= 0.99999, cosine
  np.testing.assert_allclose(np.linalg.norm(vectors, axis=-1), 1.0, atol=1e-5)
  assert stats.texts == len(SENTENCES) and stats.truncated == 1
  assert stats.padded_tokens >= stats.tokens


@pytest.fixture(scope="module")
def tiny_encoder(tmp_path_factory):
  return encode.TextEncoder(tiny_encoder_folder(str(tmp_path_factory.mktemp("enc"))),
                            batch_size=3)


def test_batching_does_not_change_vectors(tiny_encoder):
  texts = SENTENCES[:6]
  together, _ = tiny_encoder.encode(texts)
  alone = np.concatenate([tiny_encoder.encode([t])[0] for t in texts])
  np.testing.assert_allclose(together, alone, atol=1e-5)
  assert np.abs(together[0] - together[1]).max() > 1e-3  # different texts differ


def test_chunked_batches_give_the_same_vectors(tiny_encoder):
  texts = SENTENCES[:6]
  whole, _ = tiny_encoder.encode(texts)
  chunked = encode.TextEncoder(tiny_encoder.path, batch_size=3, chunk_tokens=8)
  assert row_chunks.chunk_rows(3, chunked.buckets[0], chunked.chunk_tokens) == 1
  vectors, _ = chunked.encode(texts)
  np.testing.assert_allclose(vectors, whole, atol=1e-6)


def test_truncation_is_counted(tiny_encoder):
  ids, truncated = tiny_encoder.tokenize(["short text", "word " * 100])
  assert truncated.tolist() == [False, True]
  assert len(ids[1]) == tiny_encoder.max_length == 24
  assert ids[1][0] == ids[0][0] and ids[1][-1] == ids[0][-1]  # [CLS] ... [SEP] kept
  assert tiny_encoder.count_truncated(["short text", "word " * 100, "x " * 30]) == 2


def test_cache_encodes_only_new_texts(tiny_encoder, tmp_path):
  cache = encode.EmbeddingCache(str(tmp_path / "c"), tiny_encoder.dim, max_chunks=2)
  first, stats = encode.encode_cached(tiny_encoder, cache, ["a b", "c d", "a b"])
  assert stats.texts == 2  # the duplicate is encoded once
  again, stats = encode.encode_cached(tiny_encoder, cache, ["c d", "a b"])
  assert stats.texts == 0
  np.testing.assert_array_equal(again, first[[1, 0]])
  encode.encode_cached(tiny_encoder, cache, ["e"])
  encode.encode_cached(tiny_encoder, cache, ["f"])  # third chunk: merged into one
  assert len(os.listdir(tmp_path / "c")) == 1
  reopened = encode.EmbeddingCache(str(tmp_path / "c"), tiny_encoder.dim)
  assert len(reopened) == 4
  (tmp_path / "c" / "chunk-0-bad.npz").write_bytes(b"not a zip")
  assert len(encode.EmbeddingCache(str(tmp_path / "c"), tiny_encoder.dim)) == 4


def test_encoder_settings_are_checked(tmp_path):
  folder = tiny_encoder_folder(str(tmp_path))
  with pytest.raises(ValueError, match="max_length 100 must be in 3..64"):
    encode.TextEncoder(folder, max_length=100)
  with pytest.raises(ValueError, match="pooling 'max'"):
    encode.TextEncoder(folder, pooling="max")
  cls = encode.TextEncoder(folder, pooling="cls", normalize=False)
  pooler = encode.TextEncoder(folder, pooling="pooler", normalize=False)
  a, b = cls.encode(["one text"])[0], pooler.encode(["one text"])[0]
  assert np.abs(a - b).max() > 1e-3 and np.abs(np.linalg.norm(a) - 1) > 1e-3
  assert cls.cache_key() != pooler.cache_key()
