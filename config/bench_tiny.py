# bench.py smoke size (CI, a few seconds on CPU):  python bench.py config/bench_tiny.py
vocab_size = 1024
d_model = 64
n_layers = 2
n_heads = 4
n_kv_heads = 2
d_ff = 256
block_size = 128
micro_batch_size = 2
grad_accum_steps = 1           # a step of one micro-batch (the run has 8)
steps = 2
warmup = 1
device = 'cpu'
dtype = 'float32'
backend = 'torch'
fused = False                 # compiling takes longer than this size's steps
recompute_blocks = 0
