"""PyTorch ports of RecBole 1.2.1's SASRec and SR-GNN forward passes, for parity tests.

RecBole cannot be imported in the main environment (it needs numpy<2), so these are
faithful re-statements of `recbole/model/layers.py` (MultiHeadAttention, FeedForward,
TransformerLayer/Encoder), `recbole/model/sequential_recommender/sasrec.py` and `srgnn.py`
(GNN, `_get_slice`, forward): same layers, same order, same constants, same right-padded
inputs with `item_seq_len`. Only the forward pass is ported; training code is not needed.
"""

import math

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F


# --------------------------------------------------------------------------- SASRec


class MultiHeadAttention(nn.Module):
  def __init__(self, n_heads, hidden_size, hidden_dropout_prob, attn_dropout_prob, eps):
    super().__init__()
    self.n_heads = n_heads
    self.head_size = hidden_size // n_heads
    self.query = nn.Linear(hidden_size, hidden_size)
    self.key = nn.Linear(hidden_size, hidden_size)
    self.value = nn.Linear(hidden_size, hidden_size)
    self.attn_dropout = nn.Dropout(attn_dropout_prob)
    self.dense = nn.Linear(hidden_size, hidden_size)
    self.LayerNorm = nn.LayerNorm(hidden_size, eps=eps)
    self.out_dropout = nn.Dropout(hidden_dropout_prob)

  def split_heads(self, x):  # [B, L, D] -> [B, N, L, H]
    b, l, _ = x.shape
    return x.view(b, l, self.n_heads, self.head_size).permute(0, 2, 1, 3)

  def forward(self, input_tensor, attention_mask):
    q = self.split_heads(self.query(input_tensor))
    k = self.split_heads(self.key(input_tensor)).transpose(-1, -2)
    v = self.split_heads(self.value(input_tensor))
    scores = torch.matmul(q, k) / math.sqrt(self.head_size) + attention_mask
    probs = self.attn_dropout(torch.softmax(scores, dim=-1))
    context = torch.matmul(probs, v).permute(0, 2, 1, 3).contiguous()
    context = context.view(context.shape[0], context.shape[1], -1)
    hidden = self.out_dropout(self.dense(context))
    return self.LayerNorm(hidden + input_tensor)


class FeedForward(nn.Module):
  def __init__(self, hidden_size, inner_size, hidden_dropout_prob, eps):
    super().__init__()
    self.dense_1 = nn.Linear(hidden_size, inner_size)
    self.dense_2 = nn.Linear(inner_size, hidden_size)
    self.LayerNorm = nn.LayerNorm(hidden_size, eps=eps)
    self.dropout = nn.Dropout(hidden_dropout_prob)

  def forward(self, input_tensor):
    h = self.dense_1(input_tensor)
    h = h * 0.5 * (1.0 + torch.erf(h / math.sqrt(2.0)))  # RecBole's gelu
    h = self.dropout(self.dense_2(h))
    return self.LayerNorm(h + input_tensor)


class TransformerLayer(nn.Module):
  def __init__(self, n_heads, hidden_size, inner_size, hidden_dropout, attn_dropout, eps):
    super().__init__()
    self.multi_head_attention = MultiHeadAttention(n_heads, hidden_size, hidden_dropout,
                                                   attn_dropout, eps)
    self.feed_forward = FeedForward(hidden_size, inner_size, hidden_dropout, eps)

  def forward(self, hidden, mask):
    return self.feed_forward(self.multi_head_attention(hidden, mask))


class SASRecRef(nn.Module):
  def __init__(self, n_items, max_len, hidden_size, n_layers, n_heads, inner_size,
               dropout=0.0, eps=1e-12):
    super().__init__()
    self.item_embedding = nn.Embedding(n_items, hidden_size, padding_idx=0)
    self.position_embedding = nn.Embedding(max_len, hidden_size)
    self.layers = nn.ModuleList(TransformerLayer(n_heads, hidden_size, inner_size, dropout,
                                                 dropout, eps) for _ in range(n_layers))
    self.LayerNorm = nn.LayerNorm(hidden_size, eps=eps)
    self.dropout = nn.Dropout(dropout)

  @staticmethod
  def get_attention_mask(item_seq):
    mask = (item_seq != 0)[:, None, None, :]  # [B, 1, 1, S]
    l = item_seq.size(-1)
    causal = torch.tril(torch.ones((1, l, l), dtype=torch.bool))[:, None]  # [1, 1, T, S]
    allowed = mask & causal
    return torch.where(allowed, 0.0, -10000.0)

  def forward(self, item_seq, item_seq_len):
    positions = torch.arange(item_seq.size(1), dtype=torch.long)[None].expand_as(item_seq)
    x = self.item_embedding(item_seq) + self.position_embedding(positions)
    x = self.dropout(self.LayerNorm(x))
    mask = self.get_attention_mask(item_seq)
    for layer in self.layers:
      x = layer(x, mask)
    return x[torch.arange(x.shape[0]), item_seq_len - 1]  # gather_indexes


# --------------------------------------------------------------------------- SR-GNN


class GNNRef(nn.Module):
  def __init__(self, embedding_size, step=1):
    super().__init__()
    d = embedding_size
    self.step = step
    self.w_ih = nn.Parameter(torch.empty(3 * d, 2 * d))
    self.w_hh = nn.Parameter(torch.empty(3 * d, d))
    self.b_ih = nn.Parameter(torch.empty(3 * d))
    self.b_hh = nn.Parameter(torch.empty(3 * d))
    self.b_iah = nn.Parameter(torch.empty(d))
    self.b_ioh = nn.Parameter(torch.empty(d))
    self.linear_edge_in = nn.Linear(d, d, bias=True)
    self.linear_edge_out = nn.Linear(d, d, bias=True)

  def cell(self, A, hidden):
    n = A.size(1)
    input_in = torch.matmul(A[:, :, :n], self.linear_edge_in(hidden)) + self.b_iah
    input_out = torch.matmul(A[:, :, n:2 * n], self.linear_edge_out(hidden)) + self.b_ioh
    gi = F.linear(torch.cat([input_in, input_out], 2), self.w_ih, self.b_ih)
    gh = F.linear(hidden, self.w_hh, self.b_hh)
    i_r, i_i, i_n = gi.chunk(3, 2)
    h_r, h_i, h_n = gh.chunk(3, 2)
    reset = torch.sigmoid(i_r + h_r)
    update = torch.sigmoid(i_i + h_i)
    new = torch.tanh(i_n + reset * h_n)
    return (1 - update) * hidden + update * new

  def forward(self, A, hidden):
    for _ in range(self.step):
      hidden = self.cell(A, hidden)
    return hidden


class SRGNNRef(nn.Module):
  def __init__(self, n_items, embedding_size, step=1):
    super().__init__()
    d = embedding_size
    self.item_embedding = nn.Embedding(n_items, d, padding_idx=0)
    self.gnn = GNNRef(d, step)
    self.linear_one = nn.Linear(d, d, bias=True)
    self.linear_two = nn.Linear(d, d, bias=True)
    self.linear_three = nn.Linear(d, 1, bias=False)
    self.linear_transform = nn.Linear(2 * d, d, bias=True)

  @staticmethod
  def get_slice(item_seq):
    """RecBole's host-side session graph: sorted unique nodes, [n, 2n] in/out adjacency."""
    mask = item_seq.gt(0)
    items, A, alias_inputs = [], [], []
    max_n_node = item_seq.size(1)
    for u_input in item_seq.numpy():
      node = np.unique(u_input)
      items.append(node.tolist() + (max_n_node - len(node)) * [0])
      u_A = np.zeros((max_n_node, max_n_node))
      for i in np.arange(len(u_input) - 1):
        if u_input[i + 1] == 0:
          break
        u = np.where(node == u_input[i])[0][0]
        v = np.where(node == u_input[i + 1])[0][0]
        u_A[u][v] = 1
      sum_in = np.sum(u_A, 0)
      sum_in[np.where(sum_in == 0)] = 1
      a_in = np.divide(u_A, sum_in)
      sum_out = np.sum(u_A, 1)
      sum_out[np.where(sum_out == 0)] = 1
      a_out = np.divide(u_A.transpose(), sum_out)
      A.append(np.concatenate([a_in, a_out]).transpose())
      alias_inputs.append([np.where(node == i)[0][0] for i in u_input])
    return (torch.LongTensor(np.array(alias_inputs)), torch.FloatTensor(np.array(A)),
            torch.LongTensor(np.array(items)), mask)

  def forward(self, item_seq, item_seq_len):
    alias_inputs, A, items, mask = self.get_slice(item_seq)
    hidden = self.gnn(A, self.item_embedding(items))
    d = hidden.size(-1)
    alias = alias_inputs.view(-1, alias_inputs.size(1), 1).expand(-1, -1, d)
    seq_hidden = torch.gather(hidden, dim=1, index=alias)
    ht = seq_hidden[torch.arange(seq_hidden.shape[0]), item_seq_len - 1]
    q1 = self.linear_one(ht).view(ht.size(0), 1, ht.size(1))
    q2 = self.linear_two(seq_hidden)
    alpha = self.linear_three(torch.sigmoid(q1 + q2))
    a = torch.sum(alpha * seq_hidden * mask.view(mask.size(0), -1, 1).float(), 1)
    return self.linear_transform(torch.cat([a, ht], dim=1))
