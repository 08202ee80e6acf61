"""One-Tower diffusion LCM 1.6B (``one_tower_diffusion_lcm``), pre-training.

Run:
  python -m lcm_jax.main --config=configs/one_tower_1b6.py --workdir=/path/to/workdir \
      --config.data.train=/data/wiki:0.8,/data/books:0.2
  python -m lcm_jax.main --config=configs/one_tower_1b6.py --mode=describe
Tiny CPU variant (synthetic corpus, d 64, 2 layers, 600 steps):
  python -m lcm_jax.main --config=configs/one_tower_1b6.py:tiny --workdir=workdir/one_tower_tiny
Bench variant (benchmarks/train_step.py): d 1024, 16 heads, 8 layers, 16 rows x 128 concepts.

The paper's 1.6B One-Tower (arXiv 2412.08821, section 2.3): ONE causal transformer of 32 layers,
32 heads (head_dim 64), model_dim 2048, ffn_inner_dim 8192 (SwiGLU 5632), learned position
embeddings (max_seq_len 4096 positions, no RoPE), the diffusion timestep embedding concatenated to
each input, clean and noisy concepts interleaved (the row of 128 concepts is a sequence of 256).
Diffusion as the Two-Tower: 100 steps, squaredcos_cap_v2 rescaled to zero terminal SNR, x0
prediction, uniform t, weight 1, conditioning dropout 0.15. Optimizer as Base-LCM's recipe
(AdamW 4e-4, betas (0.9, 0.95), eps 1e-5, wd 0.1, warmup 10k, cosine to 1e-5 at 250k, clip 25);
the same ~229k concepts per step as the Two-Tower recipe (each concept costs two sequence
positions here). Parameters: 1,666,491,392 (lcm_jax.models.one_tower.param_count_formula).
"""

from configs import base
from lcm_jax import errors


def apply_variant(c, variant: str, config_file: str):
  """The ``tiny`` / ``bench`` variants (configs/base.py's ``apply_tiny`` / ``apply_bench``)."""
  if variant == "tiny":
    base.apply_tiny(c)
    c.model.max_seq_len = 256
  elif variant == "bench":
    base.apply_bench(c)
    c.model.num_layers = 8
  elif variant:
    raise errors.ConfigError(f"{config_file}: unknown variant {variant!r} "
                             "(expected '', 'tiny' or 'bench')")
  return c


def get_config(variant: str = ""):
  c = base.get_config("one_tower_diffusion_lcm")
  c.model.model_dim = 2048
  c.model.num_heads = 32
  c.model.num_layers = 32
  c.model.ffn_inner_dim = 8192       # SwiGLU 5632
  c.model.max_seq_len = 4096         # learned position table (concept positions)
  c.model.timestep_embed_dim = 256
  c.model.num_diffusion_train_steps = 100
  c.model.beta_schedule = "squaredcos_cap_v2"
  c.model.rescale_zero_terminal_snr = True
  c.model.loss_weighting = "none"
  c.model.cfg_dropout = 0.15
  c.data.global_batch_size = 1792   # x 128 concepts ~ 229k concepts per step
  c.data.seq_len = 128
  c.mesh.data = 1
  c.mesh.fsdp = -1
  return apply_variant(c, variant, "configs/one_tower_1b6.py")
