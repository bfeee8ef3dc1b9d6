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
  # a b a a c (left-padded): edges a->b, b->a, a->a, a->c; nodes are first positions.
  x = np.array([[0, 1, 2, 1, 1, 3]])
  nodes = np.asarray(srgnn.node_ids(x))[0]
  np.testing.assert_array_equal(nodes, [6, 1, 2, 1, 1, 5])  # padding: a node of its own
  np.testing.assert_array_equal(np.asarray(srgnn.new_edges(x * 0 + nodes[None]))[0],
                                [False, True, True, True, True])
  edges = np.asarray(srgnn.prefix_adjacency(nodes[None], np.arange(6)))[0]  # [P, N, N]
  expected = [(1, 2), (2, 1), (1, 1), (1, 5)]
  for p in range(6):  # prefix p holds the transitions into positions 2..p
    assert {tuple(e) for e in np.argwhere(edges[p])} == set(expected[:max(p - 1, 0)])
  a_in, a_out = srgnn.normalized_adjacency(edges[-1])
  np.testing.assert_allclose(np.asarray(a_out)[1, [1, 2, 5]], [1 / 3] * 3)  # a: 3 successors
  np.testing.assert_allclose(np.asarray(a_in)[1, [1, 2]], [0.5, 0.5])  # a: from a and b


def test_state_index_reads_each_nodes_latest_event():
  # Each position's event state must carry its node's rows of the prefix graph's
  # normalised adjacency, for every prefix: checked against the dense prefix graphs.
  rng = np.random.default_rng(0)
  x = rng.integers(1, 4, size=(16, 7))  # few items: repeats, self-loops, revisited edges
  x[np.arange(7)[None, :] < rng.integers(0, 7, size=(16, 1))] = 0  # left padding
  nodes = np.asarray(srgnn.node_ids(x))
  edges = np.asarray(srgnn.prefix_adjacency(nodes, np.arange(7)))  # [B, P, N, N]
  m_in, m_out = map(np.asarray, srgnn.event_masks(nodes))  # [B, 2L, T]
  index = np.asarray(srgnn.state_index(nodes, np.arange(7)))  # [B, P, L]
  for b in range(16):
    for p in range(7):
      a_in, a_out = map(np.asarray, srgnn.normalized_adjacency(edges[b, p]))
      for t in range(p + 1):
        if x[b, t] == 0:
          continue
        n, k = nodes[b, t], index[b, p, t]
        # The state's in/out averages over transitions equal node n's rows in prefix p.
        got_in = np.zeros(14)  # padding positions have nodes 7..13, never on an edge
        got_out = np.zeros(14)
        for s in range(6):
          got_in[nodes[b, s]] += m_in[b, k, s]
          got_out[nodes[b, s + 1]] += m_out[b, k, s]
        np.testing.assert_allclose(got_in[:7], a_in[n], atol=1e-6)
        np.testing.assert_allclose(got_out[:7], a_out[n], atol=1e-6)
        assert not got_in[7:].any() and not got_out[7:].any()
