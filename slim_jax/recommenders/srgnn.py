"""SR-GNN (Wu et al., AAAI 2019) as RecBole 1.2.1 builds it, with the graph built in jnp.

Each sequence becomes a directed session graph: one node per distinct item, an edge u->v
when v directly follows u (set once however often it repeats). The incoming and outgoing
adjacency matrices are row-normalised by in- and out-degree. A gated graph network
(`num_layers` steps of GNNCell) updates node vectors; each position takes its item's
node vector; a soft attention over the positions, queried by the last item, plus the last
item itself, go through a linear transform to the sequence vector.

RecBole builds the graph in numpy on the host with `np.unique`. Here it is fixed-size and
jit-friendly: node slot s stands for the item first seen at position s (slots of repeats
and padding get no edges and are never read), so no unique/sort is needed and padding on
either side gives the same result. The GNN is equivariant to node order, so this equals
RecBole's sorted-unique layout exactly (tested against a port in tests/reference/).

`encode` (one vector per prefix) runs the graph once per prefix: position t's vector is
the graph of items 0..t, exactly what RecBole computes for each prefix as its own example.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import linen as nn

from slim_jax.models.layers import Linear
from slim_jax.recommenders.backbone import masked_item_table, padding_mask


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


def session_graph(inputs: jnp.ndarray):
  """inputs [B, L] -> (slots [B, L, L] one-hot position->node slot, transitions [B, L-1, L, L]).

  slots[b, t, s] = 1 when position t holds the item first seen at position s (0 for padding).
  transitions[b, t] is the one-hot edge slot(t) -> slot(t+1) (zero when either is padding).
  """
  l = inputs.shape[1]
  mask = padding_mask(inputs)  # [B, L]
  same = (inputs[:, :, None] == inputs[:, None, :]) & mask[:, :, None]  # [B, T, S]
  first = jnp.argmax(same, axis=-1)  # [B, L]: first position holding the same item
  slots = jax.nn.one_hot(first, l, dtype=jnp.float32) * mask[..., None]  # [B, L, L]
  transitions = jnp.einsum("btu,btv->btuv", slots[:, :-1], slots[:, 1:])  # [B, L-1, L, L]
  return slots, transitions


def normalized_adjacency(edges: jnp.ndarray):
  """edges [..., N, N] in {0,1} (u->v) -> (A_in, A_out) [..., N, N], RecBole's normalisation.

  A_in[i, j] = edge(j->i) / max(indeg(i), 1)   mean over i's predecessors
  A_out[i, j] = edge(i->j) / max(outdeg(i), 1) mean over i's successors
  """
  edges_in = jnp.swapaxes(edges, -1, -2)
  a_in = edges_in / jnp.maximum(edges_in.sum(-1, keepdims=True), 1.0)
  a_out = edges / jnp.maximum(edges.sum(-1, keepdims=True), 1.0)
  return a_in, a_out


class GatedGNN(nn.Module):
  """RecBole's GNN: `steps` applications of one gated cell (shared weights)."""

  hidden_size: int
  steps: int
  init: object

  @nn.compact
  def __call__(self, a_in: jnp.ndarray, a_out: jnp.ndarray, hidden: jnp.ndarray) -> jnp.ndarray:
    # a_in, a_out [B, N, N]; hidden [B, N, D]
    d = self.hidden_size
    p = lambda name, shape, axes: self.param(name, nn.with_logical_partitioning(self.init, axes),
                                             shape)
    w_ih = p("w_ih", (2 * d, 3 * d), ("embed", "mlp"))  # torch w_ih transposed
    w_hh = p("w_hh", (d, 3 * d), ("embed", "mlp"))
    b_ih = p("b_ih", (3 * d,), ("mlp",))
    b_hh = p("b_hh", (3 * d,), ("mlp",))
    b_iah = p("b_iah", (d,), ("embed",))
    b_ioh = p("b_ioh", (d,), ("embed",))
    edge_in = Linear(d, ("embed", "mlp"), use_bias=True, kernel_init=self.init, name="edge_in")
    edge_out = Linear(d, ("embed", "mlp"), use_bias=True, kernel_init=self.init,
                      name="edge_out")
    for _ in range(self.steps):
      input_in = jnp.einsum("bij,bjd->bid", a_in, edge_in(hidden)) + b_iah
      input_out = jnp.einsum("bij,bjd->bid", a_out, edge_out(hidden)) + b_ioh
      gi = jnp.concatenate([input_in, input_out], -1) @ w_ih + b_ih  # [B, N, 3D]
      gh = hidden @ w_hh + b_hh
      i_r, i_i, i_n = jnp.split(gi, 3, axis=-1)
      h_r, h_i, h_n = jnp.split(gh, 3, axis=-1)
      reset = jax.nn.sigmoid(i_r + h_r)
      update = jax.nn.sigmoid(i_i + h_i)
      new = jnp.tanh(i_n + reset * h_n)
      hidden = (1.0 - update) * hidden + update * new
    return hidden


class SRGNN(nn.Module):
  config: SRGNNConfig

  def setup(self):
    cfg = self.config
    d, init = cfg.hidden_size, cfg.init
    self.item_embedding = nn.Embed(
        cfg.num_items + 1, d,
        embedding_init=nn.with_logical_partitioning(init, ("items", "embed")))
    self.gnn = GatedGNN(d, cfg.num_layers, init)
    self.linear_one = Linear(d, ("embed", "mlp"), use_bias=True, kernel_init=init)
    self.linear_two = Linear(d, ("embed", "mlp"), use_bias=True, kernel_init=init)
    self.linear_three = Linear(1, ("mlp", None), use_bias=False, kernel_init=init)
    self.linear_transform = Linear(d, ("mlp", "embed"), use_bias=True, kernel_init=init)

  def item_embeddings(self) -> jnp.ndarray:
    return masked_item_table(self.item_embedding.embedding)  # [V+1, D]

  def _readout(self, inputs, slots, edges, mask, last):
    # inputs [G, L]; slots [G, L, L]; edges [G, L, L]; mask [G, L]; last [G, L] one-hot
    a_in, a_out = normalized_adjacency(edges)
    # Node slot s starts from the embedding of the item at position s.
    hidden = jnp.take(self.item_embeddings(), inputs, axis=0)  # [G, N=L, D]
    hidden = self.gnn(a_in, a_out, hidden)
    seq_hidden = jnp.einsum("gts,gsd->gtd", slots, hidden)  # [G, L, D] each position's node
    ht = jnp.einsum("gt,gtd->gd", last, seq_hidden)  # [G, D]
    q1 = self.linear_one(ht)[:, None]  # [G, 1, D]
    q2 = self.linear_two(seq_hidden)  # [G, L, D]
    alpha = self.linear_three(jax.nn.sigmoid(q1 + q2))  # [G, L, 1]
    a = jnp.sum(alpha * seq_hidden * mask[..., None], axis=1)  # [G, D]
    return self.linear_transform(jnp.concatenate([a, ht], -1))  # [G, D]

  def encode_last(self, inputs: jnp.ndarray, deterministic: bool = True) -> jnp.ndarray:
    del deterministic
    l = inputs.shape[1]
    mask = padding_mask(inputs).astype(jnp.float32)  # [B, L]
    slots, transitions = session_graph(inputs)
    edges = (transitions.sum(1) > 0).astype(jnp.float32)  # [B, L, L]
    last = jnp.broadcast_to(jax.nn.one_hot(l - 1, l), mask.shape)  # left padding: newest last
    return self._readout(inputs, slots, edges, mask, last)  # [B, D]

  def encode(self, inputs: jnp.ndarray, deterministic: bool = True) -> jnp.ndarray:
    """[B, L] -> [B, L, D]: position t is the graph of the prefix ending at t."""
    del deterministic
    b, l = inputs.shape
    mask = padding_mask(inputs).astype(jnp.float32)  # [B, L]
    slots, transitions = session_graph(inputs)
    # Edges of prefix p: transitions t -> t+1 with t + 1 <= p, i.e. a cumulative sum.
    counts = jnp.cumsum(transitions, axis=1)  # [B, L-1, L, L]: prefix ending at t + 1
    counts = jnp.concatenate([jnp.zeros_like(counts[:, :1]), counts], axis=1)  # [B, P=L, L, L]
    edges = (counts > 0).astype(jnp.float32)
    prefix = jnp.arange(l)
    prefix_mask = mask[:, None, :] * (prefix[None, :] <= prefix[:, None])[None]  # [B, P, L]
    last = jnp.broadcast_to(jnp.eye(l), (b, l, l))  # prefix p ends at position p

    def flat(x):  # [B, P, ...] -> [B * P, ...]
      return x.reshape((b * l,) + x.shape[2:])

    out = self._readout(
        flat(jnp.broadcast_to(inputs[:, None], (b, l, l))),
        flat(jnp.broadcast_to(slots[:, None], (b, l, l, l))),
        flat(edges), flat(prefix_mask), flat(last))
    return out.reshape(b, l, -1)  # [B, L, D]
