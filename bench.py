"""
The card check: training steps of config/pretrain.py's run, PolyGLU beside VanillaLM, on the device at hand.

    python bench.py                             # config/pretrain.py's run (a GPU)
    python bench.py --attention=all             # ... on every attention kernel this machine has, side by side
    python bench.py config/bench_small.py       # CPU-sized
    python bench.py --memory_only=True          # what a block keeps for its backward (seconds, any device)
    python bench.py --profile=True              # the top entries of a profiled PolyGLU step
    python bench.py --levers=all                # today's path, each speed lever alone, the recommended (lever_table)

The defaults are config/pretrain.py's settings, read again from that file at start (run_config): the model, the
micro-batch and its grad_accum_steps, the fused kernels, the recomputed blocks, the loss chunk and kernel, the speed
levers, the backend, ZeRO stage, dtype and attention kernel. A config file or --key=value shrinks or changes them. Times `steps` training
steps (grad_accum_steps micro-batches, forward and backward, then one clipped AdamW update, as train.py) after
`warmup` steps through the engine train.py uses (DeepSpeed with bf16 weights, plain PyTorch where DeepSpeed is not
installed or on the CPU), on random tokens with a document separator every ~1,000 tokens (document masking on).
Prints tokens/s; MFU (model FLOPs, model.flops_per_token) and HFU (with what is recomputed) against the card's dense
bf16 peak; peak allocated and reserved memory and whether the run fits an 80 GB and a 40 GB card; the step-time ratio
PolyGLU / VanillaLM; and the hours and dollars that `token_budget` tokens would take at the measured rate.

It also measures what one block keeps for its backward (every tensor saved by autograd, in bf16, counted once),
per token, and from it the activation memory of the micro-batch with and without checkpointing: a device-independent
figure that says how many blocks must be recomputed for a micro-batch to fit.

`make gpu-check` (tests/gpu_check.py) runs the lever table at full size as one of its stages, in its own process.
"""
import copy
import gc
import importlib.util
import json
import os
import resource
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from torch._dynamo.utils import counters

from configurator import checked, config_file_values, config_keys, configure, fail
from model import (EOS_ID, LanguageModelLoss, ModelConfig, attention_name, available_attention, check_loss_kernel,
                   count_parameters, create_model, flops_per_token, recompute_flops_per_token, use_fa4,
                   wrap_model)
from utils import (init_distributed, make_engine, named_masters, optimizer_weights, peak_flops, resolve_device,
                   round_masters, to_device)

ROOT = os.path.dirname(os.path.abspath(__file__))
RUN_CONFIG = os.path.join(ROOT, 'config', 'pretrain.py')


# -----------------------------------------------------------------------------
# config: config/pretrain.py's run (these values are its own, a test holds them equal); a run whose config/pretrain.py
# was edited is read from the file at start (run_config), then a config file and --key=value change it
run_config = 'config/pretrain.py'  # the run whose step is timed: its values of the keys below come first ('' = none)
model_types = ('polyglu', 'vanilla')
vocab_size = 151_669
d_model = 1024
n_layers = 28
n_heads = 16
n_kv_heads = 8
d_ff = 4096
block_size = 4096
micro_batch_size = 16
grad_accum_steps = 8         # a timed step is train.py's: this many micro-batches, then one update
backend = 'deepspeed'        # where DeepSpeed is not installed, plain PyTorch's bf16 engine (its bf16 ZeRO-1, in one process)
zero_stage = 1
device = 'cuda'
dtype = 'bfloat16'
attention = 'auto'           # or 'all': every kernel available here, side by side
fused = True
recompute_blocks = 8
loss_chunk_size = 2048       # train.py's
loss_kernel = 'chunked'
lean_mix = False
compile_blocks = False
fused_adamw = False
prefetch = False
selective_checkpointing = False
peak_flops_override = 0.0    # device peak FLOP/s for MFU; 0 = from the GPU's name
steps = 10
warmup = 3
activation_budget_gb = 50.0  # for the printed advice: 80 GB less ~12 GB of weights, gradients and AdamW, and headroom
token_budget = 10_000_000_000
usd_per_hour = 1.64
profile = False              # print the costliest kernels of a profiled PolyGLU step (self time)
levers = ''                  # the lever table: 'all' (today's path, each lever of LEVERS alone, the recommended), or
                             # the names of some of them: --levers=lean_mix,compile_blocks
levers_json = ''             # where the lever table writes its rows after every round (make gpu-check sets it)
levers_seconds = 0.0         # the lever table's time limit: rows it cannot reach are reported as not run; 0 = none
memory_only = False          # only measure what a block keeps for its backward (seconds, any device), no steps
seed = 1337
# -----------------------------------------------------------------------------
CARDS_GIB = (('80 GB', 79.2), ('40 GB', 39.4))  # what torch reports as the total memory of an 80 GB and a 40 GB card
HEADROOM = 0.97              # of it, for the allocator's fragmentation over a long run


def eos_id():
    return EOS_ID if vocab_size > EOS_ID else 0


def host_rows(rng, rows):
    """Random token rows [rows, block_size + 1] with a document separator every ~1,000 tokens, as a loader reads them."""
    tokens = rng.integers(0, min(vocab_size, EOS_ID), (rows, block_size + 1))
    tokens[rng.random(tokens.shape) < 1 / 1000] = eos_id()
    return tokens


def batch(rng, rows=None):
    return to_device(host_rows(rng, rows or micro_batch_size), device, eos_id())


def synchronize():
    if device.startswith('cuda'):
        torch.cuda.synchronize()


def model_config(model_type, layers=None):
    return ModelConfig(vocab_size=vocab_size, d_model=d_model, n_layers=layers or n_layers, n_heads=n_heads,
                       n_kv_heads=n_kv_heads, d_ff=d_ff, max_seq_len=max(block_size, 4096), model_type=model_type)


def recomputed_blocks(settings=None):
    """How many blocks recompute their activations under `settings` (lever_settings; default this file's)."""
    blocks = (settings or lever_settings())['recompute_blocks']
    return n_layers if blocks < 0 else blocks


def saved_kib_per_token(model_type, kernel='auto', tokens=256):
    """KiB that one block keeps for its backward per token, in bf16 (weights, buffers and shared storages
    excluded): linear in the tokens with flash-style attention, so this gives any micro-batch's activations."""
    block_model = create_model(model_config(model_type, layers=1), device=device, dtype=torch.bfloat16,
                               attention=kernel, fused=fused, lean_mix=lean_mix and fused).train()
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


def lever_settings(**changes):
    """The settings a step runs with: this file's (config/pretrain.py's unless changed), then `changes`."""
    settings = {key: globals()[key] for key in LEVER_KEYS}
    settings['attention'] = 'auto' if attention == 'all' else attention
    unknown = set(changes) - set(settings)
    if unknown:
        raise SystemExit(f"error: {sorted(unknown)} are not settings of a bench step: {', '.join(LEVER_KEYS)}")
    return {**settings, **changes}


LEVER_KEYS = ('attention', 'fused', 'lean_mix', 'compile_blocks', 'loss_kernel', 'fused_adamw', 'prefetch',
              'recompute_blocks', 'selective_checkpointing', 'micro_batch_size',
              'grad_accum_steps')


def lever_model(config, settings, blocks, model=None):
    """A model of `config` (or `model`, built) with the wrappers of `settings` (lever_settings), the first `blocks`
    blocks recomputed, and its loss module."""
    model = wrap_model(model or create_model(config, device=device), attention=settings['attention'],
                       fused=settings['fused'], lean_mix=settings['lean_mix'], compile_blocks=settings['compile_blocks'],
                       recompute_blocks=blocks, selective_checkpointing=settings['selective_checkpointing'] and blocks != 0)
    return model, LanguageModelLoss(model, loss_chunk_size, settings['loss_kernel'])


def engine_settings(**changes):
    """make_engine's settings: train.py's optimizer at config/pretrain.py's values, this file's batch, then `changes`."""
    return {'backend': backend, 'dtype': dtype, 'zero_stage': zero_stage, 'micro_batch_size': micro_batch_size,
            'grad_accum_steps': grad_accum_steps, 'grad_clip': 1.0, 'learning_rate': 1e-4, 'weight_decay': 0.1,
            'beta1': 0.9, 'beta2': 0.95, 'adam_eps': 1e-8, 'fused_adamw': fused_adamw, **changes}


def train_step(loss_engine, optimizer, autocast, batches):
    """train.py's step as a function of its index: forward and backward over grad_accum_steps micro-batches, then one
    clipped update; the loss and the gradient norm read, as train.py reads them every step (the same device waits)."""
    def step(i):
        for m in range(grad_accum_steps):
            x, y, cu_seqlens, max_seqlen = batches[(i + m) % 2]
            with autocast:
                loss = loss_engine(x, y, cu_seqlens, max_seqlen)
            if backend == 'deepspeed':
                loss_engine.backward(loss)
                loss_engine.step()
            else:
                (loss / grad_accum_steps).backward()
        loss.item()
        if backend == 'deepspeed':
            loss_engine.get_global_grad_norm()
            return
        torch.nn.utils.clip_grad_norm_(optimizer_weights(optimizer), 1.0).item()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def profiled(step):
    """The costliest kernels of one step, by self time (a parent op's total holds its children's)."""
    from torch.profiler import ProfilerActivity, profile as profiler
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith('cuda') else [])
    with profiler(activities=activities) as prof:
        step(0)
        synchronize()
    sort = 'self_cuda_time_total' if device.startswith('cuda') else 'self_cpu_time_total'
    return prof.key_averages().table(sort_by=sort, row_limit=20, max_name_column_width=60)


def memory_peaks():
    """-> (peak GiB allocated, peak reserved, what the process holds outside the allocator: the CUDA context, cuBLAS
    and NCCL workspaces); on the CPU the process's peak RSS and None."""
    if not device.startswith('cuda'):
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        return rss, rss, None
    free, total = torch.cuda.mem_get_info()
    return (torch.cuda.max_memory_allocated() / 2**30, torch.cuda.max_memory_reserved() / 2**30,
            max(0.0, (total - free) / 2**30 - torch.cuda.memory_reserved() / 2**30))


def measure(model_type, kernel=None, **changes):
    """-> dict of step seconds, tokens/s, MFU, HFU, memory and saved activations for one model type, kernel and
    lever settings (`changes` over this file's). A step is train.py's: grad_accum_steps micro-batches, one update."""
    settings = lever_settings(**changes, **({'attention': kernel} if kernel else {}))
    config = model_config(model_type)
    torch.manual_seed(seed)
    model, loss_module = lever_model(config, settings, settings['recompute_blocks'])
    loss_engine, optimizer, autocast = make_engine(loss_module, model, engine_settings(fused_adamw=settings['fused_adamw']))
    kernel_name = attention_name(model)
    loss_engine.train()
    rng = np.random.default_rng(seed)
    step = train_step(loss_engine, optimizer, autocast, [batch(rng) for _ in range(2)])
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
    top_kernels = profiled(step) if profile and model_type == 'polyglu' else None
    if top_kernels:
        print(top_kernels)
    tokens = micro_batch_size * block_size * grad_accum_steps
    n_params = count_parameters(config)[0]
    peak = peak_flops(device, peak_flops_override)
    model_flops = flops_per_token(config, block_size, n_params) * tokens / seconds
    hardware_flops = model_flops + recompute_flops_per_token(config, block_size, recomputed_blocks(),
                                                             settings['loss_kernel']) * tokens / seconds
    memory, reserved, outside = memory_peaks()
    if backend == 'deepspeed':
        loss_engine.destroy()  # its hooks would otherwise keep this model and its optimizer state alive beside the next
    del loss_engine, optimizer, model
    gc.collect()
    if device.startswith('cuda'):
        torch.cuda.empty_cache()
    needed = reserved + outside if outside is not None else None
    return {'model_type': model_type, 'kernel': kernel_name, 'params': n_params, 'step_s': seconds,
            'tokens_per_s': tokens / seconds, 'mfu': model_flops / peak if peak else None,
            'hfu': hardware_flops / peak if peak else None, 'memory_gb': memory, 'reserved_gb': reserved,
            'needed_gb': needed, 'fits': {card: needed <= HEADROOM * gib for card, gib in CARDS_GIB} if needed else None,
            'hours': token_budget / (tokens / seconds) / 3600, 'settings': settings, 'profile': top_kernels,
            'saved_kib_per_token': saved_kib_per_token(model_type, settings['attention'])}


def activation_gb(kib_per_token, checkpointed):
    """Activations kept for the backward over the micro-batch: un-checkpointed blocks keep kib_per_token, a
    checkpointed one its bf16 input, plus one block recomputed at a time."""
    tokens = micro_batch_size * block_size
    kept = (n_layers - checkpointed) * kib_per_token + checkpointed * d_model * 2 / 1024
    return (kept + (kib_per_token if checkpointed else 0)) * tokens * 1024 / 1e9


def setup(distributed=True):
    """Resolve device, dtype, backend and the kernels to measure; start DeepSpeed's process group if it is used."""
    global device, dtype, backend
    device, dtype = resolve_device(device, dtype)
    if backend == 'deepspeed' and importlib.util.find_spec('deepspeed') is None:
        print("DeepSpeed is not installed: plain PyTorch's bf16 engine instead (utils.fp32_masters: DeepSpeed's bf16 "
              "ZeRO-1 in one process, the same update and bytes of state)")
        backend = 'torch'
    if not device.startswith('cuda'):
        kernels = ['auto']
    elif attention == 'all':
        kernels = available_attention()
    else:
        kernels = [attention]
    if distributed:
        _, _, device = init_distributed(backend, device)
    return kernels


out_of_memory = []  # the model types and kernels that did not fit


def main(kernels=None):
    kernels = kernels or setup()
    name = torch.cuda.get_device_name() if device.startswith('cuda') else 'CPU'
    print(f"bench on {name} ({device}, {dtype}, {backend}, ZeRO-{zero_stage}): d_model {d_model}, {n_layers} layers, "
          f"d_ff {d_ff}, micro-batch {micro_batch_size} x {block_size} x {grad_accum_steps} micro-steps a step, "
          f"fused={fused}, attention {', '.join(kernels)}, "
          f"{recomputed_blocks()} of {n_layers} blocks recomputed, loss {loss_kernel} (chunk {loss_chunk_size}), "
          f"lean_mix={lean_mix}, compile_blocks={compile_blocks}, fused_adamw={fused_adamw}, {steps} steps after "
          f"{warmup}")
    if memory_only:
        results = [{'model_type': m, 'saved_kib_per_token': saved_kib_per_token(m)} for m in model_types]
    else:
        results = []
        for kernel in kernels:
            for model_type in model_types:
                try:
                    results.append(measure(model_type, kernel))
                except torch.OutOfMemoryError as e:  # the answer to "does the run fit", not a reason to stop
                    out_of_memory.append(f"{model_type} on {kernel}")
                    print(f"{model_type} on {kernel}: out of memory ({str(e).splitlines()[0][:160]}): raise "
                          "recompute_blocks or lower micro_batch_size (README, Troubleshooting)")
                    gc.collect()
                    torch.cuda.empty_cache()
        if not results:
            raise SystemExit("error: every configuration ran out of memory")
        print_timings(results)
    for r in results:
        if r.get('kernel', kernels[0]) != results[0].get('kernel', kernels[0]):
            continue  # the saved bytes of one kernel say it; the others keep the same q, k, v, output and lse
        kib = r['saved_kib_per_token']
        fits = [c for c in range(n_layers + 1) if activation_gb(kib, c) <= activation_budget_gb]
        advice = (f"checkpoint {fits[0]} of {n_layers} blocks to stay under {activation_budget_gb:g} GB" if fits
                  else f"no checkpointing keeps it under {activation_budget_gb:g} GB: lower micro_batch_size")
        print(f"{r['model_type']:>8} saves {kib:.1f} KiB a token a block for its backward (bf16, fused={fused}): "
              f"activations at {micro_batch_size} x {block_size} x {n_layers} blocks {activation_gb(kib, 0):.1f} GB, "
              f"all blocks checkpointed {activation_gb(kib, n_layers):.1f} GB; {advice}")
    return results


def ratios(results):
    """{kernel: PolyGLU step time / VanillaLM step time} where both ran."""
    step_s = {(r['model_type'], r['kernel']): r['step_s'] for r in results}
    return {kernel: step_s['polyglu', kernel] / step_s['vanilla', kernel]
            for (model_type, kernel) in step_s if model_type == 'polyglu' and ('vanilla', kernel) in step_s}


def print_timings(results):
    cuda = device.startswith('cuda')
    print(f"{'model':>8} | {'attention':>14} | {'params':>12} | {'s/step':>7} | {'tokens/s':>9} | {'MFU':>6} | "
          f"{'HFU':>6} | {'peak GiB':>8} | {'reserved':>8} | {'fits 80/40 GB':>13} | {'h / budget':>10} | {'USD':>6}")
    for r in results:
        mfu, hfu = (f"{100 * r[k]:.1f}%" if r[k] is not None else 'n/a' for k in ('mfu', 'hfu'))
        fits = '/'.join('yes' if ok else 'no' for ok in r['fits'].values()) if r['fits'] else 'n/a'
        print(f"{r['model_type']:>8} | {r['kernel']:>14} | {r['params']:>12,} | {r['step_s']:>7.3f} | "
              f"{r['tokens_per_s']:>9,.0f} | {mfu:>6} | {hfu:>6} | {r['memory_gb']:>8.1f} | {r['reserved_gb']:>8.1f} | "
              f"{fits:>13} | {r['hours']:>10,.1f} | {r['hours'] * usd_per_hour:>6,.0f}")
    for kernel, ratio in ratios(results).items():
        print(f"step-time ratio PolyGLU / VanillaLM ({kernel}): {ratio:.3f}")
    print(f"budget: {token_budget:.2e} tokens at ${usd_per_hour}/h. MFU counts model.flops_per_token (6N + causal "
          f"attention over whole {block_size}-token rows), HFU adds the {recomputed_blocks()} recomputed blocks and the "
          "loss chunks' second head forward. " + (
              "Memory: peak allocated and reserved by the allocator; 'fits' adds what the process holds outside it "
              f"(CUDA context, workspaces) and keeps {100 * (1 - HEADROOM):.0f}% headroom" if cuda
              else "Memory: process peak RSS"))
    peak = peak_flops(device, peak_flops_override)
    polyglu = [r for r in results if r['model_type'] == 'polyglu']
    if peak and polyglu:
        # the project's targets: 45% MFU, PolyGLU's step at most 1.12 x VanillaLM's, 10B tokens on an A100 (at this
        # MFU of its peak) for at most $130
        r = max(polyglu, key=lambda r: r['tokens_per_s'])
        a100_usd = a100_hours(r['mfu'], r['params']) * usd_per_hour
        checks = [f"MFU {100 * r['mfu']:.1f}% >= 45%: {r['mfu'] >= 0.45}",
                  f"projected A100 cost ${a100_usd:,.0f} <= $130: {a100_usd <= 130}"]
        ratio = ratios(results).get(r['kernel'])
        if ratio is not None:
            checks.append(f"ratio {ratio:.3f} <= 1.12: {ratio <= 1.12}")
        print(f"targets ({r['kernel']}): " + '; '.join(checks))


def a100_hours(mfu, n_params):
    """Hours for token_budget tokens on an A100 at `mfu` of its 312 TFLOP/s: a projection from this card's MFU."""
    return token_budget * flops_per_token(model_config('polyglu'), block_size, n_params) / (mfu * 312e12) / 3600

# -----------------------------------------------------------------------------
# the lever table: python bench.py --levers=all, and make gpu-check's "speed levers" stage

# Each lever alone over today's path (this file's settings: config/pretrain.py's). 'no_recompute' halves the micro-batch
# and doubles the accumulation (the same tokens a step) so that no block is recomputed; 'recompute=0' keeps the
# micro-batch and needs a card of BIG_CARD_GIB or more.
LEVERS = {'loss_kernel=liger': {'loss_kernel': 'liger'}, 'lean_mix': {'fused': True, 'lean_mix': True},
          'compile_blocks': {'compile_blocks': True}, 'fused_adamw': {'fused_adamw': True}, 'prefetch': {'prefetch': True},
          'selective_checkpointing': {'selective_checkpointing': True},
          'no_recompute': {'recompute_blocks': 0, 'micro_batch_size': 'half', 'grad_accum_steps': 'double'},
          'recompute=0': {'recompute_blocks': 0},
          **{f'attention={name}': {'attention': name} for name in ('flash_attn', 'cudnn', 'flex', 'fa4')}}
EXCLUSIVE = {'attention': ('attention=',), 'memory': ('selective_checkpointing', 'no_recompute', 'recompute=0')}
BIG_CARD_GIB = 120           # micro-batch 16 without recomputation: ~62 GB of activations (33.5 KiB a token a block)
REPEATS = 3                  # timed micro-batches a row, in rounds over the rows, after one untimed (it compiles)
EXACT_STEPS = 3              # AdamW steps of the exactness check
# A lever is exact when its worst relative error in every group is at most EXACT_FACTOR x today's own (bf16 against
# the float32 reference) plus EXACT_FLOOR. In float32 (the dry run) today's error is 0 and the levers measured at most
# FLOAT32_MEASURED (liger's update, in Triton's interpreter; docs/gpu.md has the command): the floor is ten times that. A gradient 5% off in one tensor is 50 times over it.
FLOAT32_MEASURED = 1.2e-4
EXACT_FACTOR, EXACT_FLOOR = 2.0, {'float32': 10 * FLOAT32_MEASURED, 'bfloat16': 1e-3}
GROUPS = (('routing', ('.alpha', '.beta', '.gate_net.')), ('attention', ('.gqa.',)),
          ('ffn', ('.W_gate.', '.W_up.', '.W_down.')), ('embedding', ('embeddings.',)), ('norms', ('rmsnorm',)))


def lever_rows(names='all'):
    """today, then each lever of LEVERS (or of `names`) with its changes, or why it cannot run here."""
    wanted = list(LEVERS) if names == 'all' else [name.strip() for name in names.split(',') if name.strip()]
    unknown = sorted(set(wanted) - set(LEVERS))
    if unknown:
        raise SystemExit(f"error: unknown levers {unknown}; the levers: {', '.join(LEVERS)}")
    rows = [{'lever': 'today', 'changes': {}}]
    for name in wanted:
        changes = {k: {'half': max(1, micro_batch_size // 2), 'double': grad_accum_steps * 2}.get(v, v)
                   for k, v in LEVERS[name].items()}
        why = lever_unavailable(name, changes)
        rows.append({'lever': name, 'skipped': why} if why else {'lever': name, 'changes': changes})
    for row in rows:
        if 'changes' in row:
            row['settings'] = lever_settings(**row['changes'])
    return rows


def lever_unavailable(name, changes):
    """Why a lever cannot run on this machine (or is today's setting already), or None."""
    settings = lever_settings()
    if all(settings[k] == v for k, v in changes.items()):
        return f"today's path already runs {name}"
    if 'attention' in changes and changes['attention'] not in available_attention():
        return f"attention={changes['attention']!r} is not available here"
    if changes.get('loss_kernel') == 'liger':
        try:
            check_loss_kernel('liger', device)
        except SystemExit as e:
            return str(e).removeprefix('error: ')
    if name == 'recompute=0' and card_gib() < BIG_CARD_GIB:
        return f"needs a card of {BIG_CARD_GIB} GiB or more (this one: {card_gib():.0f} GiB); see no_recompute"
    return None


def card_gib():
    return torch.cuda.get_device_properties(0).total_memory / 2**30 if device.startswith('cuda') else 0.0


def budget(rows):
    """The lever stage's work, counted before it starts: full-size micro-batches, model builds, compiled settings."""
    timed = len([row for row in rows if 'changes' in row])
    micro_batches = (timed * (1 + REPEATS) + REPEATS      # each row warmed and timed; today again at the end
                     + 1 + 2 * REPEATS                     # the recommended setting, beside today
                     + 2 * (1 + REPEATS) + 1)              # VanillaLM today and recommended; the profile
    compiled = len([row for row in rows if 'changes' in row and (row['settings']['compile_blocks'] or
                    row['settings']['attention'] == 'flex')]) + 1
    return {'micro_batches': micro_batches, 'full_size_builds': 2, 'two_block_builds': timed + 2,
            'compiled_settings': compiled}


# --- exactness: a 2-block model of this width and vocabulary, a few AdamW steps, each lever against float32

def group_of(name):
    return next(group for group, parts in GROUPS if any(part in name for part in parts))


def exactness_run(settings, run_dtype, data):
    """EXACT_STEPS clipped AdamW updates of a 2-block model through `settings` (plain PyTorch: in bf16 it is DeepSpeed's
    bf16 ZeRO-1), from the same weights, rows and Gumbel noise -> (losses, {name: gradient of the first step},
    {name: the weight's change after the last}), float32."""
    torch.manual_seed(seed)
    model, loss_module = lever_model(model_config('polyglu', layers=2), settings, min(recomputed_blocks(settings), 1))
    _, optimizer, _ = make_engine(None, model, engine_settings(backend='torch', dtype=run_dtype, grad_accum_steps=1,
                                                               learning_rate=1e-3, fused_adamw=settings['fused_adamw']))
    weights = named_masters(model, optimizer) or dict(model.named_parameters())
    before, losses, grads = {n: w.detach().float().clone() for n, w in weights.items()}, [], None
    for step in range(EXACT_STEPS):
        torch.manual_seed(seed + 1 + step)
        loss = loss_module(*data[step % len(data)])
        loss.backward()
        grads = grads or {n: w.grad.detach().float().clone() for n, w in weights.items()}
        torch.nn.utils.clip_grad_norm_(optimizer_weights(optimizer), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses, grads, {n: w.detach().float() - before[n] for n, w in weights.items()}


def exactness_errors(run, reference):
    """Relative errors against the reference: the worst step's loss; per group, the worst tensor's gradient and update
    (one wrong FFN or routing tensor shows, where one norm over all weights is the tied embedding's); grads/all, that
    one norm, for comparison."""
    (losses, grads, changes), (reference_losses, reference_grads, reference_changes) = run, reference
    errors = {'loss': max(abs(a - b) / abs(b) for a, b in zip(losses, reference_losses))}
    for what, values, expected in (('grads', grads, reference_grads), ('update', changes, reference_changes)):
        for name, tensor in expected.items():
            key = f"{what}/{group_of(name)}"
            error = ((values[name] - tensor).norm() / tensor.norm().clamp(min=1e-30)).item()
            errors[key] = max(errors.get(key, 0.0), error)
    everything = [(grads[n], t) for n, t in reference_grads.items()]
    errors['grads/all'] = (sum((a - b).square().sum() for a, b in everything).sqrt()
                           / sum(b.square().sum() for _, b in everything).sqrt()).item()
    return errors


def exact_limits(today_errors):
    return {key: EXACT_FACTOR * value + EXACT_FLOOR[dtype] for key, value in today_errors.items() if key != 'grads/all'}


def check_exactness(rows, data, reference):
    """Each row's errors against the float32 reference, and exact: every group within exact_limits of today's."""
    for row in rows:
        if 'settings' in row and 'errors' not in row and not row.get('error'):
            attempt(row, lambda: row.update(errors=exactness_errors(exactness_run(row['settings'], dtype, data),
                                                                     reference)))
    limits = exact_limits(rows[0]['errors']) if 'errors' in rows[0] else None
    for row in rows:
        if 'errors' in row and limits:
            row['exact'] = all(row['errors'][key] <= limit for key, limit in limits.items())
            row['inexact'] = sorted(key for key, limit in limits.items() if row['errors'][key] > limit)


def float32_reference(data):
    """Today's path in float32, attention by SDPA's float32 kernels (varlen and flash-attn take bf16 only)."""
    return exactness_run(lever_settings(attention='sdpa' if device.startswith('cuda') else 'auto'), 'float32', data)


# --- timing: rows that share one model's weights, micro-batches in rounds

def attempt(row, work):
    """Run work(); any failure is recorded in the row (type, first line), and the table goes on."""
    try:
        work()
        return True
    except (Exception, SystemExit) as e:
        row['error'] = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]}"
        print(f"  {row['lever']}: {row['error']}")
        gc.collect()
        if device.startswith('cuda'):
            torch.cuda.empty_cache()
        return False


def shared_model(model_type):
    """The weights every row's model shares (and their gradients, and AdamW's state): one model of this file's config
    under plain PyTorch's engine, bf16 with float32 masters (DeepSpeed's bf16 ZeRO-1 in one process) -> (model,
    optimizer)."""
    torch.manual_seed(seed)
    model = create_model(model_config(model_type), device=device)
    _, optimizer, _ = make_engine(None, model, engine_settings(backend='torch'))
    return model, optimizer


def row_runner(row, shared, rng):
    """A copy of the shared model holding the same weights and buffers, with the row's wrappers, and its batches."""
    settings = row['settings']
    weights = {id(t): t for t in (*shared.parameters(), *shared.buffers())}
    model, loss_module = lever_model(None, settings, settings['recompute_blocks'], copy.deepcopy(shared, weights))
    return {'loss': loss_module, 'rows': [host_rows(rng, settings['micro_batch_size']) for _ in range(2)], 'next': None,
            'loader': ThreadPoolExecutor(1) if settings['prefetch'] else None, 'count': 0}


def time_micro_batch(row, runner, optimizer):
    """One micro-batch as train.py runs it (the rows copied to the device, forward, backward, the gradients added into
    the float32 masters) -> seconds; the row's peak memory updated."""
    settings, index = row['settings'], runner['count']
    runner['count'] += 1
    if device.startswith('cuda'):
        use_fa4(settings['attention'] == 'fa4')  # process-wide: the row built last must not decide every row's kernel
        torch.cuda.reset_peak_memory_stats()
    synchronize()
    start = time.perf_counter()
    if runner['loader']:  # train.py's prefetch: this batch was copied while the last one ran
        data = (runner['next'] or runner['loader'].submit(to_device, runner['rows'][0], device, eos_id(), None,
                                                          True)).result()
        runner['next'] = runner['loader'].submit(to_device, runner['rows'][(index + 1) % 2], device, eos_id(), None,
                                                 True)
    else:
        data = to_device(runner['rows'][index % 2], device, eos_id())
    torch.manual_seed(seed + index)
    (runner['loss'](*data) / settings['grad_accum_steps']).backward()
    synchronize()
    seconds = time.perf_counter() - start
    optimizer.zero_grad(set_to_none=False)  # keep the float32 gradient buffers, as DeepSpeed keeps its own
    if device.startswith('cuda'):
        row['memory_gb'] = max(row.get('memory_gb', 0.0), torch.cuda.max_memory_allocated() / 2**30)
    return seconds


def optimizer_seconds(optimizer, fused):
    """One clipped AdamW update of the shared weights (their float32 masters in bf16), timed after one untimed ->
    (seconds, peak GiB allocated while it ran)."""
    if fused:
        optimizer = torch.optim.AdamW([{'params': g['params'], 'weight_decay': g['weight_decay']}
                                       for g in optimizer.param_groups], lr=1e-4, betas=(0.9, 0.95), eps=1e-8, fused=True)
        if dtype == 'bfloat16':
            optimizer.register_step_post_hook(round_masters)
    weights, seconds = optimizer_weights(optimizer), []
    for weight in weights:
        weight.grad = torch.zeros_like(weight) if weight.grad is None else weight.grad
    if device.startswith('cuda'):
        torch.cuda.reset_peak_memory_stats()
    for _ in range(2):
        synchronize()
        start = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(weights, 1.0)
        optimizer.step()
        synchronize()
        seconds.append(time.perf_counter() - start)
    return seconds[-1], torch.cuda.max_memory_allocated() / 2**30 if device.startswith('cuda') else 0.0


def timed_rounds(rows, runners, optimizer, rounds, deadline, write):
    """Rounds of one micro-batch a row (interleaved: a drift in the card's clock touches every row alike)."""
    for _ in range(rounds):
        for row in rows:
            if time.perf_counter() > deadline:
                return False
            if row['lever'] in runners and not row.get('error'):
                attempt(row, lambda: row.setdefault('samples', []).append(
                    time_micro_batch(row, runners[row['lever']], optimizer)))
        write()
    return True


def warm(rows, runners, shared, optimizer, rng, deadline):
    """Each row's model built and one untimed micro-batch run (its compilation, its kernels' autotuning)."""
    for row in rows:
        if time.perf_counter() > deadline:
            return False
        if 'settings' in row and not row.get('error') and row['lever'] not in runners:
            def build():
                runners[row['lever']] = row_runner(row, shared, rng)
                start = time.perf_counter()
                time_micro_batch(row, runners[row['lever']], optimizer)
                row['warmup_s'] = time.perf_counter() - start
            attempt(row, build)
    return True


def row_figures(row, optimizer_steps, config, n_params):
    """tokens/s, MFU, HFU and memory of a row from its micro-batch samples: the step is grad_accum_steps x the median
    micro-batch plus one update (optimizer_steps: {fused: (seconds, peak GiB)}); its spread, half the samples' range;
    the memory it needs, the peak of its micro-batches or of the update."""
    settings, samples = row['settings'], sorted(row['samples'])
    median = float(np.median(samples))
    row['micro_batch_s'] = median
    update_s, update_gib = optimizer_steps[settings['fused_adamw']]
    row['step_s'] = settings['grad_accum_steps'] * median + update_s
    row['spread_s'] = settings['grad_accum_steps'] * (samples[-1] - samples[0]) / 2
    tokens = settings['micro_batch_size'] * settings['grad_accum_steps'] * block_size
    recomputed = recomputed_blocks(settings)
    peak = peak_flops(device, peak_flops_override)
    row['tokens_per_s'] = tokens / row['step_s']
    row['mfu'] = flops_per_token(config, block_size, n_params) * row['tokens_per_s'] / peak if peak else None
    row['hfu'] = (row['mfu'] + recompute_flops_per_token(config, block_size, recomputed, settings['loss_kernel'])
                  * row['tokens_per_s'] / peak) if peak else None
    row['hours'] = token_budget / row['tokens_per_s'] / 3600
    if device.startswith('cuda'):
        free, total = torch.cuda.mem_get_info()
        outside = max(0.0, (total - free - torch.cuda.memory_reserved()) / 2**30)  # CUDA context, workspaces
        row['needed_gb'] = max(row.get('memory_gb', 0.0), update_gib) + outside
        row['fits'] = {card: row['needed_gb'] <= HEADROOM * gib for card, gib in CARDS_GIB}


def decide(rows):
    """Faster: the row's step time plus its spread below today's minus today's. The recommended setting: every exact
    and faster lever, one of each EXCLUSIVE kind (the fastest) -> its changes over today's."""
    today = rows[0]
    for row in rows[1:]:
        if 'step_s' in row:
            row['faster'] = row['step_s'] + row['spread_s'] < today['step_s'] - today['spread_s']
    winners = [row for row in rows[1:] if row.get('faster') and row.get('exact')]
    for prefixes in EXCLUSIVE.values():
        kind = [row for row in winners if row['lever'].startswith(prefixes)]
        winners = [row for row in winners if row not in kind] + sorted(kind, key=lambda row: row['step_s'])[:1]
    return {k: v for row in winners for k, v in row['changes'].items()}


def optimizer_steps(result, optimizer):
    """optimizer_seconds for AdamW as today's path runs it, and fused where a row asks for it -> {fused: (seconds,
    GiB)}, kept in the result; 0 s where it failed, and the failure recorded."""
    steps = {False: (0.0, 0.0), True: (0.0, 0.0)}
    for kind in {False, fused_adamw, any('fused_adamw' in row.get('changes', {}) for row in result['rows'])}:
        attempt(result, lambda: steps.update({kind: optimizer_seconds(optimizer, kind)}))
    result['optimizer_s_gib'] = {str(k): v for k, v in steps.items()}
    return steps


def profile_row(row, runner, optimizer, out):
    """The row's profiled micro-batch, kept in it and in profile.txt beside `out`."""
    attempt(row, lambda: row.update(profile=profile_micro_batch(row, runner, optimizer)))
    if out and row.get('profile'):
        with open(os.path.join(os.path.dirname(out), 'profile.txt'), 'w') as f:
            f.write(f"{row['lever']}: {row['settings']}\n{row['profile']}")


def lever_table(names='all', seconds=0.0, out=''):
    """Today's path, each lever alone and the recommended setting: PolyGLU's step time (REPEATS micro-batches a row,
    interleaved, today again at the end, the median and its spread, one update added), tokens/s, MFU, HFU and peak memory;
    VanillaLM beside today and the recommended; each row's errors against float32 (exactness_errors); the profile
    of the recommended; the line to run. Rows are written to `out` after every round, a failing row is recorded in
    itself, and a row past the time limit is reported as not run."""
    deadline = time.perf_counter() + (seconds or float('inf'))
    rows = lever_rows(names)
    result = {'lever': 'the table', 'rows': rows, 'budget': budget(rows), 'repeats': REPEATS, 'finished': False}
    config, n_params, plan = model_config('polyglu'), count_parameters(model_config('polyglu'))[0], result['budget']
    print(f"lever table: {len([r for r in rows if 'changes' in r])} rows; {plan['micro_batches']} micro-batches of "
          f"{micro_batch_size} x {block_size} or fewer tokens, {plan['full_size_builds']} full-size and "
          f"{plan['two_block_builds']} 2-block models, {plan['compiled_settings']} compiled settings"
          + (f"; time limit {seconds:.0f} s" if seconds else ''))

    def write():
        if out:
            write_json(out, result)
            with open(os.path.splitext(out)[0] + '.txt', 'w') as f:
                f.write(lever_lines(result))

    rng = np.random.default_rng(seed)
    data = [batch(np.random.default_rng(seed + 2 + i), 2) for i in range(2)]
    reference = float32_reference(data)
    check_exactness(rows, data, reference)
    write()
    shared, optimizer = shared_model('polyglu')
    runners = {}
    warm(rows, runners, shared, optimizer, rng, deadline)
    in_time = timed_rounds(rows, runners, optimizer, REPEATS, deadline, write)
    in_time = in_time and timed_rounds(rows[:1], runners, optimizer, REPEATS, deadline, write)  # today again
    steps = optimizer_steps(result, optimizer)
    for row in rows:
        if row.get('samples'):
            row_figures(row, steps, config, n_params)
    changes = decide(rows)
    if changes and in_time:
        recommended = {'lever': 'recommended', 'changes': changes, 'settings': lever_settings(**changes)}
        rows.append(recommended)
        check_exactness(rows, data, reference)
        in_time = warm(rows, runners, shared, optimizer, rng, deadline) and timed_rounds(
            [recommended, rows[0]], runners, optimizer, REPEATS, deadline, write)
        for row in (recommended, rows[0]):
            if row.get('samples'):
                row_figures(row, steps, config, n_params)
        decide(rows)
    best = next((row for row in rows[::-1] if row['lever'] == 'recommended' and row.get('step_s')), rows[0])
    result['recommended'] = best['lever']
    if in_time and best.get('samples'):
        profile_row(best, runners[best['lever']], optimizer, out)
    del runners, shared, optimizer
    gc.collect()
    if device.startswith('cuda'):
        torch.cuda.empty_cache()
    result['vanilla'] = vanilla_rows([rows[0], best] if best is not rows[0] else [rows[0]], deadline, rng, steps)
    attempt(result, lambda: result.update(line=recommended_line(best)))
    result['finished'], result['ended'] = time.perf_counter() <= deadline, True
    write()
    print(lever_lines(result))
    return result


def vanilla_rows(polyglu_rows, deadline, rng, steps):
    """VanillaLM through the settings of today's and the recommended row, interleaved, with their figures (steps:
    optimizer_steps')."""
    rows = [{'lever': row['lever'], 'changes': row['changes'], 'settings': row['settings']} for row in polyglu_rows]
    if time.perf_counter() > deadline:
        return [{**row, 'error': 'not run: the time limit'} for row in rows]
    shared, optimizer, runners = None, None, {}
    try:
        shared, optimizer = shared_model('vanilla')
    except (Exception, SystemExit) as e:
        return [{**row, 'error': f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"} for row in rows]
    warm(rows, runners, shared, optimizer, rng, deadline)
    timed_rounds(rows, runners, optimizer, REPEATS, deadline, lambda: None)
    config = model_config('vanilla')
    for row in rows:
        if row.get('samples'):
            row_figures(row, steps, config, count_parameters(config)[0])
    return rows


def profile_micro_batch(row, runner, optimizer):
    """The 20 costliest kernels of one micro-batch of the row, by self time."""
    from torch.profiler import ProfilerActivity, profile as profiler
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith('cuda') else [])
    with profiler(activities=activities) as prof:
        time_micro_batch(row, runner, optimizer)
    # self time: a parent op's total holds its children's, so the top rows of a total sort say little
    sort = 'self_cuda_time_total' if device.startswith('cuda') else 'self_cpu_time_total'
    return prof.key_averages().table(sort_by=sort, row_limit=20, max_name_column_width=60)


def recommended_line(best):
    """The command that runs the recommended setting, with the fewest recomputed blocks that fit an 80 GB card where
    the setting recomputes whole blocks."""
    settings = lever_settings()
    changes = {k: v for k, v in best['settings'].items() if v != settings[k]}
    line = 'python train.py config/pretrain.py ' + ' '.join(f"--{k}={v}" for k, v in changes.items())
    if best.get('needed_gb') and best['settings']['recompute_blocks'] and not best['settings'][
            'selective_checkpointing']:
        blocks = recompute_for(CARDS_GIB[0][1], best)
        line += f" --recompute_blocks={blocks}" if blocks is not None else " (no recompute_blocks fits 80 GB)"
    elif not device.startswith('cuda'):
        line += ' (memory: measured on CUDA only)'
    return ' '.join(line.split())


def recompute_for(gib, row):
    """The fewest recomputed blocks that keep `row`'s measured need under HEADROOM of a card of `gib`, from its measured
    peak and what a block keeps for its backward (activation_gb), or None when none fits."""
    kib = saved_kib_per_token('polyglu', row['settings']['attention'])
    settings = row['settings']
    measured = activation_gb(kib, recomputed_blocks(settings)) * 1e9 / 2**30
    for blocks in range(n_layers + 1):
        if row['needed_gb'] - measured + activation_gb(kib, blocks) * 1e9 / 2**30 <= HEADROOM * gib:
            return blocks
    return None


def lever_lines(result):
    """The lever table as text."""
    rows, lines = result['rows'], []
    today = rows[0]
    lines.append(f"{'lever':<24} | {'tokens/s':>9} | {'x today':>7} | {'spread':>6} | {'MFU':>6} | {'HFU':>6} | "
                 f"{'peak GiB':>8} | {'warmup s':>8} | {'exact':>5} | faster")
    for row in rows:
        if 'tokens_per_s' not in row:
            why = row.get('skipped') or row.get('error') or ('not run: the time limit' if result.get('ended') else
                                                             'not timed yet')
            lines.append(f"{row['lever']:<24} | {why}")
            continue
        mfu, hfu = (f"{100 * row[k]:.1f}%" if row.get(k) is not None else 'n/a' for k in ('mfu', 'hfu'))
        memory = f"{row['memory_gb']:.1f}" if 'memory_gb' in row else 'n/a'
        ratio = row['tokens_per_s'] / today['tokens_per_s'] if 'tokens_per_s' in today else float('nan')
        exact = row.get('exact', 'n/a') if not row.get('inexact') else f"no: {', '.join(row['inexact'])}"
        lines.append(f"{row['lever']:<24} | {row['tokens_per_s']:>9,.0f} | {ratio:>7.3f} | "
                     f"{100 * row['spread_s'] / row['step_s']:>5.1f}% | {mfu:>6} | {hfu:>6} | "
                     f"{memory:>8} | {row.get('warmup_s', 0):>8.1f} | {str(exact):>5} | "
                     f"{row.get('faster', '-')}")
    for vanilla in result.get('vanilla', []):
        polyglu = next((row for row in rows if row['lever'] == vanilla['lever']), {})
        if vanilla.get('step_s') and polyglu.get('step_s'):
            lines.append(f"PolyGLU/VanillaLM ({vanilla['lever']}): {polyglu['step_s'] / vanilla['step_s']:.3f}")
        elif vanilla.get('error'):
            lines.append(f"VanillaLM ({vanilla['lever']}): {vanilla['error']}")
    if 'errors' in today:
        limits = exact_limits(today['errors'])
        shown = {f"{v:.1e}" for v in limits.values()}
        lines.append(f"exact: every group's worst tensor within {EXACT_FACTOR:g} x today's error + "
                     f"{EXACT_FLOOR[dtype]:g} of a float32 run ({EXACT_STEPS} AdamW steps of a 2-block model at this "
                     "width): " + (shown.pop() if len(shown) == 1 else
                                   ', '.join(f"{k} {v:.1e}" for k, v in limits.items())))
    lines.append(f"step = grad_accum_steps x median micro-batch ({REPEATS} timed a row, interleaved; today also at the "
                 "end) + one update; faster: beyond both rows' spread")
    if result.get('line'):
        lines.append(f"to run ({result.get('recommended')}'s settings): {result['line']}")
    if result.get('error'):
        lines.append(f"the table itself: {result['error']}")
    return '\n'.join(lines) + '\n'


def write_json(path, data):
    """Written to a temporary name and renamed: a check killed mid-write leaves the last whole file."""
    with open(f"{path}.tmp", 'w') as f:
        json.dump(data, f, indent=1, default=str)
    os.replace(f"{path}.tmp", path)


def run_settings(config_file):
    """What `train.py config_file` runs with, as far as a step needs it: config/pretrain.py, then the file."""
    return {**config_file_values(RUN_CONFIG), **config_file_values(config_file)}


def configure_run(argv):
    """This file's config as every script's (configure), after the values of run_config's file for this file's keys:
    an edited config/pretrain.py is what gets timed."""
    configure(globals(), argv)
    if run_config:
        # relative to the repository, as the default always was, unless it names a file from here
        path = run_config if os.path.isfile(run_config) else os.path.join(ROOT, run_config)
        if not os.path.isfile(path):
            fail(f"run_config={run_config!r} not found: the config file of the run to time, or '' for none")
        keys = config_keys(globals())
        for key, value in config_file_values(path).items():
            if key in keys:
                globals()[key] = checked(key, value, globals()[key], path)
        configure(globals(), argv)  # the command line over the run's file


if __name__ == '__main__':
    configure_run(sys.argv[1:])
    if levers:
        setup(distributed=False)  # the lever table runs plain PyTorch's bf16 engine (lever_table)
        lever_table(levers, levers_seconds, levers_json)
    else:
        main()
