"""
Training-step benchmark: PolyGLU and VanillaLM side by side on the present device.

    python bench.py                                     # the full model, micro-batch 16 x 4,096 (a GPU)
    python bench.py --fused=True --checkpoint_blocks=8  # compiled elementwise kernels, 8 of 28 blocks recomputed
    python bench.py config/bench_small.py               # CPU-sized
    python bench.py --profile=True                      # the top entries of a profiled PolyGLU step

Times `steps` training steps (forward, backward, clipped AdamW update) after `warmup` steps, through the engine
train.py uses (DeepSpeed with bf16 weights on CUDA, plain PyTorch on CPU), on random tokens with a document
separator every ~1,000 tokens (document masking on). Prints tokens/s, MFU against the device's peak bf16 FLOP/s
(6N + attention per token, model.flops_per_token), peak memory, the step-time ratio PolyGLU / VanillaLM, and the
hours and dollars that `token_budget` tokens would take at the measured rate.

It also measures what one block keeps for its backward (every tensor saved by autograd, in bf16, counted once),
per token, and from it the activation memory of the configured micro-batch with and without checkpointing: a
device-independent figure that says how many blocks must be checkpointed for a micro-batch to fit.
"""
import gc
import resource
import time

import numpy as np
import torch
from torch._dynamo.utils import counters

from model import (EOS_ID, LanguageModelLoss, ModelConfig, count_parameters, create_model, cu_seqlens_from_eos,
                   flops_per_token)
from utils import init_distributed, make_engine, optimizer_step, peak_flops, resolve_device

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
backend = 'auto'             # 'auto': DeepSpeed on CUDA (as train.py there), plain PyTorch on CPU
zero_stage = 1
fused = False                # torch.compile'd elementwise kernels (model.enable_fused_kernels)
flash_attention = True
gradient_checkpointing = False
checkpoint_blocks = -1       # with gradient_checkpointing: how many blocks recompute, from the first; -1 = all
loss_chunk_size = 2048
activation_budget_gb = 50.0  # for the printed advice: 80 GB less ~12 GB of weights, gradients and AdamW, and headroom
device = 'auto'
dtype = 'auto'
peak_flops_override = 0.0
token_budget = 10_000_000_000
usd_per_hour = 1.64
profile = False
memory_only = False          # only measure what a block keeps for its backward (seconds, any device), no steps
seed = 1337
# -----------------------------------------------------------------------------


def batch(rng):
    eos = EOS_ID if vocab_size > EOS_ID else 0
    tokens = rng.integers(0, min(vocab_size, EOS_ID), (micro_batch_size, block_size + 1))
    tokens[rng.random(tokens.shape) < 1 / 1000] = eos
    tokens = torch.from_numpy(tokens)
    x, y = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
    cu_seqlens, max_seqlen = cu_seqlens_from_eos(x, eos)
    return x.to(device), y.to(device), cu_seqlens.to(device), max_seqlen


def synchronize():
    if device.startswith('cuda'):
        torch.cuda.synchronize()


def model_config(model_type, layers=None):
    return ModelConfig(vocab_size=vocab_size, d_model=d_model, n_layers=layers or n_layers, n_heads=n_heads,
                       n_kv_heads=n_kv_heads, d_ff=d_ff, max_seq_len=max(block_size, 4096), model_type=model_type)


def saved_kib_per_token(model_type, tokens=256):
    """KiB that one block keeps for its backward per token, in bf16 (weights, buffers and shared storages
    excluded): linear in the tokens with flash-style attention, so this gives any micro-batch's activations."""
    block_model = create_model(model_config(model_type, layers=1), device=device, dtype=torch.bfloat16,
                               flash=flash_attention, fused=fused).train()
    excluded = {t.untyped_storage().data_ptr() for t in (*block_model.parameters(), *block_model.buffers())}
    saved = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in excluded:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    x = torch.randn(1, tokens, d_model, device=device, dtype=torch.bfloat16, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        block_model.model_core[0](x, block_model.rope(tokens))
    return sum(saved.values()) / tokens / 1024


def measure(model_type):
    """-> dict of step seconds, tokens/s, MFU, peak memory and saved activations for one model type."""
    config = model_config(model_type)
    torch.manual_seed(seed)
    model = create_model(config, device=device, flash=flash_attention, gradient_checkpointing=gradient_checkpointing,
                         fused=fused, checkpoint_blocks=checkpoint_blocks)
    engine, optimizer, autocast = make_engine(LanguageModelLoss(model, loss_chunk_size), model, backend, dtype,
                                              zero_stage, micro_batch_size, 1, 1.0, 1e-4, 0.1, (0.9, 0.95), 1e-8)
    engine.train()
    rng = np.random.default_rng(seed)
    batches = [batch(rng) for _ in range(2)]

    def step(i):
        optimizer_step(engine, optimizer, model, [batches[i % 2]], backend, 1.0, autocast)

    for i in range(warmup):
        step(i)
    if device.startswith('cuda'):
        torch.cuda.reset_peak_memory_stats()
    graphs = counters['stats']['unique_graphs']
    synchronize()
    start = time.perf_counter()
    for i in range(steps):
        step(i)
    synchronize()
    seconds = (time.perf_counter() - start) / steps
    if counters['stats']['unique_graphs'] > graphs:  # a compile inside the timed steps would recur in training
        print(f"warning: {model_type} compiled {counters['stats']['unique_graphs'] - graphs} graphs during the timed "
              "steps: too few warmup steps, or a shape or guard that changes from step to step")
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
    # what the caching allocator holds (fragmentation included); the CUDA context and NCCL/cuBLAS workspaces come on
    # top of it, about 1-2 GB per GPU, so compare this plus that with the card
    reserved = torch.cuda.max_memory_reserved() / 2**30 if device.startswith('cuda') else memory
    if backend == 'deepspeed':
        engine.destroy()  # its hooks would otherwise keep this model and its optimizer state alive beside the next
    del engine, optimizer, model
    gc.collect()
    if device.startswith('cuda'):
        torch.cuda.empty_cache()
    return {'params': n_params, 'step_s': seconds, 'tokens_per_s': tokens / seconds,
            'mfu': flops_per_token(config, block_size, n_params) * tokens / seconds / peak if peak else None,
            'memory_gb': memory, 'reserved_gb': reserved, 'saved_kib_per_token': saved_kib_per_token(model_type)}


def activation_gb(kib_per_token, checkpointed):
    """Activations kept for the backward over the micro-batch: un-checkpointed blocks keep kib_per_token, a
    checkpointed one its bf16 input, plus one block recomputed at a time."""
    tokens = micro_batch_size * block_size
    kept = (n_layers - checkpointed) * kib_per_token + checkpointed * d_model * 2 / 1024
    return (kept + (kib_per_token if checkpointed else 0)) * tokens * 1024 / 1e9


def main():
    global device, dtype, backend
    device, dtype = resolve_device(device, dtype)
    backend = ('deepspeed' if device.startswith('cuda') else 'torch') if backend == 'auto' else backend
    _, _, device = init_distributed(backend, device)
    name = torch.cuda.get_device_name() if device.startswith('cuda') else 'CPU'
    print(f"bench on {name} ({device}, {dtype}, {backend}): d_model {d_model}, {n_layers} layers, d_ff {d_ff}, "
          f"micro-batch {micro_batch_size} x {block_size}, fused={fused}, flash={flash_attention}, checkpointing="
          f"{gradient_checkpointing} ({checkpoint_blocks if checkpoint_blocks >= 0 else n_layers} blocks), loss "
          f"chunk {loss_chunk_size}, {steps} steps after {warmup}")
    if memory_only:
        results = {model_type: {'saved_kib_per_token': saved_kib_per_token(model_type)} for model_type in model_types}
    else:
        results = {model_type: measure(model_type) for model_type in model_types}
        print_timings(results)
    for model_type, r in results.items():
        kib = r['saved_kib_per_token']
        fits = [c for c in range(n_layers + 1) if activation_gb(kib, c) <= activation_budget_gb]
        advice = (f"checkpoint {fits[0]} of {n_layers} blocks to stay under {activation_budget_gb:g} GB" if fits
                  else f"no checkpointing keeps it under {activation_budget_gb:g} GB: lower micro_batch_size")
        print(f"{model_type:>8} saves {kib:.1f} KiB a token a block for its backward (bf16, fused={fused}): "
              f"activations at {micro_batch_size} x {block_size} x {n_layers} blocks {activation_gb(kib, 0):.1f} GB, "
              f"all blocks checkpointed {activation_gb(kib, n_layers):.1f} GB; {advice}")
    return results


def print_timings(results):
    print(f"{'model':>8} | {'params':>12} | {'s/step':>8} | {'tokens/s':>10} | {'MFU':>6} | "
          f"{'memory GB':>9} | {'reserved GB':>11} | {'hours for budget':>16} | {'USD':>8}")
    for model_type, r in results.items():
        hours = token_budget / r['tokens_per_s'] / 3600
        mfu = f"{100 * r['mfu']:.1f}%" if r['mfu'] is not None else 'n/a'
        print(f"{model_type:>8} | {r['params']:>12,} | {r['step_s']:>8.3f} | {r['tokens_per_s']:>10,.0f} | {mfu:>6} | "
              f"{r['memory_gb']:>9.1f} | {r['reserved_gb']:>11.1f} | {hours:>16,.1f} | {hours * usd_per_hour:>8,.0f}")
    if len(results) == 2:
        ratio = results['polyglu']['step_s'] / results['vanilla']['step_s']
        print(f"step-time ratio PolyGLU / VanillaLM: {ratio:.3f}  (budget: {token_budget:.2e} tokens at "
              f"${usd_per_hour}/h; memory is {'peak allocated, reserved by the allocator; add 1-2 GB of CUDA context' if device.startswith('cuda') else 'process peak RSS'})")
    peak = peak_flops(device, peak_flops_override)
    if peak and 'polyglu' in results:
        # the performance targets: 3x the prototype's 11,800 tokens/s on an A100, scaled by this device's peak
        r, wanted = results['polyglu'], 3 * 11_800 * peak / 312e12
        checks = [f"PolyGLU tokens/s {r['tokens_per_s']:,.0f} >= {wanted:,.0f}: {r['tokens_per_s'] >= wanted}",
                  f"MFU {100 * r['mfu']:.1f}% >= 50%: {r['mfu'] >= 0.5}"]
        if len(results) == 2:
            checks.append(f"ratio {ratio:.3f} <= 1.10: {ratio <= 1.10}")
        print('targets: ' + '; '.join(checks))


if __name__ == '__main__':
    from configurator import configure
    configure(globals())
    main()
