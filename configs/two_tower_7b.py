"""Two-Tower diffusion LCM 7B (``two_tower_diffusion_lcm_7B``), pre-training.

Run:
  python -m lcm_jax.main --config=configs/two_tower_7b.py --workdir=/path/to/workdir \
      --config.data.train=/data/wiki:0.8,/data/books:0.2
  python -m lcm_jax.main --config=configs/two_tower_7b.py --mode=describe
Tiny CPU variant (same as configs/two_tower_1b6.py:tiny):
  python -m lcm_jax.main --config=configs/two_tower_7b.py:tiny --workdir=workdir/two_tower_7b_tiny
Bench and fine-tuning (``:sft``) variants: as configs/two_tower_1b6.py.

d 4096, 32 heads, 5 contextualizer layers (``num_layers``) + 14 denoiser layers, ffn_inner_dim
16384 (SwiGLU 11008), max_seq_len 4096; diffusion and optimizer recipe as the 1.6B (the spec gives
no separate 7B pre-training recipe).
"""

from configs import two_tower_1b6


def get_config(variant: str = ""):
  c = two_tower_1b6.get_config()
  c.model.model_dim = 4096
  c.model.num_heads = 32
  c.model.num_layers = 5             # contextualizer
  c.model.denoiser_num_layers = 14
  c.model.ffn_inner_dim = 16384      # SwiGLU 11008
  return two_tower_1b6.apply_variant(c, variant, "configs/two_tower_7b.py")
