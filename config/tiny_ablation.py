# The ablation's CPU miniature: the demo's 7M-parameter tiny model (config/tiny.py, on the data `make demo` prepares),
# both arms x 2 seeds x 10 steps. It proves the pipeline (paired data, resume and skip, the comparison), not the answer:
#   make ablation SEEDS=2 ABLATION_CONFIG=config/tiny_ablation.py ABLATION_DIR=checkpoints/demo/ablation
import os
exec(open(os.path.join(os.path.dirname(__file__), 'tiny.py')).read())  # the demo's model, data and CPU settings
micro_batch_size = 2
max_steps = 10
warmup_steps = 2
log_interval = 2
eval_interval = 5
checkpoint_interval = 5
keep_checkpoints = 1
out_dir = 'checkpoints/demo/ablation/polyglu-seed1'
