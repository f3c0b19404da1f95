"""
Training-step benchmark: PolyGLU and VanillaLM side by side on the present device.

    python bench.py                                     # the full model, micro-batch 16 x 4,096 (a GPU)
    python bench.py config/bench_small.py               # CPU-sized
    python bench.py --fused=True --gradient_checkpointing=True --loss_chunk_size=4096
    python bench.py --profile=True                      # the top entries of a profiled PolyGLU step

Times `steps` training steps (forward, backward, AdamW) after `warmup` steps, on random tokens with a document
separator every ~1,000 tokens (document masking on), and prints tokens/s, MFU against the device's peak bf16
FLOP/s (6N + attention per token, model.flops_per_token), peak memory, the step-time ratio PolyGLU / VanillaLM,
and the hours and dollars that `token_budget` tokens would take at the measured rate.
"""
import resource
import time

import numpy as np
import torch

from model import (EOS_ID, LanguageModelLoss, ModelConfig, count_parameters, create_model, cu_seqlens_from_eos,
                   flops_per_token)
from utils import peak_flops, resolve_device

# -----------------------------------------------------------------------------
# config
model_types = ('polyglu', 'vanilla')
vocab_size = ModelConfig.vocab_size  # the full model of SPEC.md unless a config file shrinks it
d_model = ModelConfig.d_model
n_layers = ModelConfig.n_layers
n_heads = ModelConfig.n_heads
n_kv_heads = ModelConfig.n_kv_heads
d_ff = ModelConfig.d_ff
block_size = 4096
micro_batch_size = 16
steps = 10
warmup = 3
fused = False                # torch.compile'd PolyGLU mix (model.enable_fused_polyglu)
flash_attention = True
gradient_checkpointing = False
loss_chunk_size = 2048
device = 'auto'
dtype = 'auto'
peak_flops_override = 0.0
token_budget = 10_000_000_000
usd_per_hour = 1.64
profile = False
seed = 1337
# -----------------------------------------------------------------------------


def batch(rng):
    tokens = rng.integers(0, min(vocab_size, EOS_ID), (micro_batch_size, block_size + 1))
    tokens[rng.random(tokens.shape) < 1 / 1000] = EOS_ID if vocab_size > EOS_ID else 0
    tokens = torch.from_numpy(tokens)
    x, y = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
    cu_seqlens, max_seqlen = cu_seqlens_from_eos(x, EOS_ID if vocab_size > EOS_ID else 0)
    return x.to(device), y.to(device), cu_seqlens.to(device), max_seqlen


def synchronize():
    if device.startswith('cuda'):
        torch.cuda.synchronize()


def measure(model_type):
    """-> dict of step seconds, tokens/s, MFU, peak memory for one model type."""
    config = ModelConfig(vocab_size=vocab_size, d_model=d_model, n_layers=n_layers, n_heads=n_heads,
                         n_kv_heads=n_kv_heads, d_ff=d_ff, max_seq_len=max(block_size, 4096), model_type=model_type)
    torch.manual_seed(seed)
    model = create_model(config, device=device, flash=flash_attention, gradient_checkpointing=gradient_checkpointing,
                         fused=fused and model_type == 'polyglu')
    objective = LanguageModelLoss(model, loss_chunk_size).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), fused=device.startswith('cuda'))
    autocast = torch.autocast('cuda', dtype=torch.bfloat16, enabled=dtype == 'bfloat16' and device.startswith('cuda'))
    rng = np.random.default_rng(seed)
    batches = [batch(rng) for _ in range(2)]

    def step(i):
        with autocast:
            loss = objective(*batches[i % 2])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for i in range(warmup):
        step(i)
    if device.startswith('cuda'):
        torch.cuda.reset_peak_memory_stats()
    synchronize()
    start = time.perf_counter()
    for i in range(steps):
        step(i)
    synchronize()
    seconds = (time.perf_counter() - start) / steps
    if profile and model_type == 'polyglu':
        from torch.profiler import ProfilerActivity, profile as profiler
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith('cuda') else [])
        with profiler(activities=activities) as prof:
            step(0)
            synchronize()
        sort = 'cuda_time_total' if device.startswith('cuda') else 'self_cpu_time_total'
        print(prof.key_averages().table(sort_by=sort, row_limit=12))
    tokens = micro_batch_size * block_size
    n_params = count_parameters(config)[0]
    peak = peak_flops(device, peak_flops_override)
    memory = (torch.cuda.max_memory_allocated() / 2**30 if device.startswith('cuda')
              else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)
    return {'params': n_params, 'step_s': seconds, 'tokens_per_s': tokens / seconds,
            'mfu': flops_per_token(config, block_size, n_params) * tokens / seconds / peak if peak else None,
            'memory_gb': memory}


def main():
    global device, dtype
    device, dtype = resolve_device(device, dtype)
    name = torch.cuda.get_device_name() if device.startswith('cuda') else 'CPU'
    print(f"bench on {name} ({device}, {dtype}): d_model {d_model}, {n_layers} layers, d_ff {d_ff}, micro-batch "
          f"{micro_batch_size} x {block_size}, fused={fused}, flash={flash_attention}, "
          f"checkpointing={gradient_checkpointing}, loss chunk {loss_chunk_size}, {steps} steps after {warmup}")
    results = {model_type: measure(model_type) for model_type in model_types}
    print(f"{'model':>8} | {'params':>12} | {'s/step':>8} | {'tokens/s':>10} | {'MFU':>6} | "
          f"{'memory GB':>9} | {'hours for budget':>16} | {'USD':>8}")
    for model_type, r in results.items():
        hours = token_budget / r['tokens_per_s'] / 3600
        mfu = f"{100 * r['mfu']:.1f}%" if r['mfu'] is not None else 'n/a'
        print(f"{model_type:>8} | {r['params']:>12,} | {r['step_s']:>8.3f} | {r['tokens_per_s']:>10,.0f} | {mfu:>6} | "
              f"{r['memory_gb']:>9.1f} | {hours:>16,.1f} | {hours * usd_per_hour:>8,.0f}")
    if len(results) == 2:
        ratio = results['polyglu']['step_s'] / results['vanilla']['step_s']
        print(f"step-time ratio PolyGLU / VanillaLM: {ratio:.3f}  (budget: {token_budget:.2e} tokens at "
              f"${usd_per_hour}/h; memory is {'peak allocated' if device.startswith('cuda') else 'process peak RSS'})")
    return results


if __name__ == '__main__':
    from configurator import configure
    configure(globals())
    main()
