"""
Pre-training: mixture data loader, DeepSpeed (or plain PyTorch) loop, exact resume, wandb.

    deepspeed train.py config/pretrain.py                 # one GPU, or --num_gpus=N / a hostfile for more
    python train.py config/tiny.py                        # CPU, plain PyTorch
    python train.py config/pretrain.py --max_steps=100    # any global below can be overridden

Data: the uint32 chunks prepare.py writes to {data_dir}/{math,stem,code}/. A training row is a contiguous
window of block_size + 1 tokens from one source, the source drawn by the mixture schedule (70/25/5 for the
first 80% of steps, 85/10/5 after). Every source's windows are visited in a seeded permutation, and which row
gets which window is a pure function of (seed, step, micro-step, rank, world size): a resumed run sees exactly
the data of an uninterrupted one, and ranks never share a window. The last val_tokens of each source are
held out and give the validation loss. init_seed (the weights' initialisation and PolyGLU's Gumbel noise) is separate
from the data's seed, so that runs which differ only in it, or only in model_type, train on the same rows in the same
order: the paired arms of `make ablation` (config/ablation.py).

The schedule (learning rate, tau, mixture) spans max_steps. A resume with another max_steps, or a budget_usd the
measured speed cannot meet, re-plans it from that step with nothing jumping (continue_plan, schedule_fraction). An
update whose loss or gradient norm is a spike is skipped (skip_reason), and a step that hangs ends the run
(utils.watchdog).
"""
import hashlib
import json
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from configurator import configure, fail
from model import (EOS_ID, LanguageModelLoss, ModelConfig, attention_name, count_parameters, create_model,
                   flops_per_token, recompute_flops_per_token, routing_entropy)
from utils import (all_reduce_sums, catch_stop_signals, check_resume, checkpoint_file, close_distributed, cosine_lr,
                   end_of_session, heartbeat, held_out_windows, hold_folder, import_training_state, init_distributed,
                   init_wandb, load_checkpoint, log_entry, log_step, make_engine, micro_batch_seed, named_masters,
                   open_chunks, optimizer_weights, peak_flops, plain_config, projected_cost, rank_rows, resolve_device,
                   resume_state, run_provenance, save_run, save_snapshot, to_device, trim_log, watchdog)

# -----------------------------------------------------------------------------
# config: the full run's plan, with system settings that run anywhere (the CPU, plain PyTorch); config/*.py and
# --key=value override them
# I/O
out_dir = 'checkpoints'
data_dir = 'data/tokenized'
resume = 'auto'              # 'auto': continue from the newest complete checkpoint if there is one; '' = fresh
init_from = ''               # start from these weights (a path, a folder or hf:owner/name) with a fresh optimizer and schedule
init_optimizer = False       # with init_from: keep its Adam moments too (a portable checkpoint's); the schedule is new
# model: SPEC.md's PolychromaticLM (config/pretrain.py spells out the same run; tests/test_train.py holds them equal)
model_type = 'polyglu'       # 'vanilla' for the SwiGLU baseline (VanillaLM)
vocab_size = 151_669
d_model = 1024
n_layers = 28
n_heads = 16
n_kv_heads = 8
d_ff = 4096
max_seq_len = 4096
# data
sources = ('math', 'stem', 'code')
mixture_baseline = (0.70, 0.25, 0.05)  # math, stem, code for the first 80% of steps
mixture_anneal = (0.85, 0.10, 0.05)    # ... and for the last 20%
anneal_start = 0.8           # the fraction of max_steps after which the annealed mixture is used (a resume with another
                             # max_steps re-plans it: README, "Shorten, extend or budget a run")
block_size = 4096
val_tokens = 2_000_000       # held out at the end of each source
# optimisation: ~10B tokens = 19,531 steps of 16 x 8 x 4,096 tokens
micro_batch_size = 16
grad_accum_steps = 8
max_steps = 19_531           # ~10B tokens at 512K tokens a step
learning_rate = 1e-4         # linear warm-up, then cosine to min_lr
min_lr = 1e-5
warmup_steps = 2000
weight_decay = 0.1           # on >=2-D parameters except PolyGLU's alpha
beta1 = 0.9
beta2 = 0.95
adam_eps = 1e-8
grad_clip = 1.0
tau_start = 1.0              # the Gumbel temperature, linear from tau_start to tau_end over the run
tau_end = 0.1
rope_theta = 10_000.0
eos_id = EOS_ID
eval_rows = 64               # validation rows per source
allow_repeats = True         # False: a source that would repeat windows (too little data prepared) stops the run at start
# system
backend = 'deepspeed'        # 'deepspeed' | 'torch' (plain PyTorch: CPU tests, demo, or one GPU)
zero_stage = 1
device = 'auto'              # 'auto' = cuda if available, else cpu
dtype = 'auto'               # 'auto' = bfloat16 on cuda, float32 on cpu
attention = 'auto'           # CUDA kernel: 'auto' = flash-attn if installed, else torch's varlen_attn (sm80+), else
                             # 'sdpa'; 'fa4' (FlashAttention-4 through torch, sm90+) by name only
recompute_blocks = 0         # blocks that recompute their activations in the backward, from the first; -1 = all
fused = False                # torch.compile'd elementwise kernels (RMSNorm, the PolyGLU mix): less memory, fewer passes
loss_chunk_size = 2048
# the speed levers, each off until a GPU has measured it faster and exact (docs/gpu.md, "Speed levers"; make gpu-check)
loss_kernel = 'chunked'      # 'chunked' (the head in checkpointed chunks, the reference) | 'liger' (fused linear + CE)
lean_mix = False             # with fused: PolyGLU's backward without its [tokens, d_ff, 4] stacks (same float32 result)
compile_blocks = False       # torch.compile each block whole; tau and the document boundaries stay outside its graphs
fused_adamw = False          # torch's one-kernel AdamW in place of the multi-tensor one
prefetch = False             # build the next step's batches on a thread, pinned, while this step runs (CUDA)
selective_checkpointing = False  # recomputed blocks keep their matmuls' outputs, recompute the elementwise work only
seed = 1337                  # the data: which row trains on which window, in what order
init_seed = -1               # the model: its initial weights and the Gumbel noise of its routing; -1 = seed
peak_flops_override = 0.0    # device peak FLOP/s for MFU; 0 = from the GPU's name (A100/H100/H200), none on CPU
# budget: after budget_steps timed steps, the whole run's cost from its own speed; over budget_usd, max_steps re-planned
budget_usd = 0.0             # 0 = no budget (the projection is still printed and logged)
usd_per_hour = 1.64          # the price of one GPU-hour (SPEC.md's A100/H100); a run of N ranks pays N of them
fit_budget = True            # False: a run over budget only warns
budget_steps = 20            # steps timed for the projection, after the first BUDGET_WARMUP_STEPS; 0 = none
# stability
max_bad_steps = 10           # skipped updates in a row (non-finite, or spikes) before the run stops
spike_sigmas = 10.0          # skip an update whose loss or gradient norm is this many robust sigmas (of their logs)
spike_window = 100           # above the median of the last spike_window applied steps; 0 = skip only non-finite ones
collective_timeout_s = 300   # after the first step: a step or evaluation not done in this long ends the run, naming the
                             # ranks that did not arrive (a hang holds every GPU; a full-size step takes seconds)
save_timeout_s = 1200        # the same for a checkpoint save (seconds at full size: docs/benchmarks.md)
# logging and checkpoints
log_interval = 10
eval_interval = 500
checkpoint_interval = 500
keep_checkpoints = 3
snapshot_interval = 0        # steps: the weights alone (bf16, 1.2 GB at full size) in {out_dir}/snapshots/, never pruned,
                             # and at the end: routing and benchmarks over training (analyze.py --run, eval.py
                             # --checkpoints); 0 = none
ds_checkpoint = False        # also write DeepSpeed's own checkpoint to {out_dir}/ds_checkpoint/ (~8.4 GB a save at
                             # full size; nothing here reads it: resume reads the portable file on any number of ranks)
stop_after_steps = 0         # end this session (with a checkpoint) after this many steps; 0 = run to max_steps
wandb_log = False
wandb_project = 'polychromatic'
wandb_run_name = 'pretrain'
# -----------------------------------------------------------------------------


# -----------------------------------------------------------------------------
# data

def open_source(name):
    """One prepared source: its chunks memory-mapped, the training windows, and the held-out validation rows."""
    folder = os.path.join(data_dir, name)
    chunks, manifest = open_chunks(folder, eos_id, vocab_size, missing_hint=f"run `python prepare.py --source={name}` "
                                   f"or give {name} weight 0 in the mixture")
    lengths, val = held_out_windows(chunks, val_tokens, block_size, eval_rows)
    windows_per_chunk = np.array([max(0, (n - 1) // block_size) for n in lengths], dtype=np.int64)
    if not val or not windows_per_chunk.sum():
        fail(f"{folder} ({sum(c.size for c in chunks):,} tokens) is too small to hold out val_tokens={val_tokens:,} "
             f"and train on windows of {block_size + 1} tokens: lower val_tokens or prepare more data")
    return dict(name=name, chunks=chunks, first_window=np.concatenate([[0], np.cumsum(windows_per_chunk)]),
                n_windows=int(windows_per_chunk.sum()), val=val,
                checksums=[entry['sha256'] for entry in manifest['chunks']])


def row_plan(n_sources, rows_per_step, segments):
    """For every row of the run, (source index, slot). Row j of step s is global row s * rows_per_step + j, where
    rows_per_step is the global batch (micro_batch_size x grad_accum_steps x world_size). Its source is drawn by the
    step's mixture (its segment's, baseline or annealed) from a uniform that depends on (seed, global row) only, and a
    source's k-th row takes slot k of its window permutation. So the same global batch sees the same data on 1, 2 or 8
    GPUs (each rank takes its share of every step's rows), nothing about the data needs saving for an exact resume, and
    a re-plan leaves the rows of the steps before it where they were: no window is trained twice until its source runs
    out."""
    total = max_steps * rows_per_step
    uniform = np.random.default_rng(seed).random(total)  # the g-th draw is the same whatever total is
    step_of_row = np.arange(total) // rows_per_step
    source = np.empty(total, dtype=np.int64)
    for segment, following in zip(segments, segments[1:] + [None]):
        rows = (step_of_row >= segment['step']) & (step_of_row < (following['step'] if following else max_steps))
        annealed = step_of_row >= segment['anneal_from']
        for probs, selected in ((segment['mixture_baseline'], rows & ~annealed),
                                (segment['mixture_anneal'], rows & annealed)):
            cumulative = np.cumsum(probs) / np.sum(probs)
            source[selected] = np.minimum(np.searchsorted(cumulative, uniform[selected], side='right'), n_sources - 1)
    slot = np.empty(total, dtype=np.int64)
    for s in range(n_sources):
        rows = source == s
        slot[rows] = np.arange(rows.sum())
    return source, slot


def plan_digest(data, plan, segments):
    """A fingerprint of every token the run trains and validates on, and of its schedule: the row plan, the seed, the
    windows (block_size, each source's chunks by checksum, the held-out rows), the document separator and any re-plan.
    Runs with the same digest see the same rows in the same order on the same schedule, whatever their model:
    analyze.py --compare checks it before pairing two runs."""
    source, slot = plan
    digest = hashlib.sha256(source.astype(np.int64).tobytes() + slot.astype(np.int64).tobytes())
    sources_used = [None if src is None else [src['name'], src['checksums']] for src in data]
    replans = [segments[1:]] if len(segments) > 1 else []  # a run never re-planned keeps the digest it always had
    digest.update(json.dumps([seed, block_size, val_tokens, eval_rows, eos_id, sources_used, *replans]).encode())
    return digest.hexdigest()[:16]


permutations = {}  # source name -> (epoch, its window permutation): one epoch per source, as its slots only grow


def window_tokens(src, slot):
    """The block_size + 1 tokens of a slot: epoch = slot // n_windows, each epoch a fresh seeded permutation."""
    epoch, index = divmod(int(slot), src['n_windows'])
    if permutations.get(src['name'], (None,))[0] != epoch:
        rng = np.random.default_rng([seed, sum(map(ord, src['name'])), epoch])
        permutations[src['name']] = (epoch, rng.permutation(src['n_windows']))
    window = int(permutations[src['name']][1][index])
    chunk = int(np.searchsorted(src['first_window'], window, side='right')) - 1
    start = (window - int(src['first_window'][chunk])) * block_size
    return src['chunks'][chunk][start:start + block_size + 1]


def get_batch(data, plan, step, micro_step, rank, world_size):
    source, slot = plan
    rows = rank_rows(step, micro_step, rank, world_size, micro_batch_size, grad_accum_steps)
    return to_device(np.stack([window_tokens(data[source[i]], slot[i]) for i in rows]), device, eos_id, pinned=prefetch)


def step_batches(data, plan, start_step, rank, world_size):
    """Each step's micro-batches, in order from start_step. With prefetch, step s + 1's are read and copied on a
    thread while step s runs; the rows are the same either way (a pure function of the step)."""
    def build(step):
        return [get_batch(data, plan, step, micro_step, rank, world_size) for micro_step in range(grad_accum_steps)]
    if not prefetch:
        yield from map(build, range(start_step, max_steps))
        return
    with ThreadPoolExecutor(1) as loader:
        upcoming = loader.submit(build, start_step)
        for step in range(start_step + 1, max_steps + 1):
            batches = upcoming.result()
            if step < max_steps:
                upcoming = loader.submit(build, step)
            yield batches


def check_repeats(data, plan, anneal_from, is_master):
    """Before step 0: the windows each source will use against the windows it has. A source that runs out repeats
    windows (a second epoch of its permutation): a warning, or an error with allow_repeats=False."""
    source, slot = plan
    rows_per_step = len(source) // max_steps
    lines, repeating = [], []
    for s, src in enumerate(data):
        if src is None:
            continue
        mine = slot[source == s]
        used = int(mine.max()) + 1 if mine.size else 0
        lines.append(f"{src['name']} {used:,} of {src['n_windows']:,} windows ({used / src['n_windows']:.1%})")
        if used > src['n_windows']:
            first = int(np.argmax((source == s) & (slot >= src['n_windows']))) // rows_per_step
            phase = 'the anneal phase' if first >= anneal_from else 'the baseline phase'
            repeating.append(f"{src['name']} repeats {used - src['n_windows']:,} windows "
                             f"({(used - src['n_windows']) / src['n_windows']:.1%} of its data) from step {first:,}, in "
                             f"{phase}")
    if is_master:
        print(f"data plan over {max_steps:,} steps: " + ' | '.join(lines))
    if repeating:
        message = '; '.join(repeating) + ': prepare more tokens for it (prepare.py --max_tokens=...) or lower its share'
        if not allow_repeats:
            fail(f"{message}, or pass --allow_repeats=True")
        if is_master:
            print(f"warning: {message}")


def open_data(world_size, is_master, segments):
    """The sources (None for one with weight 0 in both mixtures: it may be absent), the row plan and its digest."""
    if len(sources) != len(mixture_baseline) or len(sources) != len(mixture_anneal):
        fail(f"sources {sources} and the mixtures {mixture_baseline} / {mixture_anneal} differ in length")
    used = [i for i in range(len(sources)) if any(segment['mixture_baseline'][i] > 0 or segment['mixture_anneal'][i] > 0
                                                  for segment in segments)]
    data = [open_source(sources[i]) if i in used else None for i in range(len(sources))]
    plan = row_plan(len(sources), micro_batch_size * grad_accum_steps * world_size, segments)
    check_repeats(data, plan, segments[-1]['anneal_from'], is_master)
    return data, plan, plan_digest(data, plan, segments), [os.path.join(data_dir, sources[i]) for i in used]


@torch.no_grad()
def evaluate(loss_engine, autocast, data, rank, world_size):
    """Validation loss per source on its held-out rows (sharded over the ranks, the sums all-reduced), and their
    baseline-mixture mean."""
    loss_engine.eval()
    losses = {}
    for src in (src for src in data if src is not None):
        mine, total = src['val'][rank::world_size], 0.0
        for first in range(0, len(mine), micro_batch_size):
            rows = np.stack([src['chunks'][c][o:o + block_size + 1] for c, o in mine[first:first + micro_batch_size]])
            with autocast:
                total += loss_engine(*to_device(rows, device, eos_id)).item() * len(rows)
        losses[f"val/{src['name']}"] = all_reduce_sums([total], world_size, device)[0] / len(src['val'])
    weights = dict(zip(sources, mixture_baseline))
    losses['val/loss'] = sum(weights[k[4:]] * v for k, v in losses.items()) / sum(weights[k[4:]] for k in losses)
    loss_engine.train()
    return losses

# -----------------------------------------------------------------------------
# the schedule: the learning rate, tau and the mixture over max_steps, as planned and as re-planned on the way (a resume
# with another max_steps or mixture, a budget): each re-plan a segment from its step on, the steps before it untouched

PLANNED = ('max_steps', 'anneal_start', 'mixture_baseline', 'mixture_anneal')
SESSION_ONLY = ('resume', 'stop_after_steps')  # they steer one session, never the run: no change to list on a resume


def segment_from(step, previous=None):
    """This run's plan from `step` on. The annealed mixture starts at anneal_start x max_steps, or now if that is
    behind; a run already annealing stays annealed."""
    anneal_from = anneal_start * max_steps
    if previous is not None:
        anneal_from = previous['anneal_from'] if previous['anneal_from'] <= step else max(step, anneal_from)
    return {'step': step, 'max_steps': max_steps, 'anneal_from': anneal_from,
            'mixture_baseline': list(mixture_baseline), 'mixture_anneal': list(mixture_anneal)}


def replan(segments, step):
    """The segments with this run's max_steps and mixtures from `step` on (a re-plan at the step of an earlier one
    replaces it); the same segments when nothing planned changed."""
    kept = [segment for segment in segments if segment['step'] < step]
    segment = segment_from(step, kept[-1] if kept else None)
    if kept and all(segment[k] == kept[-1][k] for k in segment if k != 'step'):
        return kept
    return kept + [segment]


def schedule_fraction(step, begin, before_end, segments):
    """How far a linear ramp from step `begin` to `before_end` steps before the run's end has gone at `step`, 0 to 1.
    A re-plan at step c carries it on from its value at c to 1 at the new end, so nothing jumps where max_steps changed
    and every schedule still ends at the end."""
    anchor, value = begin, 0.0
    for segment, following in zip(segments, segments[1:] + [None]):
        end = segment['max_steps'] - before_end
        ends_here = following is None or step < following['step']
        at = step if ends_here else following['step']
        ramp = 1.0 if at >= end else max(0.0, value + (1 - value) * (at - anchor) / max(1, end - anchor))
        if ends_here:
            return ramp
        anchor, value = max(anchor, at), ramp


def learning_rate_at(step, segments):
    return cosine_lr(step, learning_rate, warmup_steps, max_steps, min_lr, schedule_fraction(step, warmup_steps, 0,
                                                                                              segments))


def tau_at(step, segments):
    return max(tau_end, tau_start - (tau_start - tau_end) * schedule_fraction(step, 0, 1, segments))  # last: tau_end


def model_config():
    return ModelConfig(vocab_size=vocab_size, d_model=d_model, n_layers=n_layers, n_heads=n_heads,
                       n_kv_heads=n_kv_heads, d_ff=d_ff, max_seq_len=max_seq_len, rope_theta=rope_theta,
                       model_type=model_type)


def continue_plan(path, state, world_size, is_master):
    """-> (segments, changes so far) of the run this session continues. A resume keeps the checkpoint's schedule
    (a budget's re-plan included) unless this command changes max_steps or a mixture: then it re-plans from the
    checkpoint's step. Every other changed setting is listed in one line and recorded. What cannot continue the run is
    one line: another model, seed or global batch, extending a finished schedule, an end before the step reached."""
    global max_steps
    if state is None:
        return [segment_from(0)], []
    if state['model_config'] != {**state['model_config'], **model_config().__dict__}:
        fail(f"{path} was trained with another model config; use another out_dir or resume=''")
    for key, value in (('seed', seed), ('init_seed', weights_seed())):
        if state.get(key, value) != value:  # what a checkpoint does not record cannot disagree
            fail(f"{path} was trained with {key}={state[key]}, this run has {key}={value}: resuming would change "
                 f"its {'data order' if key == 'seed' else 'Gumbel noise'} midway; pass --{key}={state[key]}, or use "
                 "another out_dir")
    check_resume(path, state, backend, dtype, micro_batch_size * grad_accum_steps * world_size,
                 f"{micro_batch_size} x {grad_accum_steps} x {world_size} ranks")
    step, saved = state['step'], state.get('config', {})
    changed = {k: [saved[k], v] for k, v in plain_config(globals()).items()
               if k in saved and saved[k] != v and k not in SESSION_ONLY}
    segments = (state.get('scheduler_state_dict') or {}).get('segments')
    if not segments:  # a checkpoint that records no plan: one segment, as its config planned it
        end = state['scheduler_state_dict']['max_steps']
        segments = [{**segment_from(0), 'max_steps': end, 'anneal_from': saved.get('anneal_start', anneal_start) * end,
                     **{k: list(saved[k]) for k in ('mixture_baseline', 'mixture_anneal') if k in saved}}]
    planned_end = segments[-1]['max_steps']
    if 'max_steps' not in changed:
        max_steps = planned_end  # the same command goes on with the plan as it stands, a budget's re-plan included
    if step >= planned_end:
        if max_steps > planned_end:
            fail(f"{path} finished its schedule at step {step} (learning rate at min_lr, tau at tau_end): more steps "
                 f"would train at the end of both. Start a new run from it instead, with a warm-up and a schedule of "
                 f"its own and Adam's moments kept: --init_from={path} --init_optimizer=True --out_dir=<a new folder>")
        return segments, state.get('config_changes', [])
    if max_steps <= step:
        fail(f"{path} is at step {step}: max_steps={max_steps} would end the run before it; pass a max_steps above "
             f"{step} (the schedule then ends there whole)")
    changes = state.get('config_changes', [])
    if changed:
        changes = changes + [{'step': step, 'changes': changed}]
        if is_master:
            print(f"changed since {path}: " + ', '.join(f"{k} {old} -> {new}" for k, (old, new) in changed.items())
                  + (f"; the schedule re-planned from step {step} to end at {max_steps:,}" if any(
                      k in changed for k in PLANNED) else ''))
    return replan(segments, step), changes


def weights_seed():
    return seed if init_seed < 0 else init_seed

# -----------------------------------------------------------------------------
# the update: skipped where the loss or the gradient norm is non-finite or far above its recent history

# a parameter's group: the first whose marks its name contains
GRADIENT_GROUPS = (('routing', ('.alpha', '.beta', '.gate_net.')), ('norms', ('.gama',)), ('attention', ('.gqa.',)),
                   ('ffn', ('.polyglu.', '.swiglu.')), ('embedding', ('',)))


def gradient_norms(model, optimizer):
    """The gradient's norm per group of parameters (the head is the embedding, tied), before clipping; routing is the
    one whose logits tau divides. Under DeepSpeed the full gradients are gathered (a collective): logged steps only."""
    masters = named_masters(model, optimizer) if backend == 'torch' else None
    if backend == 'deepspeed':
        from deepspeed.utils import safe_get_full_grad
    squares = {}
    for name, p in model.named_parameters():
        group = next(g for g, marks in GRADIENT_GROUPS if any(m in f'.{name}' for m in marks))
        grad = safe_get_full_grad(p) if backend == 'deepspeed' else (p if masters is None else masters[name]).grad
        squares[group] = squares.get(group, 0.0) + (0.0 if grad is None else grad.float().pow(2).sum().item())
    return {f'grad_norm/{group}': math.sqrt(value) for group, value in squares.items()}


SPIKE_MIN_HISTORY = 20  # applied steps seen before any finite update is skipped


def spike_above(recent):
    """The value above which a loss or gradient norm is a spike against the recent applied steps, on a log scale (both
    are positive and vary by ratios): their median times exp(spike_sigmas robust sigmas), a sigma being 1.4826 x the
    median absolute deviation of the logs, at least 0.01 (so a flat stretch is no hair trigger). inf before
    SPIKE_MIN_HISTORY steps, or with spike_sigmas=0. A skipped value never enters the window."""
    if not spike_sigmas or len(recent) < SPIKE_MIN_HISTORY:
        return math.inf
    logs = np.log(np.maximum(recent, 1e-12))
    median = float(np.median(logs))
    return math.exp(median + spike_sigmas * max(1.4826 * float(np.median(np.abs(logs - median))), 0.01))


def skip_reason(loss, grad_norm, recent):
    """Why this update is skipped, or None to apply it."""
    if not (math.isfinite(loss) and math.isfinite(grad_norm)):
        return f"non-finite loss {loss} or grad norm {grad_norm}"
    spikes = [f"{name} {value:.4g} > {spike_above(recent[name]):.4g}" for name, value in
              (('loss', loss), ('grad_norm', grad_norm)) if value > spike_above(recent[name])]
    return (f"spike: {' and '.join(spikes)} ({spike_sigmas:g} robust sigmas above the median of the last "
            f"{len(recent['loss'])} steps)") if spikes else None


def guard_deepspeed_update(loss_engine, update):
    """DeepSpeed computes the gradient norm and clips, then calls our AdamW's step once per parameter group: that
    step runs only if skip_reason(update['loss'], the norm) is None, decided at its first call of an update (recorded
    in update['skip']). A non-finite norm never reaches it: DeepSpeed's own overflow check skips that update."""
    zero = loss_engine.optimizer
    adamw = getattr(zero, 'optimizer', zero)
    step = adamw.step

    def guarded_step(*args, **kwargs):
        if 'skip' not in update:
            norm = getattr(zero, '_global_grad_norm', None)  # ZeRO sets it before this step; stage 0: the loss alone
            update['skip'] = skip_reason(update['loss'], 0.0 if norm is None else float(norm), update['recent'])
        return None if update['skip'] else step(*args, **kwargs)
    adamw.step = guarded_step

# -----------------------------------------------------------------------------
# the run

def build_model(is_master, resuming):
    if block_size > max_seq_len:
        fail(f"block_size={block_size} exceeds max_seq_len={max_seq_len}")
    config = model_config()
    torch.manual_seed(weights_seed())
    model = create_model(config, device=device, dtype=torch.float32, attention=attention, fused=fused,
                         lean_mix=lean_mix, compile_blocks=compile_blocks, recompute_blocks=recompute_blocks,
                         selective_checkpointing=selective_checkpointing)
    if init_from and not resuming:  # before the engine: DeepSpeed copies the weights into its fp32 master copy
        source, source_info = load_checkpoint(init_from, config=config)
        model.load_state_dict(source.state_dict())
        if is_master:
            print(f"init_from {init_from} ({source_info['format']}, step {source_info['step']}, tau "
                  f"{source_info['tau']}): its weights" + (" and Adam's moments" if init_optimizer else
                  " only; a fresh optimizer (--init_optimizer=True keeps its moments)")
                  + f"; the learning-rate schedule from step 0 and tau from tau_start={tau_start} "
                  f"(--tau_start={tau_end} keeps an annealed model's tau)")
    return model


def init_optimizer_state(loss_engine, optimizer, model):
    """init_optimizer: the Adam moments of init_from's portable checkpoint in this run's fresh engine."""
    path = checkpoint_file(init_from)
    state = torch.load(path, map_location='cpu', weights_only=True) if path.endswith('.pt') else {}
    if not state.get('optimizer_state_dict'):
        fail(f"init_from={init_from} holds no optimizer state (train.py's portable_*.pt do): drop init_optimizer=True")
    check_resume(path, state, backend, dtype, None, '')
    import_training_state(loss_engine, optimizer, model, backend, state['optimizer_state_dict'])


def resume_run(path, state, model, loss_engine, optimizer, world_size, is_master):
    """Continue from the newest portable checkpoint, whatever the number of ranks that wrote it -> (step, the recent
    losses and gradient norms, skipped updates, seconds trained before)."""
    model.load_state_dict(state['model_state_dict'])
    import_training_state(loss_engine, optimizer, model, backend, state['optimizer_state_dict'])
    step = state['step']
    if step and is_master:
        print(f"resumed from step {step} ({step * micro_batch_size * grad_accum_steps * block_size * world_size:,} "
              f"tokens) of {path}")
        trim_log(os.path.join(out_dir, 'train_log.jsonl'), step)  # the steps after it are trained again
    return (step, state.get('recent') or {'loss': [], 'grad_norm': []}, state.get('skipped_updates', 0),
            state.get('train_seconds', 0.0))


def describe_run(model, world_size, data_plan, start_step):
    """The lines before step 1 (the attention kernel that runs: a missing flash-attn shows here, not as a slow run;
    what MFU counts; the projected cost; the seeds), and the 'run' record analyze.py --compare pairs runs by."""
    config, tokens_per_step = model.config, micro_batch_size * grad_accum_steps * block_size * world_size
    n_params = count_parameters(config)[0]
    model_flops_per_token = flops_per_token(config, block_size, n_params)
    recomputed = recompute_blocks if recompute_blocks >= 0 else n_layers
    print(f"model {model_type}: {n_params:,} parameters | {tokens_per_step:,} tokens a step "
          f"({micro_batch_size} x {grad_accum_steps} x {block_size} x {world_size} ranks) | {max_steps:,} steps "
          f"| backend {backend} | {device} {dtype} | attention {attention_name(model)} | fused {fused} | "
          f"{recomputed} of {n_layers} blocks recomputed | loss {loss_kernel} | lean_mix {lean_mix} | compile_blocks "
          f"{compile_blocks} | fused_adamw {fused_adamw} | prefetch {prefetch} | selective_checkpointing "
          f"{selective_checkpointing}")
    extra = recompute_flops_per_token(config, block_size, recomputed, loss_kernel) / model_flops_per_token
    again = 'the recomputed blocks' + (" and the loss chunks' second head forward" if loss_kernel == 'chunked' else '')
    print(f"MFU counts {model_flops_per_token / 1e9:.2f} GFLOP a token (6N + causal attention over whole "
          f"{block_size}-token rows); {again} run {100 * extra:.1f}% more, uncounted")
    run_tokens = max_steps * tokens_per_step
    print(projected_cost(model_flops_per_token, run_tokens, f", {run_tokens / n_params:.1f} per parameter"))
    print(f"seed {seed} (data plan {data_plan}), init_seed {weights_seed()} (weights, Gumbel noise)")
    log_entry(os.path.join(out_dir, 'train_log.jsonl'), None, start_step, {'run': run_record(data_plan, world_size)})
    return model_flops_per_token * tokens_per_step


def run_record(data_plan, world_size):
    """What analyze.py --compare pairs runs by, logged at each start and after a re-plan."""
    return {'model_type': model_type, 'parameters': count_parameters(model_config())[0], 'seed': seed,
            'init_seed': weights_seed(), 'data_plan': data_plan, 'max_steps': max_steps,
            'tokens_per_step': micro_batch_size * grad_accum_steps * block_size * world_size}


BUDGET_WARMUP_STEPS = 3  # a session's first steps compile and warm caches: not timed for the budget
BUDGET_MARGIN = 0.97     # a budget's re-plan aims here: evaluations and saves, not in the steps timed, take the rest


def check_budget(step, seconds_per_step, seconds_so_far, may_replan, world_size):
    """The whole run's projected cost from its own speed and its end time; over budget_usd (with fit_budget, and no
    budget re-plan before), the max_steps that fits. -> (the line to print, metrics to log, new max_steps or None)."""
    usd_per_second = usd_per_hour * world_size / 3600
    seconds = seconds_so_far + (max_steps - step) * seconds_per_step
    cost, end = seconds * usd_per_second, time.strftime('%Y-%m-%d %H:%M', time.localtime(
        time.time() + (max_steps - step) * seconds_per_step))
    line = (f"budget: {max_steps:,} steps at {seconds_per_step:.3g} s a step cost ${cost:,.2f} in all "
            f"({seconds / 3600:.2f} h x {world_size} GPU x ${usd_per_hour:g}/h), ending {end}")
    fits = None
    if budget_usd and cost > budget_usd:
        affordable = (BUDGET_MARGIN * budget_usd / usd_per_second - seconds_so_far) / seconds_per_step
        fits = max(step + 1, int(step + affordable))
        if fit_budget and may_replan:
            line += (f": over budget_usd=${budget_usd:,.2f}, so max_steps {max_steps:,} -> {fits:,} (aiming at "
                     f"{BUDGET_MARGIN:.0%} of it), the schedule re-planned from step {step} to end there whole")
        else:
            line += (f": warning: over budget_usd=${budget_usd:,.2f}; {fits:,} steps would fit (" + (
                'fit_budget=False' if not fit_budget else 'a budget re-planned this run already') + ')')
            fits = None
    elif budget_usd:
        line += f", within budget_usd=${budget_usd:,.2f}"
    return line, {'budget/projected_usd': cost, 'budget/projected_hours': seconds / 3600,
                  'budget/seconds_per_step': seconds_per_step, 'budget/max_steps': fits or max_steps}, fits


def main():
    global device, dtype, max_steps
    device, dtype = resolve_device(device, dtype)
    rank, world_size, device = init_distributed(backend, device)
    is_master = rank == 0
    hold_folder(out_dir, rank)  # one run per out_dir, on every rank: a second one stops here, naming this one
    tokens_per_step = micro_batch_size * grad_accum_steps * block_size * world_size
    asked = dict(globals())  # the command's settings, as checkpoints record them: a budget's re-plan is in the segments
    path, state = resume_state(out_dir, 'portable_', is_master) if resume else (None, None)
    segments, changes = continue_plan(path, state, world_size, is_master)
    start_step = state['step'] if state is not None else 0
    if start_step >= max_steps:
        print(f"already trained to max_steps={max_steps}; nothing to do")
        return
    data, plan, data_plan, folders = open_data(world_size, is_master, segments)
    provenance = run_provenance(folders, asked)  # the command, the config, the commit

    model = build_model(is_master, resuming=state is not None)
    loss_engine, optimizer, autocast = make_engine(LanguageModelLoss(model, loss_chunk_size, loss_kernel), model,
                                                   globals())
    recent, skipped, seconds_before = {'loss': [], 'grad_norm': []}, 0, 0.0
    if state is not None:
        start_step, recent, skipped, seconds_before = resume_run(path, state, model, loss_engine, optimizer,
                                                                 world_size, is_master)
    elif init_from and init_optimizer:
        init_optimizer_state(loss_engine, optimizer, model)
    ds_dir = os.path.join(out_dir, 'ds_checkpoint') if backend == 'deepspeed' and ds_checkpoint else None
    log_path = os.path.join(out_dir, 'train_log.jsonl')
    if changes and changes[-1]['step'] == start_step and is_master:
        log_entry(log_path, None, start_step, {'changes': changes[-1]['changes']})
    update = {'recent': recent}  # what the DeepSpeed guard reads: this update's loss, the recent history
    if backend == 'deepspeed':
        guard_deepspeed_update(loss_engine, update)

    def weights_info(step):
        """What a checkpoint and a snapshot record beside the weights. data_dir, val_tokens and block_size: eval.py's
        perplexity and analyze.py read the same held-out windows."""
        return dict(tokens=step * tokens_per_step, train_seconds=seconds_before + time.perf_counter() - run_start,
                    world_size=world_size, data_dir=data_dir, val_tokens=val_tokens, block_size=block_size,
                    init_from=init_from, seed=seed, init_seed=weights_seed(), data_plan=data_plan, **provenance)

    def save(step, final=False):
        """On every rank (utils.save_run)."""
        heartbeat(f'the save at step {step}', save_timeout_s)
        save_run(out_dir, 'portable_', step, final, (loss_engine, optimizer, model, backend, ds_dir), keep_checkpoints,
                 is_master, {'schedule': 'linear warmup + cosine', 'step': step, 'learning_rate': learning_rate,
                             'min_lr': min_lr, 'warmup_steps': warmup_steps, 'max_steps': max_steps, 'segments': segments},
                 recent=recent, skipped_updates=skipped, config_changes=changes,
                 rows_per_step=micro_batch_size * grad_accum_steps * world_size, **weights_info(step))

    stop_signal = catch_stop_signals()
    wandb_run = init_wandb(wandb_log and is_master, wandb_project, wandb_run_name, globals())
    flops_per_step = describe_run(model, world_size, data_plan, start_step) if is_master else 0
    peak = peak_flops(device, peak_flops_override) * world_size
    with watchdog(rank, world_size, f"the last checkpoint in {out_dir} is intact: resume with the same command once "
                  "every rank is healthy"):
        loss_engine.train()
        bad_in_a_row, timer, run_start, last_logged = 0, time.perf_counter(), time.perf_counter(), start_step
        budget_due = start_step + BUDGET_WARMUP_STEPS + budget_steps
        budget_replanned = any(change.get('reason') == 'budget' for change in changes)
        batches, step = step_batches(data, plan, start_step, rank, world_size), start_step
        while step < max_steps:
            heartbeat(f'step {step}', collective_timeout_s if step > start_step else 0)  # the first compiles: no limit
            if step == start_step + BUDGET_WARMUP_STEPS:
                budget_timer = time.perf_counter()
            micro_batches = next(batches)
            lr, tau = learning_rate_at(step, segments), tau_at(step, segments)
            model.set_tau(tau)
            for group in optimizer.param_groups:
                group['lr'] = lr
            # forward and backward over the micro-batches; each draws the Gumbel noise of its place in the global batch
            losses = []
            for micro_step, (x, y, cu_seqlens, max_seqlen) in enumerate(micro_batches):
                torch.manual_seed(micro_batch_seed(weights_seed(), step, micro_step * world_size + rank))
                with autocast:
                    loss = loss_engine(x, y, cu_seqlens, max_seqlen)
                if backend == 'deepspeed':
                    loss_engine.backward(loss)
                    if micro_step < grad_accum_steps - 1:
                        loss_engine.step()  # accumulates; the boundary's step below clips and updates
                else:
                    (loss / grad_accum_steps).backward()
                losses.append(loss.detach().float())
            loss = all_reduce_sums([torch.stack(losses).mean().item()], world_size, device)[0] / world_size
            done = step + 1
            logged = done % log_interval == 0 or done == max_steps
            norms = gradient_norms(model, optimizer) if logged else {}
            # clip and update, unless the loss or the gradient norm is non-finite or a spike (skip_reason)
            if backend == 'deepspeed':
                update.update(loss=loss, recent=recent)
                update.pop('skip', None)
                loss_engine.step()  # DeepSpeed clips, then the guarded AdamW step asks skip_reason
                grad_norm = float(loss_engine.get_global_grad_norm() or 0.0)
                reason = update.get('skip', f"non-finite loss {loss} or grad norm {grad_norm}")
            else:
                grad_norm = torch.nn.utils.clip_grad_norm_(optimizer_weights(optimizer), grad_clip).item()
                reason = skip_reason(loss, grad_norm, recent)
                if reason is None:
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            bad_in_a_row, skipped = (0, skipped) if reason is None else (bad_in_a_row + 1, skipped + 1)
            if reason is None:
                for name, value in (('loss', loss), ('grad_norm', grad_norm)):
                    recent[name] = (recent[name] + [value])[-spike_window:] if spike_window else []
            elif is_master:
                print(f"step {step}: {reason}: update skipped ({bad_in_a_row} in a row, {skipped} in all)", flush=True)
            if bad_in_a_row >= max_bad_steps:
                fail(f"{bad_in_a_row} skipped updates in a row at step {step} (max_bad_steps={max_bad_steps}): "
                     f"stopping; the last good checkpoint in {out_dir} is intact (lower learning_rate, check the data, "
                     "or raise spike_sigmas, then resume)")
            if is_master and (logged or reason is not None):
                log_step(log_path, wandb_run, done, max_steps, {
                    'train/loss': loss, 'train/lr': lr, 'train/tau': tau, 'train/grad_norm': grad_norm, **norms,
                    'train/skipped_steps': skipped, 'train/tokens': done * tokens_per_step,
                    'train/skipped': float(reason is not None), **routing_entropy(model)},
                    (done - last_logged, time.perf_counter() - timer), (tokens_per_step, flops_per_step, peak), device)
                timer, last_logged = time.perf_counter(), done
            if budget_steps and done == budget_due and done < max_steps:
                # every rank decides on the same mean times, so that all of them re-plan alike
                seconds_per_step, seconds_so_far = (value / world_size for value in all_reduce_sums(
                    [(time.perf_counter() - budget_timer) / budget_steps, time.perf_counter() - run_start], world_size,
                    device))
                line, metrics, fits = check_budget(done, seconds_per_step, seconds_before + seconds_so_far,
                                                   not budget_replanned, world_size)
                if is_master:
                    print(line, flush=True)
                    log_entry(log_path, wandb_run, done, metrics)
                if fits:
                    changes = changes + [{'step': done, 'changes': {'max_steps': [max_steps, fits]},
                                          'reason': 'budget'}]
                    max_steps, budget_replanned = fits, True
                    segments = replan(segments, done)
                    batches.close()  # the steps from here may take other rows: plan them again
                    data, plan, data_plan, _ = open_data(world_size, False, segments)
                    batches = step_batches(data, plan, done, rank, world_size)
                    if is_master:
                        log_entry(log_path, None, done, {'changes': changes[-1]['changes'],
                                                         'run': run_record(data_plan, world_size)})
            if eval_interval and (done % eval_interval == 0 or done == max_steps):
                heartbeat(f'the evaluation at step {done}', collective_timeout_s)
                losses = evaluate(loss_engine, autocast, data, rank, world_size)
                if is_master:
                    print(f"step {done}: validation " + ' | '.join(f"{k[4:]} {v:.4f}" for k, v in losses.items()))
                    log_entry(log_path, wandb_run, done, {'train/tokens': done * tokens_per_step, **losses})
            stop_reason = end_of_session(stop_signal, stop_after_steps, done - start_step, world_size)
            if done < max_steps and (stop_reason or (checkpoint_interval and done % checkpoint_interval == 0)):
                save(done)
            if is_master and snapshot_interval and (done % snapshot_interval == 0 or done == max_steps):
                heartbeat(f'the snapshot at step {done}', save_timeout_s)
                save_snapshot(out_dir, f'snapshot_{done}.pt', model, done, weights_info(done))
            if stop_reason and done < max_steps:
                if is_master:
                    print(f"{stop_reason}: checkpoint saved at step {done}; resume with the same command")
                return
            step = done
        save(max_steps, final=True)
    if is_master:
        print(f"done: {max_steps} steps in {(time.perf_counter() - run_start) / 60:.1f} min, "
              f"{skipped} skipped -> {os.path.join(out_dir, 'portable_final.pt')}")
    if wandb_run:
        wandb_run.finish()


if __name__ == '__main__':
    configure(globals())
    main()
    close_distributed()
