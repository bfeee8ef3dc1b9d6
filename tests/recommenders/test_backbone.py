"""The backbone registry and the shared interface every backbone offers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from slim_jax.recommenders import backbone, registry


def test_registry_defaults_and_errors():
  assert registry.backbone_names() == ("gru4rec", "sasrec", "srgnn")
  cfg = registry.make_config("sasrec", num_items=10)
  assert (cfg.num_layers, cfg.num_heads, cfg.dropout, cfg.hidden_size) == (2, 2, 0.5, 64)
  assert registry.make_config("gru4rec", num_items=10, dropout=0.0).dropout == 0.0
  with pytest.raises(ValueError, match="unknown recommender backbone 'caser'"):
    registry.make_config("caser", num_items=10)


@pytest.mark.parametrize("name", ["gru4rec", "sasrec", "srgnn"])
def test_interface_shapes_and_scores(name):
  model = registry.make_recommender(name, num_items=20, max_len=6, hidden_size=8)
  x = jnp.array([[0, 0, 3, 4, 3, 5], [1, 2, 3, 4, 5, 6]])
  variables = model.init(jax.random.PRNGKey(0), x)
  every = model.apply(variables, x, all_positions=True)
  last = model.apply(variables, x)
  assert every.sequence.shape == (2, 6, 8) and last.sequence.shape == (2, 8)
  assert every.items.shape == (21, 8)
  np.testing.assert_array_equal(np.asarray(every.items[0]), 0.0)  # padding row
  np.testing.assert_allclose(every.sequence[:, -1], last.sequence, atol=1e-6)
  candidates = jnp.array([[5, 1, 2], [7, 3, 9]])
  scores = backbone.score_candidates(last.sequence, last.items, candidates)
  full = backbone.score_all(last.sequence, last.items)
  np.testing.assert_allclose(scores, jnp.take_along_axis(full, candidates, axis=1), rtol=1e-5)
