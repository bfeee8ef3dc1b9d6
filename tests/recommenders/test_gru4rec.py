"""GRU4Rec against torch.nn.GRU (bias=False, as RecBole) with the same weights."""

import jax
import numpy as np
import pytest
import torch
from flax.core import meta

from parity_utils import random_sequences, t
from slim_jax.recommenders import gru4rec


def _torch_gru4rec(params, cfg):
  p = params["params"]
  gru = torch.nn.GRU(cfg.hidden_size, cfg.hidden_size, num_layers=cfg.num_layers, bias=False,
                     batch_first=True)
  for i in range(cfg.num_layers):
    getattr(gru, f"weight_ih_l{i}").data = t(p[f"gru_{i}"]["kernel_i"]).T.contiguous()
    getattr(gru, f"weight_hh_l{i}").data = t(p[f"gru_{i}"]["kernel_h"]).T.contiguous()
  dense = torch.nn.Linear(cfg.hidden_size, cfg.hidden_size)
  dense.weight.data = t(p["dense"]["kernel"]).T.contiguous()
  dense.bias.data = t(p["dense"]["bias"])
  emb = torch.nn.Embedding(cfg.num_items + 1, cfg.hidden_size, padding_idx=0)
  table = np.array(p["item_embedding"]["embedding"])
  table[0] = 0.0
  emb.weight.data = t(table)
  return emb, gru, dense


@pytest.mark.parametrize("num_layers", [1, 2])
def test_matches_torch_gru(num_layers):
  cfg = gru4rec.GRU4RecConfig(num_items=40, max_len=9, hidden_size=12, num_layers=num_layers,
                              dropout=0.3)
  model = gru4rec.GRU4Rec(cfg)
  left, right, lengths = random_sequences(np.random.default_rng(0), 6, cfg.max_len, 40)
  params = meta.unbox(model.init(jax.random.PRNGKey(1), left, method=model.encode))
  ours_last = np.asarray(model.apply(params, left, method=model.encode_last))
  ours_all = np.asarray(model.apply(params, left, method=model.encode))

  emb, gru, dense = _torch_gru4rec(params, cfg)
  with torch.no_grad():
    out = dense(gru(emb(torch.tensor(right, dtype=torch.long)))[0]).numpy()  # [B, L, D]
  ref_last = out[np.arange(len(lengths)), lengths - 1]
  np.testing.assert_allclose(ours_last, ref_last, atol=1e-5, rtol=1e-5)
  # Position t of the left-padded input is the prefix ending at t.
  for b, n in enumerate(lengths):
    np.testing.assert_allclose(ours_all[b, cfg.max_len - n:], out[b, :n], atol=1e-5, rtol=1e-5)


def test_dropout_only_in_training():
  cfg = gru4rec.GRU4RecConfig.tiny()
  model = gru4rec.GRU4Rec(cfg)
  x = np.array([[0, 0, 1, 2, 3, 4, 5, 6]])
  params = model.init(jax.random.PRNGKey(0), x, method=model.encode)
  a = model.apply(params, x, method=model.encode_last)
  b = model.apply(params, x, method=model.encode_last)
  c = model.apply(params, x, False, method=model.encode_last,
                  rngs={"dropout": jax.random.PRNGKey(3)})
  np.testing.assert_array_equal(a, b)
  assert np.abs(np.asarray(a) - np.asarray(c)).max() > 1e-4
