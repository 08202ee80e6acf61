"""Base-LCM (MSE regression), the reference 1.6B pre-training recipe.

Run:
  python -m lcm_jax.main --config=configs/mse_1b6.py --workdir=/path/to/workdir \
      --config.data.train=/data/wiki:0.8,/data/books:0.2
  python -m lcm_jax.main --config=configs/mse_1b6.py --mode=describe
Tiny CPU variant (the README's default job):
  python -m lcm_jax.main --config=configs/mse_1b6.py:tiny --workdir=workdir/tiny
Bench variant (benchmarks/train_step.py): d 1024, 8 layers, 16 heads, dropout 0.1, layers unrolled,
16 rows x 128 concepts.
Supervised fine-tuning (source/target shards, see lcm_jax/schema.py ``source_len``) from a
pre-trained run:
  python -m lcm_jax.main --config=configs/mse_1b6.py:sft --workdir=/path/to/sft \
      --config.train.init_from=/path/to/pretrain_workdir --config.data.train=/data/sft_pairs
"""

from configs import base
from lcm_jax import errors


def get_config(variant: str = ""):
  # base_lcm_1_6B: d 2048, 32 layers, 16 heads, ffn 8192 (SwiGLU 5632), max_seq_len 4096 (the
  # ModelConfig defaults).
  c = base.get_config("base_lcm")
  # ~229k concepts per step in the reference (7168 per GPU x 32 GPUs): 1792 rows of 128 concepts.
  c.data.global_batch_size = 1792
  c.data.seq_len = 128
  c.mesh.data = 1
  c.mesh.fsdp = -1

  if variant == "tiny":
    base.apply_tiny(c)
  elif variant == "bench":
    base.apply_bench(c)
    c.model.num_layers = 8
  elif variant == "sft":
    apply_sft_recipe(c)
  elif variant:
    raise errors.ConfigError(f"configs/mse_1b6.py: unknown variant {variant!r} "
                     "(expected '', 'tiny', 'bench' or 'sft')")
  return c


def apply_sft_recipe(c):
  """The reference fine-tuning recipe: lr 3e-5, warmup 3k, wd 0.01, 20k steps.

  Data are source/target documents; only target concepts are scored. ``train.init_from`` must
  name the pre-trained workdir (``WORKDIR`` or ``WORKDIR@STEP``).
  """
  c.optimizer.lr = 3e-5
  c.optimizer.warmup_steps = 3_000
  c.optimizer.decay_steps = 20_000
  c.optimizer.final_lr = 3e-6
  c.optimizer.weight_decay = 0.01
  c.train.num_steps = 20_000
  c.data.train = ""
  return c
