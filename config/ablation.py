# Is PolyGLU better than SwiGLU? One arm of the controlled ablation on one 80 GB GPU (A100/H100):
#   make ablation SEEDS=3      # both arms x 3 init seeds, one after another, then analyze.py --compare
#   python train.py config/ablation.py --model_type=vanilla --init_seed=2 --out_dir=checkpoints/ablation/vanilla-seed2
# The frozen block shrunk to 125,151,712 parameters (VanillaLM 124,854,784): what changes is size alone. Both arms see
# the same rows in the same order (the data's `seed` is fixed here); init_seed varies the weights and the Gumbel noise.
model_type = 'polyglu'          # the arm: 'polyglu' | 'vanilla', chosen on the command line
vocab_size = 151_669            # the same Qwen3 tokenizer and data
d_model = 512                   # 125M in all like GPT-3 Small, but the 151,669-token embedding holds 78M of them (47.5M
n_layers = 12                   # in the blocks); at d_model 768 it would be 223M and ~$24 a run. The full model's
n_heads = 8                     # shapes: head_dim 64, 2 query heads per KV head, d_ff = 4 d_model
n_kv_heads = 4
d_ff = 2048
max_seq_len = 4096              # the full run's rows: PolyGLU's gate pools over the whole row, so its routing sees the
block_size = 4096               # same several-document windows; at 2,048 the run would cost 8% less

data_dir = 'data/tokenized'     # the full run's prepared data; alone, 2.5B tokens suffice (docs/ablation.md)
mixture_baseline = (0.70, 0.25, 0.05)
mixture_anneal = (0.85, 0.10, 0.05)
anneal_start = 0.8
seed = 1337                     # the data plan: the same for every arm and init_seed

# ~20 tokens per parameter (Chinchilla): 4,774 steps x 524,288 tokens = 2.50B tokens = 20.0 per PolyGLU parameter
micro_batch_size = 16           # activations ~44 GB unfused (bench.py --memory_only); on a 40 GB card 8 x 16
grad_accum_steps = 8
max_steps = 4_774
learning_rate = 6e-4            # GPT-3's for its 125M model (the full run's 1e-4 is for 600M); tuned for neither arm
min_lr = 6e-5
warmup_steps = 500              # ~10% of the steps, as in the full run
tau_start = 1.0                 # tau anneals 1.0 -> 0.1 over the run: part of the PolyGLU arm
tau_end = 0.1

backend = 'deepspeed'           # one GPU without a launcher; LAUNCH='deepspeed --num_gpus=8' spreads a run over eight
device = 'cuda'
zero_stage = 1
dtype = 'bfloat16'
attention = 'auto'
fused = False                   # both arms the same; the compiled kernels are not yet checked on a GPU
recompute_blocks = 0

out_dir = 'checkpoints/ablation/polyglu-seed1'  # make ablation gives each arm and seed its own
log_interval = 10
eval_interval = 250             # 20 validation points per domain (64 rows of 4,096 tokens each)
checkpoint_interval = 500
keep_checkpoints = 2            # ~2 GB each with the optimizer state
wandb_log = False               # the comparison reads train_log.jsonl; --wandb_log=True to watch the runs there
wandb_run_name = 'ablation'
