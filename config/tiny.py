# A tiny PolychromaticLM that trains in about 15 seconds on 2 CPU cores (the demo, the end-to-end test):
#   python train.py config/tiny.py
# Same architecture family and the real Qwen3 vocabulary; everything else shrunk. On the CPU the head's 151,669-way
# logits are nearly all of a step's work, so the demo's cost is the tokens it trains on: 40 steps of 128.
d_model = 48
n_layers = 2
n_heads = 4
n_kv_heads = 2
d_ff = 192
max_seq_len = 256
block_size = 64

data_dir = 'data/demo/tokenized'
out_dir = 'checkpoints/demo'
val_tokens = 1024
eval_rows = 8

micro_batch_size = 2
grad_accum_steps = 1
max_steps = 40
learning_rate = 1e-2               # high for a 7M model: 40 steps must show the loss fall
min_lr = 1e-3
warmup_steps = 4

# chunks this small stay below glibc's mmap threshold, which would otherwise page-fault every allocation
loss_chunk_size = 32
backend = 'torch'
device = 'cpu'
dtype = 'float32'
log_interval = 5
eval_interval = 20
checkpoint_interval = 20
snapshot_interval = 10             # 4 snapshots: analyze.py --run follows routing over the 40 steps
wandb_log = False
wandb_run_name = 'tiny'
