# SFT of the tiny demo model on the embedded sample's conversations (CPU, about a quarter of a minute):
#   python sft.py config/tiny_sft.py
init_from = 'checkpoints/demo/portable_final.pt'
data_dir = 'data/demo/tokenized/sft'
out_dir = 'checkpoints/demo'
block_size = 128
val_fraction = 0.1
epochs = 1
micro_batch_size = 2
grad_accum_steps = 1
learning_rate = 3e-3
min_lr = 3e-4
warmup_steps = 3
loss_chunk_size = 32            # see config/tiny.py
backend = 'torch'
device = 'cpu'
dtype = 'float32'
log_interval = 10
eval_interval = 10
checkpoint_interval = 10
snapshot_interval = 5
