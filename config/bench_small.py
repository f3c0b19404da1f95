# bench.py at a CPU-sized model with the real vocabulary:  python bench.py config/bench_small.py
d_model = 256
n_layers = 4
n_heads = 4
n_kv_heads = 2
d_ff = 1024
block_size = 512
micro_batch_size = 4
grad_accum_steps = 1
steps = 5
warmup = 2
loss_chunk_size = 256
device = 'cpu'
dtype = 'float32'
backend = 'torch'
fused = False
recompute_blocks = 0
