# The full PolychromaticLM pre-training run of SPEC.md on one 80 GB GPU (A100/H100):
#   deepspeed train.py config/pretrain.py
# ~10B tokens = 19,531 steps x (16 x 8 x 4,096) tokens. The model, data, batch and schedule are train.py's defaults,
# spelled out (tests/test_train.py holds them equal); prepare.py sizes the data by this file, bench.py times its step.
model_type = 'polyglu'          # 'vanilla' for the SwiGLU baseline (VanillaLM)
vocab_size = 151_669
d_model = 1024
n_layers = 28
n_heads = 16
n_kv_heads = 8
d_ff = 4096
max_seq_len = 4096

data_dir = 'data/tokenized'
sources = ('math', 'stem', 'code')
mixture_baseline = (0.70, 0.25, 0.05)  # math, stem, code for the first 80% of steps
mixture_anneal = (0.85, 0.10, 0.05)    # ... and for the last 20%
anneal_start = 0.8                     # the fraction of max_steps after which the annealed mixture is used
block_size = 4096
val_tokens = 2_000_000                 # held out at the end of each source

micro_batch_size = 16
grad_accum_steps = 8
max_steps = 19_531              # ~10B tokens at 512K tokens a step
learning_rate = 1e-4
min_lr = 1e-5
warmup_steps = 2000
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.95
adam_eps = 1e-8
grad_clip = 1.0
tau_start = 1.0
tau_end = 0.1

backend = 'deepspeed'
device = 'cuda'                # a GPU run: no CUDA is an error at start, never a bf16 run on the CPU
zero_stage = 1
dtype = 'bfloat16'
attention = 'auto'             # 'auto': flash-attn if installed, else torch's varlen_attn (sm80+), else SDPA; printed at start
# Memory and speed (train.py's defaults are off, for CPU): no variant fits micro-batch 16 x 4,096 on an 80 GB card
# without recomputing some blocks; with the compiled kernels (fused), recomputing the first 8 of 28 keeps the
# activations under 50 GB, beside ~12 GB of weights, gradients and AdamW state. The bytes a block keeps come from
# `python bench.py --memory_only=True --fused=True`, the peak memory an H200 measured from `make gpu-check`: both in
# docs/benchmarks.md. A larger card fits fewer recomputed blocks; `make gpu-check` prints the count for the card at hand.
fused = True
recompute_blocks = 8           # the first 8 blocks recompute their activations in the backward (-1: all, 0: none)
# The speed levers (docs/gpu.md, "Speed levers"), each off until a GPU has measured it faster and exact: `make gpu-check`
# times today's path beside each lever and all together, checks each against today's loss, gradients and update, and
# prints the line to run on that card, e.g. `deepspeed train.py config/pretrain.py --loss_kernel=liger --lean_mix=True`.
loss_kernel = 'chunked'        # 'liger': the head and the loss fused (no second head forward, float32 head gradient)
lean_mix = False               # PolyGLU's fused backward without its [tokens, d_ff, 4] float32 stacks
compile_blocks = False         # each block compiled whole
fused_adamw = False            # torch's one-kernel AdamW
prefetch = False               # the next step's batches read and copied while this step runs
selective_checkpointing = False  # the recomputed blocks keep their matmuls' outputs, recompute the elementwise work

out_dir = 'checkpoints'
resume = 'auto'
log_interval = 10
eval_interval = 500
checkpoint_interval = 500
keep_checkpoints = 3
snapshot_interval = 1000        # 20 bf16 weight snapshots of 1.2 GB (24 GB), kept: routing over training (analyze.py --run)
wandb_log = True
wandb_project = 'polychromatic'
wandb_run_name = 'polyglu-600m'
