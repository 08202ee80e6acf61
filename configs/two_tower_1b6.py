"""Two-Tower diffusion LCM 1.6B (``two_tower_diffusion_lcm_1_6B``), pre-training.

Run:
  python -m lcm_jax.main --config=configs/two_tower_1b6.py --workdir=/path/to/workdir \
      --config.data.train=/data/wiki:0.8,/data/books:0.2
  python -m lcm_jax.main --config=configs/two_tower_1b6.py --mode=describe
Tiny CPU variant (synthetic corpus, d 64, 2 contextualizer + 2 denoiser layers, 600 steps):
  python -m lcm_jax.main --config=configs/two_tower_1b6.py:tiny --workdir=workdir/two_tower_tiny
Bench variant (benchmarks/train_step.py): d 1024, 16 heads, 4 contextualizer + 8 denoiser layers
(the reference's bench shape), dropout 0.1, 16 rows x 128 concepts.
Supervised fine-tuning (source/target shards; only target concepts are scored) from a pre-trained
run, with the reference fine-tuning recipe (configs/mse_1b6.py ``apply_sft_recipe``):
  python -m lcm_jax.main --config=configs/two_tower_1b6.py:sft --workdir=/path/to/sft \
      --config.train.init_from=/path/to/pretrain_workdir --config.data.train=/data/sft_pairs

d 2048, 16 heads, 5 contextualizer layers (``num_layers``) + 13 denoiser layers, ffn_inner_dim 8192
(SwiGLU 5632), max_seq_len 4096, 100 diffusion steps (squaredcos_cap_v2, zero terminal SNR),
x0 prediction with uniform t and weight 1, conditioning dropout 0.15. Optimizer as Base-LCM's
recipe: AdamW 4e-4, betas (0.9, 0.95), eps 1e-5, wd 0.1, warmup 10k from 1e-7, cosine to 1e-5 at
250k, grad clip 25, ~229k concepts per step.
"""

from configs import base
from configs import mse_1b6
from lcm_jax import errors


def apply_variant(c, variant: str, config_file: str):
  """The ``tiny`` / ``bench`` / ``sft`` variants shared by the Two-Tower recipes (modifies c).

  ``tiny`` and ``bench`` are configs/base.py's ``apply_tiny`` / ``apply_bench`` with the Two-Tower
  depths (2 contextualizer + 2 denoiser layers; 4 + 8).
  """
  if variant == "tiny":
    base.apply_tiny(c)
    c.model.denoiser_num_layers = 2
  elif variant == "bench":
    base.apply_bench(c)
    c.model.num_layers = 4
    c.model.denoiser_num_layers = 8
  elif variant == "sft":
    mse_1b6.apply_sft_recipe(c)
  elif variant:
    raise errors.ConfigError(f"{config_file}: unknown variant {variant!r} "
                     "(expected '', 'tiny', 'bench' or 'sft')")
  return c


def get_config(variant: str = ""):
  c = base.get_config("two_tower_diffusion_lcm")
  c.model.model_dim = 2048
  c.model.num_heads = 16
  c.model.num_layers = 5             # contextualizer
  c.model.denoiser_num_layers = 13
  c.model.ffn_inner_dim = 8192       # SwiGLU 5632
  c.model.max_seq_len = 4096
  c.model.num_diffusion_train_steps = 100
  c.model.beta_schedule = "squaredcos_cap_v2"
  c.model.rescale_zero_terminal_snr = True
  c.model.loss_weighting = "none"
  c.model.cfg_dropout = 0.15
  # ~229k concepts per step in the reference (7168 per GPU x 32 GPUs): 1792 rows of 128 concepts.
  c.data.global_batch_size = 1792
  c.data.seq_len = 128
  c.mesh.data = 1
  c.mesh.fsdp = -1
  return apply_variant(c, variant, "configs/two_tower_1b6.py")
