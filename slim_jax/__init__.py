"""slim-jax: SLIM (WWW 2024) in JAX/Flax. See README.md and DESIGN.md."""
