"""
Evaluation: lm-evaluation-harness tasks through our own LM wrapper, held-out perplexity, and text samples.

    python eval.py --checkpoint=checkpoints/portable_final.pt --tasks=gsm8k,minerva_math500,mmlu_stem \
                   --output=results/pretrain_eval.json [--limit=10]
    python eval.py --checkpoint=... --tasks= --perplexity=True          # held-out perplexity only
    python eval.py --checkpoint=... --prompt="Problem: 2+2=?"            # a quick sample, then exit
    python eval.py --checkpoint=... --benchmark=True                     # time exact generation, project GSM8K

Exact under the frozen design. The PolyGLU gate mean-pools the whole sequence, so a padded or batched
forward would change a request's score. Here every request is scored as if it ran alone: requests are
packed, unpadded, into long rows, and cu_seqlens give each one its own attention block and (through
model.enable_segment_pooling) its own gate mean. Batch composition cannot move a score: only float rounding
differs. Generation is exact too: a new token changes the gate mean and so every position's FFN output in
every layer, so no key/value can be reused. Each step runs a full forward of every unfinished sequence, packed
together, and finished sequences drop out. `generation='cached'` trades exactness for speed: it reuses
keys/values and refreshes them with a full forward when any layer's routing moves more than
`refresh_threshold`, and `compare_exact=N` prints how far it strays from exact generation on N requests.
"""
import difflib
import json
import math
import os
import time

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from model import (EOS_ID, PolyGLU, RoPE, attention_name, cu_seqlens_from_eos, enable_segment_pooling, load_checkpoint,
                   packed_hidden_states, whole_row_pooling)
from utils import HUB_TOKENIZER, get_tokenizer, held_out_split, open_chunks, resolve_device

# -----------------------------------------------------------------------------
# config
checkpoint = 'checkpoints/portable_final.pt'
tasks = 'gsm8k,minerva_math500,mmlu_stem'  # harness task names, comma separated ('' = none; 'paper' = the model card)
num_fewshot = -1             # -1: TASK_SHOTS, else each task's own default (GSM8K 5-shot, Minerva MATH 4-shot)
limit = 0                    # examples per task, 0 = all
include_path = ''            # a folder of your own task YAMLs
output = 'results/eval.json'
chat = None                  # ChatML prompts (few-shot as turns, stop at <|im_end|>); None = True for fine-tuned models
log_samples = False          # write every sample (prompt, generation or loglikelihoods, score) beside the results
compare_paper = False        # print the scores beside the author's model card (on with tasks='paper')
tokenizer = HUB_TOKENIZER    # or a local tokenizer.json / folder, or 'packaged'
batch_tokens = 16_384        # tokens packed into one forward (no padding; the scores do not depend on it)
max_gen_toks = 256           # default cap of generated tokens when a task does not set one
generation = 'exact'         # 'exact' | 'cached' (approximate, faster)
refresh_threshold = 0.05     # cached: full refresh when a routing weight moves more than this
compare_exact = 0            # cached: also generate N requests exactly and print the agreement
perplexity = True            # held-out perplexity per source, when the data is there
data_dir = ''                # '' = the data_dir stored in the checkpoint (train.py's), else data/tokenized
sources = ('math', 'stem', 'code')
val_tokens = -1              # -1 = the held-out size stored in the checkpoint (train.py's val_tokens)
perplexity_tokens = 500_000  # at most this many held-out tokens scored per source
prompt = ''                  # generate from this prompt, print, and exit
benchmark = False            # time exact generation on GSM8K-shaped requests and project the full GSM8K run
benchmark_requests = 16      # benchmark: how many synthetic requests (random tokens, no early stop)
benchmark_prompt_tokens = 850  # a 5-shot GSM8K prompt is about this long with the Qwen3 tokenizer
max_new_tokens = 200
temperature = 0.0            # 0 = greedy
top_k = 50
seed = 1337
device = 'auto'
dtype = 'auto'
attention = 'auto'           # CUDA kernel for packed rows: flash-attn, else torch's varlen_attn, else SDPA per segment
# -----------------------------------------------------------------------------


def fail(message):
    raise SystemExit(f"error: {message}")


TASK_SHOTS = {'mmlu_stem': 5}  # the model card's protocol where the harness's default differs (0.4.13: 0-shot MMLU)
# The base model card (lm-eval 0.4.11): (task, metric, shots, published). 'acc' where the card names no metric.
PAPER = [('hellaswag', 'acc_norm', 0, 28.51), ('arc_easy', 'acc', 0, 41.04), ('arc_challenge', 'acc', 0, 22.27),
         ('piqa', 'acc', 0, 58.87), ('winogrande', 'acc', 0, 52.17), ('boolq', 'acc', 0, 61.13),
         ('sciq', 'acc', 0, 61.20), ('openbookqa', 'acc', 0, 29.00), ('lambada_openai', 'acc', 0, 15.35),
         ('mmlu_stem', 'acc', 5, 25.28)]
PAPER_PERPLEXITY = {'math': 3.56, 'code': 7.08, 'stem': 31.93}

# -----------------------------------------------------------------------------
# packed, exact forward passes

def packs(lengths, budget):
    """Greedy packing of request indices, longest first, into groups of at most `budget` tokens (a longer request
    gets a group of its own). Sorting by length makes the groups full and the order deterministic."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    groups, group, used = [], [], 0
    for i in order:
        if group and used + lengths[i] > budget:
            groups.append(group)
            group, used = [], 0
        group.append(i)
        used += lengths[i]
    if group:
        groups.append(group)
    return groups


def target_log_probs(model, hidden, positions, targets, chunk=1024):
    """log p(target) and whether the target is the argmax, at the given rows of hidden. The head runs on `chunk` rows at
    a time and only the targets' values are kept: memory does not grow with positions x vocabulary (16,384 positions
    at the full vocabulary would be 9.9 GB of float32 log-probs; a chunk's logits are 0.6 GB)."""
    log_probs, greedy = [], []
    for i in range(0, len(positions), chunk):
        logits = F.linear(hidden[positions[i:i + chunk]], model.embeddings.weight).float()
        wanted = targets[i:i + chunk]
        log_probs.append(logits.gather(1, wanted[:, None])[:, 0] - logits.logsumexp(-1))
        greedy.append(logits.argmax(-1) == wanted)
    if not log_probs:
        return hidden.new_zeros(0, dtype=torch.float32), torch.zeros(0, dtype=torch.bool, device=hidden.device)
    return torch.cat(log_probs), torch.cat(greedy)


@torch.no_grad()
def score(model, requests, budget, desc='loglikelihood'):
    """requests: [(context ids, continuation ids)] -> [(sum log p(continuation | context), is greedy)].
    The input is the last max_seq_len + 1 tokens of context + continuation, minus the last token."""
    max_len = model.config.max_seq_len
    inputs, spans = [], []
    for context, continuation in requests:
        continuation = list(continuation) or [EOS_ID]  # the harness never sends an empty one; keep the math defined
        whole = (list(context) + continuation)[-(max_len + 1):]
        inputs.append(whole[:-1])
        spans.append((len(whole) - 1 - len(continuation), whole[-len(continuation):]))
    results = [None] * len(requests)
    for group in tqdm(packs([len(s) for s in inputs], budget), desc=desc, disable=len(requests) < 50):
        hidden, offsets = packed_hidden_states(model, [inputs[i] for i in group])
        positions = torch.cat([torch.arange(offsets[k] + spans[i][0], offsets[k + 1], device=hidden.device)
                               for k, i in enumerate(group)])
        targets = torch.tensor([t for i in group for t in spans[i][1]], device=hidden.device)
        log_probs, greedy = (t.cpu() for t in target_log_probs(model, hidden, positions, targets))
        first = 0
        for i in group:
            n = len(spans[i][1])
            results[i] = (log_probs[first:first + n].sum().item(), bool(greedy[first:first + n].all()))
            first += n
    return results


def stop_index(text, until):
    positions = [text.find(s) for s in until if s and s in text]
    return min(positions) if positions else -1


@torch.no_grad()
def generate_exact(model, tok, prompts, budget, desc='generate'):
    """prompts: [(context ids, until strings, max new tokens)] -> generated texts, cut at the first stop string.
    Greedy; every step is a full forward of each unfinished sequence alone (packed together)."""
    max_len = model.config.max_seq_len
    sequences = [list(ids)[-max_len:] for ids, _, _ in prompts]
    generated = [[] for _ in prompts]
    active = [i for i, (_, _, n) in enumerate(prompts) if n > 0]
    progress = tqdm(total=sum(n for _, _, n in prompts), desc=desc, unit='tok', disable=len(prompts) < 8)
    while active:
        finished = set()
        for group in packs([len(sequences[i]) for i in active], budget):
            group = [active[k] for k in group]
            hidden, offsets = packed_hidden_states(model, [sequences[i] for i in group])
            last = torch.as_tensor(offsets[1:] - 1, device=hidden.device)
            next_tokens = F.linear(hidden[last], model.embeddings.weight).float().argmax(-1).tolist()
            for i, token in zip(group, next_tokens):
                generated[i].append(token)
                sequences[i] = (sequences[i] + [token])[-max_len:]
                text = tok.decode(generated[i], skip_special_tokens=False)
                if len(generated[i]) >= prompts[i][2] or stop_index(text, prompts[i][1]) >= 0 or token == EOS_ID:
                    finished.add(i)
                    progress.update(prompts[i][2] - len(generated[i]))  # the budget it did not need
            progress.update(len(group))
        active = [i for i in active if i not in finished]
    progress.close()
    return [cut(tok.decode(g, skip_special_tokens=False), until) for g, (_, until, _) in zip(generated, prompts)]


def cut(text, until):
    index = stop_index(text, until)
    text = text if index < 0 else text[:index]
    return text.replace('<|endoftext|>', '')

# -----------------------------------------------------------------------------
# the cached approximation

def routing(ffn):
    """The routing weights [d_ff, K] of a PolyGLU's last forward (one sequence); None for SwiGLU."""
    return torch.softmax(ffn.last_logits.float() / ffn.tau, -1)[0, -1] if isinstance(ffn, PolyGLU) else None


@torch.no_grad()
def full_pass(model, ids):
    """A full forward of one sequence that records, per layer, the keys/values and the FFN input sum (the state
    an incremental step continues from) and the routing weights, through the frozen modules' attend/pool hooks."""
    n_layers = len(model.model_core)
    state = {'k': [None] * n_layers, 'v': [None] * n_layers, 'sum': [None] * n_layers, 'n': len(ids)}
    originals = [(block.gqa.attend, getattr(block.ffn, 'pool', None)) for block in model.model_core]

    def recording_attend(layer, attend):
        def hook(q, k, v, cu_seqlens, max_seqlen):
            state['k'][layer], state['v'][layer] = k, v
            return attend(q, k, v, cu_seqlens, max_seqlen)
        return hook

    def recording_pool(layer, pool):
        def hook(x, cu_seqlens):
            state['sum'][layer] = x.float().sum(1)
            return pool(x, cu_seqlens)
        return hook

    for layer, (block, (attend, pool)) in enumerate(zip(model.model_core, originals)):
        block.gqa.attend = recording_attend(layer, attend)
        if pool is not None:
            block.ffn.pool = recording_pool(layer, pool)
    try:
        hidden = model.hidden_states(torch.tensor([ids], device=model.embeddings.weight.device))
    finally:
        for block, (attend, pool) in zip(model.model_core, originals):
            block.gqa.attend = attend
            if pool is not None:
                block.ffn.pool = pool
    state['routing'] = [routing(block.ffn) for block in model.model_core]
    return hidden[0, -1], state


@torch.no_grad()
def cached_step(model, token, state):
    """One new token through every layer with the cached keys/values (stale: computed under the routing of the
    last refresh) and the running gate mean. -> (final hidden of the token, max routing change since refresh)."""
    position = state['n']
    cos, sin = (t[position:position + 1] for t in model.rope(position + 1))
    x = model.embeddings(torch.tensor([[token]], device=model.embeddings.weight.device))
    drift = 0.0
    for layer, block in enumerate(model.model_core):
        attn, h = block.gqa, block.rmsnorm_1(x)
        q = RoPE.rotate(attn.rmsnorm_q(attn.W_q(h).view(1, 1, attn.n_heads, attn.head_dim)), cos, sin)
        k = RoPE.rotate(attn.rmsnorm_k(attn.W_k(h).view(1, 1, attn.n_kv_heads, attn.head_dim)), cos, sin)
        v = attn.W_v(h).view(1, 1, attn.n_kv_heads, attn.head_dim)
        state['k'][layer] = torch.cat([state['k'][layer], k], 1)
        state['v'][layer] = torch.cat([state['v'][layer], v], 1)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), state['k'][layer].transpose(1, 2),
                                             state['v'][layer].transpose(1, 2), enable_gqa=True)
        x = x + attn.W_o(out.transpose(1, 2).reshape(1, 1, -1))
        h = block.rmsnorm_2(x)
        if not isinstance(block.ffn, PolyGLU):
            x = x + block.ffn(h)
            continue
        state['sum'][layer] = state['sum'][layer] + h.float().sum(1)
        mean = (state['sum'][layer] / (position + 1)).to(h.dtype)[:, None]
        pool, block.ffn.pool = block.ffn.pool, (lambda _x, _cu: mean)
        try:
            x = x + block.ffn(h)
        finally:
            block.ffn.pool = pool
        drift = max(drift, (routing(block.ffn) - state['routing'][layer]).abs().max().item())
    state['n'] += 1
    return model.rmsnorm(x)[0, -1], drift


@torch.no_grad()
def generate_cached(model, tok, prompts, desc='generate (cached)'):
    """Greedy generation with a key/value cache, one request at a time, refreshed when routing drifts."""
    outputs, refreshes, steps = [], 0, 0
    for ids, until, n in tqdm(prompts, desc=desc, disable=len(prompts) < 8):
        ids = list(ids)[-model.config.max_seq_len:]
        hidden, state = full_pass(model, ids)
        generated = []
        while len(generated) < n:
            token = int(F.linear(hidden, model.embeddings.weight).argmax())
            generated.append(token)
            ids.append(token)
            if token == EOS_ID or stop_index(tok.decode(generated, skip_special_tokens=False), until) >= 0 or \
                    len(generated) >= n or len(ids) >= model.config.max_seq_len:
                break
            hidden, drift = cached_step(model, token, state)
            steps += 1
            if drift > refresh_threshold:
                hidden, state = full_pass(model, ids)
                refreshes += 1
        outputs.append(cut(tok.decode(generated, skip_special_tokens=False), until))
    print(f"cached generation: {refreshes} refreshes in {steps} cached steps (threshold {refresh_threshold})")
    return outputs

# -----------------------------------------------------------------------------
# the harness wrapper

def chatml(messages, add_generation_prompt=True):
    """The ChatML that sft.py trains on: <|im_start|>role\\ncontent<|im_end|>\\n per turn, then the assistant's header."""
    text = ''.join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return text + ('<|im_start|>assistant\n' if add_generation_prompt else '')


def make_lm(model, tok, chat=False):
    from lm_eval.api.model import LM

    class PolychromaticEvalLM(LM):
        """lm-evaluation-harness LM around the project's own model (no Hugging Face model classes). With chat, the
        harness renders prompts through apply_chat_template (few-shot examples as turns) and generation also stops at
        <|im_end|>, which ends every assistant turn in SFT."""

        tokenizer_name = 'Qwen3-chatml'

        def apply_chat_template(self, chat_history, add_generation_prompt=True):
            return chatml(chat_history, add_generation_prompt)

        def chat_template(self, chat_template=False):
            return 'chatml' if chat_template else ''

        def loglikelihood(self, requests, disable_tqdm=False):
            pairs = []
            for request in requests:
                context, continuation = request.args
                context_ids = tok.encode(context, add_special_tokens=False).ids if context else [EOS_ID]
                pairs.append((context_ids, tok.encode(continuation, add_special_tokens=False).ids))
            return score(model, pairs, batch_tokens)

        def loglikelihood_rolling(self, requests, disable_tqdm=False):
            from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
            pieces, owner = [], []
            for n, request in enumerate(requests):
                ids = tok.encode(request.args[0], add_special_tokens=False).ids
                for window in get_rolling_token_windows(token_list=ids, prefix_token=EOS_ID,
                                                        max_seq_len=model.config.max_seq_len, context_len=1):
                    pieces.append(make_disjoint_window(window))
                    owner.append(n)
            totals = [0.0] * len(requests)
            for n, (log_prob, _) in zip(owner, score(model, pieces, batch_tokens, 'loglikelihood_rolling')):
                totals[n] += log_prob
            return totals

        def generate_until(self, requests, disable_tqdm=False):
            prompts = []
            for request in requests:
                context, kwargs = request.args
                until = kwargs.get('until', [])
                until = ([until] if isinstance(until, str) else list(until)) + (['<|im_end|>'] if chat else [])
                prompts.append((tok.encode(context, add_special_tokens=False).ids, until,
                                int(kwargs.get('max_gen_toks', max_gen_toks))))
            if generation == 'exact':
                return generate_exact(model, tok, prompts, batch_tokens)
            outputs = generate_cached(model, tok, prompts)
            if compare_exact:
                start = time.perf_counter()
                exact = generate_exact(model, tok, prompts[:compare_exact], batch_tokens, 'generate (exact check)')
                agreement = [a == b for a, b in zip(outputs, exact)]
                same_tokens = [sum(x == y for x, y in zip(tok.encode(a).ids, tok.encode(b).ids)) /
                               max(1, len(tok.encode(b).ids)) for a, b in zip(outputs, exact)]
                print(f"cached vs exact on {len(exact)} requests: {100 * np.mean(agreement):.1f}% identical outputs, "
                      f"{100 * np.mean(same_tokens):.1f}% of tokens agree position by position, so a score on these "
                      f"requests moves by at most {100 * (1 - np.mean(agreement)):.1f} points "
                      f"(exact took {time.perf_counter() - start:.1f}s)")
            return outputs

    return PolychromaticEvalLM()


def run_tasks(lm, task_names, chat=False):
    """The harness on our LM: one simple_evaluate per shot count (TASK_SHOTS, or num_fewshot for all), merged. With
    chat, prompts go through the LM's chat template with few-shot examples as turns; answers are extracted by each
    task's own filters either way."""
    import lm_eval
    from lm_eval.tasks import TaskManager
    manager = TaskManager(include_path=include_path or None)
    known = set(manager.all_tasks)
    for name in task_names:
        if name not in known:
            near = difflib.get_close_matches(name, known, n=3)
            fail(f"unknown task '{name}'" + (f"; did you mean {', '.join(near)}?" if near else
                                               "; `lm-eval ls tasks` lists them, include_path= adds your own"))
    by_shots = {}
    for name in task_names:
        by_shots.setdefault(num_fewshot if num_fewshot >= 0 else TASK_SHOTS.get(name), []).append(name)
    merged = {}
    for shots, names in by_shots.items():
        results = lm_eval.simple_evaluate(model=lm, tasks=names, num_fewshot=shots, limit=limit or None,
                                          task_manager=manager, log_samples=log_samples, apply_chat_template=chat,
                                          fewshot_as_multiturn=chat, random_seed=seed, numpy_random_seed=seed,
                                          torch_random_seed=seed, fewshot_random_seed=seed)
        for key, value in results.items():
            if isinstance(value, dict):
                merged.setdefault(key, {}).update(value)
            else:
                merged.setdefault(key, value)
    return merged


def write_samples(samples, output):
    """Per-sample records in the harness's own format (its sample dicts: doc, arguments, resps, filtered_resps, the
    metrics), one jsonl per task beside the results -> {task: path}."""
    from lm_eval.utils import handle_non_serializable
    folder = os.path.splitext(output)[0] + '_samples'
    os.makedirs(folder, exist_ok=True)
    paths = {}
    for task, records in samples.items():
        paths[task] = os.path.join(folder, f'{task}.jsonl')
        with open(paths[task] + '.tmp', 'w') as f:
            for record in records:
                f.write(json.dumps(record, default=handle_non_serializable, ensure_ascii=False) + '\n')
        os.replace(paths[task] + '.tmp', paths[task])
    return paths


def paper_comparison(results, perplexity):
    """Rows (benchmark, metric, shots, ours, stderr, published, difference, kind) for every figure of the model card;
    ours None where it was not run."""
    rows = []
    for task, metric, shots, published in PAPER:
        values = results.get('results', {}).get(task, {})
        ours, stderr = values.get(f'{metric},none'), values.get(f'{metric}_stderr,none')
        ours, stderr = (None if v is None or v == 'N/A' else 100 * v for v in (ours, stderr))
        rows.append((task, metric, shots, ours, stderr, published, None if ours is None else ours - published,
                     'loglikelihood'))
    for name, published in PAPER_PERPLEXITY.items():
        ours = perplexity.get(name, {}).get('perplexity')
        rows.append((f'{name} perplexity', 'ppl', None, ours, None, published,
                     None if ours is None else ours - published, 'perplexity'))
    return rows


def print_paper_comparison(rows, model_label):
    print(f"\n{model_label} against the author's model card (PolyChromaticLM-1.0-base-0.6B; lm-eval 0.4.11 there, "
          "0.4.13 here):")
    print(f"{'benchmark':<22} {'metric':<9} {'shots':>5} {'ours':>8} {'stderr':>7} {'card':>7} {'diff':>8}  kind")
    show = lambda v, fmt: format(v, fmt) if v is not None else '-'  # noqa: E731
    for task, metric, shots, ours, stderr, published, diff, kind in rows:
        print(f"{task:<22} {metric:<9} {show(shots, 'd'):>5} {show(ours, '.2f'):>8} {show(stderr, '.2f'):>7} "
              f"{published:>7.2f} {show(diff, '+.2f'):>8}  {kind if ours is not None else 'not run'}")
    print("Every task score above is loglikelihood-based: PolyGLU's gate mean-pools the whole sequence, so a choice's "
          "first tokens are scored having seen the rest of it (README, eval.py). Report them as such.")

# -----------------------------------------------------------------------------
# held-out perplexity

@torch.no_grad()
def held_out_perplexity(model, folder, held_tokens, max_tokens, context):
    """Token-level loss and perplexity over the held-out end of a source, scored as train.py's validation scores it:
    windows of `context` + 1 tokens from the start of the held-out slice, `context` apart, each row alone with its
    documents masked from each other in attention (cu_seqlens from EOS) and the frozen whole-row gate mean. On the
    same windows the loss equals train.py's validation loss."""
    chunks = open_chunks(folder, EOS_ID, model.config.vocab_size)
    _, held = held_out_split([c.size for c in chunks], held_tokens)
    windows = [(c, start) for c, lo, hi in held for start in range(lo, hi - context, context)]
    windows = windows[:max(1, max_tokens // context)]
    total, count = 0.0, 0
    device = model.embeddings.weight.device
    with whole_row_pooling(model):
        for c, start in tqdm(windows, desc=os.path.basename(folder), disable=len(windows) < 20):
            ids = torch.from_numpy(chunks[c][start:start + context + 1].astype(np.int64)).to(device)
            x = ids[None, :-1]
            cu_seqlens, max_seqlen = cu_seqlens_from_eos(x)
            hidden = model.hidden_states(x, cu_seqlens, max_seqlen)[0]
            log_probs, _ = target_log_probs(model, hidden, torch.arange(context, device=device), ids[1:])
            total -= log_probs.sum().item()
            count += context
    loss = total / max(1, count)
    return {'loss': loss, 'perplexity': math.exp(loss), 'tokens': count, 'windows': len(windows),
            'context': context}

# -----------------------------------------------------------------------------

def sample_text(model, tok):
    """Greedy (temperature 0) or top-k sampling from `prompt`, exact (full forward every step)."""
    ids = tok.encode(prompt, add_special_tokens=False).ids
    generator = torch.Generator(device='cpu').manual_seed(seed)
    for _ in range(max_new_tokens):
        hidden = model.hidden_states(torch.tensor([ids[-model.config.max_seq_len:]],
                                                  device=model.embeddings.weight.device))
        logits = F.linear(hidden[0, -1], model.embeddings.weight).float().cpu()
        if temperature <= 0:
            token = int(logits.argmax())
        else:
            values, indices = torch.topk(logits / temperature, top_k)
            token = int(indices[torch.multinomial(torch.softmax(values, -1), 1, generator=generator)])
        ids.append(token)
        if token == EOS_ID:
            break
    return tok.decode(ids, skip_special_tokens=False)


def generation_flops(model, prompt_tokens, new_tokens):
    """Forward FLOPs of exact generation of one request: step t runs all prompt + t tokens through the blocks
    (2 x non-embedding parameters each, plus causal attention 2 * n_layers * d * length) and the head once."""
    from model import count_parameters
    config = model.config
    block_params = count_parameters(config)[0] - config.vocab_size * config.d_model  # the lookup is no matmul
    lengths = prompt_tokens + np.arange(new_tokens)
    attention = 2 * config.n_layers * config.n_heads * config.head_dim * lengths ** 2
    return float(np.sum(2 * block_params * lengths + attention + 2 * config.d_model * config.vocab_size))


def run_benchmark(model):
    """Exact generation of benchmark_requests synthetic requests of GSM8K's shape, measured; then the full
    GSM8K test set (1,319 problems, 5-shot) projected from the measured FLOP rate, worst case (every answer runs to
    max_gen_toks). For the 600M model on a GPU, run this with its checkpoint there."""
    rng = np.random.default_rng(seed)
    vocab = min(model.config.vocab_size, 150_000)
    prompts = [(rng.integers(0, vocab, benchmark_prompt_tokens).tolist(), [], max_gen_toks)
               for _ in range(benchmark_requests)]

    class Silent:  # no stop strings: decoding text is not what is measured
        @staticmethod
        def decode(ids, skip_special_tokens=False):
            return ''

    if device.startswith('cuda'):
        torch.cuda.synchronize()
    start = time.perf_counter()
    generate_exact(model, Silent, prompts, batch_tokens, 'benchmark')
    if device.startswith('cuda'):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    flops = benchmark_requests * generation_flops(model, benchmark_prompt_tokens, max_gen_toks)
    gsm8k = 1319 * generation_flops(model, benchmark_prompt_tokens, max_gen_toks)
    print(f"exact generation, {benchmark_requests} requests x ({benchmark_prompt_tokens} prompt + {max_gen_toks} new "
          f"tokens), batch_tokens={batch_tokens}: {seconds:.1f}s, {benchmark_requests * max_gen_toks / seconds:.1f} "
          f"new tokens/s, {flops / seconds / 1e12:.3f} TFLOP/s achieved")
    print(f"full GSM8K (1,319 x {max_gen_toks} new tokens, worst case) for this model on this device: "
          f"{gsm8k / (flops / seconds) / 3600:.2f} hours (projected from the measured rate)")
    return seconds


def main():
    global device, dtype
    device, dtype = resolve_device(device, dtype)
    if generation not in ('exact', 'cached'):
        fail(f"generation must be 'exact' or 'cached', got {generation!r}")
    task_names = [task for task, *_ in PAPER] if tasks == 'paper' else [t.strip() for t in tasks.split(',') if t.strip()]
    if (task_names or perplexity) and not prompt and not benchmark:
        folder = os.path.dirname(os.path.abspath(output))
        try:
            os.makedirs(folder, exist_ok=True)
            with open(os.path.join(folder, '.write_test'), 'w'):
                pass
            os.remove(os.path.join(folder, '.write_test'))
        except OSError as e:
            fail(f"cannot write results to {output} ({e.strerror}); choose another --output")
    model, state = load_checkpoint(checkpoint)
    step, tau = state['step'], state['tau']
    model = model.to(device=device, dtype=torch.bfloat16 if dtype == 'bfloat16' else torch.float32).eval()
    enable_segment_pooling(model, attention)
    print(f"{checkpoint} ({state['format']}): {model.config.model_type}, step {step}, tau {tau} | {device} {dtype} | "
          f"attention {attention_name(model)}")
    if benchmark:  # random token ids: no tokenizer needed (gpu-check runs it on a machine without one)
        run_benchmark(model)
        return
    tok = get_tokenizer(tokenizer, model.config.vocab_size)
    if prompt:
        print(sample_text(model, tok))
        return

    start = time.perf_counter()
    fine_tuned = state.get('stage') == 'sft' or 'sft' in os.path.basename(state['file']) or 'instruct' in checkpoint.lower()
    use_chat = fine_tuned if chat is None else bool(chat)
    report = {'checkpoint': checkpoint, 'file': state['file'], 'format': state['format'], 'step': step, 'tau': tau,
              'model_config': state['model_config'], 'chat': use_chat,
              'config': {k: v for k, v in globals().items() if not k.startswith('_') and k.islower()
                         and isinstance(v, (int, float, bool, str, tuple))}}
    results = {}
    if task_names:
        print(f"prompts: {'ChatML (chat=True), few-shot as turns, stopping at <|im_end|>' if use_chat else 'plain'}")
        results = run_tasks(make_lm(model, tok, use_chat), task_names, use_chat)
        from lm_eval.utils import make_table
        print(make_table(results))
        report['results'] = results['results']
        report['n-shot'] = results.get('n-shot')
        report['versions'] = results.get('versions')
        if log_samples:
            report['samples'] = write_samples(results.get('samples', {}), output)
            print(f"per-sample logs: {', '.join(report['samples'].values())}")
    if perplexity:
        base = data_dir or state.get('data_dir') or 'data/tokenized'
        held_tokens = val_tokens if val_tokens > 0 else state.get('val_tokens') or 2_000_000
        context = state.get('block_size') or min(model.config.max_seq_len, 4096)  # train.py's validation windows
        report['perplexity'] = {}
        for name in sources:
            folder = os.path.join(base, name)
            if not os.path.isfile(os.path.join(folder, 'manifest.json')):
                print(f"held-out {name}: no prepared data in {folder}, skipped (set data_dir=)")
                continue
            report['perplexity'][name] = held_out_perplexity(model, folder, held_tokens, perplexity_tokens, context)
        for name, values in report['perplexity'].items():
            print(f"held-out {name}: loss {values['loss']:.4f}, perplexity {values['perplexity']:.2f} "
                  f"({values['tokens']:,} tokens)")
    if compare_paper or tasks == 'paper':
        rows = paper_comparison(results, report.get('perplexity', {}))
        report['paper_comparison'] = [dict(zip(('benchmark', 'metric', 'shots', 'ours', 'stderr', 'published',
                                                'difference', 'kind'), row)) for row in rows]
        print_paper_comparison(rows, f"{checkpoint} (step {step})")
    report['wall_time_s'] = time.perf_counter() - start
    with open(f'{output}.tmp', 'w') as f:
        json.dump(report, f, indent=1, default=str)
    os.replace(f'{output}.tmp', output)
    print(f"wall time {report['wall_time_s']:.1f}s -> {output}")


if __name__ == '__main__':
    from configurator import configure
    configure(globals())
    main()
