"""
Tokenize the pre-training sources into uint32 chunks, and the SFT conversations into tokens + loss mask.

    python prepare.py --source=math                       # the hub (HF_TOKEN in the environment or .env)
    python prepare.py --source=math --input='dl/*.parquet' # local jsonl/parquet files of the same schema
    python prepare.py --source=sft --sft_sources=nemotron,metamath
    python prepare.py --verify=data/tokenized/math         # check every chunk against its manifest
    python prepare.py --benchmark=True --input=...         # tokens/s, 1 process vs all, vs the tokenizer
    python prepare.py --sample=data/demo/raw              # write the embedded offline sample (demo, tests)

Output: {output_base}/{source}/chunk_00000.bin ... (uint32, every document followed by EOS 151,643, each chunk
ends on a document boundary) and manifest.json. SFT chunks also have chunk_00000.mask.bin (uint8, 1 exactly on
assistant tokens and their closing <|im_end|>), and each conversation ends with EOS so that sft.py finds the
boundaries the same way pre-training does. Chunks and the manifest are written under a temporary name and
renamed; the manifest records how far each dataset was read (from the hub, the stream's own state, so a resume
streams no row of a finished chunk again), so a killed run restarted with the same arguments continues where it
stopped and ends byte-identical to an uninterrupted one, whatever num_proc is. One prepare per folder: a second one
on a folder a live one holds stops at once (utils.hold_folder).
"""
import collections
import contextlib
import glob
import hashlib
import json
import math
import multiprocessing
import os
import sys
import tempfile
import time

import numpy as np
from tqdm import tqdm

from configurator import config_file_values, configure, fail
from model import EOS_ID, ModelConfig
from utils import HUB_TOKENIZER, durable_replace, get_tokenizer, hold_folder, load_dotenv, read_manifest

# -----------------------------------------------------------------------------
# config
source = 'all'                 # math | stem | code | sft | all (= math, stem, code, sft)
output_base = 'data/tokenized'
input = ''                     # local jsonl/parquet path or glob read instead of the hub (same schema)
tokenizer = HUB_TOKENIZER      # hub id, local tokenizer.json or folder, or 'packaged' (offline Qwen3 copy)
chunk_tokens = 100_000_000     # tokens per chunk file (chunks end on a document boundary)
max_tokens = -1                # token budget of the source; -1 = what the pre-training plan uses (plan_budgets)
num_proc = os.cpu_count() or 1 # tokenizer worker processes; the output does not depend on it
batch_docs = 512               # documents per tokenizer call
max_bad_fraction = 0.01        # malformed rows are skipped and counted; more than this fraction stops the run
sft_sources = 'nemotron'       # comma list of nemotron, metamath, numina
sft_split = 'low'              # Nemotron-Math-v2 split: low | medium | high_part00..02 (low: shortest traces, docs/data.md)
sft_reasoning = False          # render reasoning_content between <think> and </think> before the answer (in the loss)
sft_traces_per_problem = 1     # traces kept per problem (0 = all): one is the seed's scale, ~347K conversations
sft_max_examples = -1          # stop after this many conversations; -1 = no limit
code_config = ''               # Nemotron-CC-Code-v1's config name, if the hub asks for one ('' = none)
verify = ''                    # a prepared folder to check against its manifest, then exit
sample = ''                    # write the embedded sample (generated jsonl in the real schemas) here, then exit
benchmark = False              # measure tokenization throughput on --input, then exit
# -----------------------------------------------------------------------------

# The exact datasets of SPEC.md. Text fields and configs from each dataset card: Nemotron-CC-Math-v1 has configs
# '3', '4plus', '4plus_MIND' (we use 4plus); Nemotron-CC-v2 and -v2.1 are split into quality configs, of which we
# read 'High-Quality' (organic web text, the STEM-prose half the mixture wants; the synthetic/QA configs are
# rephrasings); all three pre-training corpora keep the document in 'text'. STEM's budget is split evenly.
SOURCES = {
    'math': [dict(id='nvidia/Nemotron-CC-Math-v1', config='4plus', split='train', field='text', share=1.0)],
    'stem': [dict(id='nvidia/Nemotron-CC-v2', config='High-Quality', split='train', field='text', share=0.5),
             dict(id='nvidia/Nemotron-CC-v2.1', config='High-Quality', split='train', field='text', share=0.5)],
    'code': [dict(id='nvidia/Nemotron-CC-Code-v1', config=None, split='train', field='text', share=1.0)],
}
PLAN_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'config', 'pretrain.py')  # = train.py's defaults


def planned_rows(max_steps, rows_per_step, mixture_baseline, mixture_anneal, anneal_start):
    """Expected training rows of each source: train.py draws each row's source from the baseline mixture before step
    anneal_start * max_steps, from the annealed one after."""
    baseline_steps = min(max_steps, math.ceil(anneal_start * max_steps))
    return [rows_per_step * (baseline_steps * b / sum(mixture_baseline) + (max_steps - baseline_steps) * a / sum(mixture_anneal))
            for b, a in zip(mixture_baseline, mixture_anneal)]


def plan_budgets(margin=0.01, **changes):
    """Tokens to prepare per source so that config/pretrain.py's run never repeats a window: its expected rows x
    block_size, 1% more for the random draw of each row's source (3.6 standard deviations for code, the smallest), plus
    the held-out slice. At 10.24B tokens: math 7.55B, STEM 2.28B, code 0.52B. `changes` replace the plan's values."""
    plan = {**config_file_values(PLAN_FILE), **changes}
    rows = planned_rows(plan['max_steps'], plan['micro_batch_size'] * plan['grad_accum_steps'],
                        plan['mixture_baseline'], plan['mixture_anneal'], plan['anneal_start'])
    return {name: int(math.ceil(n * plan['block_size'] * (1 + margin))) + plan['val_tokens']
            for name, n in zip(plan['sources'], rows)}


DEFAULT_MAX_TOKENS = {**plan_budgets(), 'sft': 10**12}  # SFT: every conversation the per-problem cap keeps
SFT_DATASETS = {  # conversations: Nemotron-Math-v2 and NuminaMath-CoT carry 'messages'; MetaMathQA query/response
    'nemotron': dict(id='nvidia/Nemotron-Math-v2', config=None, field='messages'),
    'metamath': dict(id='meta-math/MetaMathQA', config=None, split='train', field='query'),
    'numina': dict(id='AI-MO/NuminaMath-CoT', config=None, split='train', field='messages'),
}
GATED = ('nvidia/Nemotron-CC-Math-v1', 'nvidia/Nemotron-CC-v2', 'nvidia/Nemotron-CC-v2.1', 'nvidia/Nemotron-CC-Code-v1')
MANIFEST_FORMAT = 'polychromatic-tokens-v1'
IM_START, IM_END = 151_644, 151_645
THINK_START, THINK_END = 151_667, 151_668  # Qwen3's <think> and </think>
SKIP_REASONS = ('malformed', 'tool', 'extra_trace')  # why a row is kept out: no usable text, a tool row, a trace too many


# -----------------------------------------------------------------------------
# rows: the hub (streaming) or local jsonl/parquet files, as an iterator of dicts

def local_files(pattern):
    files = sorted(glob.glob(pattern)) if any(c in pattern for c in '*?[') else [pattern]
    if not files or not all(os.path.isfile(f) for f in files):
        fail(f"input {pattern} matches no file; give a jsonl/parquet path or a quoted glob")
    for f in files:
        if not f.endswith(('.jsonl', '.json', '.parquet')):
            fail(f"input {f} is neither .jsonl nor .parquet")
        if os.path.getsize(f) == 0:
            fail(f"input {f} is empty")
    return files


def local_rows(files):
    """Rows of local files in order; a line that is not JSON becomes None (counted as bad, not fatal)."""
    for path in files:
        if path.endswith('.parquet'):
            import pyarrow.parquet as pq
            try:
                parquet = pq.ParquetFile(path)
            except Exception as e:
                fail(f"cannot read {path} as parquet ({type(e).__name__}: {e})")
            for batch in parquet.iter_batches(batch_size=1024):
                yield from batch.to_pylist()
        else:
            with open(path, encoding='utf-8', errors='replace') as f:
                for line in f:
                    if line.strip():
                        try:
                            yield json.loads(line)
                        except json.JSONDecodeError:
                            yield None


def count_rows(files):
    """Rows of local jsonl/parquet files (parquet from its footer), for the progress bar."""
    total = 0
    for path in files:
        if path.endswith('.parquet'):
            import pyarrow.parquet as pq
            total += pq.ParquetFile(path).metadata.num_rows
        else:
            with open(path, 'rb') as f:
                total += sum(1 for line in f if line.strip())
    return total


def hub_rows(dataset, position=None, positions=None):
    """The dataset's rows, streamed from the hub; from `position` (a state the stream recorded) onwards, so a resumed
    prepare never streams the rows of its finished chunks again (datasets skips the finished shards unopened). After
    each row its stream state is appended to `positions`, for the chunk that ends there to record."""
    load_dotenv()
    token = os.environ.get('HF_TOKEN')
    if dataset['id'] in GATED and not token:
        fail(f"HF_TOKEN is not set and {dataset['id']} is gated: accept its terms on the Hugging Face page, "
             "then put HF_TOKEN=hf_... in the environment or in .env (or use --input= with local files)")
    from datasets import load_dataset
    config = code_config or None if dataset['id'] == 'nvidia/Nemotron-CC-Code-v1' else dataset['config']
    try:
        stream = load_dataset(dataset['id'], config, split=dataset['split'], streaming=True, token=token)
    except Exception as e:
        message = str(e).splitlines()[0][:200] if str(e) else ''
        if 'config name is missing' in message.lower() and dataset['id'] == 'nvidia/Nemotron-CC-Code-v1':
            fail(f"{dataset['id']} wants a config name ({message}): pass --code_config=NAME (one of those it lists; "
                 "other loaders use 'data')")
        fail(f"cannot open {dataset['id']} ({type(e).__name__}: {message}); check HF_TOKEN, the network "
             "and that its terms are accepted")
    if position is not None:
        stream.load_state_dict(position)
    for row in stream:
        positions.append(stream.state_dict())
        yield row


def skip(rows, n):
    for _ in range(n):
        next(rows, None)
    return rows

# -----------------------------------------------------------------------------
# tokenization in worker processes; results come back in submission order, so the output never depends on num_proc

worker_tokenizer = None


def init_worker(tokenizer_name):
    global worker_tokenizer
    import signal
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a forked worker must die on pool.terminate, whatever its parent set
    os.environ['TOKENIZERS_PARALLELISM'] = 'false'  # parallelism comes from processes, one core each
    worker_tokenizer = get_tokenizer(tokenizer_name)
    # '<|endoftext|>' written in a document is text: only the pipeline inserts EOS and ChatML ids
    worker_tokenizer.encode_special_tokens = True


def row_text(row, field):
    text = row.get(field) if isinstance(row, dict) else None
    return text if isinstance(text, str) and text.strip() else None


def tokenize_documents(job):
    """(rows, field) -> (tokens, lengths, None, None, reasons): one EOS after every document; a row without usable
    text has length 0 and the reason 'malformed' (reasons[i] is None for a kept row)."""
    rows, field = job
    texts = [row_text(row, field) for row in rows]
    encoded = worker_tokenizer.encode_batch([t for t in texts if t is not None], add_special_tokens=False)
    encoded = iter(encoded)
    pieces, lengths, reasons = [], [], []
    for text in texts:
        if text is None:
            lengths.append(0)
            reasons.append('malformed')
            continue
        ids = next(encoded).ids
        pieces.append(np.array(ids + [EOS_ID], dtype=np.uint32))
        lengths.append(len(ids) + 1)
        reasons.append(None)
    tokens = np.concatenate(pieces) if pieces else np.zeros(0, np.uint32)
    return tokens, np.array(lengths, dtype=np.int64), None, None, reasons


def conversation(row, field):
    """-> (turns, problem) with turns [(role, content, reasoning)], or (None, reason) for a row that is no
    conversation: 'tool' for Nemotron-Math-v2's tool-integrated rows (a tools list, tool calls, tool turns: skipped, as
    the author's SFT did), 'malformed' for anything without a user turn and an assistant target. Content may be None
    or empty where the schema allows it (tool-call turns, an empty system prompt); reasoning_content is None on user
    turns. The problem (its statement, or else the first user turn) groups the traces of one problem."""
    if not isinstance(row, dict):
        return None, 'malformed'
    if field == 'query':  # MetaMathQA
        raw = [{'role': 'user', 'content': row.get('query')}, {'role': 'assistant', 'content': row.get('response')}]
    else:
        raw = row.get('messages')
        if not isinstance(raw, list) or not all(isinstance(m, dict) for m in raw):
            return None, 'malformed'
    if row.get('tools') or any(m.get('role') == 'tool' or m.get('tool_calls') for m in raw):
        return None, 'tool'
    turns = []
    for m in raw:
        role, content, reasoning = m.get('role'), m.get('content'), m.get('reasoning_content')
        if role not in ('system', 'user', 'assistant') or not isinstance(content, (str, type(None))):
            return None, 'malformed'
        reasoning = reasoning if role == 'assistant' and isinstance(reasoning, str) and reasoning.strip() else None
        if content or reasoning:
            turns.append((role, content or '', reasoning))
    targets = [c.strip() or (sft_reasoning and t) for r, c, t in turns if r == 'assistant']
    if not any(r == 'user' and c.strip() for r, c, _ in turns) or not targets or not all(targets):
        return None, 'malformed'
    problem = row.get('problem') if isinstance(row.get('problem'), str) else next(c for r, c, _ in turns if r == 'user')
    return turns, problem


def problem_id(problem):
    return int.from_bytes(hashlib.blake2b(problem.strip().encode(), digest_size=8).digest(), 'little')


def tokenize_conversations(job):
    """ChatML: <|im_start|>role\ncontent<|im_end|>\n per turn, EOS after the conversation; with sft_reasoning, an
    assistant turn is <think>\nreasoning\n</think>\n\ncontent (Qwen3's layout). Loss mask 1 on the assistant body
    (reasoning included) and its <|im_end|>; 0 on headers, other roles, the newline after <|im_end|> and EOS.
    -> (tokens, lengths, mask, problem ids, reasons: the SKIP_REASONS name of a row that is no conversation, whose
    length is 0; None for a kept row)."""
    rows, field = job
    encode = lambda text: worker_tokenizer.encode(text, add_special_tokens=False).ids  # noqa: E731
    newline = encode('\n')
    token_pieces, mask_pieces, lengths, problems, reasons = [], [], [], [], []
    for row in rows:
        turns, problem = conversation(row, field)
        reasons.append(None if turns else problem)
        if turns is None:
            lengths.append(0)
            problems.append(0)
            continue
        ids, mask = [], []
        for role, content, reasoning in turns:
            header = [IM_START] + encode(f'{role}\n')
            think = [THINK_START] + encode(f'\n{reasoning}\n') + [THINK_END] + encode('\n\n') \
                if role == 'assistant' and sft_reasoning and reasoning else []
            body = think + encode(content) + [IM_END]
            ids += header + body + newline
            mask += [0] * len(header) + [int(role == 'assistant')] * len(body) + [0] * len(newline)
        ids.append(EOS_ID)
        mask.append(0)
        token_pieces.append(np.array(ids, dtype=np.uint32))
        mask_pieces.append(np.array(mask, dtype=np.uint8))
        lengths.append(len(ids))
        problems.append(problem_id(problem))
    problems = np.array(problems, dtype=np.uint64)
    if not token_pieces:
        return np.zeros(0, np.uint32), np.array(lengths, dtype=np.int64), np.zeros(0, np.uint8), problems, reasons
    return (np.concatenate(token_pieces), np.array(lengths, dtype=np.int64), np.concatenate(mask_pieces), problems,
            reasons)


def ordered_map(pool, fn, jobs, ahead):
    """pool.imap with back-pressure: imap would read the whole (hub) stream into its queue at once."""
    if pool is None:
        yield from map(fn, jobs)
        return
    queue = collections.deque()
    for job in jobs:
        queue.append(pool.apply_async(fn, (job,)))
        if len(queue) >= ahead:
            yield queue.popleft().get()
    while queue:
        yield queue.popleft().get()


def batches(rows, field, size):
    batch = []
    for row in rows:
        batch.append(row)
        if len(batch) == size:
            yield batch, field
            batch = []
    if batch:
        yield batch, field

# -----------------------------------------------------------------------------
# chunks and manifest

def sha256(array):
    return hashlib.sha256(memoryview(np.ascontiguousarray(array)).cast('B')).hexdigest()


def atomic_write(path, data):
    with open(f"{path}.tmp", 'wb') as f:
        f.write(data)
    durable_replace(f"{path}.tmp", path)


def save_manifest(folder, manifest):
    atomic_write(os.path.join(folder, 'manifest.json'), json.dumps(manifest, indent=1).encode())


def write_chunk(folder, index, tokens, mask=None, problems=None):
    """A chunk's tokens; for SFT also its loss mask and the problem id (uint64) of each conversation in it."""
    entry = {'file': f'chunk_{index:05d}.bin', 'tokens': int(tokens.size),
             'documents': int(np.count_nonzero(tokens == EOS_ID)), 'sha256': sha256(tokens)}
    atomic_write(os.path.join(folder, entry['file']), tokens.tobytes())
    if mask is not None:
        entry['mask_file'] = f'chunk_{index:05d}.mask.bin'
        entry['mask_sha256'] = sha256(mask)
        atomic_write(os.path.join(folder, entry['mask_file']), mask.tobytes())
    if problems is not None:
        entry['problems_file'] = f'chunk_{index:05d}.problems.bin'
        entry['problems_sha256'] = sha256(problems.astype(np.uint64))  # which problems sft.py holds out depends on it
        atomic_write(os.path.join(folder, entry['problems_file']), problems.astype(np.uint64).tobytes())
    return entry


def write_source(folder, name, chunks, eos_id, vocab_size, tokenizer):
    """A complete source folder from token arrays ready in memory, one chunk each, in exactly the format train.py reads
    (tests/synthetic.py writes its data with it)."""
    os.makedirs(folder, exist_ok=True)
    entries = []
    for i, tokens in enumerate(chunks):
        entries.append({**write_chunk(folder, i, tokens), 'documents': int(np.count_nonzero(tokens == eos_id))})
    save_manifest(folder, {'format': MANIFEST_FORMAT, 'source': name, 'tokenizer': tokenizer, 'eos_id': eos_id,
                           'dtype': 'uint32', 'vocab_size': vocab_size, 'chunks': entries,
                           'total_tokens': int(sum(c.size for c in chunks)),
                           'total_documents': sum(e['documents'] for e in entries), 'complete': True})
    return folder


def plan(name):
    """The datasets a source reads, each with its token budget: [(dataset, budget)]."""
    budget = max_tokens if max_tokens > 0 else DEFAULT_MAX_TOKENS[name]
    if name == 'sft':
        datasets = []
        for key in sft_sources.split(','):
            if key not in SFT_DATASETS:
                fail(f"unknown sft source '{key}'; choose from {', '.join(SFT_DATASETS)}")
            datasets.append(dict(SFT_DATASETS[key], split=SFT_DATASETS[key].get('split', sft_split),
                                 share=1.0 / len(sft_sources.split(','))))
    else:
        datasets = SOURCES[name]
    if input:
        field = datasets[0]['field']
        return [(dict(id='local', input=local_files(input), field=field), budget)]
    return [(d, int(budget * d['share'])) for d in datasets]


def source_identity(name, streams):
    """What makes a preparation this one: a manifest of another identity in the folder is refused, not extended."""
    identity = {
        'format': MANIFEST_FORMAT, 'source': name, 'tokenizer': tokenizer, 'eos_id': EOS_ID, 'dtype': 'uint32',
        'chunk_tokens': chunk_tokens, 'max_tokens': sum(budget for _, budget in streams),
        'datasets': [{k: v for k, v in d.items() if k != 'share'} for d, _ in streams],
        'special_token_text': 'text',  # literal '<|endoftext|>' in a document is text, never the EOS id
    }
    if name == 'sft':
        identity.update(sft_reasoning=sft_reasoning, sft_traces_per_problem=sft_traces_per_problem,
                        sft_max_examples=sft_max_examples)
    return identity


def resumed_manifest(folder, name, identity, n_streams):
    """The folder's manifest to continue (complete: nothing to do), or a new one."""
    if not os.path.isfile(os.path.join(folder, 'manifest.json')):
        return dict(identity, vocab_size=None, chunks=[], total_tokens=0, total_documents=0, bad_rows=0,
                    skipped={reason: 0 for reason in SKIP_REASONS}, complete=False,
                    streams=[{'rows_read': 0, 'tokens': 0, 'done': False} for _ in range(n_streams)])
    manifest = read_manifest(folder)
    old = {k: manifest.get(k) for k in identity}
    if old != identity:
        changed = [k for k in identity if old[k] != identity[k]]
        fail(f"{folder} holds a preparation with different {', '.join(changed)}; use another output_base or delete "
             "the folder")
    if manifest['complete']:
        print(f"{name}: already complete in {folder} ({manifest['total_tokens']:,} tokens), nothing to do")
    else:
        print(f"{name}: resuming after {len(manifest['chunks'])} chunks ({manifest['total_tokens']:,} tokens)")
    return manifest


def write_pending(folder, manifest, pending, read):
    """The pending rows as the next chunk, and the manifest after it, recording what had been read up to it (read: the
    streams' state and the skip counts): a resume starts there. pending is emptied."""
    tokens = np.concatenate(pending['tokens'])
    mask = np.concatenate(pending['masks']) if pending['masks'] else None
    problems = np.array(pending['problems'], dtype=np.uint64) if pending['masks'] else None
    manifest['chunks'].append(write_chunk(folder, len(manifest['chunks']), tokens, mask, problems))
    manifest['total_tokens'] += int(tokens.size)
    manifest['total_documents'] += manifest['chunks'][-1]['documents']
    record_read(manifest, read)
    save_manifest(folder, manifest)
    pending.update(tokens=[], masks=[], problems=[], size=0)


def record_read(manifest, read):
    manifest['streams'] = [dict(s) for s in read['streams']]
    manifest['skipped'] = dict(read['skipped'])
    manifest['bad_rows'] = read['skipped']['malformed']


def stream_rows(dataset, stream):
    """The rows of one stream from where the last complete chunk left it, and advance(): the stream's state moves one
    row on (a chunk ending there records it). A local file is read again from its start: it costs no download."""
    if dataset['id'] == 'local':
        rows, positions = skip(local_rows(dataset['input']), stream['rows_read']), None
    else:
        positions = collections.deque()  # the hub stream's state after each row read
        rows = hub_rows(dataset, stream.get('position'), positions)

    def advance():
        stream['rows_read'] += 1
        if positions:
            stream['position'] = positions.popleft()
    return rows, advance


def prepare_stream(dataset, budget, stream, run):
    """One stream's rows through the workers into chunks, until its budget, the SFT example limit, or its end. run: the
    source's folder, manifest, pending rows, what was read, the kept traces, the workers and the progress bar."""
    rows, advance = stream_rows(dataset, stream)
    read, pending, traces, local = run['read'], run['pending'], run['traces'], run['local']
    for tokens, lengths, mask, problems, reasons in ordered_map(run['pool'], run['work'],
                                                                batches(rows, dataset['field'], batch_docs),
                                                                ahead=2 * num_proc):
        offset = 0
        for row, length in enumerate(lengths.tolist()):
            reason = reasons[row]
            if reason is None and mask is not None and 0 < sft_traces_per_problem <= traces[int(problems[row])]:
                reason, offset = 'extra_trace', offset + length
            if reason:
                advance()
                read['skipped'][reason] += 1
                run['progress'].update(1 if local else 0)
                continue
            if pending['size'] and pending['size'] + length > chunk_tokens:
                write_pending(run['folder'], run['manifest'], pending, read)  # this row is not in that chunk
            pending['tokens'].append(tokens[offset:offset + length])
            if mask is not None:
                pending['masks'].append(mask[offset:offset + length])
                pending['problems'].append(int(problems[row]))
                traces[int(problems[row])] += 1
            offset += length
            pending['size'] += length
            stream['tokens'] += length
            advance()
            run['progress'].update(1 if local else length)
            if stream['tokens'] >= budget or enough(run):
                break
        rows_read = sum(s['rows_read'] for s in read['streams'])
        if rows_read >= 1000 and read['skipped']['malformed'] > max_bad_fraction * rows_read:
            fail(f"{read['skipped']['malformed']:,} of {rows_read:,} rows of {dataset['id']} are malformed (no usable "
                 f"'{dataset['field']}'), above max_bad_fraction={max_bad_fraction}: wrong files or schema?")
        if stream['tokens'] >= budget or enough(run):
            break
    stream['done'] = True


def enough(run):
    """SFT: sft_max_examples conversations are in the chunks or pending."""
    return (run['manifest']['source'] == 'sft' and
            0 <= sft_max_examples <= run['manifest']['total_documents'] + len(run['pending']['problems']))


def prepare_source(name):
    """Tokenize one source into {output_base}/{name}/, resuming from its manifest if one is there."""
    folder = os.path.join(output_base, name)
    hold_folder(folder)  # one prepare per folder: a second one stops here, naming this one
    for leftover in glob.glob(os.path.join(folder, '*.tmp')):
        os.remove(leftover)  # a half-written chunk or manifest of a killed run
    streams = plan(name)
    manifest = resumed_manifest(folder, name, source_identity(name, streams), len(streams))
    if manifest['complete']:
        return manifest
    manifest['vocab_size'] = get_tokenizer(tokenizer).get_vocab_size(with_added_tokens=True)  # checked before work
    if name == 'sft' and sft_max_examples == 0:
        fail("sft_max_examples=0 keeps no conversation; -1 means no limit")
    # what the last complete chunk recorded; everything after it is read again
    read = {'streams': [dict(s) for s in manifest['streams']], 'skipped': dict(manifest['skipped'])}
    traces = collections.Counter()  # problem id -> conversations kept, for sft_traces_per_problem
    for entry in manifest['chunks']:
        if 'problems_file' in entry:
            traces.update(np.fromfile(os.path.join(folder, entry['problems_file']), dtype=np.uint64).tolist())
    local = streams[0][0]['id'] == 'local'  # the bar measures the work at hand: a file's rows, or the token budget
    progress = tqdm(total=count_rows(streams[0][0]['input']) if local else manifest['max_tokens'],
                    initial=sum(s['rows_read'] for s in read['streams']) if local else manifest['total_tokens'],
                    unit='row' if local else 'tok', unit_scale=True, desc=name, smoothing=0.05)
    pool = None
    if num_proc > 1:
        pool = multiprocessing.get_context('fork').Pool(num_proc, initializer=init_worker, initargs=(tokenizer,))
    else:
        init_worker(tokenizer)
    run = {'folder': folder, 'manifest': manifest, 'read': read, 'traces': traces, 'local': local, 'pool': pool,
           'pending': {'tokens': [], 'masks': [], 'problems': [], 'size': 0}, 'progress': progress,
           'work': tokenize_conversations if name == 'sft' else tokenize_documents}
    try:
        for (dataset, budget), stream in zip(streams, read['streams']):
            if not stream['done'] and not enough(run):
                prepare_stream(dataset, budget, stream, run)
        if run['pending']['size']:
            write_pending(folder, manifest, run['pending'], read)
        if not manifest['chunks']:
            fail(f"{name}: no usable document in the input (every row lacked '{streams[0][0]['field']}')")
        record_read(manifest, read)
        if name == 'sft':
            manifest['sft'] = sft_statistics(folder, manifest)
        manifest['complete'] = True
        save_manifest(folder, manifest)
    finally:
        progress.close()
        if pool is not None:
            pool.terminate()
    print_prepared(name, folder, manifest)
    return manifest


def print_prepared(name, folder, manifest):
    if name == 'sft':
        stats = manifest['sft']
        print(f"{name}: {stats['conversations']:,} conversations of {stats['problems']:,} problems, "
              f"{manifest['total_tokens']:,} tokens ({stats['assistant_tokens']:,} assistant), "
              f"{stats['longer_than_4096']:,} longer than 4,096 tokens | skipped: "
              + ', '.join(f"{n:,} {reason.replace('_', ' ')}" for reason, n in manifest['skipped'].items())
              + f" -> {folder}")
    else:
        print(f"{name}: {manifest['total_tokens']:,} tokens, {manifest['total_documents']:,} documents in "
              f"{len(manifest['chunks'])} chunks, {manifest['bad_rows']:,} malformed rows skipped -> {folder}")


def sft_statistics(folder, manifest):
    """Conversations, distinct problems, assistant tokens and conversations longer than a 4,096-token row."""
    problems, assistant_tokens, long = set(), 0, 0
    for entry in manifest['chunks']:
        tokens = np.fromfile(os.path.join(folder, entry['file']), dtype=np.uint32)
        assistant_tokens += int(np.fromfile(os.path.join(folder, entry['mask_file']), dtype=np.uint8).sum())
        problems.update(np.fromfile(os.path.join(folder, entry['problems_file']), dtype=np.uint64).tolist())
        ends = np.flatnonzero(tokens == EOS_ID)
        long += int(np.count_nonzero(np.diff(np.concatenate([[-1], ends])) > 4096))
    return {'conversations': manifest['total_documents'], 'problems': len(problems),
            'assistant_tokens': assistant_tokens, 'longer_than_4096': long}

# -----------------------------------------------------------------------------
# verification

def verify_folder(folder):
    """Check every chunk against the manifest, each file hashed again (verified.json, training's record of what it
    hashed, is dropped); returns the manifest, or ends with one line naming the problem."""
    path = os.path.join(folder, 'manifest.json')
    manifest = read_manifest(folder, 'not a prepared folder (run prepare.py for it first)')
    if manifest.get('format') != MANIFEST_FORMAT or manifest.get('eos_id') != EOS_ID:
        fail(f"{path} is a foreign manifest (format {manifest.get('format')!r}, eos {manifest.get('eos_id')}), "
             f"expected {MANIFEST_FORMAT} with EOS {EOS_ID}")
    vocab_size = manifest.get('vocab_size') or ModelConfig.vocab_size
    with contextlib.suppress(FileNotFoundError):  # what training vouched for by size and times: hashed anew
        os.remove(os.path.join(folder, 'verified.json'))
    for chunk in manifest['chunks']:
        file = os.path.join(folder, chunk['file'])
        if not os.path.isfile(file):
            fail(f"{file} is listed in the manifest but missing; re-run prepare.py to rewrite it")
        size = os.path.getsize(file)
        if size != 4 * chunk['tokens']:
            fail(f"{file} has {size:,} bytes, the manifest says {4 * chunk['tokens']:,} (truncated or foreign "
                 "chunk); delete it and re-run prepare.py with the same arguments")
        tokens = np.fromfile(file, dtype=np.uint32)
        if sha256(tokens) != chunk['sha256']:
            fail(f"{file} fails its checksum (corrupted or foreign chunk); delete it and re-run prepare.py")
        if tokens.size and int(tokens.max()) >= vocab_size:
            fail(f"{file} holds token id {int(tokens.max())} >= vocab size {vocab_size}")
        if tokens.size == 0 or tokens[-1] != EOS_ID or np.count_nonzero(tokens == EOS_ID) != chunk['documents']:
            fail(f"{file} does not end its {chunk['documents']} documents with EOS {EOS_ID}")
        if 'mask_file' in chunk:
            mask_file = os.path.join(folder, chunk['mask_file'])
            if not os.path.isfile(mask_file) or os.path.getsize(mask_file) != chunk['tokens']:
                fail(f"{mask_file} is missing or has the wrong size; re-run prepare.py")
            if sha256(np.fromfile(mask_file, dtype=np.uint8)) != chunk['mask_sha256']:
                fail(f"{mask_file} fails its checksum; delete it and re-run prepare.py")
        if 'problems_file' in chunk:
            problems_file = os.path.join(folder, chunk['problems_file'])
            if not os.path.isfile(problems_file) or os.path.getsize(problems_file) != 8 * chunk['documents']:
                fail(f"{problems_file} is missing or does not list one problem per conversation; re-run prepare.py")
            if 'problems_sha256' not in chunk:
                fail(f"{path} records no checksum for {problems_file}: prepare the SFT data again into a new "
                     "output_base")
            if sha256(np.fromfile(problems_file, dtype=np.uint64)) != chunk['problems_sha256']:
                fail(f"{problems_file} fails its checksum (it decides which problems are held out); delete it and "
                     "re-run prepare.py")
    if sum(c['tokens'] for c in manifest['chunks']) != manifest['total_tokens']:
        fail(f"{path}: total_tokens does not equal the sum of its chunks")
    return manifest

# -----------------------------------------------------------------------------
# the embedded sample: a few MB of generated text in the real schemas, so the demo and tests need no hub

NAMES = ('Ada', 'Ben', 'Chen', 'Dara', 'Eli', 'Fatima', 'Goran', 'Hana', 'Ivo', 'Jun', 'Kofi', 'Lena')
THINGS = ('apples', 'marbles', 'books', 'stamps', 'pencils', 'coins', 'shells', 'cards')
FACTS = (
    ('force', 'the product of mass and acceleration', 'newtons'),
    ('kinetic energy', 'one half of mass times velocity squared', 'joules'),
    ('power', 'the rate at which work is done', 'watts'),
    ('pressure', 'force divided by the area it acts on', 'pascals'),
    ('electric current', 'the rate of flow of charge', 'amperes'),
    ('density', 'mass per unit volume', 'kilograms per cubic metre'),
    ('frequency', 'the number of cycles per second', 'hertz'),
    ('momentum', 'the product of mass and velocity', 'kilogram metres per second'),
)


def word_problem(rng):
    a, b, c = (int(x) for x in rng.integers(2, 60, size=3))
    name, other = rng.choice(NAMES, size=2, replace=False)
    thing = rng.choice(THINGS)
    kind = int(rng.integers(3))
    if kind == 0:
        question = f"{name} has {a} {thing}. {other} gives {name} {b} more. How many {thing} does {name} have now?"
        steps, answer = f"{name} starts with {a} {thing} and receives {b}, so {a} + {b} = {a + b}.", a + b
    elif kind == 1:
        question = f"{name} buys {a} boxes with {b} {thing} in each box. How many {thing} is that in total?"
        steps, answer = f"There are {a} boxes of {b}, so {a} * {b} = {a * b}.", a * b
    else:
        total = a * b + c
        question = f"{name} shares {total} {thing} among {a} friends equally and keeps the rest. How many does each " \
                   f"friend get, and how many are left?"
        steps, answer = f"{total} = {a} * {b} + {c}, so each friend gets {b} and {c} are left.", f"{b} each, {c} left"
    return question, steps, str(answer)


def stem_paragraph(rng):
    quantity, definition, unit = FACTS[int(rng.integers(len(FACTS)))]
    mass, speed = int(rng.integers(2, 40)), int(rng.integers(2, 30))
    return (f"In physics, {quantity} is defined as {definition}. It is measured in {unit}. "
            f"For example, an object with a mass of {mass} kilograms moving at {speed} metres per second has a "
            f"momentum of {mass * speed} kilogram metres per second and a kinetic energy of "
            f"{mass * speed * speed / 2:g} joules. Careful measurement of {quantity} lets engineers predict how "
            f"machines and structures behave.")


def code_snippet(rng):
    name = rng.choice(('total', 'scale', 'clip', 'mean', 'count'))
    n = int(rng.integers(2, 9))
    bodies = {
        'total': f"    return sum(values) + {n}",
        'scale': f"    return [v * {n} for v in values]",
        'clip': f"    return [min(max(v, -{n}), {n}) for v in values]",
        'mean': "    return sum(values) / max(1, len(values))",
        'count': f"    return sum(1 for v in values if v > {n})",
    }
    return (f"def {name}_{n}(values):\n    \"\"\"{name.capitalize()} a list of numbers ({n}).\"\"\"\n"
            f"{bodies[name]}\n\n\nprint({name}_{n}([{', '.join(str(int(x)) for x in rng.integers(0, 20, 5))}]))\n")


LITERAL_MARKERS = ' (The strings <|endoftext|> and <|im_end|> in this sentence are plain text.)'
PYTHON_TOOL = {'type': 'function', 'function': {'name': 'python', 'description': 'Run Python code.',
                                                'parameters': {'type': 'object', 'properties': {'code': {'type': 'string'}},
                                                               'required': ['code']}}}


def message(role, content, reasoning_content=None, tool_calls=None, tool_call_id=None, name=None):
    """A Nemotron-Math-v2 message: every field present, None where the turn has none."""
    return {'role': role, 'content': content, 'reasoning_content': reasoning_content, 'tool_calls': tool_calls,
            'tool_call_id': tool_call_id, 'name': name}


def sft_rows(rng, problem_index):
    """Two traces of one generated problem in Nemotron-Math-v2's schema: one plain (reasoning_content and the final
    solution in content) and one tool-integrated (a tools list, an assistant tool call with None content, the tool's
    output, then the answer), as the dataset's with/without-TIR settings produce."""
    question, steps, answer = word_problem(rng)
    if problem_index % 25 == 0:
        question += LITERAL_MARKERS  # the pipeline must keep these as text, not special ids
    solution = f"{steps}\nThe answer is \\boxed{{{answer}}}."
    reasoning = f"Let me read the problem carefully. {steps} So the answer is {answer}."
    system = [message('system', '')] if problem_index % 3 == 0 else []  # an empty system prompt is no turn
    plain = system + [message('user', question), message('assistant', solution, reasoning)]
    call = {'id': f'call_{problem_index}', 'type': 'function',
            'function': {'name': 'python', 'arguments': json.dumps({'code': f'print({steps.split("=")[0]})'})}}
    tool = [message('user', question), message('assistant', None, 'I will compute it with Python.', [call]),
            message('tool', answer, tool_call_id=call['id'], name='python'), message('assistant', solution, reasoning)]
    common = {'problem': question, 'expected_answer': answer, 'data_source': 'sample'}
    return [dict(common, messages=plain, tools=None), dict(common, messages=tool, tools=[PYTHON_TOOL])]


def make_sample(folder, documents=(3000, 1200, 600), conversations=400, seed=0):
    """Write math.jsonl, stem.jsonl, code.jsonl ({'text': ...}, the Nemotron-CC schema; some documents spell out
    '<|endoftext|>' and '<|im_end|>' as text) and sft.jsonl in Nemotron-Math-v2's full schema: `conversations`
    problems, each with a plain and a tool-integrated trace."""
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    generators = {
        'math': lambda: ' '.join(f"Problem: {q}\nSolution: {s} The answer is {a}.\n"
                                 for q, s, a in (word_problem(rng) for _ in range(int(rng.integers(1, 5))))),
        'stem': lambda: '\n\n'.join(stem_paragraph(rng) for _ in range(int(rng.integers(1, 4)))),
        'code': lambda: '\n'.join(code_snippet(rng) for _ in range(int(rng.integers(1, 4)))),
    }
    for (name, generate), count in zip(generators.items(), documents):
        with open(os.path.join(folder, f'{name}.jsonl'), 'w') as f:
            for i in range(count):
                text = generate() + (LITERAL_MARKERS if i % 50 == 0 else '')
                f.write(json.dumps({'id': f'{name}-{i}', 'text': text}) + '\n')
    with open(os.path.join(folder, 'sft.jsonl'), 'w') as f:
        for i in range(conversations):
            for row in sft_rows(rng, i):
                f.write(json.dumps(row) + '\n')
    write_demo_tasks(os.path.join(folder, 'tasks'), rng)
    return folder


def write_demo_tasks(folder, rng, n=40):
    """Two lm-evaluation-harness tasks on fresh word problems, for eval.py --include_path: demo_arith_mc
    (multiple choice: the right total against two near misses) and demo_arith_gen (generate until newline)."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, 'arith.jsonl'), 'w') as f:
        for _ in range(n):
            a, b = (int(x) for x in rng.integers(2, 60, size=2))
            name, other = rng.choice(NAMES, size=2, replace=False)
            thing = rng.choice(THINGS)
            question = f"{name} has {a} {thing}. {other} gives {name} {b} more. How many {thing} does {name} have now?"
            setup = f"{name} starts with {a} {thing} and receives {b}, so {a} + {b} ="
            f.write(json.dumps({'question': question, 'setup': setup, 'answer': str(a + b),
                                'choices': [str(a + b), str(a + b + 1), str(abs(a - b))]}) + '\n')
    data = os.path.abspath(os.path.join(folder, 'arith.jsonl'))  # the harness resolves paths against the cwd
    common = f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
    with open(os.path.join(folder, 'demo_arith_mc.yaml'), 'w') as f:
        f.write("task: demo_arith_mc\n" + common + "output_type: multiple_choice\n"
                "doc_to_text: \"Problem: {{question}}\\nSolution: {{setup}}\"\n"
                "doc_to_choice: \"{{choices}}\"\ndoc_to_target: 0\nmetric_list:\n  - metric: acc\n")
    with open(os.path.join(folder, 'demo_arith_gen.yaml'), 'w') as f:
        f.write("task: demo_arith_gen\n" + common + "output_type: generate_until\n"
                "doc_to_text: \"Problem: {{question}}\\nSolution:\"\n"
                "doc_to_target: \"{{answer}}\"\ngeneration_kwargs:\n  until: [\"\\n\"]\n"
                "  max_gen_toks: 48\nfilter_list:\n  - name: answer\n    filter:\n"
                "      - function: regex\n        regex_pattern: \"The answer is (\\\\d+)\"\n"
                "      - function: take_first\nmetric_list:\n  - metric: exact_match\n")

# -----------------------------------------------------------------------------
# benchmark

def run_benchmark():
    """tokens/s of the tokenizer's own single-core encode_batch (the ceiling) and of prepare_source with 1 and
    all processes, on the same local files; projects hours for the spec's 10B tokens on a 16-core pod."""
    global output_base, num_proc, max_tokens
    if not input:
        fail("benchmark needs --input= local jsonl/parquet files")
    name = source if source in SOURCES else 'math'  # the files' schema and the label: --source=code for code files
    files = local_files(input)
    texts = [t for t in (row_text(r, SOURCES[name][0]['field']) for r in local_rows(files)) if t]
    init_worker(tokenizer)
    start = time.perf_counter()
    n = sum(len(e.ids) + 1 for e in worker_tokenizer.encode_batch(texts, add_special_tokens=False))
    ceiling = n / (time.perf_counter() - start)
    cores = os.cpu_count() or 1
    rates = {}
    for procs in sorted({1, cores}):
        with tempfile.TemporaryDirectory() as tmp:
            output_base, num_proc, max_tokens = tmp, procs, 10**12
            start = time.perf_counter()
            manifest = prepare_source(name)
            rates[procs] = manifest['total_tokens'] / (time.perf_counter() - start)
    print(f"\nbenchmark on {n:,} tokens ({len(texts):,} {name} documents), {cores} cores:")
    print(f"  tokenizer encode_batch, 1 core (ceiling): {ceiling:,.0f} tokens/s")
    for procs, rate in rates.items():
        print(f"  prepare.py num_proc={procs}: {rate:,.0f} tokens/s ({rate / procs / ceiling:.0%} of the ceiling "
              "per process)")
    per_process = rates[cores] / cores
    print(f"  projected for 10B tokens on a 16-core pod: {1e10 / (per_process * 16) / 3600:.1f} hours")


if __name__ == '__main__':
    configure(globals())
    if verify:
        manifest = verify_folder(verify)
        print(f"{verify}: OK, {len(manifest['chunks'])} chunks, {manifest['total_tokens']:,} tokens, "
              f"{manifest['total_documents']:,} documents, complete={manifest['complete']}")
        sys.exit(0)
    if benchmark:
        run_benchmark()
        sys.exit(0)
    if sample:
        print(f"embedded sample -> {make_sample(sample)}")
        sys.exit(0)
    names = ['math', 'stem', 'code', 'sft'] if source == 'all' else [source]
    for name in names:
        if name not in DEFAULT_MAX_TOKENS:
            fail(f"unknown source '{name}'; choose from math, stem, code, sft, all")
        if input and len(names) > 1:
            fail("--input= reads one source's files: give --source=math|stem|code|sft with it")
        prepare_source(name)
