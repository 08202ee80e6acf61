"""The errors a user can cause (bad data, bad config): reported as one clear line, exit code 2."""

from lcm_jax.checkpoint import CheckpointError
from lcm_jax.schema import ShardFormatError
from lcm_jax.sharding import MeshError

USER_ERRORS = (ShardFormatError, MeshError, CheckpointError, FileNotFoundError, ValueError)
