"""PyTorch interop for lcm_jax, beside it (``lcm_jax`` never imports this package).

* :mod:`lcm_interop.reference`: the reference's checkpoint format, one
  :class:`~lcm_interop.reference.ReferenceFamily` entry per model family (state-dict keys and
  shapes, card fields and archs, the torch module and decoder); JAX-free.
* :mod:`lcm_interop.naming`: Flax parameter trees <-> reference state-dict keys.
* :mod:`lcm_interop.export`: Orbax checkpoint <-> ``model.pt`` + ``model_card.yaml`` (``python -m
  lcm_interop.export``); the only module that needs both JAX and torch.
* :mod:`lcm_interop.torch_models`, :mod:`lcm_interop.torch_generate`: plain-PyTorch models of every
  family, generation and the DDIM sampler; importing them imports no JAX (they read
  ``lcm_jax.models.config.ModelConfig``, ``lcm_jax.schedules`` and ``lcm_jax.generation_config``,
  which are JAX-free).

This file imports nothing.
"""
