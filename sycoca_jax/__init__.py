"""sycoca_jax: SyCoCa (Symmetrizing Contrastive Captioners) pretraining in JAX/Flax."""
