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
"""
import hashlib
import json
import os
import time

import numpy as np
import torch

from model import (EOS_ID, LanguageModelLoss, ModelConfig, attention_name, count_parameters, create_model,
                   cu_seqlens_from_eos, flops_per_token, recompute_flops_per_token, routing_entropy)
from utils import (catch_stop_signals, close_distributed, cosine_lr, end_of_session, export_training_state,
                   held_out_split, import_training_state, init_distributed, init_wandb, load_checkpoint, make_engine,
                   micro_batch_seeds, open_chunks, optimizer_step, peak_flops, projected_cost, prune_checkpoints,
                   read_manifest, report_save, resolve_device, resume_state, run_provenance, save_checkpoint, trim_log)

# -----------------------------------------------------------------------------
# config: the defaults are SPEC.md's full run; config/*.py and --key=value override them
# I/O
out_dir = 'checkpoints'
data_dir = 'data/tokenized'
resume = 'auto'              # 'auto': continue from the newest complete checkpoint if there is one; '' = fresh
init_from = ''               # start from these weights (a path, a folder or hf:owner/name) with a fresh optimizer and schedule
# model (ModelConfig fields)
model_type = 'polyglu'       # 'polyglu' | 'vanilla' (the SwiGLU baseline)
vocab_size = 151_669
d_model = 1024
n_layers = 28
n_heads = 16
n_kv_heads = 8
d_ff = 4096
max_seq_len = 4096
rope_theta = 10_000.0
# data
sources = ('math', 'stem', 'code')
mixture_baseline = (0.70, 0.25, 0.05)
mixture_anneal = (0.85, 0.10, 0.05)
anneal_start = 0.8           # fraction of max_steps after which the annealed mixture is used
block_size = 4096
eos_id = EOS_ID
val_tokens = 2_000_000       # held out at the end of each source
eval_rows = 64               # validation rows per source
allow_repeats = True         # False: a source that would repeat windows (too little data prepared) stops the run at start
# optimisation
micro_batch_size = 16
grad_accum_steps = 8
max_steps = 19_531           # ~10B tokens at 512K tokens a step
learning_rate = 1e-4
min_lr = 1e-5
warmup_steps = 2000
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.95
adam_eps = 1e-8
grad_clip = 1.0
tau_start = 1.0
tau_end = 0.1
# system
backend = 'deepspeed'        # 'deepspeed' | 'torch' (plain PyTorch: CPU tests, demo, or one GPU)
zero_stage = 1
device = 'auto'              # 'auto' = cuda if available, else cpu
dtype = 'auto'               # 'auto' = bfloat16 on cuda, float32 on cpu
attention = 'auto'           # CUDA kernel: 'auto' = flash-attn if installed, else torch's varlen_attn (sm80+), else 'sdpa'
gradient_checkpointing = False
checkpoint_blocks = -1       # with gradient_checkpointing: how many blocks recompute, from the first; -1 = all
fused = False                # torch.compile'd elementwise kernels (RMSNorm, the PolyGLU mix): less memory, fewer passes
loss_chunk_size = 2048
seed = 1337                  # the data: which row trains on which window, in what order
init_seed = -1               # the model: its initial weights and the Gumbel noise of its routing; -1 = seed
peak_flops_override = 0.0    # device peak FLOP/s for MFU; 0 = from the GPU's name (A100/H100/H200), none on CPU
# stability
max_bad_steps = 10           # non-finite loss/grad steps in a row before the run stops
spike_factor = 3.0           # a loss above spike_factor x its running mean is logged as a spike
# logging and checkpoints
log_interval = 10
eval_interval = 500
checkpoint_interval = 500
keep_checkpoints = 3
ds_checkpoint = False        # also write DeepSpeed's own checkpoint to {out_dir}/ds_checkpoint/ (~8.4 GB a save at
                             # full size; nothing here reads it: resume reads the portable file on any number of ranks)
stop_after_steps = 0         # end this session (with a checkpoint) after this many steps; 0 = run to max_steps
wandb_log = False
wandb_project = 'polychromatic'
wandb_run_name = 'pretrain'
# -----------------------------------------------------------------------------


def fail(message):
    raise SystemExit(f"error: {message}")


# -----------------------------------------------------------------------------
# data

def open_source(name):
    """One prepared source: its chunks memory-mapped, the training windows, and the held-out validation rows."""
    folder = os.path.join(data_dir, name)
    chunks = open_chunks(folder, eos_id, vocab_size,
                         missing_hint=f"run `python prepare.py --source={name}` or give {name} weight 0 in the mixture")
    window = block_size + 1
    lengths, held = held_out_split([c.size for c in chunks], val_tokens)
    val = [(c, start) for c, lo, hi in held for start in range(lo, hi - window + 1, block_size)][:eval_rows]
    windows_per_chunk = np.array([max(0, (n - 1) // block_size) for n in lengths], dtype=np.int64)
    if not val or not windows_per_chunk.sum():
        fail(f"{folder} ({sum(c.size for c in chunks):,} tokens) is too small to hold out val_tokens={val_tokens:,} "
             f"and train on windows of {window} tokens: lower val_tokens or prepare more data")
    return dict(name=name, chunks=chunks, first_window=np.concatenate([[0], np.cumsum(windows_per_chunk)]),
                n_windows=int(windows_per_chunk.sum()), val=val,
                checksums=[entry['sha256'] for entry in read_manifest(folder)['chunks']])


def row_plan(n_sources, rows_per_step):
    """For every row of the run, (source index, slot). Row j of step s is global row s * rows_per_step + j, where
    rows_per_step is the global batch (micro_batch_size x grad_accum_steps x world_size). Its source is drawn by the
    step's mixture from a uniform that depends on (seed, global row) only, and a source's k-th row takes slot k of its
    window permutation. So the same global batch sees the same data on 1, 2 or 8 GPUs (each rank takes its share of every
    step's rows), and nothing about the data needs saving for an exact resume, on any GPU count with the same global
    batch."""
    total = max_steps * rows_per_step
    uniform = np.random.default_rng(seed).random(total)  # the g-th draw is the same whatever total is
    step_of_row = np.arange(total) // rows_per_step
    source = np.empty(total, dtype=np.int64)
    for probs, selected in ((mixture_baseline, step_of_row < anneal_start * max_steps),
                            (mixture_anneal, step_of_row >= anneal_start * max_steps)):
        cumulative = np.cumsum(probs) / np.sum(probs)
        source[selected] = np.minimum(np.searchsorted(cumulative, uniform[selected], side='right'), n_sources - 1)
    slot = np.empty(total, dtype=np.int64)
    for s in range(n_sources):
        rows = source == s
        slot[rows] = np.arange(rows.sum())
    return source, slot


def plan_digest(data, plan):
    """A fingerprint of every token the run trains and validates on: the row plan, the seed, the windows (block_size,
    each source's chunks by checksum, the held-out rows) and the document separator. Runs with the same digest see the
    same rows in the same order, whatever their model: analyze.py --compare checks it before pairing two runs."""
    source, slot = plan
    digest = hashlib.sha256(source.astype(np.int64).tobytes() + slot.astype(np.int64).tobytes())
    sources_used = [None if src is None else [src['name'], src['checksums']] for src in data]
    digest.update(json.dumps([seed, block_size, val_tokens, eval_rows, eos_id, sources_used]).encode())
    return digest.hexdigest()[:16]


def rank_rows(step, micro_step, rank, world_size):
    """The global rows one rank trains on in one micro-step: micro-step m of rank r takes the (m * world_size + r)-th
    block of micro_batch_size rows of the step, so 2 ranks x grad_accum 1 train what 1 rank x grad_accum 2 trains."""
    rows_per_step = micro_batch_size * grad_accum_steps * world_size
    first = step * rows_per_step + (micro_step * world_size + rank) * micro_batch_size
    return range(first, first + micro_batch_size)


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
    rows = np.stack([window_tokens(data[source[i]], slot[i]) for i in rank_rows(step, micro_step, rank, world_size)])
    return to_device(rows)


def check_repeats(data, plan, master):
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
            phase = 'the anneal phase' if first >= anneal_start * max_steps else 'the baseline phase'
            repeating.append(f"{src['name']} repeats {used - src['n_windows']:,} windows "
                             f"({(used - src['n_windows']) / src['n_windows']:.1%} of its data) from step {first:,}, in "
                             f"{phase}")
    if master:
        print(f"data plan over {max_steps:,} steps: " + ' | '.join(lines))
    if repeating:
        message = '; '.join(repeating) + ': prepare more tokens for it (prepare.py --max_tokens=...) or lower its share'
        if not allow_repeats:
            fail(f"{message}, or pass --allow_repeats=True")
        if master:
            print(f"warning: {message}")


def to_device(rows):
    rows = torch.from_numpy(rows.astype(np.int64))
    x, y = rows[:, :-1].contiguous(), rows[:, 1:].contiguous()
    cu_seqlens, max_seqlen = cu_seqlens_from_eos(x, eos_id)
    return x.to(device), y.to(device), cu_seqlens.to(device), max_seqlen

# -----------------------------------------------------------------------------
# the run

def main():
    global device, dtype
    device, dtype = resolve_device(device, dtype)
    if len(sources) != len(mixture_baseline) or len(sources) != len(mixture_anneal):
        fail(f"sources {sources} and the mixtures {mixture_baseline} / {mixture_anneal} differ in length")
    rank, world_size, device = init_distributed(backend, device)
    use_deepspeed, master = backend == 'deepspeed', rank == 0
    if master:
        os.makedirs(out_dir, exist_ok=True)
    tokens_per_step = micro_batch_size * grad_accum_steps * block_size * world_size

    # data: sources with weight 0 in both mixtures may be absent
    used = [i for i in range(len(sources)) if mixture_baseline[i] > 0 or mixture_anneal[i] > 0]
    data = [open_source(sources[i]) if i in used else None for i in range(len(sources))]
    provenance = run_provenance([os.path.join(data_dir, sources[i]) for i in used])  # the command, the tokenizer
    plan = row_plan(len(sources), micro_batch_size * grad_accum_steps * world_size)
    check_repeats(data, plan, master)
    data_plan = plan_digest(data, plan)
    weights_seed = seed if init_seed < 0 else init_seed

    # model
    config = ModelConfig(vocab_size=vocab_size, d_model=d_model, n_layers=n_layers, n_heads=n_heads,
                         n_kv_heads=n_kv_heads, d_ff=d_ff, max_seq_len=max_seq_len, rope_theta=rope_theta,
                         model_type=model_type)
    if block_size > max_seq_len:
        fail(f"block_size={block_size} exceeds max_seq_len={max_seq_len}")
    torch.manual_seed(weights_seed)
    model = create_model(config, device=device, dtype=torch.float32, attention=attention, fused=fused,
                         gradient_checkpointing=gradient_checkpointing, checkpoint_blocks=checkpoint_blocks)
    ds_dir = os.path.join(out_dir, 'ds_checkpoint')
    path, state = resume_state(out_dir, 'portable_') if resume else (None, None)
    resuming = state is not None
    if init_from and not resuming:  # before the engine: DeepSpeed copies the weights into its fp32 master copy
        source, source_info = load_checkpoint(init_from, config=config)
        model.load_state_dict(source.state_dict())
        del source
        if master:
            print(f"init_from {init_from} ({source_info['format']}, step {source_info['step']}, tau "
                  f"{source_info['tau']}): its weights only; a fresh optimizer, the learning-rate schedule from step 0 "
                  f"and tau from tau_start={tau_start} (--tau_start={tau_end} keeps an annealed model's tau)")
    engine, optimizer, autocast = make_engine(
        LanguageModelLoss(model, loss_chunk_size), model, backend, dtype, zero_stage, micro_batch_size,
        grad_accum_steps, grad_clip, learning_rate, weight_decay, (beta1, beta2), adam_eps)

    # resume
    start_step, loss_ema, bad_in_a_row, skipped_steps = 0, None, 0, 0
    if resuming:  # from the newest portable checkpoint, whatever the number of ranks that wrote it
        if state['model_config'] != {**state['model_config'], **config.__dict__}:
            fail(f"{path} was trained with another model config; use another out_dir or resume=''")
        for key, value in (('seed', seed), ('init_seed', weights_seed)):
            if state.get(key, value) != value:  # a checkpoint from before init_seed records neither
                fail(f"{path} was trained with {key}={state[key]}, this run has {key}={value}: resuming would change "
                     f"its {'data order' if key == 'seed' else 'Gumbel noise'} midway; pass --{key}={state[key]}, or use "
                     "another out_dir")
        if state['optimizer_state_dict'] is None:
            fail(f"{path} holds no optimizer state (written before resumable DeepSpeed checkpoints): resume with "
                 f"the same number of GPUs from {ds_dir} using an older train.py, or start fresh with resume=''")
        per_parameter = isinstance(state['optimizer_state_dict'], dict) and 'master' in state['optimizer_state_dict']
        if per_parameter != use_deepspeed:
            fail(f"{path} was written by a {'DeepSpeed' if per_parameter else 'torch'} run: resume it with "
                 f"backend={'deepspeed' if per_parameter else 'torch'}, or start fresh with resume=''")
        saved_rows = state.get('rows_per_step', micro_batch_size * grad_accum_steps * world_size)
        if saved_rows != micro_batch_size * grad_accum_steps * world_size:
            fail(f"{path} was trained with {saved_rows} rows a step, this run has {micro_batch_size} x "
                 f"{grad_accum_steps} x {world_size} ranks = {micro_batch_size * grad_accum_steps * world_size}: keep "
                 "the global batch (e.g. --grad_accum_steps) so the data order and schedule continue")
        model.load_state_dict(state['model_state_dict'])
        import_training_state(engine, optimizer, model, backend, state['optimizer_state_dict'])
        start_step, loss_ema, skipped_steps = state['step'], state.get('loss_ema'), state.get('skipped_updates', 0)
        if start_step and master:
            print(f"resumed from step {start_step} ({start_step * tokens_per_step:,} tokens) of {path}")
            trim_log(os.path.join(out_dir, 'train_log.jsonl'), start_step)  # the steps after it are trained again
        if start_step >= max_steps:
            print(f"already trained to max_steps={max_steps}; nothing to do")
            return

    def save(step, final=False):
        save_start = time.perf_counter()
        scheduler_state = {'step': step, 'learning_rate': learning_rate, 'min_lr': min_lr,
                           'warmup_steps': warmup_steps, 'max_steps': max_steps, 'schedule': 'linear warmup + cosine'}
        extra = {'loss_ema': loss_ema, 'skipped_updates': skipped_steps, 'tokens': step * tokens_per_step,
                 'rows_per_step': micro_batch_size * grad_accum_steps * world_size, 'world_size': world_size,
                 'data_dir': data_dir, 'val_tokens': val_tokens, 'block_size': block_size,  # eval.py's perplexity
                 'init_from': init_from, 'seed': seed, 'init_seed': weights_seed,         # reads the same windows
                 'data_plan': data_plan, **provenance}
        if use_deepspeed and ds_checkpoint:
            engine.save_checkpoint(ds_dir, tag=f'step_{step}', client_state={'step': step, **extra})
        optimizer_state = export_training_state(engine, optimizer, model, backend)  # every rank: collectives
        masters = optimizer_state['master'] if backend == 'deepspeed' else None  # fp32, where the module may be bf16
        if master:
            name = 'portable_final.pt' if final else f'portable_{step}.pt'
            # resumable on any number of ranks; ds_checkpoint/, if asked for, is DeepSpeed's own copy (same world size)
            save_checkpoint(os.path.join(out_dir, name), model, step, master_weights=masters,
                            optimizer_state=optimizer_state,
                            scheduler_state=scheduler_state, **extra)
            prune_checkpoints(out_dir, 'portable_', ds_dir, keep_checkpoints)
            report_save(step, os.path.join(out_dir, name), time.perf_counter() - save_start,
                        os.path.join(ds_dir, f'step_{step}') if use_deepspeed and ds_checkpoint else None)

    stop_signal = catch_stop_signals()

    wandb_run = init_wandb(wandb_log and master, wandb_project, wandb_run_name, globals())

    n_params = count_parameters(config)[0]
    model_flops_per_token = flops_per_token(config, block_size, n_params)
    flops_per_step = model_flops_per_token * tokens_per_step
    peak = peak_flops(device, peak_flops_override) * world_size
    recomputed = (checkpoint_blocks if checkpoint_blocks >= 0 else n_layers) if gradient_checkpointing else 0
    if master:  # which attention kernel runs: a missing flash-attn shows here, not as a slow run
        print(f"model {model_type}: {n_params:,} parameters | {tokens_per_step:,} tokens a step "
              f"({micro_batch_size} x {grad_accum_steps} x {block_size} x {world_size} ranks) | {max_steps:,} steps "
              f"| backend {backend} | {device} {dtype} | attention {attention_name(model)} | fused {fused} | "
              f"{recomputed} of {n_layers} blocks recomputed")
        extra = recompute_flops_per_token(config, block_size, recomputed) / model_flops_per_token
        print(f"MFU counts {model_flops_per_token / 1e9:.2f} GFLOP a token (6N + causal "
              f"attention over whole {block_size}-token rows); the recomputed blocks and the loss's second head "
              f"forward run {100 * extra:.1f}% more, uncounted")
        run_tokens = max_steps * tokens_per_step
        print(projected_cost(model_flops_per_token, run_tokens, f", {run_tokens / n_params:.1f} per parameter"))
        print(f"seed {seed} (data plan {data_plan}), init_seed {weights_seed} (weights, Gumbel noise)")
        with open(os.path.join(out_dir, 'train_log.jsonl'), 'a') as f:  # what analyze.py --compare pairs runs by
            f.write(json.dumps({'step': start_step, 'run': {
                'model_type': model_type, 'parameters': n_params, 'seed': seed, 'init_seed': weights_seed,
                'data_plan': data_plan, 'tokens_per_step': tokens_per_step, 'max_steps': max_steps}}) + '\n')

    def evaluate():
        engine.eval()
        losses = {}
        with torch.no_grad(), autocast:
            for src in data:
                if src is None:
                    continue
                mine = src['val'][rank::world_size]  # rows sharded over the ranks, the sums all-reduced
                total = torch.zeros((), dtype=torch.float64)
                for first in range(0, len(mine), micro_batch_size):
                    rows = np.stack([src['chunks'][c][o:o + block_size + 1] for c, o in mine[first:first + micro_batch_size]])
                    x, y, cu_seqlens, max_seqlen = to_device(rows)
                    total += engine(x, y, cu_seqlens, max_seqlen).item() * len(rows)
                if world_size > 1:
                    total = total.to(device)
                    torch.distributed.all_reduce(total)
                losses[f"val/{src['name']}"] = total.item() / len(src['val'])
        weights = dict(zip(sources, mixture_baseline))
        losses['val/loss'] = sum(weights[k[4:]] * v for k, v in losses.items()) / sum(
            weights[k[4:]] for k in losses)
        engine.train()
        return losses

    engine.train()
    timer, run_start, last_logged = time.perf_counter(), time.perf_counter(), start_step
    for step in range(start_step, max_steps):
        tau = model.update_tau(step, max_steps - 1, tau_start, tau_end)  # the last step trains at tau_end
        lr = cosine_lr(step, learning_rate, warmup_steps, max_steps, min_lr)
        for group in optimizer.param_groups:
            group['lr'] = lr
        micro_batches = [get_batch(data, plan, step, micro_step, rank, world_size)
                         for micro_step in range(grad_accum_steps)]
        noise_seeds = micro_batch_seeds(weights_seed, step, grad_accum_steps, rank, world_size)
        loss, grad_norm, applied = optimizer_step(engine, optimizer, model, micro_batches, backend, grad_clip, autocast,
                                                  seeds=noise_seeds)

        done, spike = step + 1, False
        if not applied:  # no logging for it, but the stop signal and the checkpoint interval below still apply
            bad_in_a_row, skipped_steps = bad_in_a_row + 1, skipped_steps + 1
            print(f"step {step}: non-finite loss {loss} or grad norm {grad_norm}: update skipped "
                  f"({bad_in_a_row} in a row, {skipped_steps} in all)")
            if bad_in_a_row >= max_bad_steps:
                fail(f"{bad_in_a_row} non-finite steps in a row at step {step}: stopping; the last good checkpoint "
                     f"in {out_dir} is intact (lower learning_rate or check the data, then resume)")
        else:
            bad_in_a_row = 0
            spike = loss_ema is not None and loss > spike_factor * loss_ema
            loss_ema = loss if loss_ema is None else 0.99 * loss_ema + 0.01 * loss
            if spike and master:
                print(f"step {step}: loss spike {loss:.4f} > {spike_factor} x running mean {loss_ema:.4f}")

        if applied and master and (done % log_interval == 0 or done == max_steps or spike):
            elapsed, steps_timed = time.perf_counter() - timer, done - last_logged
            tokens_per_sec = steps_timed * tokens_per_step / elapsed
            mfu = flops_per_step * steps_timed / elapsed / peak if peak else None
            eta = (max_steps - done) * elapsed / steps_timed
            metrics = {'train/loss': loss, 'train/lr': lr, 'train/tau': tau, 'train/grad_norm': grad_norm,
                       'train/tokens_per_sec': tokens_per_sec, 'train/mfu': mfu, 'train/skipped_steps': skipped_steps,
                       'train/tokens': done * tokens_per_step, 'train/loss_spike': float(spike),
                       **routing_entropy(model)}
            if device.startswith('cuda'):
                metrics['train/gpu_mem_gb'] = torch.cuda.max_memory_allocated() / 2**30
            entropy = metrics.get('routing/entropy_frac_mean')
            print(f"step {done}/{max_steps} | loss {loss:.4f} | lr {lr:.2e} | tau {tau:.3f} | grad {grad_norm:.2f} | "
                  f"{tokens_per_sec / 1e3:.1f}k tok/s | MFU {'n/a' if not peak else f'{100 * mfu:.1f}%'} | "
                  + (f"routing H {100 * entropy:.1f}% | " if entropy is not None else '')
                  + f"{elapsed / steps_timed:.2f}s/step | ETA {int(eta // 3600)}h{int(eta % 3600 // 60):02d}m",
                  flush=True)
            if wandb_run:
                wandb_run.log(metrics, step=done)
            with open(os.path.join(out_dir, 'train_log.jsonl'), 'a') as f:  # analyze.py --compare reads it
                f.write(json.dumps({'step': done, **metrics}) + '\n')
            timer, last_logged = time.perf_counter(), done
        if eval_interval and (done % eval_interval == 0 or done == max_steps):
            losses = evaluate()
            if master:
                print(f"step {done}: validation " + ' | '.join(f"{k[4:]} {v:.4f}" for k, v in losses.items()))
                with open(os.path.join(out_dir, 'train_log.jsonl'), 'a') as f:
                    f.write(json.dumps({'step': done, 'train/tokens': done * tokens_per_step, **losses}) + '\n')
                if wandb_run:
                    wandb_run.log(losses, step=done)
        stop_reason = end_of_session(stop_signal, stop_after_steps, done - start_step, world_size)
        if done < max_steps and (stop_reason or (checkpoint_interval and done % checkpoint_interval == 0)):
            save(done)
            if stop_reason:
                if master:
                    print(f"{stop_reason}: checkpoint saved at step {done}; resume with the same command")
                return
    save(max_steps, final=True)
    if master:
        print(f"done: {max_steps} steps in {(time.perf_counter() - run_start) / 60:.1f} min, "
              f"{skipped_steps} skipped -> {os.path.join(out_dir, 'portable_final.pt')}")
    if wandb_run:
        wandb_run.finish()


if __name__ == '__main__':
    from configurator import configure
    configure(globals())
    main()
    close_distributed()
