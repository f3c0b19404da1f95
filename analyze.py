"""
Interpretability of PolyGLU routing: neurotransmitter maps, routing entropy, the gate's contribution, routing
by domain, a causality audit of the mean-pooled gate; one run over time (its log's dynamics, routing at each of its
snapshots); what fine-tuning changed in routing; and, from training logs alone, PolyGLU against VanillaLM at
matched tokens (paired runs, mean and 95% interval over seeds).

    python analyze.py --checkpoint=checkpoints/portable_final.pt --output=figures/
    python analyze.py --checkpoint=... --data=math=data/tokenized/math,prose=notes.txt,code=snippets.jsonl
    python analyze.py --run=checkpoints --output=figures/run     # its train_log.jsonl and snapshots/ (snapshot_interval)
    python analyze.py --shift=checkpoints/portable_final.pt,checkpoints/portable_sft_final.pt --output=figures/shift
    python analyze.py --compare='polyglu=runs/p1,runs/p2 vanilla=runs/v1,runs/v2' --output=figures/ablation

Writes PNG figures and summary.json (every number a figure shows) into `output`. Routing is measured with the
model in eval mode (deterministic routing, softmax((alpha + beta f(h)) / tau)) on windows of `seq_len` tokens,
each routed on its own mean (packed, segment pooling): one routing distribution per window, layer and neuron.
"Static" routing is softmax(alpha / tau), what a neuron prefers with the gate switched off.
"""
import json
import math
import os

import matplotlib
import numpy as np
import scipy.stats
import torch
import torch.nn.functional as F
from tqdm import tqdm

from configurator import configure, fail
from model import ACTIVATION_NAMES, EOS_ID, PolyGLU, packed_hidden_states, wrap_model
from utils import (HUB_TOKENIZER, command_line, durable_replace, get_tokenizer, held_out_windows, hold_folder,
                   init_wandb, let_go, load_checkpoint, log_records, numbered_checkpoints, open_chunks, resolve_device)

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the headless backend)

# -----------------------------------------------------------------------------
# config
checkpoint = 'checkpoints/portable_final.pt'
output = 'figures'
data = ''                    # name=path,...: prepared folders (their held-out end is read) or .txt/.jsonl files;
                             # '' = the math, stem and code folders under the checkpoint's data_dir
data_dir = ''                # '' = the data_dir stored in the checkpoint, else data/tokenized
tokenizer = HUB_TOKENIZER    # for .txt/.jsonl inputs
max_tokens = 200_000         # text analysed per domain
seq_len = 1024               # tokens per analysed window (each window is routed on its own mean)
batch_tokens = 16_384        # windows packed into one forward
collapse_threshold = 0.1     # nats: a neuron whose routing entropy is below this has collapsed to one activation
map_layers = ''              # layers for the neuron-level maps, e.g. '0,13,27'; '' = first, middle, last
audit_sequences = 8          # causality audit: sequences, each cut at its middle
compare = ''                 # training runs (out_dirs or their train_log.jsonl) instead of a checkpoint: two arms of paired
                             # runs, 'polyglu=dir1,dir2 vanilla=dir3,dir4' (make ablation), or two runs 'dir_a,dir_b'
run = ''                     # one run over time: its out_dir (or its train_log.jsonl / sft_log.jsonl): the dynamics from
                             # its log, routing at every snapshot (snapshot_interval) on the same held-out windows
shift = ''                   # 'base.pt,fine_tuned.pt': what fine-tuning changed in routing, on the base's held-out text
smoothing = 0.05             # the compared training loss is the mean over this trailing fraction of the logged points
device = 'auto'
attention = 'auto'           # CUDA kernel for packed rows: flash-attn, else torch's varlen_attn, else SDPA per segment
dtype = 'float32'
precision = False            # also measure what bf16 training does to routing at tau 0.1 (bf16 copies of alpha, beta and
                             # the gate network; the head's gradient summed over the loss chunks in bf16): docs/gpu.md
seed = 1337
wandb_log = False            # log every figure and the summary's figures to wandb
wandb_project = ''           # '' = the project the checkpoint trained in (its config), else 'polychromatic'
wandb_run_name = ''          # '' = analyze-{the checkpoint's file name}
# -----------------------------------------------------------------------------


def entropy(probs):
    return -(probs * torch.log(probs.clamp_min(1e-30))).sum(-1)


def kl_divergence(p, q):
    """KL(p || q) over the last axis (routing distributions over the activations), in nats."""
    return (p * (torch.log(p.clamp_min(1e-30)) - torch.log(q.clamp_min(1e-30)))).sum(-1)

# -----------------------------------------------------------------------------
# text

def domain_windows(name, path, model, held_tokens):
    """Token windows of seq_len + 1 for one domain, at most max_tokens: from a prepared folder's held-out end
    (text the model never trained on) or from a local .txt/.jsonl file."""
    window = min(seq_len, model.config.max_seq_len) + 1
    if os.path.isdir(path):
        chunks, _ = open_chunks(path, EOS_ID, model.config.vocab_size)
        starts = held_out_windows(chunks, held_tokens, window - 1)[1] or [  # too small to hold out: the last chunk
            (len(chunks) - 1, start) for start in range(0, chunks[-1].size - window + 1, window - 1)]
        windows = [np.asarray(chunks[c][start:start + window], dtype=np.int64) for c, start in starts]
    elif os.path.isfile(path):
        tok = get_tokenizer(tokenizer, model.config.vocab_size)
        with open(path, encoding='utf-8', errors='replace') as f:
            if path.endswith('.jsonl'):
                texts = [json.loads(line).get('text', '') for line in f if line.strip()]
            else:
                texts = [f.read()]
        ids = []
        for text in texts:
            ids += tok.encode(text, add_special_tokens=False).ids + [EOS_ID]
            if len(ids) >= max_tokens + window:
                break
        ids = np.array(ids, dtype=np.int64)
        windows = [ids[start:start + window] for start in range(0, len(ids) - window + 1, window - 1)]
    else:
        fail(f"data for '{name}': {path} is neither a prepared folder nor a file")
    windows = windows[:max(1, max_tokens // (window - 1))]
    if not windows:
        fail(f"data for '{name}' ({path}) holds fewer than {window} tokens; lower seq_len")
    return windows


def analysis_windows(model, info):
    """The text every analysis of a model routes: `data`, else the held-out ends of the math, stem and code folders its
    checkpoint trained on (data_dir overrides) -> {domain: windows}."""
    base = data_dir or info.get('data_dir') or 'data/tokenized'
    domains = dict(item.split('=', 1) for item in data.split(',')) if data else {
        name: os.path.join(base, name) for name in ('math', 'stem', 'code')
        if os.path.isfile(os.path.join(base, name, 'manifest.json'))}
    if not domains:
        fail(f"no text to analyse: no prepared math/stem/code under {base}; give data=name=path,...")
    return {name: domain_windows(name, path, model, info.get('val_tokens') or 2_000_000)
            for name, path in domains.items()}


def described(windows):
    return ', '.join(f"{name} {len(w)} windows of {len(w[0]) - 1}" for name, w in windows.items())


@torch.no_grad()
def measure_routing(model, windows):
    """Routing probabilities per window, layer and neuron: [windows, layers, d_ff, K] (float32, on the CPU)."""
    per_forward = max(1, batch_tokens // (len(windows[0]) - 1))
    routing = []
    for first in tqdm(range(0, len(windows), per_forward), desc='routing', leave=False):
        packed_hidden_states(model, [w[:-1] for w in windows[first:first + per_forward]])
        layers = [torch.softmax(b.ffn.last_logits.float() / b.ffn.tau, -1)[:, 0] for b in model.model_core]
        routing.append(torch.stack(layers, 1).cpu())
    return torch.cat(routing)


def shares(probs):
    """The share of neurons whose largest routing weight is each activation: [..., d_ff, K] -> [..., K]."""
    return F.one_hot(probs.argmax(-1), len(ACTIVATION_NAMES)).float().mean(-2)


def routing_layers(model, windows):
    """What the maps and curves show of one model's routing, per layer, measured on windows {domain: [...]}: static
    (alpha alone) and on text, entropy, collapsed neurons, the preferred activations' shares, the gate's KL over alpha,
    beta. -> (per_layer, routing per domain [N, L, d_ff, K], mean routing on text [L, d_ff, K])."""
    n_layers = len(model.model_core)
    alpha = torch.stack([b.ffn.alpha.detach().float().cpu() for b in model.model_core])  # [L, d_ff, K]
    beta = torch.stack([b.ffn.beta.detach().float().cpu() for b in model.model_core])    # [L, K]
    static = torch.softmax(alpha / model.tau, -1)
    routing = {name: measure_routing(model, w) for name, w in windows.items()}        # [N, L, d_ff, K]
    dynamic = torch.cat(list(routing.values()))
    mean_dynamic = dynamic.mean(0)                                                     # [L, d_ff, K]
    static_entropy = entropy(static)                       # [L, d_ff]
    dynamic_entropy = entropy(dynamic)                     # [N, L, d_ff]
    kl = kl_divergence(dynamic, static)
    per_layer = {
        'static_entropy_mean': static_entropy.mean(-1).tolist(),
        'static_entropy_std': static_entropy.std(-1).tolist(),
        'dynamic_entropy_mean': dynamic_entropy.mean((0, 2)).tolist(),
        'dynamic_entropy_std': dynamic_entropy.transpose(0, 1).reshape(n_layers, -1).std(-1).tolist(),
        'collapsed_fraction_static': (static_entropy < collapse_threshold).float().mean(-1).tolist(),
        'collapsed_fraction_dynamic': (dynamic_entropy < collapse_threshold).float().mean((0, 2)).tolist(),
        'kl_dynamic_vs_static': kl.mean((0, 2)).tolist(),
        'beta': beta.tolist(),
        'static_shares': shares(static).tolist(),
        'dynamic_shares': shares(mean_dynamic).tolist(),
    }
    return per_layer, routing, mean_dynamic

# -----------------------------------------------------------------------------
# the causality audit

@torch.no_grad()
def causality_audit(model, windows):
    """Change only the tokens after position t (the middle) and measure how far positions <= t move: per layer,
    the relative change of the residual stream; at the output, mean KL and max |delta log p| of the next token.
    A causal model (VanillaLM) shows exactly zero; PolyGLU's whole-sequence gate does not."""
    rng = np.random.default_rng(seed)
    device_ = model.embeddings.weight.device
    captured = []
    hooks = [b.register_forward_hook(lambda module, args, out: captured.append(out)) for b in model.model_core]
    layer_change, kls, max_delta = np.zeros(len(model.model_core)), [], 0.0
    try:
        for window in windows[:audit_sequences]:
            ids = torch.tensor(window[:-1], device=device_)[None]
            t = ids.shape[1] // 2
            changed = ids.clone()
            changed[0, t + 1:] = torch.from_numpy(rng.integers(0, model.config.vocab_size, ids.shape[1] - t - 1))
            captured.clear()
            logits = model(ids)[0, :t + 1].double().log_softmax(-1)  # float64: tiny KLs stay >= 0
            logits_changed = model(changed)[0, :t + 1].double().log_softmax(-1)
            original, moved = captured[:len(model.model_core)], captured[len(model.model_core):]
            for layer, (a, b) in enumerate(zip(original, moved)):
                layer_change[layer] += ((a[0, :t + 1] - b[0, :t + 1]).norm() / a[0, :t + 1].norm()).item()
            kls.append(F.kl_div(logits_changed, logits, log_target=True, reduction='none').sum(-1).mean().item())
            targets = ids[0, 1:t + 2]
            delta = (logits.gather(1, targets[:, None]) - logits_changed.gather(1, targets[:, None])).abs().max()
            max_delta = max(max_delta, delta.item())
    finally:
        for hook in hooks:
            hook.remove()
    n = min(audit_sequences, len(windows))
    return {'sequences': n, 'mean_kl': float(np.mean(kls)), 'max_abs_delta_log_p': max_delta,
            'relative_change_per_layer': (layer_change / n).tolist()}


@torch.no_grad()
def gumbel_noise_effect(model, windows):
    """What sampling Gumbel noise at evaluation would change (the author's code did; ours is deterministic):
    mean KL between the next-token distributions with and without noise, and how often the top token agrees."""
    torch.manual_seed(seed)
    device_ = model.embeddings.weight.device
    kls, agree, total = [], 0, 0
    for window in windows[:audit_sequences]:
        ids = torch.tensor(window[:-1], device=device_)[None]
        clean = model(ids)[0].double().log_softmax(-1)
        for block in model.model_core:
            block.ffn.train()  # PolyGLU samples Gumbel noise in training mode; nothing else depends on the mode
        try:
            noisy = model(ids)[0].double().log_softmax(-1)
        finally:
            model.eval()
        kls.append(F.kl_div(noisy, clean, log_target=True, reduction='none').sum(-1).mean().item())
        agree += int((clean.argmax(-1) == noisy.argmax(-1)).sum())
        total += ids.shape[1]
    return {'sequences': min(audit_sequences, len(windows)), 'mean_kl': float(np.mean(kls)),
            'top1_agreement': agree / total}

# -----------------------------------------------------------------------------
# precision: what bf16 training does to routing at tau = 0.1

ROUTING_PARAMETERS = ('.alpha', '.beta', '.gate_net.')


def routing_agreement(probs, reference):
    """Mean KL(reference || probs) over windows, layers and neurons, and how often their top activation agrees."""
    kl = kl_divergence(reference, probs)
    return {'kl': float(kl.mean()), 'top1_agreement': float((probs.argmax(-1) == reference.argmax(-1)).float().mean())}


@torch.no_grad()
def window_loss(model, windows):
    return float(np.mean([F.cross_entropy(model(torch.tensor(w[:-1])[None])[0], torch.tensor(w[1:])).item()
                          for w in windows[:audit_sequences]]))


@torch.no_grad()
def bf16_routing_effect(model, windows):
    """Under DeepSpeed bf16 the module's alpha, beta and gate network are bf16 copies of the float32 masters, and the
    routing divides their logits by tau: the same model with only those rounded to bf16, against float32."""
    reference, loss = measure_routing(model, windows), window_loss(model, windows)
    masters = {name: p.detach().clone() for name, p in model.named_parameters()
               if any(key in name for key in ROUTING_PARAMETERS)}
    try:
        for name, p in model.named_parameters():
            if name in masters:
                p.copy_(p.bfloat16().float())
        effect = {**routing_agreement(measure_routing(model, windows), reference),
                  'loss_change': window_loss(model, windows) - loss}
    finally:
        for name, p in model.named_parameters():
            if name in masters:
                p.copy_(masters[name])
    return effect


def bf16_head_gradient_effect(windows, steps=20, learning_rate=1e-3, chunks=32):
    """Under DeepSpeed bf16 the tied embedding's gradient from the loss is summed over a micro-batch's 32 loss chunks in
    bf16, the weight's dtype (liger's loss sums it in float32). Two short trainings from the checkpoint on the same
    windows, Gumbel noise and AdamW, with that sum in float32 and in bf16 over as many chunks: the head gradient's
    relative error at the first step, and how far the bf16 run's routing and loss are from the float32 run's after
    `steps` updates."""
    rows = torch.tensor(np.stack(windows[:4]))
    inputs, targets = rows[:, :-1], rows[:, 1:].reshape(-1)
    chunk = -(-len(targets) // chunks)
    results = []
    for accumulate in (torch.float32, torch.bfloat16):
        model = load_checkpoint(checkpoint)[0].train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, betas=(0.9, 0.95), weight_decay=0.0)
        head = model.embeddings.weight
        for step in range(steps):
            torch.manual_seed(seed + step)
            hidden = model.hidden_states(inputs)
            flat = hidden.detach().reshape(-1, hidden.shape[-1]).requires_grad_()
            head_grad, hidden_grad = torch.zeros_like(head, dtype=accumulate), []
            for first in range(0, len(targets), chunk):  # chunked_cross_entropy's chunks, their head gradients summed
                h = flat[first:first + chunk]
                loss = F.cross_entropy(h @ head.T, targets[first:first + chunk], reduction='sum') / len(targets)
                grad_head, grad_h = torch.autograd.grad(loss, (head, h))
                head_grad += grad_head.to(accumulate)
                hidden_grad.append(grad_h)
            hidden.backward(torch.cat(hidden_grad).view_as(hidden))  # every other parameter, and the lookup's gradient
            head.grad += head_grad.float()
            if step == 0:
                first_gradient = head_grad.float()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        model.eval()
        wrap_model(model, attention=attention, segment_pooling=True)
        results.append((first_gradient, measure_routing(model, windows), window_loss(model, windows)))
    (grad32, routing32, loss32), (grad16, routing16, loss16) = results
    return {'steps': steps, 'chunks': chunks, 'head_gradient_relative_error': float((grad16 - grad32).norm() /
                                                                                    grad32.norm()),
            **routing_agreement(routing16, routing32), 'loss_change': loss16 - loss32}

# -----------------------------------------------------------------------------
# comparison of training runs: two arms of paired runs (make ablation), or two runs

def interval(values):
    """Mean and 95% t-interval of paired differences (one per seed), over axis 0; no interval from one value."""
    values = np.asarray(values, dtype=np.float64)
    n, mean = len(values), values.mean(0)
    if n < 2:
        return n, mean, None
    half = scipy.stats.t.ppf(0.975, n - 1) * values.std(0, ddof=1) / math.sqrt(n)
    return n, mean, (mean - half, mean + half)


def log_entries(path):
    """A run's jsonl log -> (its training entries by step, the last of a step winning: a resumed run logs some steps
    twice; every other entry, in order). A line torn by a kill is skipped."""
    train, other = {}, []
    for entry in log_records(path)[0]:
        if 'train/loss' in entry:
            train[entry['step']] = entry
        else:
            other.append(entry)
    return train, other


def validation_losses(entry):
    return {key[4:]: value for key, value in entry.items() if key.startswith('val/')}


def read_log(path):
    """A train_log.jsonl (or the out_dir holding it): training points (tokens, loss, tokens/s), the last entry of a step
    winning (a resumed run logs some steps twice), validation losses by tokens, and the run's own record (train.py's
    'run' line: model type, seeds, data plan)."""
    if os.path.isdir(path):
        path = os.path.join(path, 'train_log.jsonl')
    elif path.endswith('.pt'):
        path = os.path.join(os.path.dirname(path), 'train_log.jsonl')
    if not os.path.isfile(path):
        fail(f"no training log at {path}: train.py writes train_log.jsonl into its out_dir, sft.py sft_log.jsonl")
    train, other = log_entries(path)
    validation = {entry['train/tokens']: validation_losses(entry) for entry in other if validation_losses(entry)}
    run = next((entry['run'] for entry in reversed(other) if 'run' in entry), {})
    points = sorted((e['train/tokens'], e['train/loss'], e.get('train/tokens_per_sec') or np.nan)
                    for e in train.values())
    if len(points) < 2:
        fail(f"{path} holds {len(points)} training-loss entries; a comparison needs at least two")
    return dict(path=path, points=np.array(points, dtype=np.float64), validation=validation, run=run)


def parse_arms(value):
    """'polyglu=a,b vanilla=c,d' -> [('polyglu', [a, b]), ('vanilla', [c, d])]; 'a,b' -> two arms of one run each."""
    if '=' not in value:
        paths = [p for p in value.split(',') if p]
        if len(paths) != 2:
            fail("compare= takes two arms, 'polyglu=dir1,dir2 vanilla=dir3,dir4', or two runs 'dir_a,dir_b'")
        return [(os.path.normpath(p), [p]) for p in paths]
    arms = [item.split('=', 1) for item in value.split()]
    if len(arms) != 2 or not all(name and paths for name, paths in arms):
        fail(f"compare={value!r}: give two arms, 'polyglu=dir1,dir2 vanilla=dir3,dir4' (quoted: one argument)")
    return [(name, [p for p in paths.split(',') if p]) for name, paths in arms]


def check_pairs(arms, logs):
    """Paired runs: as many in each arm, the i-th runs of the two arms trained on the same data plan, and no arm
    repeating a run (the same folder or init_seed twice is one sample counted twice)."""
    (first, runs_a), (second, runs_b) = arms
    if len(runs_a) != len(runs_b):
        fail(f"{first} has {len(runs_a)} runs and {second} {len(runs_b)}: the i-th runs of the arms are a pair, so "
             "give both the same seeds")
    for name, runs in arms:
        for key, label in ((lambda r: os.path.realpath(logs[r]['path']), 'is listed twice'),
                           (lambda r: logs[r]['run'].get('init_seed'), 'share an init_seed')):
            seen = {}
            for r in runs:
                if key(r) is not None and key(r) in seen:
                    fail(f"{name}: {seen[key(r)]} and {r} {label}: one run counted twice would shrink the interval "
                         "without new evidence")
                seen[key(r)] = r
    plans = [(logs[a]['run'].get('data_plan'), logs[b]['run'].get('data_plan'), a, b) for a, b in zip(runs_a, runs_b)]
    for plan_a, plan_b, a, b in plans:
        if plan_a and plan_b and plan_a != plan_b:
            fail(f"{a} and {b} trained on different data (data plans {plan_a} and {plan_b}): a paired comparison "
                 "needs the same data, seed, batch and max_steps in both arms")
    return 'identical' if all(a and b for a, b, _, _ in plans) else 'not recorded in the logs'


def smoothing_window(grid):
    return max(1, round(smoothing * len(grid)))


def smoothed_loss(points, grid):
    """The training loss at the grid's token counts, each the mean over the trailing `smoothing` fraction of them."""
    values = np.interp(grid, points[:, 0], points[:, 1])
    window = smoothing_window(grid)
    sums = np.cumsum(np.concatenate([[0.0], values]))
    first = np.maximum(np.arange(len(grid)) + 1 - window, 0)
    return (sums[1:] - sums[first]) / (np.arange(len(grid)) + 1 - first)


def tokens_per_sec(points):
    """A run's speed: the median logged interval (the first holds the warm-up, some an evaluation or a save)."""
    speeds = points[1:, 2] if len(points) > 2 else points[:, 2]
    return None if np.isnan(speeds).all() else float(np.nanmedian(speeds))


def stated(n, mean, ci):
    return f"{mean:+.4f} (95% CI {ci[0]:+.4f} to {ci[1]:+.4f}, {n} paired seeds)" if ci else f"{mean:+.4f} (1 seed)"


def verdict(first, second, metric, tokens, n, mean, ci):
    """One line that says what the interval says, and no more."""
    difference = f"{first} - {second} {metric} at {tokens:,.0f} tokens = {mean:+.4f}"
    if ci is None:
        return (f"{difference} from one run per arm: no interval exists with one seed, so this cannot tell whether the "
                "arms differ; run more seeds")
    if ci[0] <= 0 <= ci[1]:
        return (f"{difference} (95% CI {ci[0]:+.4f} to {ci[1]:+.4f}, {n} paired seeds): the interval includes zero, so "
                "these runs cannot tell the arms apart")
    lower = first if ci[1] < 0 else second
    return (f"{difference} (95% CI {ci[0]:+.4f} to {ci[1]:+.4f}, {n} paired seeds): the interval excludes zero; "
            f"{lower} has the lower {metric}, at this one scale, data mix and learning rate")


def compare_runs(arms, folder):
    """The paired difference first arm - second arm at matched token counts: the smoothed training loss along the run
    and at its end, each domain's validation loss at every common evaluation, mean and 95% t-interval over the pairs;
    each arm's tokens/s; a figure; a verdict line."""
    logs = {r: read_log(r) for _, runs in arms for r in runs}
    data_plans = check_pairs(arms, logs)
    (first, runs_a), (second, runs_b) = arms
    everything = [logs[r]['points'] for r in logs]
    low, high = max(p[0, 0] for p in everything), min(p[-1, 0] for p in everything)
    grid = everything[0][:, 0][(everything[0][:, 0] >= low) & (everything[0][:, 0] <= high)]
    if len(grid) < 2:
        fail(f"the runs share no range of tokens to compare ({', '.join(logs)})")
    curves = {r: smoothed_loss(logs[r]['points'], grid) for r in logs}
    differences = np.stack([curves[a] - curves[b] for a, b in zip(runs_a, runs_b)])  # [pairs, grid]
    n, curve_mean, curve_ci = interval(differences)
    train_stats = interval(differences[:, -1])
    comparison = {'difference': f'{first} - {second}', 'pairs': n, 'data_plans': data_plans,
                  'tokens_compared': [float(grid[0]), float(grid[-1])], 'smoothing_points': smoothing_window(grid),
                  'train_loss': {'differences': differences[:, -1].tolist(), 'mean': float(train_stats[1]),
                                 'ci95': list(map(float, train_stats[2])) if train_stats[2] else None},
                  'curve': {'tokens': grid.tolist(), 'mean': curve_mean.tolist(),
                            'ci95': [c.tolist() for c in curve_ci] if curve_ci else None}}

    evaluations = sorted(set.intersection(*(set(logs[r]['validation']) for r in logs)))
    logged = [set(logs[r]['validation'][t]) for r in logs for t in evaluations]
    domains = [d for d in logs[runs_a[0]]['validation'][evaluations[-1]] if all(d in keys for keys in logged)] \
        if evaluations else []  # in the order train.py logs them: math, stem, code, then the mixture's loss
    validation = {}
    for domain in domains:
        per_eval = np.array([[logs[a]['validation'][t][domain] - logs[b]['validation'][t][domain] for t in evaluations]
                             for a, b in zip(runs_a, runs_b)])
        _, mean, ci = interval(per_eval)
        validation[domain] = {'differences': per_eval[:, -1].tolist(), 'mean': float(mean[-1]),
                              'ci95': [float(ci[0][-1]), float(ci[1][-1])] if ci else None,
                              'curve_mean': mean.tolist(), 'curve_ci95': [c.tolist() for c in ci] if ci else None}
    if validation:
        comparison['validation'] = {'tokens': evaluations[-1], 'evaluations': evaluations, 'domains': validation}

    comparison['arms'] = [{'name': name, 'runs': runs, 'init_seeds': [logs[r]['run'].get('init_seed') for r in runs],
                           'tokens_per_sec': [tokens_per_sec(logs[r]['points']) for r in runs]} for name, runs in arms]
    for arm in comparison['arms']:
        arm['tokens_per_sec_mean'] = None if None in arm['tokens_per_sec'] else float(np.mean(arm['tokens_per_sec']))
    speed_a, speed_b = (arm['tokens_per_sec_mean'] for arm in comparison['arms'])
    comparison['speed_ratio'] = speed_a / speed_b if speed_a and speed_b else None
    if 'loss' in validation:  # the mixture-weighted validation loss: no sampling noise, the headline
        last = validation['loss']
        metric, tokens, stats = 'validation loss', evaluations[-1], (n, last['mean'], last['ci95'])
    else:
        metric, tokens, stats = 'training loss', grid[-1], (n, *train_stats[1:])
    comparison['verdict'] = verdict(first, second, metric, tokens, *stats)
    comparison_figure(comparison, arms, curves, grid, folder)
    return comparison


def comparison_figure(comparison, arms, curves, grid, folder):
    validation = comparison.get('validation')
    fig, axes = plt.subplots(1, 3 if validation else 2, figsize=(16 if validation else 11, 4))
    for (name, runs), color in zip(arms, ('C0', 'C1')):
        n, mean, ci = interval([curves[r] for r in runs])
        axes[0].plot(grid, mean, color=color, label=f'{name} ({n} run{"s" * (n > 1)})')
        if ci:
            axes[0].fill_between(grid, *ci, color=color, alpha=0.25)
    axes[0].set(xlabel='tokens', ylabel='training loss (smoothed)', title='Training loss, mean and 95% CI')
    axes[0].legend()
    curve, label = comparison['curve'], comparison['difference']
    axes[1].plot(grid, curve['mean'], color='C3')
    if curve['ci95']:
        axes[1].fill_between(grid, *curve['ci95'], color='C3', alpha=0.25)
    axes[1].axhline(0, color='gray', linestyle='--')
    axes[1].set(xlabel='tokens', ylabel=f'{label}, training loss', title='Paired difference, mean and 95% CI')
    if validation:
        for domain, stats in validation['domains'].items():
            line, = axes[2].plot(validation['evaluations'], stats['curve_mean'], marker='.', label=domain)
            if stats['curve_ci95']:
                axes[2].fill_between(validation['evaluations'], *stats['curve_ci95'], color=line.get_color(), alpha=0.2)
        axes[2].axhline(0, color='gray', linestyle='--')
        axes[2].set(xlabel='tokens', ylabel=f'{label}, validation loss', title='Validation by domain, paired')
        axes[2].legend()
    save(fig, folder, 'loss_comparison.png')


def print_comparison(comparison):
    first, second = (arm['name'] for arm in comparison['arms'])
    print(f"{comparison['difference']} over {comparison['pairs']} pair(s), data plans {comparison['data_plans']}:")
    train, window = comparison['train_loss'], comparison['smoothing_points']
    print(f"  training loss at {comparison['tokens_compared'][1]:,.0f} tokens (the mean of the last {window} logged "
          f"step{'s' * (window > 1)}): {stated(comparison['pairs'], train['mean'], train['ci95'])}")
    validation = comparison.get('validation', {})
    for domain, stats in validation.get('domains', {}).items():
        print(f"  validation {domain} at {validation['tokens']:,} tokens: "
              f"{stated(comparison['pairs'], stats['mean'], stats['ci95'])}")
    if comparison['speed_ratio']:
        speeds = ' | '.join(f"{arm['name']} {arm['tokens_per_sec_mean']:,.0f}" for arm in comparison['arms'])
        print(f"  tokens/s: {speeds} | {first}/{second} {comparison['speed_ratio']:.3f}")
    print(f"verdict: {comparison['verdict']}")

# -----------------------------------------------------------------------------
# one run over time: its log's dynamics, and routing at every snapshot (train.py, sft.py: snapshot_interval)

DYNAMICS = (  # (figure, title, the log's keys, y label): one figure each, and all of them in training_dynamics.png
    ('loss_curve.png', 'Loss', ('train/loss',), 'loss (validation: dots)'),
    ('lr_schedule.png', 'Learning rate', ('train/lr',), 'learning rate'),
    ('tau_annealing.png', 'Routing temperature τ', ('train/tau',), 'τ'),
    ('throughput.png', 'Throughput', ('train/tokens_per_sec',), 'tokens/s'),
    ('mfu.png', 'Model FLOPs utilisation', ('train/mfu',), 'MFU'),
    ('gradient_norms.png', 'Gradient norm by group (before clipping)', ('train/grad_norm', 'grad_norm/'),
     'gradient norm'),
    ('skipped_updates.png', 'Skipped updates (spikes, non-finite)', ('train/skipped_steps',), 'skipped, in all'),
    ('routing_entropy_logged.png', 'Routing entropy on the training batches (logged)', ('routing/entropy_layer_',),
     'entropy (nats)'),
)


def run_files(path):
    """--run's argument (an out_dir, or its train_log.jsonl / sft_log.jsonl) -> (the log, the snapshots [(step, path)]):
    train.py's snapshot_{step}.pt, or sft.py's snapshot_sft_{step}.pt beside sft_log.jsonl."""
    if os.path.isdir(path):
        logs = [os.path.join(path, name) for name in ('train_log.jsonl', 'sft_log.jsonl')]
        path = next((log for log in logs if os.path.isfile(log)), logs[0])
    if not os.path.isfile(path):
        fail(f"no training log at {path}: --run takes a train.py or sft.py out_dir, or its train_log.jsonl / "
             "sft_log.jsonl")
    folder, prefix = os.path.join(os.path.dirname(path), 'snapshots'), (
        'snapshot_sft_' if os.path.basename(path) == 'sft_log.jsonl' else 'snapshot_')
    return path, [(step, os.path.join(folder, f'{prefix}{step}.pt')) for step in numbered_checkpoints(folder, prefix)]


def training_dynamics(path):
    """The log's series against step (the last entry of a step wins): every key DYNAMICS plots, the validation losses,
    and the steps where the plan changed (a resume with another max_steps, a budget)."""
    train, other = log_entries(path)
    validation = {entry['step']: validation_losses(entry) for entry in other if validation_losses(entry)}
    replans = [entry['step'] for entry in other if 'changes' in entry]
    if not train:
        fail(f"{path} holds no training-loss entry yet: --run reads a run once it has logged (log_interval)")
    steps = sorted(train)
    keys = sorted({key for entry in train.values() for key in entry if key not in ('step', 'train/skipped')})
    series = {key: [train[step].get(key) for step in steps] for key in keys}
    val_steps = sorted(validation)
    names = sorted({name for losses in validation.values() for name in losses})
    tokens = train[steps[-1]].get('train/tokens') or 0
    return {'step': steps, 'series': series, 'tokens_per_step': tokens / steps[-1] if steps[-1] else 0,
            'validation': {'step': val_steps, **{name: [validation[s].get(name) for s in val_steps] for name in names}},
            'skipped_at': [step for step in steps if train[step].get('train/skipped')], 'replans': sorted(set(replans))}


def tokens_axis(ax, tokens_per_step):
    """A second x axis on top: tokens, from the run's fixed tokens a step."""
    if not tokens_per_step:
        return
    top = max(ax.get_xlim()[1], 1) * tokens_per_step
    scale, unit = next(((s, u) for s, u in ((1e9, 'B'), (1e6, 'M'), (1e3, 'K')) if top >= s), (1, ''))
    axis = ax.secondary_xaxis('top', functions=(lambda step: step * tokens_per_step / scale,
                                                lambda t: t * scale / tokens_per_step))
    axis.set_xlabel(f'tokens{f" ({unit})" if unit else ""}', fontsize=8)
    axis.tick_params(labelsize=7)


def draw_dynamic(ax, dynamics, keys, title, ylabel):
    steps, series = dynamics['step'], dynamics['series']
    drawn = 0
    for key in sorted(k for k in series if any(k == p or (p.endswith(('/', '_')) and k.startswith(p)) for p in keys)):
        values = np.array([np.nan if v is None else v for v in series[key]], dtype=np.float64)
        if np.isfinite(values).any():
            label = 'train' if key == 'train/loss' else key.split('/')[-1].replace('entropy_layer_', 'layer ')
            ax.plot(steps, values, label=label, linewidth=1)
            drawn += 1
    if keys == ('train/loss',):
        validation = dynamics['validation']
        for name in (n for n in validation if n != 'step'):
            ax.plot(validation['step'], validation[name], marker='o', markersize=3, linestyle=':',
                    label=f"val {'(mixture)' if name == 'loss' else name}")
    if keys[0] == 'train/grad_norm':
        ax.set_yscale('log')
    if keys == ('train/skipped_steps',):
        for step in dynamics['skipped_at']:
            ax.axvline(step, color='C3', alpha=0.3, linewidth=0.8)
    for step in dynamics['replans']:
        ax.axvline(step, color='gray', linestyle='--', linewidth=0.8)
    if not drawn:
        ax.text(0.5, 0.5, 'not logged' + (' (no peak FLOP/s on this device)' if 'mfu' in keys[0] else ''),
                ha='center', va='center', transform=ax.transAxes, color='gray')
        ax.set(xlabel='step', ylabel=ylabel, title=title)
        return
    if 1 < drawn + (keys == ('train/loss',)) * len(dynamics['validation']):
        ax.legend(fontsize=6, ncol=2)
    ax.set(xlabel='step', ylabel=ylabel, title=title)
    ax.title.set_fontsize(9)
    tokens_axis(ax, dynamics['tokens_per_step'])


def dynamics_figures(dynamics, folder):
    """training_dynamics.png (every panel; dashed: a re-plan) and one figure per panel."""
    fig, axes = plt.subplots(2, 4, figsize=(20, 8))
    for ax, (name, title, keys, ylabel) in zip(axes.flat, DYNAMICS):
        draw_dynamic(ax, dynamics, keys, title, ylabel)
    save(fig, folder, 'training_dynamics.png')
    for name, title, keys, ylabel in DYNAMICS:
        fig, ax = plt.subplots(figsize=(8, 3.8))
        draw_dynamic(ax, dynamics, keys, title, ylabel)
        save(fig, folder, name)


def first_below(steps, values):
    """The first step from which a layer's entropy stays below collapse_threshold, or None."""
    below = np.asarray(values) < collapse_threshold
    later = [i for i in range(len(steps)) if below[i:].all()]
    return steps[later[0]] if later else None


def routing_over_training(snapshots):
    """Every snapshot's routing on the same held-out windows, measured as one checkpoint's is (routing_layers) ->
    {snapshots: [{file, step, tokens, tau, per_layer}], collapse_step: {dynamic, static}, windows}."""
    measured, windows = [], None
    for step, path in tqdm(snapshots, desc='snapshots'):
        model, info = load_checkpoint(path)
        if not isinstance(model.model_core[0].ffn, PolyGLU):
            return None  # VanillaLM: no routing to follow
        model = model.to(device).eval()
        wrap_model(model, attention=attention, segment_pooling=True)
        windows = windows or analysis_windows(model, info)  # the first snapshot's data: the same windows for all
        per_layer = routing_layers(model, windows)[0]
        measured.append({'file': path, 'step': step, 'tokens': info.get('tokens'), 'tau': info['tau'],
                         'per_layer': {key: per_layer[key] for key in (
                             'static_entropy_mean', 'dynamic_entropy_mean', 'collapsed_fraction_static',
                             'collapsed_fraction_dynamic', 'static_shares', 'dynamic_shares', 'beta')}})
    steps = [m['step'] for m in measured]
    collapse = {kind: [first_below(steps, layer) for layer in np.array(
        [m['per_layer'][f'{kind}_entropy_mean'] for m in measured]).T] for kind in ('dynamic', 'static')}
    return {'snapshots': measured, 'collapse_step': collapse, 'collapse_threshold': collapse_threshold,
            'windows': {name: len(w) for name, w in windows.items()}, 'window_tokens': len(next(iter(
                windows.values()))[0]) - 1}


def routing_over_training_figures(routing, folder):
    """entropy_over_training.png (layer x step, on text and static; the collapse step marked), activation_shares_over_
    training.png (each activation's share of neurons, layer x step) and neurotransmitter_maps_over_training.png (the
    maps at the first, middle and last snapshot)."""
    measured = routing['snapshots']
    steps = [m['step'] for m in measured]
    grid = lambda key: np.array([m['per_layer'][key] for m in measured])  # noqa: E731  [snapshots, layers, ...]
    n_layers = grid('dynamic_entropy_mean').shape[1]
    ticks = dict(xticks=range(len(steps)), xticklabels=steps, xlabel='step (snapshot)', ylabel='layer',
                 yticks=range(n_layers))
    fig, axes = plt.subplots(1, 3, figsize=(17, 0.25 * n_layers + 3))
    for ax, kind in zip(axes, ('dynamic', 'static')):
        image = ax.imshow(grid(f'{kind}_entropy_mean').T, aspect='auto', cmap='viridis', vmin=0,
                          vmax=math.log(len(ACTIVATION_NAMES)), origin='lower', interpolation='nearest')
        for layer, step in enumerate(routing['collapse_step'][kind]):
            if step is not None:
                ax.plot(steps.index(step), layer, marker='x', color='white', markersize=6)
        ax.set(title=f"Routing entropy, {'on text' if kind == 'dynamic' else 'static (α)'} (×: below "
                     f"{collapse_threshold} nats from here)", **ticks)
        ax.tick_params(axis='x', labelsize=7, rotation=45)
        fig.colorbar(image, ax=ax, label='mean entropy (nats)')
    for layer, values in enumerate(grid('dynamic_entropy_mean').T):
        axes[2].plot(steps, np.maximum(values, 1e-12), marker='.', linewidth=1, label=f'layer {layer}')
    axes[2].axhline(collapse_threshold, color='gray', linestyle='--', label='collapse threshold')
    axes[2].set(yscale='log', xlabel='step', ylabel='mean entropy on text (nats)', title='Each layer on text')
    if n_layers <= 12:
        axes[2].legend(fontsize=6)
    save(fig, folder, 'entropy_over_training.png')

    fig, axes = plt.subplots(1, len(ACTIVATION_NAMES), figsize=(17, 0.25 * n_layers + 3), sharey=True)
    dynamic_shares = grid('dynamic_shares')  # [snapshots, layers, K]
    for k, ax in enumerate(axes):
        image = ax.imshow(dynamic_shares[:, :, k].T, aspect='auto', cmap='viridis', vmin=0, vmax=1, origin='lower',
                          interpolation='nearest')
        ax.set(title=f'{ACTIVATION_NAMES[k]}: share of neurons', **ticks)
        ax.tick_params(axis='x', labelsize=7, rotation=45)
    fig.colorbar(image, ax=axes, label='share of neurons (routing on text)')
    fig.savefig(os.path.join(folder, 'activation_shares_over_training.png'), dpi=150, bbox_inches='tight')
    plt.close(fig)

    picks = sorted({0, len(measured) // 2, len(measured) - 1})
    fig, axes = plt.subplots(1, len(picks), figsize=(4.5 * len(picks), 0.22 * n_layers + 1.8), squeeze=False)
    for ax, i in zip(axes[0], picks):
        share_axes(ax, dynamic_shares[i], f"step {steps[i]} (τ {measured[i]['tau']:.2g})")
    save(fig, folder, 'neurotransmitter_maps_over_training.png')


def analyze_run(path):
    log, snapshots = run_files(path)
    dynamics = training_dynamics(log)
    dynamics_figures(dynamics, output)
    result = {'log': log, 'dynamics': dynamics}
    print(f"{log}: {len(dynamics['step'])} logged steps, {len(dynamics['validation']['step'])} validations, "
          f"{len(snapshots)} snapshots" + ('' if snapshots else " (none: train with --snapshot_interval=N for routing "
                                           "over training)"))
    routing = routing_over_training(snapshots) if snapshots else None
    if routing:
        result['routing'] = routing
        routing_over_training_figures(routing, output)
        for kind in ('dynamic', 'static'):
            steps = routing['collapse_step'][kind]
            print(f"entropy {'on text' if kind == 'dynamic' else 'static'} below {collapse_threshold} nats from step: "
                  + ', '.join(f"layer {layer} {step if step is not None else '-'}" for layer, step in enumerate(steps)))
    return result

# -----------------------------------------------------------------------------
# what fine-tuning changed: base against fine-tuned routing on the same windows

def routing_shift(base_path, tuned_path):
    """Per layer: each activation's share of neurons before and after, KL(fine-tuned || base) between the two routings
    (mean over windows and neurons), and the fraction of neurons whose top activation changed."""
    (base, base_info), (tuned, tuned_info) = (load_checkpoint(p) for p in (base_path, tuned_path))
    if base.config != tuned.config or not isinstance(base.model_core[0].ffn, PolyGLU):
        fail(f"shift= compares two PolyGLU checkpoints of one architecture; {base_path} is {base.config}, "
             f"{tuned_path} is {tuned.config}")
    windows, routing = analysis_windows(base, base_info), []  # the base model's held-out text, for both
    for model in (base, tuned):
        model = model.to(device).eval()
        wrap_model(model, attention=attention, segment_pooling=True)
        routing.append(torch.cat([measure_routing(model, w) for w in windows.values()]))
    before, after = routing
    kl = kl_divergence(after, before)                                                       # [N, L, d_ff]
    changed = (before.mean(0).argmax(-1) != after.mean(0).argmax(-1)).float()                # [L, d_ff]
    per_layer = {'shares_base': shares(before.mean(0)).tolist(), 'shares_fine_tuned': shares(after.mean(0)).tolist(),
                 'kl': kl.mean((0, 2)).tolist(), 'top_activation_changed': changed.mean(-1).tolist(),
                 'entropy_base': entropy(before).mean((0, 2)).tolist(),
                 'entropy_fine_tuned': entropy(after).mean((0, 2)).tolist()}
    print(f"{base_path} (step {base_info['step']}) -> {tuned_path} (step {tuned_info['step']}) on "
          f"{described(windows)}")
    return {'base': base_path, 'fine_tuned': tuned_path, 'steps': [base_info['step'], tuned_info['step']],
            'per_layer': per_layer, 'kl_mean': float(kl.mean()),
            'top_activation_changed_fraction': float(changed.mean())}


def routing_shift_figure(shift, folder):
    per_layer = shift['per_layer']
    n_layers = len(per_layer['kl'])
    x = np.arange(n_layers)
    fig, axes = plt.subplots(1, 3, figsize=(17, 4))
    for offset, key, label, hatch in ((-0.2, 'shares_base', 'base', ''), (0.2, 'shares_fine_tuned', 'fine-tuned', '//')):
        bottom = np.zeros(n_layers)
        for k, name in enumerate(ACTIVATION_NAMES):
            values = np.array(per_layer[key])[:, k]
            axes[0].bar(x + offset, values, 0.38, bottom=bottom, color=f'C{k}', hatch=hatch, edgecolor='white',
                        label=name if offset < 0 else None)
            bottom += values
    axes[0].set(xlabel='layer', ylabel='share of neurons', title='Preferred activation: base (left), fine-tuned '
                '(right, hatched)', ylim=(0, 1.02))
    axes[0].legend(fontsize=7)
    axes[1].bar(x, per_layer['kl'], color='C3')
    axes[1].set(xlabel='layer', ylabel='KL(fine-tuned ‖ base), nats', title=f"Routing shift: mean KL "
                f"{shift['kl_mean']:.2e}")
    axes[2].bar(x, per_layer['top_activation_changed'], color='C4')
    axes[2].set(xlabel='layer', ylabel='fraction of neurons', ylim=(0, 1.02), title="Neurons whose top activation "
                f"changed ({100 * shift['top_activation_changed_fraction']:.1f}% in all)")
    save(fig, folder, 'routing_shift.png')

# -----------------------------------------------------------------------------
# figures

def save(fig, folder, name):
    for ax in fig.axes:
        if ax.get_xlabel() == 'layer':
            ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    fig.tight_layout()
    fig.savefig(os.path.join(folder, name), dpi=150)
    plt.close(fig)


def share_axes(ax, values, title):
    """One neurotransmitter map: layer x activation, the share of neurons preferring each."""
    image = ax.imshow(values, aspect='auto', cmap='viridis', vmin=0, vmax=1)
    ax.set(xticks=range(len(ACTIVATION_NAMES)), xticklabels=ACTIVATION_NAMES, yticks=range(len(values)),
           ylabel='layer', title=title)
    for layer in range(len(values)):
        for k in range(len(ACTIVATION_NAMES)):
            ax.text(k, layer, f'{values[layer, k]:.2f}', ha='center', va='center', fontsize=6,
                    color='white' if values[layer, k] < 0.5 else 'black')
    ax.figure.colorbar(image, ax=ax, label='share of neurons')


def share_map(values, title, name, folder):
    fig, ax = plt.subplots(figsize=(5, 0.22 * len(values) + 1.6))
    share_axes(ax, values, title)
    save(fig, folder, name)


def neuron_map(probs, layer, folder):
    """One layer's neurons sorted by preferred activation, then by how strongly: [K, d_ff] of mean routing."""
    order = np.lexsort((-probs.max(1), probs.argmax(1)))
    fig, ax = plt.subplots(figsize=(8, 2.2))
    image = ax.imshow(probs[order].T, aspect='auto', cmap='magma', vmin=0, vmax=1, interpolation='nearest')
    ax.set(yticks=range(len(ACTIVATION_NAMES)), yticklabels=ACTIVATION_NAMES, xlabel='neuron (sorted by preference)',
           title=f'Layer {layer}: mean routing weight per neuron')
    fig.colorbar(image, ax=ax, label='routing weight')
    save(fig, folder, f'neuron_map_layer_{layer:02d}.png')


def routing_figures(per_layer, domain_means, n_layers):
    """routing_entropy.png (static and on text, and the collapsed neurons), gate_contribution.png (β and what the gate
    adds over α) and domain_routing.png, per layer."""
    K = len(ACTIVATION_NAMES)
    x = np.arange(n_layers)
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 3.8))
    for key, label in (('static', 'static (α)'), ('dynamic', 'with the gate, on text')):
        mean, std = np.array(per_layer[f'{key}_entropy_mean']), np.array(per_layer[f'{key}_entropy_std'])
        ax.plot(x, mean, marker='o', label=label)
        ax.fill_between(x, mean - std, mean + std, alpha=0.2)
    ax.axhline(math.log(K), color='gray', linestyle='--', label='max ln 4')
    ax.set(xlabel='layer', ylabel='routing entropy (nats)', title='Routing entropy per layer (mean ± std)')
    ax.legend()
    ax2.plot(x, per_layer['collapsed_fraction_static'], marker='o', label='static')
    ax2.plot(x, per_layer['collapsed_fraction_dynamic'], marker='o', label='on text')
    ax2.set(xlabel='layer', ylabel=f'fraction of neurons, entropy < {collapse_threshold}', ylim=(-0.02, 1.02),
            title='Collapsed neurons')
    ax2.legend()
    save(fig, output, 'routing_entropy.png')

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 3.8))
    beta = np.array(per_layer['beta'])
    for k, name in enumerate(ACTIVATION_NAMES):
        ax.plot(x, beta[:, k], marker='o', label=name)
    ax.set(xlabel='layer', ylabel='β', title='Gate scale β per activation')
    ax.legend()
    ax2.plot(x, per_layer['kl_dynamic_vs_static'], marker='o', color='C3')
    ax2.set(xlabel='layer', ylabel='KL(routing on text ‖ static)', title="What the gate adds over α")
    save(fig, output, 'gate_contribution.png')

    fig, axes = plt.subplots(1, K, figsize=(13, 3.4), sharey=True)
    for k, ax in enumerate(axes):
        for name, means in domain_means.items():
            ax.plot(x, means[:, k], marker='.', label=name)
        ax.set(title=ACTIVATION_NAMES[k], xlabel='layer')
    axes[0].set_ylabel('mean routing weight')
    axes[-1].legend()
    fig.suptitle('Routing by domain')
    save(fig, output, 'domain_routing.png')


def over_time():
    """--run (a run's dynamics and routing over its snapshots) or --shift (what fine-tuning changed): the summary, its
    figures and wandb."""
    newest = [path for _, path in run_files(run)[1][-1:]] if run else shift.split(',')[:1]
    trained = load_checkpoint(newest[0])[1] if wandb_log and newest else {}  # the project it trained in
    name = wandb_run_name or f"analyze-{'run-' + os.path.basename(os.path.normpath(run)) if run else 'shift'}"
    wandb_run = init_wandb(wandb_log, wandb_project, name, globals(), 'analyze', trained)
    if run:
        summary = {'run': analyze_run(run), 'command': command_line()}
    else:
        if len(shift.split(',')) != 2:
            fail(f"shift={shift!r}: give two checkpoints, 'base.pt,fine_tuned.pt'")
        summary = {'shift': routing_shift(*shift.split(',')), 'command': command_line()}
        routing_shift_figure(summary['shift'], output)
    write_summary(summary)
    if wandb_run:
        log_to_wandb(wandb_run, summary)


def audit_figure(audit):
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar(range(len(audit['relative_change_per_layer'])), audit['relative_change_per_layer'])
    ax.set(xlabel='layer', ylabel='relative change at positions <= t',
           title=f"Causality audit: mean KL {audit['mean_kl']:.2e}, max |Δ log p| {audit['max_abs_delta_log_p']:.2e}")
    save(fig, output, 'causality_audit.png')
    print(f"causality audit: mean KL {audit['mean_kl']:.3e}, max |delta log p| {audit['max_abs_delta_log_p']:.3e} "
          f"at positions before the change")


def routing_analysis(model, windows):
    """A PolyGLU's routing on the windows: the maps drawn, and the per-layer numbers -> (summary entries, the mean
    routing per domain)."""
    per_layer, routing, mean_dynamic = routing_layers(model, windows)
    share_map(np.array(per_layer['static_shares']), 'Neurotransmitter map: static preference (α)',
              'neurotransmitter_map_static.png', output)
    share_map(np.array(per_layer['dynamic_shares']), 'Neurotransmitter map: routing on text',
              'neurotransmitter_map_dynamic.png', output)
    n_layers = len(model.model_core)
    layers = [int(x) for x in map_layers.split(',')] if map_layers else sorted({0, n_layers // 2, n_layers - 1})
    for layer in layers:
        neuron_map(mean_dynamic[layer].numpy(), layer, output)
    domain_means = {name: r.mean((0, 2)).numpy() for name, r in routing.items()}  # [L, K] mean weight
    per_layer['domain_mean_routing'] = {name: m.tolist() for name, m in domain_means.items()}
    names = list(domain_means)
    per_layer['domain_total_variation'] = {
        f'{a}|{b}': (0.5 * (routing[a].mean(0) - routing[b].mean(0)).abs().sum(-1).mean(-1)).tolist()
        for i, a in enumerate(names) for b in names[i + 1:]}
    dynamic_entropy = torch.tensor(per_layer['dynamic_entropy_mean'])
    return {'per_layer': per_layer, 'collapse_threshold': collapse_threshold,
            'routing_entropy_mean_nats': float(dynamic_entropy.mean()),  # the model card's 0.0004 nats
            'routing_entropy_mean_fraction': float(dynamic_entropy.mean() / math.log(len(ACTIVATION_NAMES)))
            }, domain_means


def precision_analysis(model, windows):
    first_domain = next(iter(windows.values()))
    effects = {'bf16_routing_parameters': bf16_routing_effect(model, first_domain),
               'bf16_head_gradient_sum': bf16_head_gradient_effect(first_domain)}
    for what, effect in effects.items():
        print(f"precision, {what}: routing KL {effect['kl']:.2e} nats, top-1 agreement "
              f"{100 * effect['top1_agreement']:.2f}%, loss change {effect['loss_change']:+.5f}"
              + (f" after {effect['steps']} steps (head gradient off by {effect['head_gradient_relative_error']:.1e})"
                 if 'steps' in effect else ''))
    return effects


def one_checkpoint():
    """The checkpoint's causality audit, and for PolyGLU its routing (maps, entropy, domains), the Gumbel noise's and
    (precision=True) bf16's effect: the summary, its figures and wandb."""
    model, state = load_checkpoint(checkpoint)
    step, tau = state['step'], state['tau']
    # started before the work, so that a missing login stops the run now
    wandb_run = init_wandb(wandb_log, wandb_project, wandb_run_name, globals(), 'analyze', state)
    model = model.to(device).eval()
    wrap_model(model, attention=attention, segment_pooling=True)
    summary = {'checkpoint': checkpoint, 'file': state['file'], 'command': command_line(), 'step': step, 'tau': tau,
               'model_type': model.config.model_type,
               'activations': list(ACTIVATION_NAMES), 'max_entropy_nats': math.log(len(ACTIVATION_NAMES))}
    windows = analysis_windows(model, state)
    print(f"{checkpoint}: {model.config.model_type}, step {step}, tau {tau} | " + described(windows))
    summary['causality_audit'] = causality_audit(model, next(iter(windows.values())))
    audit_figure(summary['causality_audit'])
    if isinstance(model.model_core[0].ffn, PolyGLU):
        summary['gumbel_noise_effect'] = noise = gumbel_noise_effect(model, next(iter(windows.values())))
        print(f"Gumbel noise at evaluation (tau {model.tau}) would move predictions by mean KL {noise['mean_kl']:.3e}; "
              f"top-1 agreement {100 * noise['top1_agreement']:.1f}%")
        routing, domain_means = routing_analysis(model, windows)
        summary.update(routing)
        if precision:
            summary['precision'] = precision_analysis(model, windows)
        routing_figures(summary['per_layer'], domain_means, len(model.model_core))
        print(f"routing entropy on text: {summary['routing_entropy_mean_nats']:.2e} nats on average "
              f"({100 * summary['routing_entropy_mean_fraction']:.3f}% of ln 4); "
              f"collapsed neurons (< {collapse_threshold} nats): "
              f"{100 * np.mean(summary['per_layer']['collapsed_fraction_dynamic']):.1f}%")
    write_summary(summary)
    if wandb_run:
        log_to_wandb(wandb_run, summary)


def scalars(values, prefix='analyze'):
    """The summary's numbers, flattened: {'analyze/causality_audit/mean_kl': ...}; lists are left to the figures."""
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(scalars(value, f'{prefix}/{key}'))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            flat[f'{prefix}/{key}'] = value
    return flat


def log_to_wandb(run, summary):
    """Every figure in output as an image, and the summary's numbers as the run's summary."""
    import wandb
    run.log({f"analyze/{name[:-4]}": wandb.Image(os.path.join(output, name)) for name in sorted(os.listdir(output))
             if name.endswith('.png')})
    run.summary.update(scalars(summary))
    run.finish()


def write_summary(summary):
    with open(os.path.join(output, 'summary.json.tmp'), 'w') as f:
        json.dump(summary, f, indent=1)
    durable_replace(os.path.join(output, 'summary.json.tmp'), os.path.join(output, 'summary.json'))
    print(f"figures and summary.json -> {output}: {', '.join(sorted(os.listdir(output)))}")


def main():
    global device
    device, _ = resolve_device(device, dtype)
    try:
        os.makedirs(output, exist_ok=True)
    except OSError as e:
        fail(f"cannot create {output} ({e.strerror}); choose another --output")
    hold_folder(output)  # one analysis per folder: its figures and summary.json.tmp have fixed names
    if compare:  # training logs only: no checkpoint, no text
        summary = {'comparison': compare_runs(parse_arms(compare), output), 'command': command_line()}
        print_comparison(summary['comparison'])
        write_summary(summary)
    elif run or shift:
        over_time()
    else:
        one_checkpoint()
    let_go(output)


if __name__ == '__main__':
    configure(globals())
    main()
