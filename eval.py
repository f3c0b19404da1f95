"""
Evaluation: lm-evaluation-harness tasks through our own LM wrapper, held-out perplexity, and text samples.

    python eval.py --checkpoint=checkpoints/portable_final.pt --tasks=gsm8k,minerva_math500,mmlu_stem \
                   --output=results/pretrain_eval.json [--limit=10]
    python eval.py --checkpoint=... --tasks= --perplexity=True          # held-out perplexity only
    python eval.py --checkpoint=... --benchmark=True                     # time exact generation, project GSM8K
    python eval.py --checkpoint=hf:tylerxdurden/PolyChromaticLM-1.0-base-0.6B --tasks=paper  # the card, as the author ran it
    python eval.py --checkpoints=checkpoints/snapshots --tasks=arc_easy --output=results/snapshots.json  # each snapshot
    python eval.py lm_eval --model polychromatic --model_args checkpoint=ckpt.pt --tasks gsm8k \
                   --output_path results/ --log_samples    # lm-evaluation-harness's own command line, every flag

Exact under the frozen design. The PolyGLU gate mean-pools the whole sequence, so a padded or batched
forward would change a request's score. Here every request is scored as if it ran alone: requests are
packed, unpadded, into long rows, and cu_seqlens give each one its own attention block and (through
model.wrap_model's segment_pooling) its own gate mean. Batch composition cannot move a score: only float rounding
differs. Generation is exact too: a new token changes the gate mean and so every position's FFN output in
every layer, so no key/value can be reused. Each step runs a full forward of every unfinished sequence, packed
together, and finished sequences drop out. `generation='cached'` trades exactness for speed: it reuses
keys/values and refreshes them with a full forward when any layer's routing moves more than
`refresh_threshold`, and `compare_exact=N` prints how far it strays from exact generation on N requests.

Every answer is appended to a store beside the output as soon as it is computed, keyed by the checkpoint's bytes and
the settings: an interrupted evaluation rerun with the same command computes only the rest.
"""
import collections
import contextlib
import difflib
import glob
import hashlib
import itertools
import json
import math
import os
import re
import sys
import time
from functools import lru_cache, partial

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm
try:
    from lm_eval.api.model import LM
except ImportError:  # the perplexity and the generation benchmark need no harness (gpu-check runs on a stock image)
    LM = object

from configurator import configure, fail
from model import (EOS_ID, PolyGLU, attention_name, count_parameters, cu_seqlens_from_eos, generate_cached,
                   generate_exact, packed_hidden_states, sampler, wrap_model)
from utils import (chatml, checkpoint_tokenizer, command_line, durable_replace, file_digest, fine_tuned, get_tokenizer,
                   git_commit, harness_metrics, held_out_windows, hold_folder, init_wandb, let_go, load_checkpoint,
                   open_chunks, package_versions, plain_config, resolve_device)

# -----------------------------------------------------------------------------
# config
checkpoint = 'checkpoints/portable_final.pt'
checkpoints = ''             # benchmarks over training: a folder (e.g. {out_dir}/snapshots) or a glob of checkpoints, each
                             # evaluated as `checkpoint` would be into {output stem}_checkpoints/, a finished one not
                             # again; the table (output, .csv) and a figure of each metric against step
tasks = 'gsm8k,minerva_math500,mmlu_stem'  # harness task names, comma separated ('' = none; 'paper' = the model card)
num_fewshot = -1             # -1: each task's own default (the harness's, as the author ran them), else N for every task
limit = 0                    # examples per task, 0 = all
include_path = ''            # a folder of your own task YAMLs
output = 'results/eval.json'
chat = None                  # ChatML prompts (few-shot as turns, stop at <|im_end|>); None = True for fine-tuned models
                             # (tasks=paper: plain, as the author scored every model)
log_samples = False          # write every sample (prompt, generation or loglikelihoods, score) beside the results
compare_paper = False        # print the scores beside the author's model card (on with tasks='paper')
paper_model = 'auto'         # the card's 'base' or 'instruct' column; 'auto': from the checkpoint's provenance
paper_routing_seeds = 0      # tasks=paper: also rerun the ten rows under the author's Gumbel routing with N seeds
resume = True                # keep answered requests beside output; the same command rerun skips them
tokenizer = 'auto'           # 'auto': beside the checkpoint, else its data's, else the Qwen3 hub tokenizer; or a path, 'packaged'
batch_tokens = 16_384        # tokens packed into one forward (no padding; the scores do not depend on it)
max_gen_toks = 256           # default cap of generated tokens when a task does not set one
generation = 'exact'         # 'exact' | 'cached' (approximate, faster)
refresh_threshold = 0.05     # cached: full refresh when a routing weight moves more than this
compare_exact = 0            # cached: also generate N requests exactly and print the agreement
perplexity = True            # held-out perplexity per source, when the data is there
perplexity_protocol = 'validation'  # 'validation': train.py's held-out windows | 'author': the card's domain perplexity
data_dir = ''                # '' = the data_dir stored in the checkpoint (train.py's), else data/tokenized
sources = ('math', 'stem', 'code')
val_tokens = -1              # -1 = the held-out size stored in the checkpoint (train.py's val_tokens)
perplexity_tokens = 500_000  # validation: at most this many held-out tokens scored per source
prompt = ''                  # text generation is sample.py's (--prompt=...): here it is one line saying so
benchmark = False            # time exact generation on GSM8K-shaped requests and project the full GSM8K run
benchmark_requests = 16      # benchmark: how many synthetic requests (random tokens, no early stop)
benchmark_prompt_tokens = 850  # a 5-shot GSM8K prompt is about this long with the Qwen3 tokenizer
seed = 1337                  # the benchmark's random requests
device = 'auto'
dtype = 'auto'
attention = 'auto'           # CUDA kernel for packed rows: flash-attn, else torch's varlen_attn, else SDPA per segment
wandb_log = False            # log the results table and every figure of the report to wandb
wandb_project = ''           # '' = the project the checkpoint trained in (its config), else 'polychromatic'
wandb_run_name = ''          # '' = eval-{the checkpoint's file name}
# -----------------------------------------------------------------------------


# -----------------------------------------------------------------------------
# packed, exact forward passes

@contextlib.contextmanager
def whole_row_pooling(model):
    """Within: the frozen whole-row gate mean (training's) on a model wrapped with segment_pooling=True, so a held-out
    window is scored exactly as train.py's validation scores it: document-masked attention, one gate mean per row."""
    wrapping = dict(model.wrapping)
    wrap_model(model, **{**wrapping, 'segment_pooling': False})
    try:
        yield model
    finally:
        wrap_model(model, **wrapping)


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
def score(model, requests, budget, desc='loglikelihood', author=False, noise_seed=None, record=None, progress=None):
    """requests: [(context ids, continuation ids)] -> [(sum log p(continuation | context), is greedy)].
    The harness's input: the last max_seq_len + 1 tokens of context + continuation, minus the last token.
    author=True, the author's wrapper (src/evaluation/model_wrapper.py): the last max_seq_len tokens, the last one
    included, so the mean-pooled gate also sees the final token (a target at position 0 is not scored, as there).
    noise_seed: the author's Gumbel routing (gumbel_routing), seeded per request. record(i, result) is called
    as each pack finishes, progress (a tqdm over requests) is advanced."""
    max_len = model.config.max_seq_len
    inputs, spans = [], []
    for context, continuation in requests:
        continuation = list(continuation) or [EOS_ID]  # the harness never sends an empty one; keep the math defined
        whole = (list(context) + continuation)[-(max_len if author else max_len + 1):]
        first = max(1, len(whole) - len(continuation))  # the first target's index in whole
        inputs.append(whole if author else whole[:-1])
        spans.append((first - 1, whole[first:]))  # (the position that predicts the first target, the targets)
    results = [None] * len(requests)
    own_progress = progress is None
    if own_progress:
        progress = tqdm(total=len(requests), desc=desc, unit='req', disable=len(requests) < 50)
    for group in packs([len(s) for s in inputs], budget):
        seeds = [request_seed(noise_seed, inputs[i]) for i in group] if noise_seed is not None else None
        with gumbel_routing(model, seeds) if seeds else contextlib.nullcontext():
            hidden, offsets = packed_hidden_states(model, [inputs[i] for i in group])
        positions = torch.cat([torch.arange(offsets[k] + spans[i][0], offsets[k] + spans[i][0] + len(spans[i][1]),
                                            device=hidden.device) for k, i in enumerate(group)])
        targets = torch.tensor([t for i in group for t in spans[i][1]], dtype=torch.long, device=hidden.device)
        log_probs, greedy = (t.cpu() for t in target_log_probs(model, hidden, positions, targets))
        first = 0
        for i in group:
            n = len(spans[i][1])
            results[i] = (log_probs[first:first + n].sum().item(), bool(greedy[first:first + n].all()))
            first += n
            if record:
                record(i, results[i])
        progress.update(len(group))
    if own_progress:
        progress.close()
    return results


def stop_index(text, until):
    positions = [text.find(s) for s in until if s and s in text]
    return min(positions) if positions else -1


def cut(text, until):
    index = stop_index(text, until)
    text = text if index < 0 else text[:index]
    return text.replace('<|endoftext|>', '')


def generate_texts(model, tok, prompts, budget, cached=False, desc='generate', record=None, progress=None,
                   pick=sampler()):
    """prompts: [(context ids, until strings, max new tokens)] -> texts, cut at the first stop string: exact
    (model.generate_exact, continuous batching) or, cached=True, model.generate_cached (approximate, one at a time).
    pick: greedy, or one model.sampler per prompt. record(i, text) is called as each request finishes, so an
    interrupted run keeps what it answered."""
    outputs = [None] * len(prompts)
    decode = lambda ids: tok.decode(ids, skip_special_tokens=False)  # noqa: E731
    stop = lambda i, ids: stop_index(decode(ids), prompts[i][1]) >= 0  # noqa: E731
    requests, stats = [(ids, n) for ids, _, n in prompts], {}
    events = (generate_cached(model, requests, refresh_threshold, pick, stop=stop, stats=stats) if cached
              else generate_exact(model, requests, budget, pick, stop=stop))
    own_progress = progress is None
    if own_progress:
        progress = tqdm(total=len(prompts), desc=desc, unit='req', disable=len(prompts) < 8)
    generated, new_tokens, start = [[] for _ in prompts], 0, time.perf_counter()
    for i, token, finished in events:
        if token is not None:
            generated[i].append(token)
            new_tokens += 1
        if finished:
            outputs[i] = cut(decode(generated[i]), prompts[i][1])
            if record:
                record(i, outputs[i])
            progress.update(1)
            progress.set_postfix_str(f'{new_tokens / (time.perf_counter() - start):.1f} new tok/s', refresh=False)
    if own_progress:
        progress.close()
    if cached:
        print(f"cached generation: {stats['refreshes']} refreshes in {stats['cached_steps']} cached steps "
              f"(threshold {refresh_threshold})")
    return outputs


def compare_with_exact(model, tok, prompts, outputs):
    """cached generation: how far it strays from exact generation on these prompts."""
    start = time.perf_counter()
    exact = generate_texts(model, tok, prompts, batch_tokens, desc='generate (exact check)')
    agreement = [a == b for a, b in zip(outputs, exact)]
    same_tokens = [sum(x == y for x, y in zip(tok.encode(a).ids, tok.encode(b).ids)) /
                   max(1, len(tok.encode(b).ids)) for a, b in zip(outputs, exact)]
    print(f"cached vs exact on {len(exact)} requests: {100 * np.mean(agreement):.1f}% identical outputs, "
          f"{100 * np.mean(same_tokens):.1f}% of tokens agree position by position, so a score on these "
          f"requests moves by at most {100 * (1 - np.mean(agreement)):.1f} points "
          f"(exact took {time.perf_counter() - start:.1f}s)")


# -----------------------------------------------------------------------------
# the answers store: an interrupted evaluation continues

def weights_digest(state):
    """The sha256 of the checkpoint file that was loaded, hashed once (a second for 1.2 GB): the answer store, the
    report and the harness's record all name the weights by it."""
    if 'file_sha256' not in state:
        state['file_sha256'] = file_digest(state['file'])
    return state['file_sha256']


def answers_path(state, tok, settings):
    """Where the answers of this model under these settings are kept: <output>_answers/<hash>.jsonl. The hash covers the
    checkpoint's bytes, the tokenizer and every setting that moves an answer, so nothing else ever reuses them."""
    identity = {'checkpoint': weights_digest(state), 'tokenizer': hashlib.sha256(tok.to_str().encode()).hexdigest(),
                **settings}
    key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:20]
    return os.path.join(os.path.splitext(output)[0] + '_answers', f'{key}.jsonl')


def read_answers(path):
    """{request key: answer} from the lines a run appended to `path`. A line cut short by a kill is cut off the file,
    so the next append starts a line of its own."""
    if not os.path.exists(path):
        return {}
    with open(path, 'rb+') as f:
        data = f.read()
        whole = data.rfind(b'\n') + 1
        if whole < len(data):
            f.truncate(whole)
    answers = {}
    for line in data[:whole].splitlines():
        try:
            record = json.loads(line)
            answers[record['key']] = record['value']
        except (ValueError, KeyError, TypeError):
            continue  # a damaged line: that request is answered again
    return answers


def valid_answer(kind, value):
    """Whether a stored answer has the form its kind returns: a finite log-likelihood <= 0 (loglikelihood's with whether
    the continuation is greedy), or a generated string. A damaged store's others are computed again."""
    def log_likelihood(x):
        return isinstance(x, (int, float)) and not isinstance(x, bool) and -math.inf < x <= 0
    if kind == 'generate_until':
        return isinstance(value, str)
    if kind == 'loglikelihood':
        return isinstance(value, list) and len(value) == 2 and log_likelihood(value[0]) and isinstance(value[1], bool)
    return log_likelihood(value)


# -----------------------------------------------------------------------------
# the harness wrapper and its command line

GENERATION_KEYS = ('until', 'max_gen_toks', 'do_sample', 'temperature', 'top_k')
NEUTRAL_GENERATION = {'top_p': 1.0, 'num_beams': 1, 'num_return_sequences': 1}  # values that ask for nothing else
# eval.py's keys that --model_args sets on the lm_eval command line ('pretrained': checkpoint, as lm-eval spells it; it
# also names --output_path's subfolder after the weights)
MODEL_ARGS = ('checkpoint', 'pretrained', 'dtype', 'device', 'attention', 'tokenizer', 'batch_tokens', 'max_gen_toks',
              'generation', 'refresh_threshold', 'seed')


def sampling(kwargs):
    """A request's generation arguments -> (temperature, top_k): (0, 0) is greedy. As Hugging Face's generate reads
    them: sampling only with do_sample=True, at temperature 1 and over the whole vocabulary unless they say otherwise.
    Anything this cannot honour stops the run in one line naming it."""
    for key, value in kwargs.items():
        if key not in GENERATION_KEYS and NEUTRAL_GENERATION.get(key, object()) != value:
            fail(f"generation argument {key}={value!r} cannot be honoured here (only {', '.join(GENERATION_KEYS)}): "
                 "drop it from --gen_kwargs or the task's generation_kwargs")
    temperature, top_k = float(kwargs.get('temperature', 1.0)), int(kwargs.get('top_k') or 0)
    if not kwargs.get('do_sample'):
        if temperature > 0 and 'temperature' in kwargs or top_k:
            fail(f"generation arguments temperature={kwargs.get('temperature')}, top_k={kwargs.get('top_k')} without "
                 "do_sample=True would decode greedily and score it as sampled: add do_sample=True, or drop them")
        return 0.0, 0
    if temperature < 0 or top_k < 0:
        fail(f"generation arguments temperature={temperature} and top_k={top_k} must not be negative")
    return temperature, top_k


def check_model_args(arguments):
    for key in arguments:
        if key not in MODEL_ARGS:
            fail(f"--model_args {key}= is not a setting of the polychromatic model; it takes {', '.join(MODEL_ARGS)}")


class HarnessLM(LM):
    """lm-evaluation-harness LM around the project's own model (no Hugging Face model classes): eval.py's own runs and
    the `lm_eval` command line (`python eval.py lm_eval --model polychromatic ...`) both score through it. With chat,
    the harness renders prompts through apply_chat_template (few-shot examples as turns) and generation also stops at
    <|im_end|>, which ends every assistant turn in SFT. store: a jsonl path where every answer is appended as soon as
    it is computed and read back first, so an interrupted evaluation rerun continues where it stopped (the command
    line's --use_cache does the same through the harness's cache hook). author: score loglikelihoods as the author's
    wrapper did (score)."""

    tokenizer_name = 'Qwen3-chatml'

    def __init__(self, model, tok, chat=False, store=None, author=False, info=None):
        super().__init__()
        self.model, self.tok, self.chat, self.author, self.info = model, tok, chat, author, info or {}
        self.noise_seed = None  # the author's Gumbel routing under this seed (paper_routing_seeds), None: deterministic
        self.answers = read_answers(store) if store else {}
        self.stored, self.answered = len(self.answers), 0  # answered: read back from the store, this process
        if store:
            os.makedirs(os.path.dirname(store), exist_ok=True)
        self.file = open(store, 'a') if store else None

    @classmethod
    def create_from_arg_string(cls, arg_string, additional_config=None):
        from lm_eval.utils import simple_parse_args_string
        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict, additional_config=None):
        """--model_args checkpoint=...,dtype=...: eval.py's own keys (MODEL_ARGS), checked as its command line checks
        them; the harness's --device too (its default, cuda:0, is our 'auto': the GPU where there is one). Its
        --batch_size has no say: requests are packed by batch_tokens."""
        arguments = dict(arg_dict)
        if (additional_config or {}).get('device') not in (None, 'cuda:0') and 'device' not in arguments:
            arguments['device'] = additional_config['device']
        check_model_args(arguments)
        if 'pretrained' in arguments:
            arguments['checkpoint'] = arguments.pop('pretrained')
        configure(globals(), [f'--{key}={value}' for key, value in arguments.items()])
        model, state = load_for_evaluation()
        return cls(model, get_tokenizer(checkpoint_tokenizer(state, tokenizer), model.config.vocab_size), chat=False,
                   info=state)

    def get_model_info(self):
        """What the harness records under config: the weights, by file and digest."""
        if not self.info.get('file'):
            return {}
        return {'checkpoint': checkpoint, 'checkpoint_sha256': weights_digest(self.info),
                'step': self.info.get('step'), 'tau': self.info.get('tau'), 'model_config': self.info.get('model_config')}

    def apply_chat_template(self, chat_history, add_generation_prompt=True):
        self.chat = True  # ChatML prompts: generation stops at <|im_end|> too
        return chatml(chat_history, add_generation_prompt)

    def chat_template(self, chat_template=False):
        return 'chatml' if chat_template else ''

    def answer(self, kind, requests, compute):
        """Answers in request order: those in the store are read, compute(todo, record, progress) does the rest. The
        n-th copy of a sampled request (a task's repeats) is a request of its own."""
        copies, keys = collections.Counter(), []
        for request in requests:
            identity = [kind, request.args, self.author, self.noise_seed]
            if kind == 'generate_until' and sampling(request.args[1])[0] > 0:
                args = json.dumps(request.args, sort_keys=True, default=str)
                copies[args] += 1
                identity.append(copies[args])
            keys.append(hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest())
        malformed = {key for key in keys if key in self.answers and not valid_answer(kind, self.answers[key])}
        if malformed:
            print(f"{len(malformed):,} stored {kind} answers are malformed (a damaged store): computed again")
            for key in malformed:
                del self.answers[key]
        todo = [i for i, key in enumerate(keys) if key not in self.answers]
        self.answered += len(requests) - len(todo)
        progress = tqdm(total=len(requests), initial=len(requests) - len(todo), unit='req', desc=kind)

        def record(j, value):
            request = requests[todo[j]]
            self.answers[keys[todo[j]]] = value
            self.cache_hook.add_partial(kind, request.args, value)  # --use_cache: kept as it comes, not at the end
            if self.file:
                self.file.write(json.dumps({'key': keys[todo[j]], 'value': value}) + '\n')
                self.file.flush()  # in the OS's hands: a killed process loses nothing it recorded
        if todo:
            compute(todo, record, progress, keys)
        progress.close()
        return [self.answers[key] for key in keys]

    def close(self):
        if self.file:
            self.file.close()

    def loglikelihood(self, requests, disable_tqdm=False):
        def compute(todo, record, progress, keys):
            pairs = []
            for i in todo:
                context, continuation = requests[i].args
                context_ids = self.tok.encode(context, add_special_tokens=False).ids if context else [EOS_ID]
                pairs.append((context_ids, self.tok.encode(continuation, add_special_tokens=False).ids))
            score(self.model, pairs, batch_tokens, author=self.author, noise_seed=self.noise_seed, record=record,
                  progress=progress)
        return [tuple(answer) for answer in self.answer('loglikelihood', requests, compute)]

    def loglikelihood_rolling(self, requests, disable_tqdm=False):
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        def compute(todo, record, progress, keys):
            pieces, owner = [], []
            for j, i in enumerate(todo):
                ids = self.tok.encode(requests[i].args[0], add_special_tokens=False).ids
                for window in get_rolling_token_windows(token_list=ids, prefix_token=EOS_ID,
                                                        max_seq_len=self.model.config.max_seq_len, context_len=1):
                    pieces.append(make_disjoint_window(window))
                    owner.append(j)
            totals, left = [0.0] * len(todo), collections.Counter(owner)

            def add(piece, result):  # a request is recorded once all its windows are scored
                j = owner[piece]
                totals[j] += result[0]
                left[j] -= 1
                if not left[j]:
                    record(j, totals[j])
                    progress.update(1)
            score(self.model, pieces, batch_tokens, 'loglikelihood_rolling', author=self.author,
                  noise_seed=self.noise_seed, record=add, progress=tqdm(disable=True))
        return self.answer('loglikelihood_rolling', requests, compute)

    def generate_until(self, requests, disable_tqdm=False):
        def compute(todo, record, progress, keys):
            prompts, picks = [], []
            for i in todo:
                context, kwargs = requests[i].args
                until = kwargs.get('until', [])
                until = ([until] if isinstance(until, str) else list(until)) + (['<|im_end|>'] if self.chat else [])
                prompts.append((self.tok.encode(context, add_special_tokens=False).ids, until,
                                int(kwargs.get('max_gen_toks', max_gen_toks))))
                # sample.py's sampler, seeded by the request (and its copy number): its draws do not depend on what
                # it is batched with, nor on a resume
                picks.append(sampler(*sampling(kwargs), seed=int(keys[i][:15], 16) ^ seed))
            outputs = generate_texts(self.model, self.tok, prompts, batch_tokens, generation == 'cached',
                                     record=record, progress=progress, pick=picks)
            if generation == 'cached' and compare_exact:
                compare_with_exact(self.model, self.tok, prompts[:compare_exact], outputs)
        return self.answer('generate_until', requests, compute)


def harness_command_line(arguments):
    """`python eval.py lm_eval ARGS`: lm-evaluation-harness's own command line, every flag of it (--output_path,
    --log_samples, --use_cache, --wandb_args, --hf_hub_log_args, --gen_kwargs ...), with this model registered as
    `polychromatic` (lm-eval cannot import a model from another module by itself: its issues #1457, #1621). Parsed by
    the harness's own parser; then a wrong --model_args key stops it at once, and when every task is one of
    --include_path's, only that folder is indexed (task_index), not the harness's ~12,000 task files."""
    if LM is object:
        fail("`eval.py lm_eval` is lm-evaluation-harness's command line, which is not installed: pip install -r "
             "requirements.txt")
    import lm_eval.tasks
    from lm_eval._cli import HarnessCLI
    from lm_eval.api.registry import register_model
    from lm_eval.utils import setup_logging
    register_model('polychromatic')(HarnessLM)
    sys.argv = ['lm_eval', *arguments]
    setup_logging()
    parser = HarnessCLI()
    args = parser.parse_args()
    if getattr(args, 'model', None) == 'polychromatic':
        check_model_args(getattr(args, 'model_args', None) or {})
    tasks, folder, index = getattr(args, 'tasks', None), getattr(args, 'include_path', None), lm_eval.tasks.TaskManager
    if tasks and folder and set(tasks) <= set(task_index(folder, defaults=False).all_tasks):
        lm_eval.tasks.TaskManager = partial(index, include_defaults=False)
    try:
        parser.execute(args)
    finally:
        lm_eval.tasks.TaskManager = index


# -----------------------------------------------------------------------------
# tasks

@lru_cache(maxsize=4)
def task_index(path, defaults=True):
    """The harness's TaskManager: indexing its ~12,000 task files takes ~9 s, so a process indexes each path once.
    Without the defaults, only include_path's tasks."""
    from lm_eval.tasks import TaskManager
    return TaskManager(include_path=path or None, include_defaults=defaults)


def task_manager(task_names):
    """The harness's task index (with include_path; only include_path's tasks when every name is one of them); an
    unknown name is one line with the nearest ones."""
    manager = task_index(include_path, defaults=not include_path)
    if not set(task_names) <= set(manager.all_tasks):
        manager = task_index(include_path)
    known = set(manager.all_tasks)
    for name in task_names:
        if name not in known:
            near = difflib.get_close_matches(name, known, n=3)
            fail(f"unknown task '{name}'" + (f"; did you mean {', '.join(near)}?" if near else
                                               "; `lm-eval ls tasks` lists them, include_path= adds your own"))
    return manager


UNREACHABLE = ('DatasetNotFoundError', 'LocalEntryNotFoundError', 'OfflineModeIsEnabled', 'HfHubHTTPError',
               'RepositoryNotFoundError', 'GatedRepoError')


def evaluate_task(lm, manager, task, shots=None, chat=False, samples=False):
    """One harness run of one task, at `shots` or (None) the task's own default. With chat, prompts go through the LM's
    chat template with few-shot examples as turns; answers are extracted by the task's own filters either way. A
    dataset that cannot be fetched ends the run with one line naming the task, the dataset and the fix."""
    import lm_eval
    try:
        return lm_eval.simple_evaluate(model=lm, tasks=[task], num_fewshot=shots, limit=limit or None,
                                       task_manager=manager, log_samples=samples, apply_chat_template=chat,
                                       fewshot_as_multiturn=chat, random_seed=seed, numpy_random_seed=seed,
                                       torch_random_seed=seed, fewshot_random_seed=seed)
    except Exception as e:
        chain = [e, e.__cause__, e.__context__]
        if not any(isinstance(x, (ConnectionError, TimeoutError, FileNotFoundError)) or
                   type(x).__name__ in UNREACHABLE for x in chain if x is not None):
            raise
        entry = manager.task_index.get(task)
        named = re.search(r"'([^' ]*/[^' ]*)'", str(e))
        dataset = named.group(1) if named else (entry and (entry.cfg or {}).get('dataset_path')) or 'its dataset'
        fail(f"task {task}: its data ({dataset}) cannot be fetched ({type(e).__name__}); run once online to fill the "
             f"Hugging Face cache, or set HF_DATASETS_OFFLINE=1 to use a cached copy")


TASK_KEYED = ('results', 'groups', 'group_subtasks', 'configs', 'versions', 'n-shot', 'higher_is_better', 'n-samples',
              'samples')


def merge_results(merged, results, suffix=''):
    """One harness result dict into the run's; with a suffix ('@5-shot'), under renamed tasks, so the same task at
    another shot count sits beside the first."""
    for key, value in results.items():
        if key in TASK_KEYED and isinstance(value, dict):
            renamed = {name + suffix: value for name, value in value.items()}
            if key == 'group_subtasks':
                renamed = {name: [task + suffix for task in tasks] for name, tasks in renamed.items()}
            merged.setdefault(key, {}).update(renamed)
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
        durable_replace(paths[task] + '.tmp', paths[task])
    return paths


def run_tasks(model, state, tok, task_names, paper, use_chat, scoring, report):
    """The harness tasks (with tasks=paper, the author's protocol and its noisy-routing repeats), each finished task and
    its samples written at once; answers kept in a store that a rerun of the same command reuses. -> results."""
    results = {}
    print(f"prompts: {'ChatML (chat=True), few-shot as turns, stopping at <|im_end|>' if use_chat else 'plain'}; "
          f"scoring: {scoring}" + (" (the author's wrapper: tasks=paper)" if paper else ''))
    store = None
    if resume:
        store = answers_path(state, tok, {'dtype': dtype, 'device': device.split(':')[0],
                                          'attention': attention_name(model), 'generation': generation,
                                          'refresh_threshold': refresh_threshold if generation == 'cached' else None,
                                          'max_gen_toks': max_gen_toks})
    lm = HarnessLM(model, tok, use_chat, store, author=paper, info=state)
    if store:
        print(f"answers kept in {store} ({lm.stored:,} there; the same command rerun reuses them)")
    manager = task_manager(task_names)
    runs = [(task, None if num_fewshot < 0 else num_fewshot, '') for task in task_names]
    if paper:
        runs += [(task, shots, f'@{shots}-shot') for task, shots in PAPER_STATED_SHOTS.items()]
    try:
        for task, shots, suffix in runs:
            run = evaluate_task(lm, manager, task, shots, use_chat, log_samples)
            if log_samples:
                report.setdefault('samples', {}).update(
                    write_samples({name + suffix: records for name, records in run.pop('samples', {}).items()},
                                  output))
            merge_results(results, run, suffix)
            report.update({key: value for key, value in results.items() if key != 'samples'})  # all the harness's
            write_report(report)  # a finished task and its samples are on disk at once
        if paper and paper_routing_seeds:
            report['paper_routing'] = {'seeds': paper_routing_seeds, 'results': {}}
            for noise_seed in range(paper_routing_seeds):
                lm.noise_seed = noise_seed
                for task in task_names:
                    run = evaluate_task(lm, manager, task, None, use_chat)
                    report['paper_routing']['results'].setdefault(task, []).append(run['results'][task])
                    write_report(report)
            lm.noise_seed = None
    finally:
        lm.close()
    report['answers_reused'] = lm.answered
    if lm.answered:
        print(f"{lm.answered:,} requests answered from {store}, not recomputed")
    from lm_eval.utils import make_table
    print(make_table(results))
    if log_samples:
        print(f"per-sample logs: {', '.join(report['samples'].values())}")
    return results


# -----------------------------------------------------------------------------
# held-out perplexity and the generation benchmark

@torch.no_grad()
def held_out_perplexity(model, folder, held_tokens, max_tokens, context):
    """Token-level loss and perplexity over the held-out end of a source, scored as train.py's validation scores it:
    windows of `context` + 1 tokens from the start of the held-out slice, `context` apart, each row alone with its
    documents masked from each other in attention (cu_seqlens from EOS) and the frozen whole-row gate mean. On the
    same windows the loss equals train.py's validation loss."""
    chunks, _ = open_chunks(folder, EOS_ID, model.config.vocab_size)
    _, windows = held_out_windows(chunks, held_tokens, context, max(1, max_tokens // context))
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
    return {'protocol': 'validation', 'loss': loss, 'perplexity': math.exp(loss), 'tokens': count,
            'windows': len(windows), 'context': context}


def domain_perplexity(model, state):
    """Perplexity per source under perplexity_protocol -> {source: result}; a source without data is skipped, said."""
    base = data_dir or state.get('data_dir') or 'data/tokenized'
    held_tokens = val_tokens if val_tokens > 0 else state.get('val_tokens') or 2_000_000
    context = state.get('block_size') or min(model.config.max_seq_len, 4096)  # train.py's validation windows
    if perplexity_protocol == 'author' and dtype != 'bfloat16':
        print(f"perplexity: the author's protocol ran bf16 weights; this runs {dtype} (--dtype=bfloat16 for theirs)")
    perplexities = {}
    for name in sources:
        folder = os.path.join(base, name)
        if not os.path.isfile(os.path.join(folder, 'manifest.json')):
            print(f"held-out {name}: no prepared data in {folder}, skipped (set data_dir=)")
            continue
        if perplexity_protocol == 'validation':
            perplexities[name] = held_out_perplexity(model, folder, held_tokens, perplexity_tokens, context)
        elif (result := author_perplexity(model, folder, model.config.max_seq_len)) is None:
            print(f"{name}: no chunk in {folder} holds two windows of {model.config.max_seq_len + 1} tokens, skipped "
                  "(the author's protocol needs one)")
        else:
            perplexities[name] = result
    for name, values in perplexities.items():
        where = (f"the author's protocol: {values['windows']} windows of {values['context']} in {values['chunk']}"
                 if values['protocol'] == 'author' else "train.py's validation windows")
        print(f"{name} perplexity: loss {values['loss']:.4f}, perplexity {values['perplexity']:.2f} "
              f"({values['tokens']:,} tokens; {where})")
    return perplexities


def generation_flops(model, prompt_tokens, new_tokens):
    """Forward FLOPs of exact generation of one request: step t runs all prompt + t tokens through the blocks
    (2 x non-embedding parameters each, plus causal attention 2 * n_layers * d * length) and the head once."""
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
    generate_texts(model, Silent, prompts, batch_tokens, desc='benchmark')
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


# -----------------------------------------------------------------------------
# one checkpoint's report, and benchmarks over training

def harness_version():
    return package_versions()['lm_eval']


def write_report(report):
    with open(f'{output}.tmp', 'w') as f:
        json.dump(report, f, indent=1, default=str)
    durable_replace(f'{output}.tmp', output)


def load_for_evaluation():
    """The checkpoint on the device, at the dtype, packed and exact (wrap_model's segment_pooling) -> (model, its info)."""
    global device, dtype
    device, dtype = resolve_device(device, dtype)
    model, state = load_checkpoint(checkpoint)
    model = model.to(device=device, dtype=torch.bfloat16 if dtype == 'bfloat16' else torch.float32).eval()
    wrap_model(model, attention=attention, segment_pooling=True)
    print(f"{checkpoint} ({state['format']}): {model.config.model_type}, step {state['step']}, tau {state['tau']} | "
          f"{device} {dtype} | attention {attention_name(model)}")
    return model, state


def evaluate_checkpoint(task_names, with_wandb):
    """`checkpoint` evaluated as configured, its report written to `output`."""
    paper = tasks == 'paper'
    model, state = load_for_evaluation()
    step, tau = state['step'], state['tau']
    # started before the work, so that a missing login stops the run now, not after hours of evaluation
    wandb_run = init_wandb(with_wandb and not benchmark, wandb_project, wandb_run_name, globals(), 'eval', state)
    if benchmark:  # random token ids: no tokenizer needed (gpu-check runs it on a machine without one)
        run_benchmark(model)
        return
    tok = get_tokenizer(checkpoint_tokenizer(state, tokenizer), model.config.vocab_size) if task_names else None

    start = time.perf_counter()
    sft_model = fine_tuned(state, checkpoint)
    column = paper_model if paper_model != 'auto' else 'instruct' if sft_model else 'base'
    use_chat = (sft_model and not paper) if chat is None else bool(chat)
    scoring = 'author' if paper else 'harness'
    report = {'checkpoint': checkpoint, 'file': state['file'], 'command': command_line(), 'format': state['format'],
              'step': step, 'tau': tau, 'tokens': state.get('tokens'), 'checkpoint_sha256': weights_digest(state),
              'model_config': state['model_config'], 'chat': use_chat, 'scoring': scoring, 'complete': False,
              'eval_config': plain_config(globals()), 'lm_eval_version': harness_version(),
              'git': git_commit(), 'library_versions': package_versions()}
    results = run_tasks(model, state, tok, task_names, paper, use_chat, scoring, report) if task_names else {}
    if perplexity:
        report['perplexity'] = domain_perplexity(model, state)
    if compare_paper or paper:
        report['paper'] = paper_comparison(results, report.get('perplexity', {}), column,
                                           'ChatML' if use_chat else 'plain', scoring, report.get('paper_routing'))
        print_paper_comparison(report['paper'], f"{checkpoint} (step {step})")
    report['wall_time_s'] = time.perf_counter() - start
    report['complete'] = True
    write_report(report)
    print(f"wall time {report['wall_time_s']:.1f}s -> {output}")
    if wandb_run:
        log_to_wandb(wandb_run, report)


def result_rows(report):
    """[task, metric, filter, value, stderr] for every harness figure and held-out perplexity of a report."""
    rows = [list(figure) for figure in harness_metrics(report.get('results', {}))]
    rows += [[f'{name} held-out', 'perplexity', values['protocol'], values['perplexity'], None]
             for name, values in report.get('perplexity', {}).items()]
    return rows


def log_to_wandb(run, report):
    """The results as a wandb table and as the run's summary."""
    rows = result_rows(report)
    import wandb
    run.log({'eval/results': wandb.Table(columns=['task', 'metric', 'filter', 'value', 'stderr'], data=rows)})
    run.summary.update({f'eval/{task}/{metric},{filter_name}': value for task, metric, filter_name, value, _ in rows})
    run.summary.update({'eval/step': report['step'], 'eval/checkpoint': report['checkpoint']})
    run.finish()


SWEEP_KEYS = ('checkpoint', 'checkpoints', 'output', 'wandb_log', 'wandb_project', 'wandb_run_name')  # not the answers'


def sweep(task_names):
    """Every checkpoint of `checkpoints`, in step order, evaluated alike: each report in {output stem}_checkpoints/
    (answers kept beside it: an interrupted sweep resumes, and a finished checkpoint with the same settings and bytes
    is read, not redone); then one table of every metric against step (output, and a .csv) and one figure."""
    global checkpoint, output, device, dtype
    device, dtype = resolve_device(device, dtype)  # as each report records them
    paths = sorted(glob.glob(os.path.join(checkpoints, '*.pt')) + glob.glob(os.path.join(checkpoints, '*.safetensors'))
                   if os.path.isdir(checkpoints) else glob.glob(checkpoints), key=checkpoint_order)
    if not paths:
        fail(f"checkpoints={checkpoints!r}: no .pt or .safetensors there (train.py --snapshot_interval=N writes "
             "{out_dir}/snapshots/)")
    table_output, folder = output, os.path.splitext(output)[0] + '_checkpoints'
    os.makedirs(folder, exist_ok=True)
    settings = json.loads(json.dumps({key: value for key, value in plain_config(globals()).items()
                                      if key not in SWEEP_KEYS}, default=str))  # as a report holds them
    name = wandb_run_name or f'eval-{os.path.basename(os.path.normpath(checkpoints))}'
    wandb_run = init_wandb(wandb_log, wandb_project, name, globals(), 'eval',
                           load_checkpoint(paths[-1])[1] if wandb_log else None)  # the project it trained in
    reports = []
    try:
        for i, path in enumerate(paths):
            checkpoint, output = path, os.path.join(folder, f'{os.path.splitext(os.path.basename(path))[0]}.json')
            print(f"[{i + 1}/{len(paths)}] {path} -> {output}")
            report = json.load(open(output)) if os.path.isfile(output) else {}
            if not (report.get('complete') and report.get('checkpoint_sha256') == file_digest(path) and {
                    k: v for k, v in report['eval_config'].items() if k not in SWEEP_KEYS} == settings):
                evaluate_checkpoint(task_names, False)
                report = json.load(open(output))
            else:
                print(f"evaluated already with these settings: {output} read, not redone")
            reports.append(report)
    finally:
        checkpoint, output = paths[0], table_output
    reports.sort(key=lambda report: report['step'])
    table = {'checkpoints': [{key: report.get(key) for key in ('checkpoint', 'step', 'tokens', 'tau')}
                             for report in reports], 'metrics': {}, 'command': command_line(), 'eval_config': settings}
    for j, report in enumerate(reports):
        for task, metric, filter_name, value, stderr in result_rows(report):
            series = table['metrics'].setdefault(f"{task} {metric}" + (f" ({filter_name})" if filter_name not in (
                'none', 'validation') else ''), {'value': [None] * len(reports), 'stderr': [None] * len(reports)})
            series['value'][j], series['stderr'][j] = value, stderr
    write_report(table)
    with open(f'{os.path.splitext(output)[0]}.csv', 'w') as f:
        f.write(','.join(['step', 'tokens', 'checkpoint', *table['metrics']]) + '\n')
        for j, entry in enumerate(table['checkpoints']):
            values = [series['value'][j] for series in table['metrics'].values()]
            f.write(','.join(map(str, [entry['step'], entry['tokens'] or '', entry['checkpoint'], *values])) + '\n')
    figure = over_training_figure(table)
    print('step     ' + ' | '.join(table['metrics']))
    for j, entry in enumerate(table['checkpoints']):
        print(f"{entry['step']:<8} " + ' | '.join(f"{series['value'][j]:.4g}" if series['value'][j] is not None
                                                  else '-' for series in table['metrics'].values()))
    print(f"{len(reports)} checkpoints -> {output}, {os.path.splitext(output)[0]}.csv, {figure}")
    if wandb_run:
        import wandb
        rows = [[entry['step'], name, series['value'][j]] for name, series in table['metrics'].items()
                for j, entry in enumerate(table['checkpoints'])]
        wandb_run.log({'eval/over_training': wandb.Table(columns=['step', 'metric', 'value'], data=rows),
                       'eval/over_training_figure': wandb.Image(figure)})
        wandb_run.finish()


def checkpoint_order(path):
    """Numbered files by their number, a final one last (the step itself is known once loaded)."""
    name = os.path.basename(path)
    return 'final' in name, int(''.join(c for c in name if c.isdigit()) or -1), name


def over_training_figure(table):
    """One panel per metric against step (error bars: the harness's stderr)."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    steps = [entry['step'] for entry in table['checkpoints']]
    columns = min(4, max(1, len(table['metrics'])))
    rows = max(1, -(-len(table['metrics']) // columns))
    fig, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.2 * rows), squeeze=False)
    for ax, (name, series) in zip(axes.flat, table['metrics'].items()):
        values = [np.nan if v is None else v for v in series['value']]
        errors = [0 if e is None else e for e in series['stderr']]
        ax.errorbar(steps, values, yerr=errors, marker='o', capsize=3)
        ax.set(xlabel='step', title=name)
        ax.title.set_fontsize(9)
    for ax in list(axes.flat)[len(table['metrics']):]:
        ax.axis('off')
    fig.tight_layout()
    path = f'{os.path.splitext(output)[0]}_over_training.png'
    fig.savefig(path, dpi=150)
    plt.close(fig)
    return path


# =============================================================================
# The author's protocol: the model card's numbers, scored as the author's scripts scored them (tasks=paper,
# perplexity_protocol='author', paper_routing_seeds)
# =============================================================================

# The model cards (lm-eval 0.4.11; paper_reporting/base_pretrained__performance.md and sft__performance.md in
# danielxmed/PolyGLU): (task, the author's metric, base, instruct), in percent. Every task ran at the harness's default
# shots (scripts/run_*_eval.sh pass no --num-fewshot): 0 for all ten, MMLU-STEM included, though the card says 5-shot.
PAPER = [('hellaswag', 'acc_norm', 28.51, 27.84), ('arc_easy', 'acc_norm', 41.04, 36.11),
         ('arc_challenge', 'acc_norm', 22.27, 24.15), ('piqa', 'acc_norm', 58.87, 54.52),
         ('winogrande', 'acc', 52.17, 52.72), ('boolq', 'acc', 61.13, 55.63), ('mmlu_stem', 'acc', 25.28, 28.42),
         ('lambada_openai', 'acc', 15.35, 7.01), ('openbookqa', 'acc_norm', 29.00, 26.80),
         ('sciq', 'acc_norm', 61.20, 52.70)]
PAPER_STATED_SHOTS = {'mmlu_stem': 5}  # what the card says was run, also scored and labelled as such
PAPER_LAMBADA_PERPLEXITY = {'base': 911.8, 'instruct': None}
PAPER_PERPLEXITY = {'base': {'math': 3.56, 'code': 7.08, 'stem': 31.93}, 'instruct': {}}
AUTHOR_WINDOWS, AUTHOR_MIN_CHUNK = 244, 100_000  # src/evaluation/domain_perplexity.py


@contextlib.contextmanager
def gumbel_routing(model, seeds):
    """Within: PolyGLU routes as the author's class ran at evaluation (gumbel_softmax with no train/eval switch):
    softmax((logits + G) / tau), G ~ Gumbel(0, 1). seeds: one per segment of the next forward, each its own generator,
    so a segment draws what it would alone in train mode after torch.manual_seed(seed), whatever it is packed with."""
    device = model.embeddings.weight.device
    generators = [torch.Generator(device).manual_seed(int(seed)) for seed in seeds]

    def noisy(ffn):
        turns = itertools.cycle(generators)

        def routing_weights(logits):  # torch's gumbel_softmax, hard=False, with the segment's own generator
            gumbels = -torch.empty_like(logits).exponential_(generator=next(turns)).log()
            return torch.softmax((logits + gumbels) / ffn.tau, dim=-1)
        return routing_weights

    polyglus = [m for m in model.modules() if isinstance(m, PolyGLU)]
    for m in polyglus:
        m.routing_weights = noisy(m)
    try:
        yield model
    finally:
        for m in polyglus:
            del m.routing_weights  # the class's deterministic routing again


def request_seed(noise_seed, ids):
    """The Gumbel seed of one request under noise seed N: a hash of its tokens, so its noise does not depend on what it
    is packed with, nor on whether an interrupted run already answered its neighbours."""
    digest = hashlib.blake2b(np.asarray(ids, dtype=np.int64).tobytes(), digest_size=7, key=str(noise_seed).encode())
    return int.from_bytes(digest.digest(), 'little')


def percent(value):
    return None if value is None or value == 'N/A' else 100 * value


def task_shots(results, name):
    """The shots the harness ran a task (or a group, through its subtasks) at."""
    shots = results.get('n-shot', {})
    counts = {shots.get(task) for task in results.get('group_subtasks', {}).get(name, [])} - {None}
    return shots.get(name, counts.pop() if len(counts) == 1 else None)


def paper_comparison(results, perplexity, column, prompts, scoring, routing=None):
    """The model card's figures beside ours -> {'rows': [...], 'mean': {...}, 'notes': [...]}. Every row says its
    metric, shots, prompt format and scoring; routing: {'seeds': N, 'results': {task: [results of seed k]}} adds the
    mean and spread under the author's Gumbel routing."""
    rows = []
    tasks_results = results.get('results', {})
    as_run = "the author's" if scoring == 'author' and prompts == 'plain' else f"ours: {scoring} scoring, {prompts}"

    def add(benchmark, metric, ours, stderr, card, protocol, task=None, kind='loglikelihood'):
        row = {'benchmark': benchmark, 'metric': metric, 'shots': task_shots(results, task) if task else None,
               'prompts': prompts if task else None, 'scoring': scoring if task else None, 'protocol': protocol,
               'ours': ours, 'stderr': stderr, 'card': card,
               'difference': None if ours is None or card is None else ours - card, 'kind': kind}
        if routing and task in routing['results']:
            scale = (lambda v: v) if metric == 'perplexity' else percent
            values = [scale(r.get(f'{metric},none')) for r in routing['results'][task]]
            if values and None not in values:
                row.update(noisy_mean=float(np.mean(values)), noisy_std=float(np.std(values, ddof=1)) if
                           len(values) > 1 else 0.0, noisy_values=values)
        rows.append(row)

    for task, metric, base, instruct in PAPER:
        card = instruct if column == 'instruct' else base
        values = tasks_results.get(task, {})
        add(task, metric, percent(values.get(f'{metric},none')), percent(values.get(f'{metric}_stderr,none')), card,
            as_run, task)
        if task in PAPER_STATED_SHOTS:
            label = f'{task}@{PAPER_STATED_SHOTS[task]}-shot'
            values = tasks_results.get(label, {})
            add(label, metric, percent(values.get(f'{metric},none')), percent(values.get(f'{metric}_stderr,none')),
                card, "the card's stated shots", label)
    lambada = tasks_results.get('lambada_openai', {})
    add('lambada_openai', 'perplexity', lambada.get('perplexity,none'), lambada.get('perplexity_stderr,none'),
        PAPER_LAMBADA_PERPLEXITY[column], as_run, 'lambada_openai' if lambada else None)
    for name, values in perplexity.items():
        add(f'{name} perplexity', 'perplexity', values.get('perplexity'), None, PAPER_PERPLEXITY[column].get(name),
            "the author's" if values.get('protocol') == 'author' else "ours: train.py's validation", kind='perplexity')
    ten = [row for row in rows if row['protocol'] == as_run and row['metric'] != 'perplexity']
    mean = {'card': float(np.mean([row['card'] for row in ten])),
            'ours': float(np.mean([row['ours'] for row in ten])) if all(r['ours'] is not None for r in ten) else None}
    if all('noisy_mean' in row for row in ten):
        mean['noisy_mean'] = float(np.mean([row['noisy_mean'] for row in ten]))
    notes = [
        "prompts: the author scored every model, the instruct one too, on plain prompts; a ChatML row is ours, not the "
        "card's protocol",
        "scoring: as the author's wrapper, context + continuation go through the model whole, the last token included, "
        "so the mean-pooled gate sees the whole choice (every score here is loglikelihood-based and sees it)"
        if scoring == 'author' else "scoring: the harness's (the last token is not fed); tasks=paper scores as the "
        "author's wrapper did, the whole context + continuation through the model",
        "routing: the author's PolyGLU sampled Gumbel noise at evaluation too (gumbel_softmax with no train/eval switch, "
        "tau 0.1, unseeded): each card figure is one noisy draw; ours is deterministic"
        + (f"; 'noisy' is the mean and spread over {routing['seeds']} seeds of the author's routing" if routing else
           "; paper_routing_seeds=N gives the mean and spread of the author's noisy routing"),
        "mmlu_stem@5-shot: the card says 5-shot, but the author's scripts pass no --num-fewshot and lm-eval's MMLU sets "
        "none, so its figure was most likely 0-shot: the mmlu_stem row",
        "perplexity: 'the author's' is src/evaluation/domain_perplexity.py's protocol (perplexity_protocol='author'), "
        "the card's held-out text was another corpus: expect the order math < code < STEM, not the values"]
    return {'model': column, 'rows': rows, 'mean': mean, 'notes': notes}


def print_paper_comparison(comparison, model_label):
    column = comparison['model']
    print(f"\n{model_label} against the author's model card, {column} column (PolyChromaticLM-1.0-{column}-0.6B; "
          f"lm-eval 0.4.11 there, {harness_version()} here):")
    print(f"{'benchmark':<23} {'metric':<10} {'shots':>5} {'prompts':<7} {'ours':>8} {'stderr':>6} {'noisy':>14} "
          f"{'card':>7} {'diff':>8}  protocol")
    show = lambda v, fmt: format(v, fmt) if v is not None else '-'  # noqa: E731
    for row in comparison['rows']:
        noisy = f"{row['noisy_mean']:.2f}±{row['noisy_std']:.2f}" if 'noisy_mean' in row else '-'
        print(f"{row['benchmark']:<23} {row['metric']:<10} {show(row['shots'], 'd'):>5} {row['prompts'] or '-':<7} "
              f"{show(row['ours'], '.2f'):>8} {show(row['stderr'], '.2f'):>6} {noisy:>14} {show(row['card'], '.2f'):>7} "
              f"{show(row['difference'], '+.2f'):>8}  {row['protocol'] if row['ours'] is not None else 'not run'}")
    mean = comparison['mean']
    noisy = f"{mean['noisy_mean']:.2f}" if 'noisy_mean' in mean else '-'
    print(f"{'mean of the ten':<23} {'':<10} {'':>5} {'':<7} {show(mean['ours'], '.2f'):>8} {'':>6} {noisy:>14} "
          f"{mean['card']:>7.2f} {show(None if mean['ours'] is None else mean['ours'] - mean['card'], '+.2f'):>8}")
    for note in comparison['notes']:
        print(f"- {note}")


@torch.no_grad()
def author_perplexity(model, folder, context, windows=AUTHOR_WINDOWS, min_chunk=AUTHOR_MIN_CHUNK):
    """The card's domain perplexity as the author's src/evaluation/domain_perplexity.py computes it: the last chunk
    with at least `min_chunk` tokens (else the last chunk); n = min(windows, (len - (S+1)) // (S+1)) windows of S + 1
    tokens at i * stride, stride = (len - (S+1)) // n, S = `context`; each window one sequence with full causal
    attention (no document masking) and one gate mean; loss in float32 from the model's logits; perplexity = exp(mean
    loss over every scored token). -> None when the chunk holds fewer than 2 (S+1) tokens."""
    chunks, manifest = open_chunks(folder, EOS_ID, model.config.vocab_size)
    index = next((c for c in reversed(range(len(chunks))) if chunks[c].size >= min_chunk), len(chunks) - 1)
    chunk, span = chunks[index], chunks[index].size - (context + 1)
    n = min(windows, span // (context + 1)) if span > 0 else 0
    if n == 0:
        return None
    stride = span // n
    # each window a request of its first token and the S targets after it: score packs them, each its own segment
    rows = [chunk[i * stride:i * stride + context + 1].tolist() for i in range(n)]
    scored = score(model, [(ids[:1], ids[1:]) for ids in rows], batch_tokens, os.path.basename(folder))
    loss = -sum(log_prob for log_prob, _ in scored) / (n * context)
    return {'protocol': 'author', 'loss': loss, 'perplexity': math.exp(loss), 'tokens': n * context, 'windows': n,
            'stride': stride, 'context': context, 'chunk': manifest['chunks'][index]['file'],
            'dtype': str(model.embeddings.weight.dtype).replace('torch.', '')}


def checked_tasks():
    """The settings checked, each wrong one in one line -> the task names to run."""
    if prompt:
        fail(f"--prompt moved to sample.py: python sample.py --checkpoint={checkpoint} --prompt=... (it streams, "
             "samples and chats)")
    if generation not in ('exact', 'cached'):
        fail(f"generation must be 'exact' or 'cached', got {generation!r}")
    if perplexity_protocol not in ('validation', 'author'):
        fail(f"perplexity_protocol must be 'validation' or 'author', got {perplexity_protocol!r}")
    if paper_model not in ('auto', 'base', 'instruct'):
        fail(f"paper_model must be 'auto', 'base' or 'instruct', got {paper_model!r}")
    paper = tasks == 'paper'
    if paper and num_fewshot >= 0:
        fail("tasks=paper runs every task at the shots the author ran (and MMLU-STEM 5-shot beside it); drop "
             "--num_fewshot, or list the tasks yourself")
    task_names = [task for task, *_ in PAPER] if paper else list(dict.fromkeys(t.strip() for t in tasks.split(',')
                                                                               if t.strip()))
    if task_names and not benchmark and LM is object:
        fail(f"tasks={tasks!r} need lm-evaluation-harness, which is not installed: pip install -r requirements.txt "
             "(--perplexity and --benchmark run without it)")
    return task_names


def check_output_folder():
    folder = os.path.dirname(os.path.abspath(output))
    try:
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, '.write_test'), 'w'):
            pass
        os.remove(os.path.join(folder, '.write_test'))
    except OSError as e:
        fail(f"cannot write results to {output} ({e.strerror}); choose another --output")
    lock = f'.{os.path.basename(output)}.lock'
    hold_folder(folder, lock=lock)  # one evaluation per output: its temporary names too
    return folder, lock


def main():
    task_names = checked_tasks()
    held = None
    if (task_names or perplexity) and not benchmark:
        held = check_output_folder()  # before the model loads: a read-only folder is found at once, not after the tasks
    if checkpoints and not benchmark:
        sweep(task_names)
    else:
        evaluate_checkpoint(task_names, wandb_log)
    if held:
        let_go(*held)


if __name__ == '__main__':
    if sys.argv[1:2] == ['lm_eval']:
        harness_command_line(sys.argv[2:])
    else:
        configure(globals())
        main()
