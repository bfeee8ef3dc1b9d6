"""SASRec against a port of RecBole 1.2.1's SASRec (tests/reference/recbole_ports.py).

RecBole pads on the right, we pad on the left: the same sequences must give the same
vectors (positions count from the oldest item on both sides).
"""

import jax
import numpy as np
import pytest
import torch
from flax.core import meta

from parity_utils import random_sequences, t
from recbole_ports import SASRecRef
from slim_jax.recommenders import sasrec


def _copy_linear(torch_linear, p):
  torch_linear.weight.data = t(p["kernel"]).T.contiguous()
  torch_linear.bias.data = t(p["bias"])


def _copy_norm(torch_norm, p):
  torch_norm.weight.data = t(p["scale"])
  torch_norm.bias.data = t(p["bias"])


def to_torch(params, cfg) -> SASRecRef:
  ref = SASRecRef(cfg.num_items + 1, cfg.max_len, cfg.hidden_size, cfg.num_layers,
                  cfg.num_heads, cfg.ffn_size, dropout=0.0, eps=cfg.layer_norm_eps)
  table = np.array(params["item_embedding"]["embedding"])
  table[0] = 0.0
  ref.item_embedding.weight.data = t(table)
  ref.position_embedding.weight.data = t(params["position_embedding"]["embedding"])
  _copy_norm(ref.LayerNorm, params["input_norm"])
  for i, layer in enumerate(ref.layers):
    p = params[f"block_{i}"]
    att = layer.multi_head_attention
    for name in ("query", "key", "value"):
      _copy_linear(getattr(att, name), p[name])
    _copy_linear(att.dense, p["attn_out"])
    _copy_norm(att.LayerNorm, p["attn_norm"])
    _copy_linear(layer.feed_forward.dense_1, p["ffn_in"])
    _copy_linear(layer.feed_forward.dense_2, p["ffn_out"])
    _copy_norm(layer.feed_forward.LayerNorm, p["ffn_norm"])
  return ref.eval()


def _randomize(params, seed):
  """Init leaves biases and norms at 0/1; perturb every leaf so they are all tested."""
  leaves, tree = jax.tree.flatten(params)
  rng = np.random.default_rng(seed)
  return jax.tree.unflatten(tree, [np.asarray(x) + 0.1 * rng.standard_normal(x.shape)
                                   .astype(np.float32) for x in leaves])


@pytest.mark.parametrize("num_layers,num_heads", [(1, 1), (2, 2), (2, 4)])
def test_matches_recbole_port(num_layers, num_heads):
  cfg = sasrec.SASRecConfig(num_items=50, max_len=10, hidden_size=16, num_layers=num_layers,
                            num_heads=num_heads, dropout=0.5)
  model = sasrec.SASRec(cfg)
  left, right, lengths = random_sequences(np.random.default_rng(num_layers * 7 + num_heads),
                                          7, cfg.max_len, 50)
  params = _randomize(meta.unbox(model.init(jax.random.PRNGKey(0), left,
                                            method=model.encode))["params"], 1)
  ours_last = np.asarray(model.apply({"params": params}, left, method=model.encode_last))
  ours_all = np.asarray(model.apply({"params": params}, left, method=model.encode))
  ref = to_torch(params, cfg)
  with torch.no_grad():
    ref_last = ref(torch.tensor(right, dtype=torch.long), torch.tensor(lengths)).numpy()
  np.testing.assert_allclose(ours_last, ref_last, atol=1e-5, rtol=1e-5)
  # Position t is the prefix ending at t, as RecBole's per-prefix training examples.
  b = 0
  for n in range(1, cfg.max_len + 1):
    prefix = np.zeros((1, cfg.max_len), np.int64)
    prefix[0, :n] = right[b, :n]
    with torch.no_grad():
      ref_prefix = ref(torch.tensor(prefix), torch.tensor([n])).numpy()[0]
    np.testing.assert_allclose(ours_all[b, n - 1], ref_prefix, atol=1e-5, rtol=1e-5)


def test_rejects_too_long_sequences():
  cfg = sasrec.SASRecConfig.tiny()
  model = sasrec.SASRec(cfg)
  with pytest.raises(ValueError, match="max_len"):
    model.init(jax.random.PRNGKey(0), np.ones((1, cfg.max_len + 1), np.int32),
               method=model.encode)
