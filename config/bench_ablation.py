# bench.py at config/ablation.py's settings, on the GPU before `make ablation`: its step's tokens/s, MFU and memory, and
# the hours and dollars of one run (token_budget) at the measured rate:  python bench.py config/bench_ablation.py
import os
_ablation = {'__file__': __file__}
exec(open(os.path.join(os.path.dirname(__file__), 'ablation.py')).read(), _ablation)
for _key in ('vocab_size', 'd_model', 'n_layers', 'n_heads', 'n_kv_heads', 'd_ff', 'block_size', 'micro_batch_size', 'grad_accum_steps',
             'backend', 'zero_stage', 'device', 'dtype', 'attention', 'fused', 'recompute_blocks'):
    globals()[_key] = _ablation[_key]
token_budget = (_ablation['max_steps'] * _ablation['micro_batch_size'] * _ablation['grad_accum_steps']
                * _ablation['block_size'])
