"""The LLaMA decoder (the SLIM student) in Flax linen, and one call to load it.

The parameter tree mirrors Hugging Face's names with unrolled layers, so a conversion or a
PEFT adapter maps one key to one key:

  embed_tokens/embedding [V, D]
  layers_{i}/input_layernorm/scale [D]
  layers_{i}/self_attn/{q,k,v,o}_proj/kernel  [D, N*H], [D, K*H], [D, K*H], [N*H, D]
  layers_{i}/post_attention_layernorm/scale [D]
  layers_{i}/mlp/{gate,up,down}_proj/kernel  [D, F], [D, F], [F, D]
  norm/scale [D]
  lm_head/kernel [D, V]  (absent when the head is tied to the embedding)

Every dense layer is `layers.Linear`, so a `lora` variable collection next to a kernel
adapts it. Rotary embeddings use Hugging Face's `rotate_half` layout (q/k weights need only a
transpose), with the `rope_scaling` of the LLaMA 2 and 3 families (none, linear, llama3).

`Llama.__call__` has two modes:
  * full sequence: `apply(v, ids [B, T], attention_mask=[B, T])` -> logits [B, T, V] float32;
    positions default to `cumsum(mask) - 1`, so left and right padding give the same logits
    on the real tokens as an unpadded row.
  * KV cache: `apply(v, ids [B, T], attention_mask=[B, S], positions=[B, T], cache=...,
    cache_index=i)` writes the T new keys/values at cache slots i..i+T-1 and attends over
    the S slots that the mask allows and causality permits; returns (logits, new_cache).
    With `prefix=` (the cache of tokens every row starts with, held once) the rows' slots
    follow those tokens. `init_cache` builds the empty cache; slim_jax/generate.py drives it.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from slim_jax.models import attention
from slim_jax.models.layers import Linear, matmul

Cache = tuple[tuple[jax.Array, jax.Array], ...]  # per layer (k, v), each [B, K, S, H]

_ROPE_TYPES = ("linear", "llama3")


def _dtype_name(x) -> str:
  return jnp.dtype(x).name


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """Architecture of a LLaMA-family decoder (names as in transformers' LlamaConfig)."""

  vocab_size: int = 32000
  hidden_size: int = 4096
  intermediate_size: int = 11008
  num_hidden_layers: int = 32
  num_attention_heads: int = 32
  num_key_value_heads: int = 32
  head_dim: int | None = None  # None: hidden_size // num_attention_heads
  rms_norm_eps: float = 1e-6
  rope_theta: float = 10000.0
  rope_scaling: dict | None = None  # None, {"rope_type": "linear", "factor"}, or llama3's
  max_position_embeddings: int = 4096
  tie_word_embeddings: bool = False
  bos_token_id: int | None = 1
  eos_token_id: int | tuple[int, ...] | None = 2
  pad_token_id: int | None = None
  dtype: Any = "float32"  # compute dtype name (a jnp dtype is accepted and turned into its name)
  param_dtype: Any = "float32"
  remat: bool = False  # rematerialise each layer in the backward pass

  def __post_init__(self):
    set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731
    set_("dtype", _dtype_name(self.dtype))
    set_("param_dtype", _dtype_name(self.param_dtype))
    if self.head_dim is None:
      set_("head_dim", self.hidden_size // self.num_attention_heads)
    if isinstance(self.eos_token_id, list):
      set_("eos_token_id", tuple(self.eos_token_id))
    if self.num_attention_heads % self.num_key_value_heads:
      raise ValueError(f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                       f"num_key_value_heads={self.num_key_value_heads}")
    if self.rope_scaling is not None:
      kind = self.rope_scaling.get("rope_type")
      if kind not in _ROPE_TYPES:
        raise ValueError(f"rope_scaling type {kind!r} is not supported; expected one of "
                         f"{_ROPE_TYPES} (or no scaling)")

  def __hash__(self):
    return hash(json.dumps(dataclasses.asdict(self), sort_keys=True, default=str))

  @property
  def eos_token_ids(self) -> tuple[int, ...]:
    if self.eos_token_id is None:
      return ()
    if isinstance(self.eos_token_id, int):
      return (self.eos_token_id,)
    return tuple(self.eos_token_id)

  @classmethod
  def tiny(cls, **overrides) -> "LlamaConfig":
    """A two-layer model with GQA for fast tests."""
    fields = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  rms_norm_eps=1e-5, rope_theta=10000.0, bos_token_id=1, eos_token_id=2)
    fields.update(overrides)
    return cls(**fields)

  @classmethod
  def from_hf_config(cls, hf_config, **overrides) -> "LlamaConfig":
    """From a transformers config object or its dict (config.json), old or new rope keys."""
    d = hf_config.to_dict() if hasattr(hf_config, "to_dict") else dict(hf_config)
    model_type = d.get("model_type")
    architectures = d.get("architectures") or []
    if model_type != "llama" and "LlamaForCausalLM" not in architectures:
      raise ValueError(f"not a LLaMA config: model_type={model_type!r}, architectures="
                       f"{architectures}; this loader reads LlamaForCausalLM checkpoints only")
    for key, ok in (("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False)):
      if d.get(key, ok) != ok:
        raise ValueError(f"config {key}={d[key]!r} is not supported (expected {ok!r})")
    rope = dict(d.get("rope_parameters") or {})  # transformers 5
    theta = rope.pop("rope_theta", None) or d.get("rope_theta") or 10000.0
    if not rope and d.get("rope_scaling"):  # transformers 4
      rope = dict(d["rope_scaling"])
    kind = rope.pop("rope_type", None) or rope.pop("type", None) or "default"
    rope.pop("type", None)
    scaling = None if kind == "default" else {"rope_type": kind, **rope}
    fields = dict(
        vocab_size=d["vocab_size"], hidden_size=d["hidden_size"],
        intermediate_size=d["intermediate_size"], num_hidden_layers=d["num_hidden_layers"],
        num_attention_heads=d["num_attention_heads"],
        num_key_value_heads=d.get("num_key_value_heads") or d["num_attention_heads"],
        head_dim=d.get("head_dim"), rms_norm_eps=d.get("rms_norm_eps", 1e-6),
        rope_theta=float(theta), rope_scaling=scaling,
        max_position_embeddings=d.get("max_position_embeddings", 4096),
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        bos_token_id=d.get("bos_token_id"), eos_token_id=d.get("eos_token_id"),
        pad_token_id=d.get("pad_token_id"))
    fields.update(overrides)
    return cls(**fields)

  def to_hf_config(self):
    """The matching transformers.LlamaConfig."""
    import transformers  # pylint: disable=import-outside-toplevel
    rope = {"rope_type": "default", "rope_theta": self.rope_theta}
    if self.rope_scaling:
      rope = {**self.rope_scaling, "rope_theta": self.rope_theta}
    eos = self.eos_token_id if not isinstance(self.eos_token_id, tuple) else list(
        self.eos_token_id)
    return transformers.LlamaConfig(
        vocab_size=self.vocab_size, hidden_size=self.hidden_size,
        intermediate_size=self.intermediate_size, num_hidden_layers=self.num_hidden_layers,
        num_attention_heads=self.num_attention_heads,
        num_key_value_heads=self.num_key_value_heads, head_dim=self.head_dim,
        rms_norm_eps=self.rms_norm_eps, rope_parameters=rope,
        max_position_embeddings=self.max_position_embeddings,
        tie_word_embeddings=self.tie_word_embeddings, bos_token_id=self.bos_token_id,
        eos_token_id=eos, pad_token_id=self.pad_token_id, hidden_act="silu",
        architectures=["LlamaForCausalLM"])


# ----------------------------------------------------------------------------- RoPE

def rope_inv_freq(config: LlamaConfig) -> np.ndarray:
  """Inverse frequencies [H/2] in float32, computed as transformers does (incl. scaling)."""
  h = config.head_dim
  inv = (1.0 / (np.float32(config.rope_theta) ** (np.arange(0, h, 2, dtype=np.float32)
                                                  / np.float32(h)))).astype(np.float32)
  scaling = config.rope_scaling
  if scaling is None:
    return inv
  factor = np.float32(scaling["factor"])
  if scaling["rope_type"] == "linear":
    return (inv / factor).astype(np.float32)
  # llama3: long wavelengths divided by `factor`, short kept, a smooth blend in between.
  old = np.float32(scaling["original_max_position_embeddings"])
  low, high = np.float32(scaling["low_freq_factor"]), np.float32(scaling["high_freq_factor"])
  wavelen = np.float32(2 * np.pi) / inv
  scaled = np.where(wavelen > old / low, inv / factor, inv)
  smooth = (old / wavelen - low) / (high - low)
  smoothed = (1 - smooth) * scaled / factor + smooth * scaled
  medium = ~(wavelen < old / high) & ~(wavelen > old / low)
  return np.where(medium, smoothed, scaled).astype(np.float32)


def rope_cos_sin(config: LlamaConfig, positions: jax.Array, table_size: int
                 ) -> tuple[jax.Array, jax.Array]:
  """cos, sin [B, T, H] for integer positions [B, T] below `table_size` (rotate_half layout),
  rows of a table computed on the host. Computed in the graph instead, XLA:CPU fuses the
  cosine and sine into every layer's rotation of q and k (and into their backward passes)
  and evaluates them there once per head and element: q's rotation at [4, 512, 9, 64]
  took 4.1 ms that way, 0.45 ms reading the table."""
  angles = np.arange(table_size, dtype=np.float32)[:, None] * rope_inv_freq(config)[None]
  angles = np.concatenate([angles, angles], axis=-1)  # [table_size, H], float32 products
  rows = jnp.clip(positions, 0, table_size - 1)
  return jnp.asarray(np.cos(angles))[rows], jnp.asarray(np.sin(angles))[rows]


@jax.custom_vjp
def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """x [B, T, N, H] rotated by position; cos/sin [B, T, H]. Computed in float32 (in bf16,
  XLA:CPU rounds after every multiply and add) and returned in x's dtype.

  The backward pass is the rotation by minus the angle, one fused pass like the forward;
  autodiff's transposes of the halves' slices and concatenation made XLA:CPU pad and add
  them in a slow fused loop."""
  return _rotate(x, cos, sin)


def _rotate(x, cos, sin):
  half = x.shape[-1] // 2
  x32 = x.astype(jnp.float32)
  x1, x2 = x32[..., :half], x32[..., half:]
  cos, sin = cos[:, :, None, :half], sin[:, :, None, :half]  # rotate_half: both halves alike
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def _apply_rope_fwd(x, cos, sin):
  return _rotate(x, cos, sin), (x, cos, sin)


def _apply_rope_bwd(residuals, g):
  x, cos, sin = residuals
  half = x.shape[-1] // 2
  x32, g32 = x.astype(jnp.float32), g.astype(jnp.float32)
  x1, x2, g1, g2 = x32[..., :half], x32[..., half:], g32[..., :half], g32[..., half:]
  # out1 = x1 c - x2 s, out2 = x2 c + x1 s; only the first halves of cos, sin are read.
  d_cos = jnp.sum(g1 * x1 + g2 * x2, axis=2)  # [B, T, H/2]
  d_sin = jnp.sum(g2 * x1 - g1 * x2, axis=2)
  zeros = jnp.zeros_like(d_cos)
  return (_rotate(g, cos, -sin).astype(x.dtype),
          jnp.concatenate([d_cos, zeros], axis=-1).astype(cos.dtype),
          jnp.concatenate([d_sin, zeros], axis=-1).astype(sin.dtype))


apply_rope.defvjp(_apply_rope_fwd, _apply_rope_bwd)


# ----------------------------------------------------------------------------- layers

class RMSNorm(nn.Module):
  eps: float
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
                       (x.shape[-1],), self.param_dtype)
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return scale.astype(self.dtype) * normed.astype(self.dtype)


class _Block(nn.Module):
  """Common fields of the sub-modules: config, LoRA settings, dropout mode."""

  config: LlamaConfig
  lora_scale: float = 1.0
  lora_dropout: float = 0.0
  deterministic: bool = True

  def dense(self, features: int, axes: tuple[str, str], name: str):
    cfg = self.config
    linear = Linear(features, axes=axes, dtype=jnp.dtype(cfg.dtype),
                    param_dtype=jnp.dtype(cfg.param_dtype), lora_scale=self.lora_scale,
                    lora_dropout=self.lora_dropout, name=name)
    return lambda x: linear(x, deterministic=self.deterministic)


QUERY_CHUNK = 128  # query positions per block of full-sequence causal attention
PREFILL_QUERY_CHUNK = 64  # query positions per block of a prefill into the KV cache


def _attend_prefill(q, key, value, allowed, prefix, first_slot: int):
  """_attend for queries written at cache slots first_slot.. (a prefill; first_slot a
  Python int), PREFILL_QUERY_CHUNK positions at a time, each block reading the slots up to
  its last query only: the slots after it are masked by causality, and at the start of
  generation they also hold the decode steps' empty slots. For 32 student prompts (about
  290 tokens, 64 shared) the prefill took 6.6 s instead of 7.9-8.2 s on 2 cores."""
  t = q.shape[3]  # the queries are the last t of the first_slot + t slots they may read
  blocks = [_attend(q[:, :, :, lo:hi], key[:, :, :keys], value[:, :, :keys],
                    allowed[:, lo:hi, :keys], prefix)
            for lo, hi, keys in attention.query_chunks(t, first_slot + t, PREFILL_QUERY_CHUNK)]
  return jnp.concatenate(blocks, axis=3)


def _attend(q, key, value, allowed, prefix=None):
  """softmax(q k^T / sqrt(H)) v over the allowed slots.

  q [B, K, G, T, H] (the G query heads of each kv head); key, value [B, K, S, H];
  allowed [B, T, S] bool -> [B, K, G, T, H].

  prefix: (keys, values) [1, K, L, H] of tokens every row starts with, visible to every
  query and held once, not per row: the rows' slots follow them. Their scores are one
  [B*G*T, H] x [H, L] product per kv head, joined to the rows' scores before the softmax.

  Head n uses kv head n // G (G = N/K), as repeat_kv does. The G query heads of a kv head
  and the T positions form one [G*T, H] matrix per (row, kv head); the products are
  batched over (B, K). Decoding (T = 1) is a read of the whole cache for G query vectors,
  and on XLA:CPU a multiply-and-sum over H streams the keys where a matmul with G rows
  does not: SmolLM2, 16 rows, one decode step 102 -> 74 ms at 1024 cache slots (4 rows
  42 -> 30 ms, one row about the same). The probabilities times the values stay a
  dot_general (as a sum it was slower). In prefill, operand order matters: with one row
  the cache first ([S, H] x [H, G*T], S rows to split over threads), else queries first.
  Products take 16-bit operands with float32 accumulation (layers.matmul's rule), except
  a CPU decode step's values, held in float32 (value_cache_dtype).
  """
  b, k, g, t, h = q.shape
  q = q.reshape(b, k, g * t, h)
  batch_bk = ((0, 1), (0, 1))
  if t == 1:  # [B, K, G, 1, H] * [B, K, 1, S, H] summed over H
    scores = jnp.sum(q[:, :, :, None, :].astype(jnp.float32) * key[:, :, None, :, :],
                     axis=-1)
  elif b == 1:
    scores = jax.lax.dot_general(key, q, (((3,), (3,)), batch_bk),
                                 preferred_element_type=jnp.float32).swapaxes(2, 3)
  else:
    scores = jax.lax.dot_general(q, key, (((3,), (3,)), batch_bk),
                                 preferred_element_type=jnp.float32)
  scores = scores.reshape(b, k, g, t, -1) / np.sqrt(h)  # [B, K, G, T, S]
  scores = jnp.where(allowed[:, None, None], scores, jnp.finfo(jnp.float32).min)
  if prefix is not None:
    # The prefix's products are real matmuls ([B*G*T, L] rows), fast in q's dtype; only the
    # one-row product with a row's own values is widened by XLA:CPU (value_cache_dtype).
    prefix_k, prefix_v = (x[0].astype(q.dtype) for x in prefix)  # [K, L, H]
    length = prefix_k.shape[1]
    q_by_head = q.transpose(1, 0, 2, 3).reshape(k, b * g * t, h)  # [K, B*G*T, H]
    prefix_scores = jax.lax.dot_general(q_by_head, prefix_k, (((2,), (2,)), ((0,), (0,))),
                                        preferred_element_type=jnp.float32)  # [K, BGT, L]
    prefix_scores = prefix_scores.reshape(k, b, g, t, length).transpose(1, 0, 2, 3, 4)
    scores = jnp.concatenate([prefix_scores / np.sqrt(h), scores], axis=-1)
  probs = jax.nn.softmax(scores, axis=-1)  # [B, K, G, T, (L +) S]
  out = 0.0
  if prefix is not None:
    prefix_probs = probs[..., :length].astype(q.dtype).transpose(1, 0, 2, 3, 4)
    prefix_out = jax.lax.dot_general(prefix_probs.reshape(k, b * g * t, length), prefix_v,
                                     (((2,), (1,)), ((0,), (0,))),
                                     preferred_element_type=jnp.float32)  # [K, BGT, H]
    out = prefix_out.reshape(k, b, g * t, h).transpose(1, 0, 2, 3)
    probs = probs[..., length:]
  probs = probs.astype(value.dtype).reshape(b, k, g * t, -1)
  out = out + jax.lax.dot_general(probs, value, (((3,), (2,)), batch_bk),
                                  preferred_element_type=jnp.float32)  # [B, K, G*T, H]
  return out.astype(q.dtype).reshape(b, k, g, t, h)


def _write_cache(cache: jax.Array, new: jax.Array, start) -> jax.Array:
  """`cache` [B, K, S, H] with `new` [B, K, T, H] written at `start`. A 16-bit float cache
  is written as its bits (uint16): XLA:CPU otherwise widens a bfloat16 update to float32,
  converting the whole cache there and back in every layer of every decode step (at 64
  rows and 288 slots, about 0.8 GB of traffic a step), where the bits update in place."""
  if jnp.dtype(cache.dtype).itemsize != 2:
    return jax.lax.dynamic_update_slice(cache, new.astype(cache.dtype), start)
  bits = lambda x: jax.lax.bitcast_convert_type(x, jnp.uint16)  # noqa: E731
  written = jax.lax.dynamic_update_slice(bits(cache), bits(new.astype(cache.dtype)), start)
  return jax.lax.bitcast_convert_type(written, cache.dtype)


class Attention(_Block):
  """Grouped-query attention with RoPE and an optional KV cache."""

  @nn.compact
  def __call__(self, x, cos, sin, allowed, cache=None, cache_index=None, prefix=None):
    """x [B, T, D]; allowed [B, T, S] bool; cache (k, v) [B, K, S, H] or None; prefix
    (k, v) [1, K, L, H] shared by every row, or None (see _attend)."""
    cfg = self.config
    b, t, _ = x.shape
    n, k, h = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    q = self.dense(n * h, ("embed", "heads"), "q_proj")(x).reshape(b, t, n, h)
    key = self.dense(k * h, ("embed", "kv_heads"), "k_proj")(x).reshape(b, t, k, h)
    value = self.dense(k * h, ("embed", "kv_heads"), "v_proj")(x).reshape(b, t, k, h)
    q, key = apply_rope(q, cos, sin), apply_rope(key, cos, sin)
    # Keys and values heads-first, [B, K, T, H]: each (row, kv head) is one contiguous
    # [S, H] matrix, so the two attention matmuls read the cache in place (a [B, S, K, H]
    # cache made XLA:CPU transpose all of it in every decode step).
    key, value = key.transpose(0, 2, 1, 3), value.transpose(0, 2, 1, 3)
    new_cache = None
    if cache is not None:
      cache_k, cache_v = cache
      start = (0, 0, cache_index, 0)
      key, value = _write_cache(cache_k, key, start), _write_cache(cache_v, value, start)
      new_cache = (key, value)  # [B, K, S, H]
    g = n // k
    q = q.reshape(b, t, k, g, h).transpose(0, 2, 3, 1, 4)  # [B, K, G, T, H]
    key = key.astype(q.dtype)
    if t > 1:  # a product with many query rows runs in q's dtype; one row reads the cache
      value = value.astype(q.dtype)
    if cache is None:  # training and scoring: slim_jax/models/attention.py
      out = attention.attend(q, key, value, allowed, QUERY_CHUNK)  # [B, K, G, T, H]
    elif t > 1 and isinstance(cache_index, (int, np.integer)):  # a prefill, slot static
      out = _attend_prefill(q, key, value, allowed, prefix, cache_index)
    else:
      out = _attend(q, key, value, allowed, prefix)
    out = out.transpose(0, 3, 1, 2, 4).reshape(b, t, n * h)
    return self.dense(cfg.hidden_size, ("heads", "embed"), "o_proj")(out), new_cache


class Mlp(_Block):

  @nn.compact
  def __call__(self, x):
    cfg = self.config
    gate = self.dense(cfg.intermediate_size, ("embed", "mlp"), "gate_proj")(x)
    up = self.dense(cfg.intermediate_size, ("embed", "mlp"), "up_proj")(x)
    return self.dense(cfg.hidden_size, ("mlp", "embed"), "down_proj")(nn.silu(gate) * up)


class DecoderLayer(_Block):

  @nn.compact
  def __call__(self, x, cos, sin, allowed, cache=None, cache_index=None, prefix=None):
    cfg = self.config
    kw = dict(config=cfg, lora_scale=self.lora_scale, lora_dropout=self.lora_dropout,
              deterministic=self.deterministic)
    norm = lambda name: RMSNorm(cfg.rms_norm_eps, jnp.dtype(cfg.dtype),  # noqa: E731
                                jnp.dtype(cfg.param_dtype), name=name)
    attn, new_cache = Attention(**kw, name="self_attn")(norm("input_layernorm")(x), cos, sin,
                                                        allowed, cache, cache_index, prefix)
    x = x + attn
    x = x + Mlp(**kw, name="mlp")(norm("post_attention_layernorm")(x))
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
    return x, new_cache


class Llama(nn.Module):
  """LlamaForCausalLM. See the module docstring for the two calling modes."""

  config: LlamaConfig
  lora_scale: float = 1.0
  lora_dropout: float = 0.0

  @nn.compact
  def __call__(self, input_ids, attention_mask=None, positions=None, deterministic=True,
               cache: Cache | None = None, cache_index=None, last_only: bool = False,
               return_hidden: bool = False, prefix: Cache | None = None):
    """Logits [B, T, V] float32 (or [B, 1, V] with last_only); with a cache, also the new one.
    With return_hidden (no cache): the final normed hidden states [B, T, D] instead of
    logits, for a loss that applies the output head itself (slim_jax/train/token_loss.py).

    input_ids [B, T]; attention_mask [B, T] (no cache) or [B, S] over cache slots (cache);
    positions [B, T] (required with a cache); cache_index: first cache slot to write.
    prefix (with a cache): per layer (k, v) [1, K, L, H] of L tokens that precede every
    row, held once (a cache this model filled for one row of those tokens); the rows'
    positions count from L.
    """
    if prefix is not None and cache is None:
      raise ValueError("prefix is for decoding with a KV cache")
    cfg = self.config
    dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    b, t = input_ids.shape
    positions_given = positions is not None
    if cache is None:
      mask = (jnp.ones((b, t), bool) if attention_mask is None
              else jnp.asarray(attention_mask).astype(bool))
      if positions is None:
        positions = jnp.maximum(jnp.cumsum(mask, axis=-1) - 1, 0)
      causal = jnp.tril(jnp.ones((t, t), bool))
      allowed = mask[:, None, :] & causal[None]  # [B, T, T]
    else:
      if positions is None or attention_mask is None or cache_index is None:
        raise ValueError("with a cache, pass positions [B, T], attention_mask [B, S] over "
                         "the cache slots and cache_index")
      s = cache[0][0].shape[2]
      slot = jnp.arange(s)[None, :]  # [1, S]
      query_slot = cache_index + jnp.arange(t)[:, None]  # [T, 1]
      allowed = jnp.asarray(attention_mask).astype(bool)[:, None, :] & (slot <= query_slot)[None]
    if cache is not None:  # a row's tokens fill the prefix and its cache slots, in order
      table_size = s + (0 if prefix is None else prefix[0][0].shape[2])
    elif positions_given:
      table_size = cfg.max_position_embeddings
    else:
      table_size = t
    cos, sin = rope_cos_sin(cfg, positions, table_size)

    embed = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=dtype, param_dtype=param_dtype,
                     embedding_init=nn.with_logical_partitioning(
                         nn.initializers.normal(stddev=0.02), ("vocab", "embed")),
                     name="embed_tokens")
    x = embed(input_ids)  # [B, T, D]
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
    layer_cls = nn.remat(DecoderLayer) if cfg.remat else DecoderLayer
    new_cache = []
    for i in range(cfg.num_hidden_layers):
      layer = layer_cls(cfg, self.lora_scale, self.lora_dropout, deterministic,
                        name=f"layers_{i}")
      x, layer_cache = layer(x, cos, sin, allowed, None if cache is None else cache[i],
                             cache_index, None if prefix is None else prefix[i])
      new_cache.append(layer_cache)
    x = RMSNorm(cfg.rms_norm_eps, dtype, param_dtype, name="norm")(x)
    if return_hidden:
      if cache is not None:
        raise ValueError("return_hidden is for full sequences, not with a KV cache")
      return x
    if last_only:
      x = x[:, -1:]
    if cfg.tie_word_embeddings:  # [B, T, D] x [V, D]^T, accumulated and returned in float32
      logits = matmul(x, embed.embedding.T, dtype, jnp.float32)
    else:
      logits = Linear(cfg.vocab_size, axes=("embed", "vocab"), dtype=dtype,
                      param_dtype=param_dtype, lora_scale=self.lora_scale,
                      lora_dropout=self.lora_dropout, name="lm_head")(x, deterministic)
    logits = logits.astype(jnp.float32)  # [B, T, V]
    if cache is None:
      return logits
    return logits, tuple(new_cache)


def init_cache(config: LlamaConfig, batch: int, length: int, dtype=jnp.float32,
               value_dtype=None) -> Cache:
  """An empty KV cache: per layer (k, v) zeros [B, K, S, H]; values in `value_dtype`
  (default `dtype`; see `value_cache_dtype`)."""
  shape = (batch, config.num_key_value_heads, length, config.head_dim)
  return tuple((jnp.zeros(shape, dtype), jnp.zeros(shape, value_dtype or dtype))
               for _ in range(config.num_hidden_layers))


def value_cache_dtype(dtype) -> jnp.dtype:
  """The value cache's dtype for decoding in `dtype`: float32 on a CPU. XLA:CPU widens
  the one-token probabilities x bfloat16 values product to float32, converting each
  layer's whole value cache in every decode step; a float32 cache is read as it is
  (SmolLM2, 64 rows, 448 slots: 164 -> 154 ms a step). Elsewhere `dtype`."""
  return jnp.dtype(jnp.float32 if jax.default_backend() == "cpu" else dtype)


def param_shapes(config: LlamaConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
  """{flax path: shape} of every parameter, computed without allocating them."""
  from flax import traverse_util  # pylint: disable=import-outside-toplevel
  abstract = jax.eval_shape(Llama(config).init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))
  flat = traverse_util.flatten_dict(nn.unbox(abstract)["params"])
  return {path: tuple(x.shape) for path, x in flat.items()}


def param_partition_specs(config: LlamaConfig):
  """Logical PartitionSpecs of the parameter tree (for slim_jax.sharding)."""
  abstract = jax.eval_shape(Llama(config).init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))
  return nn.get_partition_spec(abstract)["params"]


# DESIGN.md's public API names. The library itself loads through slim_jax/convert/
# (convert/ depends on models/, never the reverse); these two delegate there for users.

def load_pretrained(path: str, param_dtype=None):
  """(config, params, tokenizer) from a HF LLaMA folder or a .gguf file: the public name of
  slim_jax.convert.pretrained.load_llama."""
  from slim_jax.convert import pretrained  # pylint: disable=import-outside-toplevel
  return pretrained.load_llama(path, param_dtype=param_dtype)


def save_pretrained(config: LlamaConfig, params, path: str, tokenizer=None,
                    max_shard_bytes: int = 5 * 2 ** 30) -> None:
  """Writes a HF folder: the public name of slim_jax.convert.pretrained.save_llama."""
  from slim_jax.convert import pretrained  # pylint: disable=import-outside-toplevel
  pretrained.save_llama(config, params, path, tokenizer=tokenizer,
                        max_shard_bytes=max_shard_bytes)
