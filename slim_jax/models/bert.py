"""The BERT text encoder (SLIM's TextEncoder) in Flax linen, and one call to load it.

SLIM embeds item descriptions and rationales with a pre-trained BERT (DESIGN.md, step 3).
This is transformers' `BertModel`: word + position + token-type embeddings, LayerNorm,
post-LN encoder layers (attention -> add -> LayerNorm, GELU MLP -> add -> LayerNorm) and an
optional pooler (tanh(dense(hidden[:, 0]))). The parameter tree:

  embeddings/{word,position,token_type}_embeddings/embedding  [V, D], [P, D], [2, D]
  embeddings/LayerNorm/{scale,bias}                            [D]
  layers_{i}/attention/{query,key,value}/{kernel,bias}         [D, N*H], [N*H]
  layers_{i}/attention/output/{kernel,bias}                    [N*H, D], [D]
  layers_{i}/attention_norm/{scale,bias}                       [D]
  layers_{i}/intermediate/{kernel,bias}                        [D, F], [F]
  layers_{i}/output/{kernel,bias}                              [F, D], [D]
  layers_{i}/output_norm/{scale,bias}                          [D]
  pooler/{kernel,bias}                                         [D, D]  (add_pooling_layer)

slim_jax/convert/bert_hf.py maps it one key to one key onto the Hugging Face state dict.
Dense layers are `layers.Linear`, so a `lora` collection adapts them as in the LLaMA model.

  hidden = Bert(cfg).apply({"params": p}, ids [B, T], attention_mask=[B, T],
                           token_type_ids=[B, T])                     # [B, T, D]
  hidden, pooled = Bert(cfg).apply(..., return_pooled=True)           # pooled [B, D]

Padding is on the right (positions are 0..T-1, as in transformers); padded keys are masked,
so a row's real tokens get the same states however long the batch is padded. Pooling to
sentence vectors (mean, CLS, pooler) and normalisation live in slim_jax/encode.py.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from slim_jax.models.layers import Dropout, Linear

_ACTIVATIONS = {
    "gelu": lambda x: nn.gelu(x, approximate=False),
    "gelu_new": lambda x: nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: nn.gelu(x, approximate=True),
    "relu": nn.relu,
}


@dataclasses.dataclass(frozen=True)
class BertConfig:
  """Architecture of a BERT encoder (names as in transformers' BertConfig)."""

  vocab_size: int = 30522
  hidden_size: int = 768
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  intermediate_size: int = 3072
  hidden_act: str = "gelu"
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12
  pad_token_id: int = 0
  add_pooling_layer: bool = True
  dropout_rate: float = 0.0  # hidden and attention dropout when deterministic=False
  dtype: str = "float32"  # compute dtype
  param_dtype: str = "float32"

  def __post_init__(self):
    if self.hidden_size % self.num_attention_heads:
      raise ValueError(f"hidden_size {self.hidden_size} is not divisible by "
                       f"num_attention_heads {self.num_attention_heads}")
    if self.hidden_act not in _ACTIVATIONS:
      raise ValueError(f"hidden_act {self.hidden_act!r} is not supported; one of "
                       f"{sorted(_ACTIVATIONS)}")

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_attention_heads

  @classmethod
  def tiny(cls, **overrides) -> "BertConfig":
    """A two-layer model for fast tests."""
    fields = dict(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=64, max_position_embeddings=64, type_vocab_size=2,
                  layer_norm_eps=1e-12)
    fields.update(overrides)
    return cls(**fields)

  @classmethod
  def from_hf_config(cls, hf_config, **overrides) -> "BertConfig":
    """From a transformers config object or its dict (config.json)."""
    d = hf_config.to_dict() if hasattr(hf_config, "to_dict") else dict(hf_config)
    model_type = d.get("model_type")
    architectures = d.get("architectures") or []
    if model_type != "bert" and not any(a.startswith("Bert") for a in architectures):
      raise ValueError(f"not a BERT config: model_type={model_type!r}, architectures="
                       f"{architectures}; this loader reads BertModel checkpoints only")
    position = d.get("position_embedding_type", "absolute")
    if position not in (None, "absolute"):
      raise ValueError(f"position_embedding_type={position!r} is not supported (absolute "
                       "only)")
    if d.get("is_decoder"):
      raise ValueError("is_decoder=true is not supported: this is an encoder")
    fields = dict(
        vocab_size=d["vocab_size"], hidden_size=d["hidden_size"],
        num_hidden_layers=d["num_hidden_layers"],
        num_attention_heads=d["num_attention_heads"],
        intermediate_size=d["intermediate_size"], hidden_act=d.get("hidden_act", "gelu"),
        max_position_embeddings=d.get("max_position_embeddings", 512),
        type_vocab_size=d.get("type_vocab_size", 2),
        layer_norm_eps=d.get("layer_norm_eps", 1e-12),
        pad_token_id=d.get("pad_token_id") or 0)
    fields.update(overrides)
    return cls(**fields)

  def to_hf_config(self):
    """The matching transformers.BertConfig."""
    import transformers  # pylint: disable=import-outside-toplevel
    return transformers.BertConfig(
        vocab_size=self.vocab_size, hidden_size=self.hidden_size,
        num_hidden_layers=self.num_hidden_layers,
        num_attention_heads=self.num_attention_heads,
        intermediate_size=self.intermediate_size, hidden_act=self.hidden_act,
        max_position_embeddings=self.max_position_embeddings,
        type_vocab_size=self.type_vocab_size, layer_norm_eps=self.layer_norm_eps,
        pad_token_id=self.pad_token_id, architectures=["BertModel"])


class _Block(nn.Module):
  """Common fields: config, LoRA settings, dropout mode."""

  config: BertConfig
  lora_scale: float = 1.0
  lora_dropout: float = 0.0
  deterministic: bool = True

  def dense(self, features: int, axes: tuple[str, str], name: str):
    cfg = self.config
    linear = Linear(features, axes=axes, use_bias=True, dtype=jnp.dtype(cfg.dtype),
                    param_dtype=jnp.dtype(cfg.param_dtype), lora_scale=self.lora_scale,
                    lora_dropout=self.lora_dropout, name=name)
    return lambda x: linear(x, deterministic=self.deterministic)

  def norm(self, name: str):
    cfg = self.config
    return nn.LayerNorm(
        epsilon=cfg.layer_norm_eps, dtype=jnp.dtype(cfg.dtype),
        param_dtype=jnp.dtype(cfg.param_dtype), use_fast_variance=False,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)), name=name)

  def dropout(self, x):
    return Dropout(self.config.dropout_rate)(x, deterministic=self.deterministic)


class Attention(_Block):
  """Bidirectional multi-head self-attention over the unmasked keys."""

  @nn.compact
  def __call__(self, x, key_bias):
    """x [B, T, D]; key_bias [B, 1, 1, T] float32 (0 for real keys, very negative for pads)."""
    cfg = self.config
    b, t, _ = x.shape
    n, h = cfg.num_attention_heads, cfg.head_dim
    # Heads first ([B, N, T, H]) so both attention matmuls are plain batched matmuls: on
    # CPU this layout runs them several times faster than contracting across [B, T, N, H].
    def heads(name):
      y = self.dense(n * h, ("embed", "heads"), name)(x)
      return y.reshape(b, t, n, h).transpose(0, 2, 1, 3)

    q, k, v = heads("query"), heads("key"), heads("value")
    scores = jnp.einsum("bnth,bnsh->bnts", q, k,
                        preferred_element_type=jnp.float32) * (1.0 / np.sqrt(h)) + key_bias
    # softmax(scores) @ v, normalised after the matmul ([B, N, T, H] instead of
    # [B, N, T, S] divisions); pads get exp(min - max) = 0.
    weights = jnp.exp(scores - scores.max(axis=-1, keepdims=True))  # [B, N, T, S]
    total = weights.sum(axis=-1, keepdims=True)  # [B, N, T, 1]
    weights = self.dropout(weights)
    out = jnp.einsum("bnts,bnsh->bnth", weights.astype(v.dtype), v,
                     preferred_element_type=jnp.float32) / total
    out = out.astype(v.dtype).transpose(0, 2, 1, 3).reshape(b, t, n * h)
    return self.dense(cfg.hidden_size, ("heads", "embed"), "output")(out)


class EncoderLayer(_Block):
  """Post-LN: x = LN(x + Attn(x)); x = LN(x + MLP(x))."""

  @nn.compact
  def __call__(self, x, key_bias):
    cfg = self.config
    kw = dict(config=cfg, lora_scale=self.lora_scale, lora_dropout=self.lora_dropout,
              deterministic=self.deterministic)
    attn = Attention(**kw, name="attention")(x, key_bias)
    x = self.norm("attention_norm")(x + self.dropout(attn))
    hidden = _ACTIVATIONS[cfg.hidden_act](
        self.dense(cfg.intermediate_size, ("embed", "mlp"), "intermediate")(x))  # [B, T, F]
    out = self.dense(cfg.hidden_size, ("mlp", "embed"), "output")(hidden)
    x = self.norm("output_norm")(x + self.dropout(out))
    return nn.with_logical_constraint(x, ("batch", "length", "embed"))


class Embeddings(_Block):

  @nn.compact
  def __call__(self, input_ids, token_type_ids, position_ids):
    cfg = self.config
    dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)

    def embed(num, axes, name):
      return nn.Embed(num, cfg.hidden_size, dtype=dtype, param_dtype=param_dtype,
                      embedding_init=nn.with_logical_partitioning(
                          nn.initializers.normal(stddev=0.02), axes), name=name)

    x = (embed(cfg.vocab_size, ("vocab", "embed"), "word_embeddings")(input_ids)
         + embed(cfg.type_vocab_size, (None, "embed"), "token_type_embeddings")(token_type_ids)
         + embed(cfg.max_position_embeddings, (None, "embed"),
                 "position_embeddings")(position_ids))  # [B, T, D]
    return self.dropout(self.norm("LayerNorm")(x))


class Bert(nn.Module):
  """transformers' BertModel: last hidden state [B, T, D] (and the pooler output)."""

  config: BertConfig
  lora_scale: float = 1.0
  lora_dropout: float = 0.0

  @nn.compact
  def __call__(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None,
               deterministic: bool = True, return_pooled: bool = False):
    """input_ids, attention_mask, token_type_ids, position_ids: [B, T] (right padding)."""
    cfg = self.config
    b, t = input_ids.shape
    if t > cfg.max_position_embeddings:
      raise ValueError(f"sequence length {t} exceeds max_position_embeddings "
                       f"{cfg.max_position_embeddings}; truncate the input")
    if attention_mask is None:
      attention_mask = jnp.ones((b, t), jnp.int32)
    if token_type_ids is None:
      token_type_ids = jnp.zeros((b, t), jnp.int32)
    if position_ids is None:
      position_ids = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    kw = dict(config=cfg, lora_scale=self.lora_scale, lora_dropout=self.lora_dropout,
              deterministic=deterministic)
    x = Embeddings(**kw, name="embeddings")(input_ids, token_type_ids, position_ids)
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
    keep = jnp.asarray(attention_mask).astype(bool)[:, None, None, :]  # [B, 1, 1, T]
    key_bias = jnp.where(keep, 0.0, jnp.finfo(jnp.float32).min).astype(jnp.float32)
    for i in range(cfg.num_hidden_layers):
      x = EncoderLayer(**kw, name=f"layers_{i}")(x, key_bias)
    if not return_pooled:
      return x
    if not cfg.add_pooling_layer:
      raise ValueError("return_pooled=True needs a pooler: this config has "
                       "add_pooling_layer=False")
    pooled = jnp.tanh(Linear(cfg.hidden_size, axes=("embed", "embed"), use_bias=True,
                             dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype),
                             name="pooler")(x[:, 0]))  # [B, D]
    return x, pooled


def _init_abstract(config: BertConfig):
  ids = jnp.zeros((1, 1), jnp.int32)
  return jax.eval_shape(lambda: Bert(config).init(jax.random.key(0), ids,
                                                  return_pooled=config.add_pooling_layer))


def param_shapes(config: BertConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
  """{flax path: shape} of every parameter, computed without allocating them."""
  from flax import traverse_util  # pylint: disable=import-outside-toplevel
  flat = traverse_util.flatten_dict(nn.unbox(_init_abstract(config))["params"])
  return {path: tuple(x.shape) for path, x in flat.items()}


def param_partition_specs(config: BertConfig):
  """Logical PartitionSpecs of the parameter tree (for slim_jax.sharding)."""
  return nn.get_partition_spec(_init_abstract(config))["params"]


def init_params(config: BertConfig, rng: jax.Array) -> dict:
  """Random parameters (plain arrays) for tests and from-scratch use."""
  ids = jnp.zeros((1, 1), jnp.int32)
  init = jax.jit(lambda r: nn.unbox(Bert(config).init(
      r, ids, return_pooled=config.add_pooling_layer))["params"])
  return init(rng)


# DESIGN.md's public API names. The library itself loads through slim_jax/convert/
# (convert/ depends on models/, never the reverse); these two delegate there for users.

def load_pretrained(path: str, dtype: str | None = None):
  """(config, params, tokenizer) from a HF BERT folder: the public name of
  slim_jax.convert.pretrained.load_bert."""
  from slim_jax.convert import pretrained  # pylint: disable=import-outside-toplevel
  return pretrained.load_bert(path, dtype=dtype)


def save_pretrained(config: BertConfig, params, path: str, tokenizer=None) -> None:
  """Writes a HF folder: the public name of slim_jax.convert.pretrained.save_bert."""
  from slim_jax.convert import pretrained  # pylint: disable=import-outside-toplevel
  pretrained.save_bert(config, params, path, tokenizer=tokenizer)
