"""
Interpretability of PolyGLU routing: neurotransmitter maps, routing entropy, the gate's contribution, routing
by domain, a causality audit of the mean-pooled gate, and PolyGLU-vs-VanillaLM loss curves.

    python analyze.py --checkpoint=checkpoints/portable_final.pt --output=figures/
    python analyze.py --checkpoint=... --data=math=data/tokenized/math,prose=notes.txt,code=snippets.jsonl
    python analyze.py --checkpoint=... --compare=checkpoints/train_log.jsonl,checkpoints_vanilla/train_log.jsonl

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
import torch
import torch.nn.functional as F
from tqdm import tqdm

from model import ACTIVATION_NAMES, EOS_ID, PolyGLU, enable_segment_pooling, load_checkpoint, packed_hidden_states
from utils import HUB_TOKENIZER, command_line, get_tokenizer, held_out_split, open_chunks, resolve_device

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
compare = ''                 # two train_log.jsonl files (or checkpoint folders holding one): loss curves
device = 'auto'
attention = 'auto'           # CUDA kernel for packed rows: flash-attn, else torch's varlen_attn, else SDPA per segment
dtype = 'float32'
seed = 1337
# -----------------------------------------------------------------------------


def fail(message):
    raise SystemExit(f"error: {message}")


def entropy(probs):
    return -(probs * torch.log(probs.clamp_min(1e-30))).sum(-1)

# -----------------------------------------------------------------------------
# text

def domain_windows(name, path, model, held_tokens):
    """Token windows of seq_len + 1 for one domain, at most max_tokens: from a prepared folder's held-out end
    (text the model never trained on) or from a local .txt/.jsonl file."""
    window = min(seq_len, model.config.max_seq_len) + 1
    if os.path.isdir(path):
        chunks = open_chunks(path, EOS_ID, model.config.vocab_size)
        _, held = held_out_split([c.size for c in chunks], held_tokens)
        regions = held if sum(hi - lo for _, lo, hi in held) >= window else [(len(chunks) - 1, 0, chunks[-1].size)]
        windows = [np.asarray(chunks[c][start:start + window], dtype=np.int64)
                   for c, lo, hi in regions for start in range(lo, hi - window + 1, window - 1)]
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
    """What sampling Gumbel noise at evaluation would change (the author's prototype did; ours is deterministic):
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
# comparison of training runs

def read_log(path):
    """Training-loss points (tokens, loss) of a train_log.jsonl, the last entry of a step winning (a resumed run
    may have logged a step twice)."""
    if os.path.isdir(path):
        path = os.path.join(path, 'train_log.jsonl')
    elif path.endswith('.pt'):
        path = os.path.join(os.path.dirname(path), 'train_log.jsonl')
    if not os.path.isfile(path):
        fail(f"no training log at {path}: train.py writes train_log.jsonl into its out_dir")
    entries = {}
    with open(path) as f:
        for line in f:
            entry = json.loads(line)
            if 'train/loss' in entry:
                entries[entry['step']] = entry
    points = sorted((e['train/tokens'], e['train/loss']) for e in entries.values())
    return path, np.array(points, dtype=np.float64).reshape(-1, 2)


def compare_runs(paths, folder):
    (path_a, a), (path_b, b) = (read_log(p) for p in paths)
    common = np.linspace(max(a[0, 0], b[0, 0]), min(a[-1, 0], b[-1, 0]), 200)
    if common[0] >= common[-1]:
        fail(f"{path_a} and {path_b} share no range of tokens to compare")
    loss_a, loss_b = np.interp(common, a[:, 0], a[:, 1]), np.interp(common, b[:, 0], b[:, 1])
    last = common >= common[0] + 0.9 * (common[-1] - common[0])
    fig, ax = plt.subplots(figsize=(6.5, 4))
    ax.plot(a[:, 0], a[:, 1], label=os.path.dirname(path_a) or path_a)
    ax.plot(b[:, 0], b[:, 1], label=os.path.dirname(path_b) or path_b)
    ax.set(xlabel='tokens', ylabel='training loss', title='Loss at equal tokens')
    ax.legend()
    save(fig, folder, 'loss_comparison.png')
    return {'runs': [path_a, path_b], 'tokens_compared': [float(common[0]), float(common[-1])],
            'loss_difference_at_end': float(loss_a[-1] - loss_b[-1]),
            'mean_loss_difference_last_10pct': float(np.mean(loss_a[last] - loss_b[last]))}

# -----------------------------------------------------------------------------
# figures

def save(fig, folder, name):
    for ax in fig.axes:
        if ax.get_xlabel() == 'layer':
            ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    fig.tight_layout()
    fig.savefig(os.path.join(folder, name), dpi=150)
    plt.close(fig)


def share_map(shares, title, name, folder):
    fig, ax = plt.subplots(figsize=(5, 0.22 * len(shares) + 1.6))
    image = ax.imshow(shares, aspect='auto', cmap='viridis', vmin=0, vmax=1)
    ax.set(xticks=range(len(ACTIVATION_NAMES)), xticklabels=ACTIVATION_NAMES, yticks=range(len(shares)),
           ylabel='layer', title=title)
    for layer in range(len(shares)):
        for k in range(len(ACTIVATION_NAMES)):
            ax.text(k, layer, f'{shares[layer, k]:.2f}', ha='center', va='center', fontsize=6,
                    color='white' if shares[layer, k] < 0.5 else 'black')
    fig.colorbar(image, ax=ax, label='share of neurons')
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


def main():
    global device
    device, _ = resolve_device(device, dtype)
    try:
        os.makedirs(output, exist_ok=True)
    except OSError as e:
        fail(f"cannot create {output} ({e.strerror}); choose another --output")
    summary = {}
    if compare:
        paths = [p for p in compare.split(',') if p]
        if len(paths) != 2:
            fail("compare= takes two training logs (or their out_dir folders), comma separated")
        summary['comparison'] = compare_runs(paths, output)
        comparison = summary['comparison']
        print(f"loss difference at equal tokens (first - second): {comparison['loss_difference_at_end']:+.4f} "
              f"at the end, {comparison['mean_loss_difference_last_10pct']:+.4f} over the last 10%")
    model, state = load_checkpoint(checkpoint)
    step, tau = state['step'], state['tau']
    model = model.to(device).eval()
    enable_segment_pooling(model, attention)
    polyglu = isinstance(model.model_core[0].ffn, PolyGLU)
    summary.update({'checkpoint': checkpoint, 'file': state['file'], 'command': command_line(), 'step': step, 'tau': tau,
                    'model_type': model.config.model_type,
                    'activations': list(ACTIVATION_NAMES), 'max_entropy_nats': math.log(len(ACTIVATION_NAMES))})
    base = data_dir or state.get('data_dir') or 'data/tokenized'
    held_tokens = state.get('val_tokens') or 2_000_000
    domains = dict(item.split('=', 1) for item in data.split(',')) if data else {
        name: os.path.join(base, name) for name in ('math', 'stem', 'code')
        if os.path.isfile(os.path.join(base, name, 'manifest.json'))}
    if not domains:
        fail(f"no text to analyse: no prepared math/stem/code under {base}; give data=name=path,...")
    windows = {name: domain_windows(name, path, model, held_tokens) for name, path in domains.items()}
    print(f"{checkpoint}: {model.config.model_type}, step {step}, tau {tau} | "
          + ', '.join(f"{name} {len(w)} windows of {len(w[0]) - 1}" for name, w in windows.items()))

    summary['causality_audit'] = causality_audit(model, next(iter(windows.values())))
    audit = summary['causality_audit']
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar(range(len(audit['relative_change_per_layer'])), audit['relative_change_per_layer'])
    ax.set(xlabel='layer', ylabel='relative change at positions <= t',
           title=f"Causality audit: mean KL {audit['mean_kl']:.2e}, max |Δ log p| {audit['max_abs_delta_log_p']:.2e}")
    save(fig, output, 'causality_audit.png')
    print(f"causality audit: mean KL {audit['mean_kl']:.3e}, max |delta log p| {audit['max_abs_delta_log_p']:.3e} "
          f"at positions before the change")

    if polyglu:
        summary['gumbel_noise_effect'] = gumbel_noise_effect(model, next(iter(windows.values())))
        noise = summary['gumbel_noise_effect']
        print(f"Gumbel noise at evaluation (tau {model.tau}) would move predictions by mean KL {noise['mean_kl']:.3e}; "
              f"top-1 agreement {100 * noise['top1_agreement']:.1f}%")
        n_layers, K = len(model.model_core), len(ACTIVATION_NAMES)
        alpha = torch.stack([b.ffn.alpha.detach().float().cpu() for b in model.model_core])  # [L, d_ff, K]
        beta = torch.stack([b.ffn.beta.detach().float().cpu() for b in model.model_core])    # [L, K]
        static = torch.softmax(alpha / model.tau, -1)
        routing = {name: measure_routing(model, w) for name, w in windows.items()}        # [N, L, d_ff, K]
        dynamic = torch.cat(list(routing.values()))
        mean_dynamic = dynamic.mean(0)                                                     # [L, d_ff, K]
        shares = lambda probs: F.one_hot(probs.argmax(-1), K).float().mean(-2).numpy()  # noqa: E731
        static_shares, dynamic_shares = shares(static), shares(mean_dynamic)
        share_map(static_shares, 'Neurotransmitter map: static preference (α)', 'neurotransmitter_map_static.png',
                  output)
        share_map(dynamic_shares, 'Neurotransmitter map: routing on text', 'neurotransmitter_map_dynamic.png',
                  output)
        layers = [int(x) for x in map_layers.split(',')] if map_layers else sorted({0, n_layers // 2, n_layers - 1})
        for layer in layers:
            neuron_map(mean_dynamic[layer].numpy(), layer, output)

        static_entropy = entropy(static)                       # [L, d_ff]
        dynamic_entropy = entropy(dynamic)                     # [N, L, d_ff]
        kl = (dynamic * (torch.log(dynamic.clamp_min(1e-30)) - torch.log(static.clamp_min(1e-30)))).sum(-1)
        per_layer = {
            'static_entropy_mean': static_entropy.mean(-1).tolist(),
            'static_entropy_std': static_entropy.std(-1).tolist(),
            'dynamic_entropy_mean': dynamic_entropy.mean((0, 2)).tolist(),
            'dynamic_entropy_std': dynamic_entropy.transpose(0, 1).reshape(n_layers, -1).std(-1).tolist(),
            'collapsed_fraction_static': (static_entropy < collapse_threshold).float().mean(-1).tolist(),
            'collapsed_fraction_dynamic': (dynamic_entropy < collapse_threshold).float().mean((0, 2)).tolist(),
            'kl_dynamic_vs_static': kl.mean((0, 2)).tolist(),
            'beta': beta.tolist(),
            'static_shares': static_shares.tolist(),
            'dynamic_shares': dynamic_shares.tolist(),
        }
        domain_means = {name: r.mean((0, 2)).numpy() for name, r in routing.items()}  # [L, K] mean weight
        per_layer['domain_mean_routing'] = {name: m.tolist() for name, m in domain_means.items()}
        names = list(domain_means)
        per_layer['domain_total_variation'] = {
            f'{a}|{b}': (0.5 * (routing[a].mean(0) - routing[b].mean(0)).abs().sum(-1).mean(-1)).tolist()
            for i, a in enumerate(names) for b in names[i + 1:]}
        summary['per_layer'] = per_layer
        summary['collapse_threshold'] = collapse_threshold
        summary['routing_entropy_mean_nats'] = float(dynamic_entropy.mean())  # the model card's 0.0004 nats
        summary['routing_entropy_mean_fraction'] = float(dynamic_entropy.mean() / math.log(K))

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
        for k, name in enumerate(ACTIVATION_NAMES):
            ax.plot(x, beta[:, k].numpy(), marker='o', label=name)
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
        print(f"routing entropy on text: {summary['routing_entropy_mean_nats']:.2e} nats on average "
              f"({100 * summary['routing_entropy_mean_fraction']:.3f}% of ln 4); "
              f"collapsed neurons (< {collapse_threshold} nats): "
              f"{100 * np.mean(per_layer['collapsed_fraction_dynamic']):.1f}%")
    with open(os.path.join(output, 'summary.json.tmp'), 'w') as f:
        json.dump(summary, f, indent=1)
    os.replace(os.path.join(output, 'summary.json.tmp'), os.path.join(output, 'summary.json'))
    print(f"figures and summary.json -> {output}: {', '.join(sorted(os.listdir(output)))}")


if __name__ == '__main__':
    from configurator import configure
    configure(globals())
    main()
