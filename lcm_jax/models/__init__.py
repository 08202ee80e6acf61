"""The Flax modules of the model families (``base_lcm``, ``two_tower``, ``one_tower``), their
shared :class:`~lcm_jax.models.config.ModelConfig`, reference checkpoint names (``naming``) and
the FLOP conventions (``flops``). How the tools build, train, evaluate and generate with a family
is :mod:`lcm_jax.families`."""
