"""SR-GNN (Wu et al., AAAI 2019) as RecBole 1.2.1 builds it, with the graph built in jnp.

Each sequence becomes a directed session graph: one node per distinct item, an edge u->v
when v directly follows u (set once however often it repeats). The incoming and outgoing
adjacency matrices are row-normalised by in- and out-degree. A gated graph network
(`num_layers` steps of a gated cell) updates node vectors; each position takes its item's
node vector; a soft attention over the positions, queried by the last item, plus the last
item itself, go through a linear transform to the sequence vector.

RecBole builds the graph in numpy on the host with `np.unique`. Here node n is the
position where its item first appears (`node_ids`), so no unique/sort is needed and
padding on either side gives the same result; the GNN is equivariant to node order, so
this equals RecBole's sorted-unique layout (tested against a port in tests/reference/).

`encode` gives one vector per prefix, position t standing for the graph of items 0..t,
exactly what RecBole computes when it trains on each prefix as its own example. Running
L graphs of L nodes per sequence costs O(L^2 D^2); instead, the first GNN step is taken
only where a node's state can change. Adding prefix q's transition (q-1 -> q) changes
only two nodes, those of positions q and q-1, so the first step has 2L distinct node
states per sequence (`event_masks`): state q is node(q) after prefix q, state L + q
node(q-1) after prefix q. Node n's state in prefix p is then the state of the latest
q <= p that touched n (`state_index`). The readout of all L prefixes reads those states
by index: O(L D^2 + L^2 D) per sequence. Further GNN steps (num_layers > 1) mix
neighbours' states, which break this sharing; they run densely per prefix from there.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import linen as nn

from slim_jax.models.layers import Linear
from slim_jax.recommenders.backbone import input_vectors, masked_item_table, padding_mask


@dataclasses.dataclass(frozen=True)
class SRGNNConfig:
  num_items: int  # V; the table has V + 1 rows (0 = padding)
  max_len: int = 50
  hidden_size: int = 64
  num_layers: int = 1  # GNN steps (RecBole's `step`)
  dropout: float = 0.0  # RecBole's SR-GNN has none; kept for a uniform interface

  @classmethod
  def tiny(cls, num_items: int = 30) -> "SRGNNConfig":
    return cls(num_items=num_items, max_len=8, hidden_size=16, num_layers=2)

  @property
  def init(self):
    return _uniform(1.0 / math.sqrt(self.hidden_size))  # RecBole: every weight U(-stdv, stdv)


def _uniform(stdv: float):
  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -stdv, stdv)
  return init


# ----------------------------------------------------------------- graph from item ids


def node_ids(inputs: jnp.ndarray) -> jnp.ndarray:
  """inputs [B, L] -> [B, L] int32: the node of each position.

  A real position's node is the first position holding the same item (0..L-1); padding
  position t gets node L + t, a node of its own that no edge reaches.
  """
  l = inputs.shape[1]
  mask = padding_mask(inputs)  # [B, L]
  same = (inputs[:, :, None] == inputs[:, None, :]) & mask[:, None, :]  # [B, T, S]
  first = jnp.argmax(same, axis=-1).astype(jnp.int32)  # [B, L]
  return jnp.where(mask, first, l + jnp.arange(l, dtype=jnp.int32))


def new_edges(nodes: jnp.ndarray) -> jnp.ndarray:
  """nodes [B, L] -> [B, L-1] bool: transition t (node[t] -> node[t+1]) is a real edge
  seen for the first time (edges form a set: a repeated transition adds nothing)."""
  l = nodes.shape[1]
  src, dst = nodes[:, :-1], nodes[:, 1:]  # [B, T]
  real = (src < l) & (dst < l)
  same = (src[:, :, None] == src[:, None, :]) & (dst[:, :, None] == dst[:, None, :])
  earlier = jnp.tril(jnp.ones((l - 1, l - 1), bool), k=-1)  # [T, T'] t' < t
  seen = jnp.any(same & earlier[None] & real[:, None, :], axis=-1)
  return real & ~seen


def prefix_adjacency(nodes: jnp.ndarray, prefixes: jnp.ndarray) -> jnp.ndarray:
  """nodes [B, L], prefixes [P] -> edges [B, P, L, L] in {0,1}, u->v, of each prefix graph.

  Prefix p holds positions 0..p, hence transitions t with t + 1 <= p.
  """
  l = nodes.shape[1]
  onehot = jax.nn.one_hot(nodes, l, dtype=jnp.float32)  # [B, L, N]; padding nodes: zeros
  live = new_edges(nodes)[:, None, :] & (jnp.arange(l - 1)[None, :] < prefixes[:, None])[None]
  return jnp.einsum("bpt,btu,btv->bpuv", live.astype(jnp.float32), onehot[:, :-1],
                    onehot[:, 1:])


def normalized_adjacency(edges: jnp.ndarray):
  """edges [..., N, N] in {0,1} (u->v) -> (A_in, A_out) [..., N, N], RecBole's normalisation.

  A_in[i, j] = edge(j->i) / max(indeg(i), 1)   mean over i's predecessors
  A_out[i, j] = edge(i->j) / max(outdeg(i), 1) mean over i's successors
  """
  edges_in = jnp.swapaxes(edges, -1, -2)
  a_in = edges_in / jnp.maximum(edges_in.sum(-1, keepdims=True), 1.0)
  a_out = edges / jnp.maximum(edges.sum(-1, keepdims=True), 1.0)
  return a_in, a_out


def event_masks(nodes: jnp.ndarray):
  """nodes [B, L] -> (A_in, A_out) [B, 2L, L-1], the messages of the 2L event states.

  State k < L is node(k) after prefix k; state L + q is node(q - 1) after prefix q (state
  L + 0 is a placeholder no position reads). A_in[k, t] averages over the new edges t
  (t + 1 <= prefix) that enter the state's node, A_out[k, t] over those that leave it.
  """
  l = nodes.shape[1]
  owners = jnp.concatenate([nodes, jnp.roll(nodes, 1, axis=1)], axis=1)  # [B, 2L]
  prefix = jnp.tile(jnp.arange(l), 2)  # [2L]
  live = new_edges(nodes)[:, None, :] & (jnp.arange(l - 1)[None, :] < prefix[:, None])[None]
  enters = live & (nodes[:, None, 1:] == owners[:, :, None])  # [B, 2L, T]
  leaves = live & (nodes[:, None, :-1] == owners[:, :, None])

  def mean(m):
    m = m.astype(jnp.float32)
    return m / jnp.maximum(m.sum(-1, keepdims=True), 1.0)

  return mean(enters), mean(leaves)


def state_index(nodes: jnp.ndarray, prefixes: jnp.ndarray) -> jnp.ndarray:
  """nodes [B, L], prefixes [P] -> [B, P, L] int32: the event state (of `event_masks`)
  holding position t's node after prefix p, for t <= p (other entries are arbitrary)."""
  l = nodes.shape[1]
  q = jnp.arange(l)[None, :, None]  # event prefix q, against position t
  as_new = nodes[:, :, None] == nodes[:, None, :]  # [B, Q, T]: node(q) is node(t)
  prev = jnp.roll(nodes, 1, axis=1)
  as_prev = (prev[:, :, None] == nodes[:, None, :]) & (q >= 1)  # node(q - 1) is node(t)
  # Latest touching q, state q preferred to state L + q (both are the node after prefix q).
  key = jnp.where(as_new, 2 * q + 1, jnp.where(as_prev, 2 * q, -1))  # [B, Q, T]
  latest = jnp.maximum(jax.lax.cummax(key, axis=1), 0)[:, prefixes]  # [B, P, T]
  return jnp.where(latest % 2 == 1, latest // 2, l + latest // 2).astype(jnp.int32)


def _gather(table: jnp.ndarray, index: jnp.ndarray) -> jnp.ndarray:
  """table [B, S, D] or [B, P, S, D], index [B, P, L] -> [B, P, L, D]."""
  if table.ndim == 3:  # shared by all prefixes: gather (and scatter its gradient) once
    return jax.vmap(lambda t, i: t[i])(table, index)
  return jnp.take_along_axis(table, index[..., None], axis=2)


def _state_weights(alpha: jnp.ndarray, index: jnp.ndarray, num_states: int) -> jnp.ndarray:
  """alpha [B, P, L], index [B, P, L] -> [B, P, S]: alpha summed per state it points to."""
  p = jnp.arange(index.shape[1])[:, None]  # [P, 1]
  return jax.vmap(lambda a, i: jnp.zeros((index.shape[1], num_states), a.dtype)
                  .at[p, i].add(a))(alpha, index)


# ------------------------------------------------------------------------------ model


class GatedGNN(nn.Module):
  """RecBole's GNN: a gated cell over mean incoming and outgoing neighbour messages."""

  hidden_size: int
  init: object

  def setup(self):
    d = self.hidden_size
    p = lambda name, shape, axes: self.param(name, nn.with_logical_partitioning(self.init, axes),
                                             shape)
    self.w_ih = p("w_ih", (2 * d, 3 * d), ("embed", "mlp"))  # torch w_ih transposed
    self.w_hh = p("w_hh", (d, 3 * d), ("embed", "mlp"))
    self.b_ih = p("b_ih", (3 * d,), ("mlp",))
    self.b_hh = p("b_hh", (3 * d,), ("mlp",))
    self.b_iah = p("b_iah", (d,), ("embed",))
    self.b_ioh = p("b_ioh", (d,), ("embed",))
    self.edge_in = Linear(d, ("embed", "mlp"), use_bias=True, kernel_init=self.init)
    self.edge_out = Linear(d, ("embed", "mlp"), use_bias=True, kernel_init=self.init)

  def cell(self, message_in: jnp.ndarray, message_out: jnp.ndarray,
           hidden: jnp.ndarray) -> jnp.ndarray:
    """Mean messages (edge_in/edge_out of neighbours) and states [..., D] -> new states."""
    gi = (jnp.concatenate([message_in + self.b_iah, message_out + self.b_ioh], -1)
          @ self.w_ih + self.b_ih)  # [..., 3D]
    gh = hidden @ self.w_hh + self.b_hh
    i_r, i_i, i_n = jnp.split(gi, 3, axis=-1)
    h_r, h_i, h_n = jnp.split(gh, 3, axis=-1)
    reset = jax.nn.sigmoid(i_r + h_r)
    update = jax.nn.sigmoid(i_i + h_i)
    new = jnp.tanh(i_n + reset * h_n)
    return (1.0 - update) * hidden + update * new

  def __call__(self, a_in: jnp.ndarray, a_out: jnp.ndarray, hidden: jnp.ndarray) -> jnp.ndarray:
    """One dense step: a_in, a_out [..., N, N]; hidden [..., N, D]."""
    message_in = jnp.einsum("...ij,...jd->...id", a_in, self.edge_in(hidden))
    message_out = jnp.einsum("...ij,...jd->...id", a_out, self.edge_out(hidden))
    return self.cell(message_in, message_out, hidden)


class SRGNN(nn.Module):
  config: SRGNNConfig

  def setup(self):
    cfg = self.config
    d, init = cfg.hidden_size, cfg.init
    self.item_embedding = nn.Embed(
        cfg.num_items + 1, d,
        embedding_init=nn.with_logical_partitioning(init, ("items", "embed")))
    self.gnn = GatedGNN(d, init)
    self.linear_one = Linear(d, ("embed", "mlp"), use_bias=True, kernel_init=init)
    self.linear_two = Linear(d, ("embed", "mlp"), use_bias=True, kernel_init=init)
    self.linear_three = Linear(1, ("mlp", None), use_bias=False, kernel_init=init)
    self.linear_transform = Linear(d, ("mlp", "embed"), use_bias=True, kernel_init=init)

  def item_embeddings(self) -> jnp.ndarray:
    return masked_item_table(self.item_embedding.embedding)  # [V+1, D]

  def _prefix_vectors(self, inputs: jnp.ndarray, prefixes: jnp.ndarray,
                      table: jnp.ndarray | None = None) -> jnp.ndarray:
    """inputs [B, L], prefixes [P] (last position of each prefix) -> [B, P, D]."""
    l = inputs.shape[1]
    nodes = node_ids(inputs)  # [B, L]
    # [B, L, D]: node(t) starts as x[t]
    x = input_vectors(self.item_embeddings() if table is None else table, inputs)
    # First GNN step on the 2L event states.
    m_in, m_out = event_masks(nodes)  # [B, 2L, T]
    start = jnp.concatenate([x, jnp.roll(x, 1, axis=1)], axis=1)  # [B, 2L, D]
    states = self.gnn.cell(
        jnp.einsum("bkt,btd->bkd", m_in, self.gnn.edge_in(x[:, :-1])),  # from sources
        jnp.einsum("bkt,btd->bkd", m_out, self.gnn.edge_out(x[:, 1:])),  # to targets
        start)  # [B, 2L, D]
    index = state_index(nodes, prefixes)  # [B, P, L]
    table = states  # [B, S=2L, D], shared by all prefixes
    if self.config.num_layers > 1:
      # Node n (slot n) after prefix p, then the remaining steps densely per prefix.
      table = _gather(table, index)  # [B, P, N, D]: slot n is node n (position n) after p
      a_in, a_out = normalized_adjacency(prefix_adjacency(nodes, prefixes))  # [B, P, N, N]
      for _ in range(self.config.num_layers - 1):
        table = self.gnn(a_in, a_out, table)
      index = jnp.broadcast_to(jnp.minimum(nodes, l - 1)[:, None], index.shape)
    return self._readout(table, index, inputs, prefixes)

  def _readout(self, table, index, inputs, prefixes):
    # table [B, S, D] or [B, P, S, D] node states; index [B, P, L] position t's state in prefix p
    mask = padding_mask(inputs)[:, None, :] & (jnp.arange(inputs.shape[1])[None, :]
                                               <= prefixes[:, None])[None]  # [B, P, L]
    last = index[:, jnp.arange(len(prefixes)), prefixes]  # [B, P]: the state of position p
    ht = _gather(table, last[..., None])[:, :, 0]  # [B, P, D]
    q1 = self.linear_one(ht)[:, :, None]  # [B, P, 1, D]
    q2 = _gather(self.linear_two(table), index)  # [B, P, L, D]: linear_two on the states
    alpha = self.linear_three(jax.nn.sigmoid(q1 + q2))[..., 0] * mask  # [B, P, L]
    # sum_t alpha[p, t] state(index[p, t]) = sum_s weight[p, s] state s: each state's
    # weights are summed first, so the states are never gathered to [B, P, L, D].
    weight = _state_weights(alpha, index, table.shape[-2])  # [B, P, S]
    a = jnp.einsum("bps,bsd->bpd" if table.ndim == 3 else "bps,bpsd->bpd", weight,
                   table)  # [B, P, D]
    return self.linear_transform(jnp.concatenate([a, ht], -1))  # [B, P, D]

  def encode_last(self, inputs: jnp.ndarray, deterministic: bool = True,
                  table: jnp.ndarray | None = None) -> jnp.ndarray:
    """[B, L] left-padded -> [B, D]: the graph of the whole sequence."""
    del deterministic
    last = jnp.array([inputs.shape[1] - 1])
    return self._prefix_vectors(inputs, last, table)[:, 0]

  def encode(self, inputs: jnp.ndarray, deterministic: bool = True,
             table: jnp.ndarray | None = None) -> jnp.ndarray:
    """[B, L] -> [B, L, D]: position t is the graph of the prefix ending at t."""
    del deterministic
    return self._prefix_vectors(inputs, jnp.arange(inputs.shape[1]), table)
