"""SR-GNN against a port of RecBole 1.2.1's SR-GNN, whose session graph is built in numpy."""

import jax
import numpy as np
import pytest
import torch
from flax.core import meta

from parity_utils import random_sequences, t
from recbole_ports import SRGNNRef
from slim_jax.recommenders import srgnn


def to_torch(params, cfg) -> SRGNNRef:
  ref = SRGNNRef(cfg.num_items + 1, cfg.hidden_size, cfg.num_layers)
  ref.item_embedding.weight.data = t(params["item_embedding"]["embedding"])
  g = params["gnn"]
  for name in ("w_ih", "w_hh"):
    getattr(ref.gnn, name).data = t(g[name]).T.contiguous()
  for name in ("b_ih", "b_hh", "b_iah", "b_ioh"):
    getattr(ref.gnn, name).data = t(g[name])
  for torch_name, ours in (("linear_edge_in", g["edge_in"]), ("linear_edge_out", g["edge_out"]),
                           ("linear_one", params["linear_one"]),
                           ("linear_two", params["linear_two"]),
                           ("linear_three", params["linear_three"]),
                           ("linear_transform", params["linear_transform"])):
    module = getattr(ref.gnn, torch_name, None) or getattr(ref, torch_name)
    module.weight.data = t(ours["kernel"]).T.contiguous()
    if "bias" in ours:
      module.bias.data = t(ours["bias"])
  return ref.eval()


def _randomize(params, seed):
  leaves, tree = jax.tree.flatten(params)
  rng = np.random.default_rng(seed)
  return jax.tree.unflatten(tree, [np.asarray(x) + 0.1 * rng.standard_normal(x.shape)
                                   .astype(np.float32) for x in leaves])


@pytest.mark.parametrize("steps", [1, 2])
def test_matches_recbole_port(steps):
  cfg = srgnn.SRGNNConfig(num_items=12, max_len=9, hidden_size=16, num_layers=steps)
  model = srgnn.SRGNN(cfg)
  # Few items, so sequences repeat items and revisit edges.
  left, right, lengths = random_sequences(np.random.default_rng(steps), 8, cfg.max_len, 12)
  params = _randomize(meta.unbox(model.init(jax.random.PRNGKey(0), left,
                                            method=model.encode))["params"], 2)
  ours_last = np.asarray(model.apply({"params": params}, left, method=model.encode_last))
  ours_all = np.asarray(model.apply({"params": params}, left, method=model.encode))
  ref = to_torch(params, cfg)
  with torch.no_grad():
    ref_last = ref(torch.tensor(right, dtype=torch.long), torch.tensor(lengths)).numpy()
  np.testing.assert_allclose(ours_last, ref_last, atol=1e-5, rtol=1e-5)
  for b in range(2):
    n_b = lengths[b]
    for n in range(1, n_b + 1):
      prefix = np.zeros((1, cfg.max_len), np.int64)
      prefix[0, :n] = right[b, :n]
      with torch.no_grad():
        ref_prefix = ref(torch.tensor(prefix), torch.tensor([n])).numpy()[0]
      np.testing.assert_allclose(ours_all[b, cfg.max_len - n_b + n - 1], ref_prefix,
                                 atol=1e-5, rtol=1e-5)


def test_session_graph_edges():
  # a b a a c (left-padded): edges a->b, b->a, a->a, a->c; slots are first positions.
  x = np.array([[0, 1, 2, 1, 1, 3]])
  slots, transitions = srgnn.session_graph(x)
  first = np.asarray(slots[0]).argmax(-1)
  np.testing.assert_array_equal(first[1:], [1, 2, 1, 1, 5])
  assert np.asarray(slots[0, 0]).sum() == 0  # padding maps to no node
  edges = np.asarray(transitions[0].sum(0) > 0)
  expected = {(1, 2), (2, 1), (1, 1), (1, 5)}
  assert {tuple(e) for e in np.argwhere(edges)} == expected
  a_in, a_out = srgnn.normalized_adjacency(edges.astype(np.float32))
  np.testing.assert_allclose(np.asarray(a_out)[1, [1, 2, 5]], [1 / 3] * 3)  # a: 3 successors
  np.testing.assert_allclose(np.asarray(a_in)[1, [1, 2]], [0.5, 0.5])  # a: from a and b
