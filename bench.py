"""
The card check: training steps of config/pretrain.py's run, PolyGLU beside VanillaLM, on the device at hand.

    python bench.py                             # config/pretrain.py's run, read from that file (a GPU)
    python bench.py --attention=all             # ... on every attention kernel this machine has, side by side
    python bench.py config/bench_small.py       # CPU-sized
    python bench.py --memory_only=True          # what a block keeps for its backward (seconds, any device)
    python bench.py --profile=True              # the top entries of a profiled PolyGLU step
    python bench.py --levers=True               # today's path, each speed lever alone and all together (lever_table)
    make gpu-check                              # = python bench.py --gpu_check=True: all a fresh GPU must pass

The defaults are train.py's settings under config/pretrain.py (run_settings): the model, the micro-batch and its
grad_accum_steps, the fused kernels, the recomputed blocks, the loss chunk and kernel, the speed levers, the backend,
ZeRO stage, dtype and attention kernel. A config file or --key=value shrinks or changes them. Times `steps` training
steps (grad_accum_steps micro-batches, forward and backward, then one clipped AdamW update, as train.py) after
`warmup` steps through the engine train.py uses (DeepSpeed with bf16 weights, plain PyTorch where DeepSpeed is not
installed or on the CPU), on random tokens with a document separator every ~1,000 tokens (document masking on).
Prints tokens/s; MFU (model FLOPs, model.flops_per_token) and HFU (with what is recomputed) against the card's dense
bf16 peak; peak allocated and reserved memory and whether the run fits an 80 GB and a 40 GB card; the step-time ratio
PolyGLU / VanillaLM; and the hours and dollars that `token_budget` tokens would take at the measured rate.

It also measures what one block keeps for its backward (every tensor saved by autograd, in bf16, counted once),
per token, and from it the activation memory of the micro-batch with and without checkpointing: a device-independent
figure that says how many blocks must be recomputed for a micro-batch to fit.

gpu_check=True runs, in order, and writes a summary table, gpu_check.json and gpu_check.log to results/gpu_check/ (or
$GPU_CHECK_DIR): the environment; the CUDA tests (tests/test_cuda.py); the lever table at full size, with the profile
of its fastest exact configuration (profile.txt) and the settings it recommends for the card;
train.py for a few steps on token chunks it writes itself, stopped and resumed, with the save of a full-size checkpoint
timed; and exact generation at full size (eval.py --benchmark). It uses what is installed (DeepSpeed, flash-attn) and
says what it skipped. Without CUDA it stops with exit status 2, unless GPU_CHECK_DRY=1 runs it all on the CPU at a tiny
size (the test suite does), the CUDA-only parts reported as skipped.
"""
import gc
import importlib.util
import json
import os
import platform
import re
import resource
import shutil
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import torch
from torch._dynamo.utils import counters

from configurator import config_file_values, configure
from model import (EOS_ID, LanguageModelLoss, ModelConfig, attention_name, available_attention, check_loss_kernel,
                   count_parameters, create_model, cu_seqlens_from_eos, flops_per_token, recompute_flops_per_token)
from utils import (LAUNCHER_GRACE_S, file_digest, init_distributed, make_engine, peak_flops, resolve_device,
                   save_checkpoint)

ROOT = os.path.dirname(os.path.abspath(__file__))
RUN_CONFIG = os.path.join(ROOT, 'config', 'pretrain.py')


def run_settings(config_file=RUN_CONFIG):
    """What `train.py config_file` runs with, as far as a step needs it: config/pretrain.py (train.py's defaults, held
    equal by a test), then the file."""
    return {**config_file_values(RUN_CONFIG), **config_file_values(config_file)}


RUN = run_settings()
# -----------------------------------------------------------------------------
# config: the run of config/pretrain.py unless a config file or --key=value changes it
model_types = ('polyglu', 'vanilla')
vocab_size = RUN['vocab_size']
d_model = RUN['d_model']
n_layers = RUN['n_layers']
n_heads = RUN['n_heads']
n_kv_heads = RUN['n_kv_heads']
d_ff = RUN['d_ff']
block_size = RUN['block_size']
micro_batch_size = RUN['micro_batch_size']
grad_accum_steps = RUN['grad_accum_steps']  # a timed step is train.py's: this many micro-batches, then one update
backend = RUN['backend']     # DeepSpeed falls back to plain PyTorch (bf16 autocast) where it is not installed
zero_stage = RUN['zero_stage']
device = RUN['device']
dtype = RUN['dtype']
attention = RUN['attention']  # or 'all': every kernel available here, side by side
fused = RUN['fused']
gradient_checkpointing = RUN['gradient_checkpointing']
recompute_blocks = RUN['recompute_blocks']
loss_chunk_size = 2048       # train.py's
loss_kernel = RUN['loss_kernel']
lean_mix = RUN['lean_mix']
compile_blocks = RUN['compile_blocks']
fused_adamw = RUN['fused_adamw']
peak_flops_override = 0.0    # device peak FLOP/s for MFU; 0 = from the GPU's name
steps = 10
warmup = 3
activation_budget_gb = 50.0  # for the printed advice: 80 GB less ~12 GB of weights, gradients and AdamW, and headroom
token_budget = 10_000_000_000
usd_per_hour = 1.64
profile = False              # print the costliest kernels of a profiled PolyGLU step (self time)
levers = False               # the lever table: today's path, each speed lever alone and all together (LEVERS)
memory_only = False          # only measure what a block keeps for its backward (seconds, any device), no steps
gpu_check = False            # `make gpu-check`: every stage a fresh GPU must pass before the run (module docstring)
seed = 1337
# -----------------------------------------------------------------------------
CARDS_GIB = (('80 GB', 79.2), ('40 GB', 39.4))  # what torch reports as the total memory of an 80 GB and a 40 GB card
HEADROOM = 0.97              # of it, for the allocator's fragmentation over a long run


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


def recomputed_blocks():
    return (recompute_blocks if recompute_blocks >= 0 else n_layers) if gradient_checkpointing else 0


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


LEVER_KEYS = ('attention', 'fused', 'lean_mix', 'compile_blocks', 'loss_kernel', 'fused_adamw')


def lever_model(config, settings, blocks):
    """A model of `config` with the wrappers of `settings` (lever_settings), the first `blocks` blocks recomputed, and
    its loss module."""
    model = create_model(config, device=device, attention=settings['attention'],
                         gradient_checkpointing=gradient_checkpointing, fused=settings['fused'], recompute_blocks=blocks,
                         lean_mix=settings['lean_mix'], compile_blocks=settings['compile_blocks'])
    return model, LanguageModelLoss(model, loss_chunk_size, settings['loss_kernel'])


def engine_settings(**changes):
    """make_engine's settings: train.py's optimizer at config/pretrain.py's values, this file's batch, then `changes`."""
    return {'backend': backend, 'dtype': dtype, 'zero_stage': zero_stage, 'micro_batch_size': micro_batch_size,
            'grad_accum_steps': grad_accum_steps, 'grad_clip': 1.0, 'learning_rate': 1e-4, 'weight_decay': 0.1,
            'beta1': 0.9, 'beta2': 0.95, 'adam_eps': 1e-8, 'fused_adamw': fused_adamw, **changes}


def measure(model_type, kernel=None, **changes):
    """-> dict of step seconds, tokens/s, MFU, HFU, memory and saved activations for one model type, kernel and
    lever settings (`changes` over this file's). A step is train.py's: grad_accum_steps micro-batches, one update."""
    settings = lever_settings(**changes, **({'attention': kernel} if kernel else {}))
    config = model_config(model_type)
    torch.manual_seed(seed)
    model, loss_module = lever_model(config, settings, recompute_blocks)
    loss_engine, optimizer, autocast = make_engine(loss_module, model, engine_settings(fused_adamw=settings['fused_adamw']))
    kernel_name = attention_name(model)
    loss_engine.train()
    rng = np.random.default_rng(seed)
    batches = [batch(rng) for _ in range(2)]

    def step(i):  # train.py's step: forward and backward over the micro-batches, then one clipped update
        for m in range(grad_accum_steps):
            x, y, cu_seqlens, max_seqlen = batches[(i + m) % 2]
            with autocast:
                loss = loss_engine(x, y, cu_seqlens, max_seqlen)
            if backend == 'deepspeed':
                loss_engine.backward(loss)
                loss_engine.step()
            else:
                (loss / grad_accum_steps).backward()
        loss.item()  # train.py reads the loss and the gradient norm every step: the same waits for the device
        if backend == 'deepspeed':
            loss_engine.get_global_grad_norm()
            return
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0).item()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

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
    profiled = None
    if profile and model_type == 'polyglu':
        from torch.profiler import ProfilerActivity, profile as profiler
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith('cuda') else [])
        with profiler(activities=activities) as prof:
            step(0)
            synchronize()
        # self time: a parent op's total holds its children's, so the top rows of a total sort say little
        sort = 'self_cuda_time_total' if device.startswith('cuda') else 'self_cpu_time_total'
        profiled = prof.key_averages().table(sort_by=sort, row_limit=20, max_name_column_width=60)
        print(profiled)
    tokens = micro_batch_size * block_size * grad_accum_steps
    n_params = count_parameters(config)[0]
    peak = peak_flops(device, peak_flops_override)
    model_flops = flops_per_token(config, block_size, n_params) * tokens / seconds
    hardware_flops = model_flops + recompute_flops_per_token(config, block_size, recomputed_blocks(),
                                                             settings['loss_kernel']) * tokens / seconds
    if device.startswith('cuda'):
        memory, reserved = torch.cuda.max_memory_allocated() / 2**30, torch.cuda.max_memory_reserved() / 2**30
        free, total = torch.cuda.mem_get_info()
        # what the process holds outside the allocator: the CUDA context, cuBLAS and NCCL workspaces
        outside = max(0.0, (total - free) / 2**30 - torch.cuda.memory_reserved() / 2**30)
    else:
        memory = reserved = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # the process's peak RSS
        outside = None
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
            'hours': token_budget / (tokens / seconds) / 3600, 'settings': settings, 'profile': profiled,
            'saved_kib_per_token': saved_kib_per_token(model_type, settings['attention'])}


def activation_gb(kib_per_token, checkpointed):
    """Activations kept for the backward over the micro-batch: un-checkpointed blocks keep kib_per_token, a
    checkpointed one its bf16 input, plus one block recomputed at a time."""
    tokens = micro_batch_size * block_size
    kept = (n_layers - checkpointed) * kib_per_token + checkpointed * d_model * 2 / 1024
    return (kept + (kib_per_token if checkpointed else 0)) * tokens * 1024 / 1e9


def setup():
    """Resolve device, dtype, backend and the kernels to measure; start DeepSpeed's process group if it is used."""
    global device, dtype, backend
    device, dtype = resolve_device(device, dtype)
    if backend == 'deepspeed' and importlib.util.find_spec('deepspeed') is None:
        print("DeepSpeed is not installed: plain PyTorch with bf16 autocast instead (the run itself needs DeepSpeed: "
              "pip install -r requirements.txt)")
        backend = 'torch'
    if not device.startswith('cuda'):
        kernels = ['auto']
    elif attention == 'all':
        kernels = available_attention()
    else:
        kernels = [attention]
    _, _, device = init_distributed(backend, device)
    return kernels


out_of_memory = []  # the model types and kernels that did not fit


def main(kernels=None):
    kernels = kernels or setup()
    name = torch.cuda.get_device_name() if device.startswith('cuda') else 'CPU'
    print(f"bench on {name} ({device}, {dtype}, {backend}, ZeRO-{zero_stage}): d_model {d_model}, {n_layers} layers, "
          f"d_ff {d_ff}, micro-batch {micro_batch_size} x {block_size} x {grad_accum_steps} micro-steps a step, "
          f"fused={fused}, attention {', '.join(kernels)}, checkpointing={gradient_checkpointing} "
          f"({recomputed_blocks()} of {n_layers} blocks recomputed), loss {loss_kernel} (chunk {loss_chunk_size}), "
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
        # the targets (issue 31): 45% MFU, PolyGLU's step at most 1.12 x VanillaLM's, 10B tokens on an A100 (at this
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
# make gpu-check

# (liger's kernels run in Triton's interpreter here: its cost grows with the tokens and the vocabulary)
DRY_SIZE = dict(vocab_size=512, d_model=64, n_layers=3, n_heads=4, n_kv_heads=2, d_ff=256, block_size=64,
                micro_batch_size=2, grad_accum_steps=1, loss_chunk_size=32, recompute_blocks=1, fused=False, steps=1,
                warmup=1, device='cpu', dtype='float32', backend='torch')
# timed steps of each lever, each of grad_accum_steps micro-batches (~9 s on an H200): the check fits 8 minutes
CHECK_STEPS = dict(steps=1, warmup=1)
TRAIN_STEPS, STOP_AT = 6, 3      # the resume check: an uninterrupted run against one stopped at STOP_AT and resumed
# the resumed losses against the uninterrupted ones: float32 on the CPU repeats exactly; bf16 on a GPU only as far as
# kernels whose atomics reorder sums allow. A resume that loses Adam's moments is off by 0.009 in the dry run.
LOSS_TOLERANCE = {'float32': 1e-4, 'bfloat16': 1e-2}


class Tee:
    """stdout that is also written to the check's log file."""

    def __init__(self, *streams):
        self.streams = streams

    def write(self, text):
        for stream in self.streams:
            stream.write(text)
            stream.flush()

    def flush(self):
        for stream in self.streams:
            stream.flush()


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def run_logged(args, timeout):
    """Run a command in the repository, echoing its output as it comes -> (exit status, output). Killed after
    `timeout` seconds, so that a hang cannot eat the rented hour. Its own MASTER_PORT: this process may hold one."""
    env = {**os.environ, 'PYTHONUNBUFFERED': '1', 'MASTER_PORT': str(free_port())}
    process = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    timer = threading.Timer(timeout, process.kill)
    timer.start()
    lines = []
    for line in process.stdout:
        print(f"    {line}", end='')
        lines.append(line)
    process.wait()
    timer.cancel()
    if process.returncode < 0:
        lines.append(f"killed after {timeout} s\n")
    return process.returncode, ''.join(lines)


def environment():
    """One line: the card, its driver, torch and its CUDA, and the kernels and packages that are there."""
    installed = {name: importlib.util.find_spec(name) is not None for name in ('deepspeed', 'flash_attn', 'triton')}
    env = {'python': platform.python_version(), 'torch': torch.__version__, 'torch_cuda': torch.version.cuda,
           'cuda': torch.cuda.is_available(), 'kernels': available_attention(), **{k: v for k, v in installed.items()}}
    if env['cuda']:
        try:
            driver = subprocess.run(['nvidia-smi', '--query-gpu=driver_version', '--format=csv,noheader'],
                                    capture_output=True, text=True, timeout=30).stdout.strip().splitlines()[0]
        except (OSError, IndexError, subprocess.SubprocessError):
            driver = 'unknown'
        env.update(gpu=torch.cuda.get_device_name(), capability='.'.join(map(str, torch.cuda.get_device_capability())),
                   memory_gib=round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1), driver=driver)
    print(f"environment: {env.get('gpu', 'no GPU')} (sm {env.get('capability', '-')}, {env.get('memory_gib', '-')} GiB, "
          f"driver {env.get('driver', '-')}) | Python {env['python']} | torch {env['torch']} (CUDA {env['torch_cuda']}) "
          f"| attention kernels: {', '.join(env['kernels']) or 'none (CPU)'} | DeepSpeed "
          f"{'yes' if installed['deepspeed'] else 'no'} | flash-attn {'yes' if installed['flash_attn'] else 'no'} | "
          f"Triton {'yes' if installed['triton'] else 'no'}")
    return env


def stage_cuda_tests():
    code, output = run_logged([sys.executable, '-m', 'pytest', '-q', '-p', 'no:cacheprovider', 'tests/test_cuda.py'],
                              timeout=600)
    counts = {word: int(n) for n, word in re.findall(r'(\d+) (passed|failed|skipped|error)', output)}
    if code not in (0, 5) or counts.get('failed') or counts.get('error'):
        raise RuntimeError(f"tests/test_cuda.py: {counts or 'exit ' + str(code)}")
    if not counts.get('passed'):
        return 'skipped', f"{counts.get('skipped', 0)} skipped (no CUDA)", counts
    return 'ok', ', '.join(f"{n} {word}" for word, n in counts.items()), counts


# the speed levers, each alone over today's path (this file's settings: config/pretrain.py's), then all that run here
LEVERS = {'loss_kernel=liger': {'loss_kernel': 'liger'}, 'lean_mix': {'fused': True, 'lean_mix': True},
          'compile_blocks': {'compile_blocks': True}, 'fused_adamw': {'fused_adamw': True},
          'attention=fa4': {'attention': 'fa4'}, 'attention=flash_attn': {'attention': 'flash_attn'}}
LEVER_TOLERANCE = {'float32': 1e-4, 'bfloat16': 1e-2}  # relative error a lever may add, beyond today's own bf16 error
FASTER = 1.01               # a lever is recommended when it is exact and at least 1% faster than today's path


def lever_unavailable(changes):
    """Why a lever cannot run on this machine, or None."""
    if 'attention' in changes and changes['attention'] not in available_attention():
        return f"attention={changes['attention']!r} is not available here"
    if changes.get('loss_kernel') == 'liger':
        try:
            check_loss_kernel('liger', device)
        except SystemExit as e:
            return str(e).removeprefix('error: ')
    return None


def one_update(settings, run_dtype, data):
    """Loss, gradients and the weights' change of one AdamW update of a 2-block model at the configured width and
    vocabulary, through today's or a lever's path, from the same weights, batch and Gumbel noise (plain PyTorch:
    DeepSpeed changes no math)."""
    torch.manual_seed(seed)
    model, loss_module = lever_model(model_config('polyglu', layers=2), settings, min(recompute_blocks, 1))
    loss_module, optimizer, autocast = make_engine(loss_module, model, engine_settings(
        backend='torch', dtype=run_dtype, grad_accum_steps=1, learning_rate=1e-3, fused_adamw=settings['fused_adamw']))
    before = torch.cat([p.detach().float().flatten() for p in model.parameters()])
    torch.manual_seed(seed + 1)
    with autocast:
        loss = loss_module(*data)
    loss.backward()
    grads = torch.cat([p.grad.float().flatten() for p in model.parameters()])
    optimizer.step()
    update = torch.cat([p.detach().float().flatten() for p in model.parameters()]) - before
    return loss.item(), grads, update


def lever_errors(rows):
    """Each row's loss, gradients and update against a float32 run of today's path, on this device: relative errors.
    Today's own error (bf16 against float32) is the yardstick: a lever is exact when it adds at most LEVER_TOLERANCE."""
    data = batch(np.random.default_rng(seed + 2))
    reference = one_update(lever_settings(attention='auto'), 'float32', data)
    for row in rows:
        if row.get('skipped'):
            continue
        loss, grads, update = one_update(row['settings'], dtype, data)
        row['errors'] = {'loss': abs(loss - reference[0]) / abs(reference[0]),
                         'grads': ((grads - reference[1]).norm() / reference[1].norm()).item(),
                         'update': ((update - reference[2]).norm() / reference[2].norm()).item()}
    today = rows[0]['errors']
    for row in rows:
        if 'errors' in row:
            row['exact'] = all(row['errors'][k] <= today[k] + LEVER_TOLERANCE[dtype] for k in today)


def recompute_for(card_gib, row):
    """The fewest recomputed blocks that keep `row`'s measured need under HEADROOM of a card of card_gib, from its
    measured peak and what a block keeps for its backward (bench.activation_gb), or None when none fits."""
    measured = activation_gb(row['saved_kib_per_token'], recomputed_blocks()) * 1e9 / 2**30
    for blocks in range(n_layers + 1):
        need = row['needed_gb'] - measured + activation_gb(row['saved_kib_per_token'], blocks) * 1e9 / 2**30
        if need <= HEADROOM * card_gib:
            return blocks
    return None


def lever_table():
    """Today's path, each lever alone and all that run here together: PolyGLU's tokens/s, MFU, HFU and peak memory at
    this file's batch (train.py's step), VanillaLM beside today's and all, each row's errors against today's path in
    float32, the profile of the fastest exact configuration, and the settings to use on this card."""
    rows, available = [], {}
    for name, changes in (('today', {}), *LEVERS.items()):
        why = lever_unavailable(changes)
        if why:
            rows.append({'lever': name, 'skipped': why})
        else:
            available.update(changes)
            rows.append({'lever': name, 'changes': changes})
    if len([row for row in rows if 'changes' in row]) > 2:
        if 'attention' in available:  # 'all' keeps the configured kernel: the attention rows compare kernels alone
            del available['attention']
        rows.append({'lever': 'all', 'changes': available})
    for row in rows:
        if row.get('skipped'):
            continue
        try:
            row.update(measure('polyglu', **row['changes']))
        except torch.OutOfMemoryError as e:
            row['skipped'] = f"out of memory ({str(e).splitlines()[0][:100]})"
            gc.collect()
            torch.cuda.empty_cache()
    lever_errors(rows)
    measured = [row for row in rows if 'tokens_per_s' in row]
    if not measured or measured[0]['lever'] != 'today':
        raise RuntimeError(f"today's path did not run: {rows[0].get('skipped')}")
    today = measured[0]
    recommended = {k: v for row in measured if row['lever'] not in ('today', 'all') and row.get('exact')
                   and row['tokens_per_s'] >= FASTER * today['tokens_per_s'] for k, v in row['changes'].items()}
    vanilla = {row['lever']: measure('vanilla', **row['changes'])['step_s'] for row in (today, measured[-1])}
    global profile
    profile, best = True, max((row for row in measured if row.get('exact')), key=lambda row: row['tokens_per_s'])
    best['profile'] = measure('polyglu', **best['changes'])['profile']
    profile = False
    print_lever_table(rows, vanilla)
    settings = ' '.join(f"--{k}={v}" for k, v in recommended.items())
    lines = []
    if device.startswith('cuda'):
        card = torch.cuda.get_device_properties(0).total_memory / 2**30
        for label, gib in ((f"this card ({torch.cuda.get_device_name()})", card), *CARDS_GIB[:1]):
            blocks = recompute_for(gib, best)
            fit = (f"--recompute_blocks={blocks}" if blocks is not None else
                   "(no recompute_blocks fits: lower micro_batch_size and raise grad_accum_steps)")
            lines.append(f"{label}: python train.py config/pretrain.py {settings} {fit}".replace('  ', ' '))
    else:
        lines.append(f"python train.py config/pretrain.py {settings} (memory: measured on CUDA only)".replace('  ', ' '))
    for line in lines:
        print(f"recommended, {line}")
    return rows, vanilla, recommended, lines, best


def print_lever_table(rows, vanilla):
    today = rows[0]
    print(f"\n{'lever':<22} | {'tokens/s':>9} | {'x today':>7} | {'MFU':>6} | {'HFU':>6} | {'peak GiB':>8} | "
          f"{'loss err':>8} | {'grad err':>8} | {'update err':>10} | exact")
    for row in rows:
        if 'tokens_per_s' not in row:
            print(f"{row['lever']:<22} | skipped: {row['skipped']}")
            continue
        mfu, hfu = (f"{100 * row[k]:.1f}%" if row[k] is not None else 'n/a' for k in ('mfu', 'hfu'))
        errors = row.get('errors', {})
        print(f"{row['lever']:<22} | {row['tokens_per_s']:>9,.0f} | {row['tokens_per_s'] / today['tokens_per_s']:>7.3f} | "
              f"{mfu:>6} | {hfu:>6} | {row['memory_gb']:>8.1f} | {errors.get('loss', 0):>8.1e} | "
              f"{errors.get('grads', 0):>8.1e} | {errors.get('update', 0):>10.1e} | {row.get('exact')}")
    steps = {row['lever']: row['step_s'] for row in rows if row['lever'] in vanilla}
    print(' | '.join(f"PolyGLU/VanillaLM ({lever}) {steps[lever] / vanilla[lever]:.3f}" for lever in vanilla))
    print(f"errors: relative to a float32 run of today's path (loss, gradients, one AdamW update of a 2-block model at "
          f"this width), {dtype} here; exact: at most {LEVER_TOLERANCE[dtype]:g} more than today's own")


def stage_levers():
    rows, vanilla, recommended, lines, best = lever_table()
    with open(os.path.join(check_folder(), 'profile.txt'), 'w') as f:
        f.write(f"{best['lever']}: {best['settings']}\n{best['profile']}")
    today, fastest = rows[0], best
    mfu = (lambda row: f", MFU {100 * row['mfu']:.1f}%" if row['mfu'] is not None else '')
    summary = (f"today {today['tokens_per_s']:,.0f} tokens/s{mfu(today)}, PolyGLU/VanillaLM "
               f"{today['step_s'] / vanilla['today']:.3f}; fastest exact: {fastest['lever']} "
               f"{fastest['tokens_per_s']:,.0f} tokens/s{mfu(fastest)}, {fastest['hours']:,.0f} h / "
               f"${fastest['hours'] * usd_per_hour:,.0f} for {token_budget:.0e} tokens; recommended: "
               + ('; '.join(lines)))
    info = {'levers': rows, 'vanilla_step_s': vanilla, 'recommended': recommended, 'recommended_lines': lines}
    inexact = [row['lever'] for row in rows if row.get('exact') is False]
    if inexact:
        return 'warning', summary + f"; not exact: {', '.join(inexact)}", info
    return 'ok', summary, info


def check_folder():
    return os.environ.get('GPU_CHECK_DIR', os.path.join(ROOT, 'results', 'gpu_check'))


def write_check_data(folder, eos):
    """math, stem and code as prepare.py writes them (one chunk and its manifest each): random ids, skewed towards the
    first of 4,096 (a unigram the model learns within the check's few steps, so that a resume that lost its state shows
    in the losses), an EOS every ~1,000 tokens."""
    rng = np.random.default_rng(seed)
    rows = TRAIN_STEPS * micro_batch_size + 4   # every row of the check's steps, and the held-out rows
    for name in ('math', 'stem', 'code'):
        tokens = (rng.random(rows * (block_size + 1)) ** 3 * min(4096, vocab_size)).astype(np.uint32)
        tokens[tokens == eos] = eos + 1
        tokens[rng.random(tokens.size) < 1 / 1000] = eos
        tokens[-1] = eos
        os.makedirs(os.path.join(folder, name), exist_ok=True)
        tokens.tofile(os.path.join(folder, name, 'chunk_00000.bin'))
        chunk = {'file': 'chunk_00000.bin', 'tokens': int(tokens.size),
                 'sha256': file_digest(os.path.join(folder, name, 'chunk_00000.bin'))}
        with open(os.path.join(folder, name, 'manifest.json'), 'w') as f:
            json.dump({'format': 'polychromatic-tokens-v1', 'source': name, 'tokenizer': 'random (gpu-check)',
                       'eos_id': eos, 'dtype': 'uint32', 'vocab_size': vocab_size, 'chunks': [chunk],
                       'total_tokens': int(tokens.size), 'complete': True}, f)


def train_losses(out_dir):
    with open(os.path.join(out_dir, 'train_log.jsonl')) as f:
        return {entry['step']: entry['train/loss'] for entry in map(json.loads, f) if 'train/loss' in entry}


def stage_train(work, dry):
    """train.py with config/pretrain.py's settings for TRAIN_STEPS steps of one micro-batch, uninterrupted, and again
    stopped at STOP_AT and resumed: the losses must agree. Every save is a checkpoint of the configured model (full
    size on a GPU), timed against the launchers' grace."""
    eos = EOS_ID if vocab_size > EOS_ID else 1
    write_check_data(os.path.join(work, 'data'), eos)
    sizes = {k: globals()[k] for k in ('vocab_size', 'd_model', 'n_layers', 'n_heads', 'n_kv_heads', 'd_ff',
                                       'block_size', 'micro_batch_size', 'loss_chunk_size', 'recompute_blocks',
                                       'fused', 'device', 'dtype', 'backend', 'zero_stage')}
    settings = dict(sizes, max_seq_len=max(block_size, 4096), eos_id=eos, data_dir=os.path.join(work, 'data'),
                    max_steps=TRAIN_STEPS, grad_accum_steps=1, warmup_steps=1, learning_rate=1e-3, min_lr=1e-4,
                    val_tokens=2 * block_size, eval_rows=1, eval_interval=0, checkpoint_interval=0, log_interval=1,
                    keep_checkpoints=1, wandb_log=False, attention=attention if attention != 'all' else 'auto')
    args = [sys.executable, 'train.py', RUN_CONFIG, *(f'--{k}={v}' for k, v in settings.items())]
    saves, outputs = [], []
    for name, extra in (('uninterrupted', []), ('stopped', [f'--stop_after_steps={STOP_AT}']), ('resumed', [])):
        out_dir = os.path.join(work, 'uninterrupted' if name == 'uninterrupted' else 'resumed')
        print(f"  train.py, {name} ({TRAIN_STEPS} steps{f', stop at {STOP_AT}' if extra else ''})")
        code, output = run_logged([*args, f'--out_dir={out_dir}', *extra], timeout=600)
        if code != 0:
            raise RuntimeError(f"train.py ({name}) exited {code}: {output.strip().splitlines()[-1][:200]}")
        outputs.append(output)
        saves += [(float(gb), float(s)) for gb, s in re.findall(r'saved checkpoint .*\(([\d.e+-]+) GB in ([\d.]+) s', output)]
        if name == 'uninterrupted':
            reference = train_losses(out_dir)
            shutil.rmtree(out_dir)  # a full-size checkpoint is ~10 GB of disk
    resumed = train_losses(os.path.join(work, 'resumed'))
    if f"resumed from step {STOP_AT}" not in outputs[2] or sorted(resumed) != sorted(reference):
        raise RuntimeError(f"the resumed run did not continue from step {STOP_AT}: steps {sorted(resumed)}")
    difference, tolerance = max(abs(resumed[s] - reference[s]) for s in reference), LOSS_TOLERANCE[dtype]
    size, seconds = max(saves, key=lambda save: save[1])
    info = {'losses_uninterrupted': reference, 'losses_resumed': resumed, 'max_loss_difference': difference,
            'save_gb': size, 'save_s': seconds, 'saves': saves}
    summary = (f"losses over {TRAIN_STEPS} steps {reference[1]:.3f} -> {reference[TRAIN_STEPS]:.3f}, resumed at "
               f"{STOP_AT}: max |difference| {difference:.5f} (<= {tolerance:g}); slowest save {size:.3g} GB in "
               f"{seconds:.1f} s (<= {LAUNCHER_GRACE_S} s)")
    if difference > tolerance:
        raise RuntimeError(f"the resumed losses leave the uninterrupted ones: {summary}")
    if seconds > LAUNCHER_GRACE_S:
        return 'warning', summary + ': a pre-emption would kill the save; use a faster disk for out_dir', info
    return 'ok', summary, info


def stage_generation(checkpoint, dry):
    """eval.py's benchmark on the checkpoint the train stage wrote (the configured model, trained for a few steps)."""
    extra = (['--benchmark_requests=2', '--max_gen_toks=4', '--benchmark_prompt_tokens=32', '--batch_tokens=256'] if dry
             else ['--benchmark_requests=8', '--max_gen_toks=64'])
    code, output = run_logged([sys.executable, 'eval.py', f'--checkpoint={checkpoint}', '--benchmark=True',
                               f'--device={device}', f'--dtype={dtype}', *extra], timeout=600)
    rate = re.search(r'([\d.]+) new tokens/s, ([\d.]+) TFLOP/s', output)
    hours = re.search(r'full GSM8K .*: ([\d.]+) hours', output)
    if code != 0 or not rate or not hours:
        raise RuntimeError(f"eval.py --benchmark exited {code}: {output.strip().splitlines()[-1][:200]}")
    info = {'new_tokens_per_s': float(rate[1]), 'tflops': float(rate[2]), 'gsm8k_hours': float(hours[1])}
    return 'ok', (f"exact generation {info['new_tokens_per_s']:,.1f} new tokens/s ({info['tflops']:.3f} TFLOP/s); full "
                  f"GSM8K, worst case: {info['gsm8k_hours']:.2f} h"), info


def run_gpu_check():
    dry = os.environ.get('GPU_CHECK_DRY') == '1'
    if not dry and not torch.cuda.is_available():
        print("gpu-check needs CUDA (none here: torch.cuda.is_available() is False); GPU_CHECK_DRY=1 runs it on the "
              "CPU at a tiny size")
        sys.exit(2)
    folder = check_folder()
    work = os.path.join(folder, 'work')
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    log = open(os.path.join(folder, 'gpu_check.log'), 'w')
    sys.stdout = Tee(sys.__stdout__, log)
    globals().update(DRY_SIZE if dry else CHECK_STEPS)
    if dry:
        print(f"gpu-check, dry run (GPU_CHECK_DRY=1): every stage on the CPU at a tiny size: {DRY_SIZE}")
    report = {'dry_run': dry, 'started': time.strftime('%Y-%m-%d %H:%M:%S'), 'environment': environment(),
              'stages': {}}

    def stage(name, function, *args):
        print(f"\n== {name}")
        start = time.perf_counter()
        try:
            status, summary, info = function(*args)
        except (Exception, SystemExit) as e:  # one stage's failure must not cost the others' GPU minutes
            status, summary, info = 'failed', f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:300] if str(e) else ''}", {}
        report['stages'][name] = {'status': status, 'summary': summary, 'seconds': time.perf_counter() - start, **info}
        print(f"== {name}: {status} ({report['stages'][name]['seconds']:.0f} s): {summary}")
        return report['stages'][name]

    stage('cuda tests', stage_cuda_tests)
    try:
        setup()
        setup_error = None
    except (Exception, SystemExit) as e:
        setup_error = e
    if setup_error is None:
        stage('speed levers', stage_levers)
        stage('train, stop, resume', stage_train, work, dry)
        checkpoint = os.path.join(work, 'resumed', 'portable_final.pt')
        if not os.path.isfile(checkpoint):  # the train stage failed: generation still gets measured
            checkpoint = os.path.join(work, 'initialised.pt')
            save_checkpoint(checkpoint, create_model(model_config(RUN['model_type'])), step=0)
        stage('generation', stage_generation, checkpoint, dry)
    else:
        for name in ('speed levers', 'train, stop, resume', 'generation'):
            report['stages'][name] = {'status': 'failed', 'summary': f"set-up: {setup_error}", 'seconds': 0}
    shutil.rmtree(work, ignore_errors=True)
    report['seconds'] = sum(s['seconds'] for s in report['stages'].values())
    with open(os.path.join(folder, 'gpu_check.json.tmp'), 'w') as f:
        json.dump(report, f, indent=1, default=str)
    os.replace(os.path.join(folder, 'gpu_check.json.tmp'), os.path.join(folder, 'gpu_check.json'))
    env = report['environment']
    print(f"\ngpu-check summary: {env.get('gpu', 'CPU (dry run)')}, torch {env['torch']}, "
          f"{report['seconds'] / 60:.1f} min")
    print(f"{'stage':<22} {'status':<8} {'seconds':>7}  result")
    for name, s in report['stages'].items():
        print(f"{name:<22} {s['status']:<8} {s['seconds']:>7.0f}  {s['summary']}")
    print(f"-> {os.path.join(folder, 'gpu_check.json')}, {os.path.join(folder, 'gpu_check.log')}")
    sys.stdout = sys.__stdout__
    log.close()
    return 1 if any(s['status'] == 'failed' for s in report['stages'].values()) else 0


if __name__ == '__main__':
    configure(globals())
    if gpu_check:
        sys.exit(run_gpu_check())
    if levers:
        setup()
        lever_table()
    else:
        main()
