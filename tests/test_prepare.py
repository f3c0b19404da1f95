import json
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import prepare
import utils as U
from conftest import ROOT, held_by_another_process
from model import EOS_ID

TOKENIZER = U.get_tokenizer('packaged')


def documents(n=120, seed=0):
    rng = np.random.default_rng(seed)
    return [f"Lemma {i}. For all n > {i}, n^2 - {i} is {'even' if i % 2 else 'odd'} when n is. " * int(rng.integers(1, 12))
            for i in range(n)]


def write_jsonl(path, rows):
    with open(path, 'w') as f:
        for row in rows:
            f.write((row if isinstance(row, str) else json.dumps(row)) + '\n')
    return str(path)


def configure(monkeypatch, tmp_path, input, **overrides):
    settings = dict(input=input, output_base=str(tmp_path / 'out'), tokenizer='packaged', chunk_tokens=2000,
                    num_proc=1, batch_docs=16, max_tokens=-1, sft_sources='nemotron')
    settings.update(overrides)
    for key, value in settings.items():
        monkeypatch.setattr(prepare, key, value)


def read_source(folder):
    manifest = json.load(open(os.path.join(folder, 'manifest.json')))
    return manifest, [np.fromfile(os.path.join(folder, c['file']), dtype=np.uint32) for c in manifest['chunks']]


def test_chunks_hold_every_document_then_eos(monkeypatch, tmp_path):
    docs = documents()
    path = write_jsonl(tmp_path / 'math.jsonl', [{'text': d, 'url': f'u{i}'} for i, d in enumerate(docs)])
    configure(monkeypatch, tmp_path, path)
    prepare.prepare_source('math')
    manifest, chunks = read_source(tmp_path / 'out' / 'math')
    expected = np.concatenate([np.array(TOKENIZER.encode(d, add_special_tokens=False).ids + [EOS_ID], np.uint32)
                               for d in docs])
    np.testing.assert_array_equal(np.concatenate(chunks), expected)
    assert len(chunks) > 3
    for chunk, entry in zip(chunks, manifest['chunks']):
        assert chunk.size <= 2000 and chunk[-1] == EOS_ID  # chunks end on a document boundary
        assert entry['tokens'] == chunk.size and entry['documents'] == np.count_nonzero(chunk == EOS_ID)
    assert manifest['total_tokens'] == expected.size
    assert manifest['total_documents'] == len(docs)
    assert manifest['vocab_size'] == 151_669 and manifest['eos_id'] == EOS_ID and manifest['complete']
    assert manifest['streams'] == [{'rows_read': len(docs), 'tokens': int(expected.size), 'done': True}]


def test_parquet_input_and_token_budget(monkeypatch, tmp_path):
    docs = documents()
    path = str(tmp_path / 'stem.parquet')
    pq.write_table(pa.table({'text': docs, 'id': list(range(len(docs)))}), path)
    configure(monkeypatch, tmp_path, path, max_tokens=3000)
    manifest = prepare.prepare_source('stem')
    # the document that crosses the budget is the last one kept
    lengths = np.cumsum([len(TOKENIZER.encode(d, add_special_tokens=False).ids) + 1 for d in docs])
    kept = int(np.searchsorted(lengths, 3000)) + 1
    assert manifest['total_documents'] == kept and manifest['total_tokens'] == lengths[kept - 1]


def test_output_identical_for_any_num_proc(monkeypatch, tmp_path):
    path = write_jsonl(tmp_path / 'code.jsonl', [{'text': d} for d in documents(200)])
    outputs = []
    for procs in (1, 2):
        configure(monkeypatch, tmp_path, path, num_proc=procs, output_base=str(tmp_path / f'out{procs}'))
        prepare.prepare_source('code')
        outputs.append(read_source(tmp_path / f'out{procs}' / 'code'))
    assert outputs[0][0] == outputs[1][0]
    for a, b in zip(outputs[0][1], outputs[1][1]):
        assert a.tobytes() == b.tobytes()


def test_killed_run_resumes_byte_identical(monkeypatch, tmp_path):
    path = write_jsonl(tmp_path / 'math.jsonl', [{'text': d} for d in documents(200)])
    configure(monkeypatch, tmp_path, path, output_base=str(tmp_path / 'whole'))
    prepare.prepare_source('math')
    whole_manifest, whole = read_source(tmp_path / 'whole' / 'math')

    configure(monkeypatch, tmp_path, path, output_base=str(tmp_path / 'killed'))
    real_save = prepare.save_manifest
    calls = []

    def dying_save(folder, manifest):
        calls.append(1)
        if len(calls) == 3:  # chunk 3 is on disk, its manifest entry is not: the worst moment to die
            open(os.path.join(folder, 'manifest.json.tmp'), 'w').write('{half')
            raise KeyboardInterrupt
        real_save(folder, manifest)

    monkeypatch.setattr(prepare, 'save_manifest', dying_save)
    with pytest.raises(KeyboardInterrupt):
        prepare.prepare_source('math')
    partial = json.load(open(tmp_path / 'killed' / 'math' / 'manifest.json'))
    assert len(partial['chunks']) == 2 and not partial['complete']
    monkeypatch.setattr(prepare, 'save_manifest', real_save)
    prepare.prepare_source('math')
    resumed_manifest, resumed = read_source(tmp_path / 'killed' / 'math')
    assert resumed_manifest == whole_manifest
    assert [c.tobytes() for c in resumed] == [c.tobytes() for c in whole]
    assert not any(f.endswith('.tmp') for f in os.listdir(tmp_path / 'killed' / 'math'))


def test_an_interrupted_hub_stream_resumes_where_it_stopped(monkeypatch, tmp_path):
    """The math source streamed from the hub, stood in for by a local streaming dataset of four jsonl shards: killed
    after its second chunk and resumed, it streams no row of its finished chunks again, and its chunks are
    byte-identical to an uninterrupted run's."""
    import datasets
    docs = documents(200)
    shards = [write_jsonl(tmp_path / f'shard{i}.jsonl', [{'text': docs[j], 'row': j} for j in range(50 * i, 50 * i + 50)])
              for i in range(4)]
    streamed, local = [], datasets.load_dataset

    def load_dataset(dataset_id, config, split, streaming, token):
        assert (dataset_id, config, split, streaming) == ('nvidia/Nemotron-CC-Math-v1', '4plus', 'train', True)
        stream = local('json', data_files=shards, split='train', streaming=True)
        return stream.map(lambda row: streamed.append(row['row']) or row)  # every row the stream yields, counted
    monkeypatch.setattr(datasets, 'load_dataset', load_dataset)
    monkeypatch.setenv('HF_TOKEN', 'hf_test')
    configure(monkeypatch, tmp_path, '', output_base=str(tmp_path / 'whole'))
    prepare.prepare_source('math')
    whole_manifest, whole = read_source(tmp_path / 'whole' / 'math')
    assert streamed == list(range(200)) and len(whole) >= 6

    streamed.clear()
    configure(monkeypatch, tmp_path, '', output_base=str(tmp_path / 'killed'))
    real_save, calls = prepare.save_manifest, []

    def dying_save(folder, manifest):
        calls.append(1)
        if len(calls) == 3:  # chunk 3 is on disk, its manifest entry is not
            raise KeyboardInterrupt
        real_save(folder, manifest)
    monkeypatch.setattr(prepare, 'save_manifest', dying_save)
    with pytest.raises(KeyboardInterrupt):
        prepare.prepare_source('math')
    finished = json.load(open(tmp_path / 'killed' / 'math' / 'manifest.json'))['streams'][0]['rows_read']
    assert 0 < finished < 100  # in the second shard
    streamed.clear()
    monkeypatch.setattr(prepare, 'save_manifest', real_save)
    prepare.prepare_source('math')
    assert streamed == list(range(finished, 200))  # from the first row no finished chunk holds, each row once
    resumed_manifest, resumed = read_source(tmp_path / 'killed' / 'math')
    for manifest in (resumed_manifest, whole_manifest):  # the stream's own bookkeeping differs after a resume
        assert manifest['streams'][0].pop('position')['examples_iterable']
    assert resumed_manifest == whole_manifest
    assert [c.tobytes() for c in resumed] == [c.tobytes() for c in whole]


def test_a_folder_held_by_a_live_prepare_stops_another_at_once(monkeypatch, tmp_path):
    path = write_jsonl(tmp_path / 'math.jsonl', [{'text': d} for d in documents(20)])
    configure(monkeypatch, tmp_path, path)
    with held_by_another_process(tmp_path / 'out' / 'math') as pid:
        with pytest.raises(SystemExit, match=rf"^error: .*out/math is in use by a live run \(process {pid} on .*\): "
                                             r"stop that run, or give this one another folder$"):
            prepare.prepare_source('math')
    assert prepare.prepare_source('math')['complete']


def test_verify_catches_truncation_and_flipped_byte(monkeypatch, tmp_path):
    path = write_jsonl(tmp_path / 'math.jsonl', [{'text': d} for d in documents()])
    configure(monkeypatch, tmp_path, path)
    prepare.prepare_source('math')
    folder = str(tmp_path / 'out' / 'math')
    assert prepare.verify_folder(folder)['complete']
    chunk = os.path.join(folder, 'chunk_00001.bin')
    data = open(chunk, 'rb').read()
    open(chunk, 'wb').write(data[:-6])
    with pytest.raises(SystemExit, match=r'chunk_00001\.bin has .* bytes, the manifest says .*truncated'):
        prepare.verify_folder(folder)
    flipped = bytearray(data)
    flipped[100] ^= 0x01
    open(chunk, 'wb').write(bytes(flipped))
    with pytest.raises(SystemExit, match=r'chunk_00001\.bin fails its checksum'):
        prepare.verify_folder(folder)
    result = subprocess.run([sys.executable, 'prepare.py', f'--verify={folder}'], cwd=ROOT, capture_output=True,
                            text=True)
    assert result.returncode == 1 and result.stderr.strip().count('\n') == 0
    assert 'fails its checksum' in result.stderr
    # damage that keeps the size and the mtime: training's record of what it hashed (verified.json) does not vouch
    # for it, and --verify hashes every file again
    open(chunk, 'wb').write(data)
    entry = prepare.read_manifest(folder)['chunks'][1]
    assert prepare.verify_folder(folder) and U.verified_chunk(folder, entry) == chunk  # hashed, and recorded
    stat = os.stat(chunk)
    with open(chunk, 'r+b') as f:
        f.seek(100)
        f.write(bytes([data[100] ^ 0x01]))
    os.utime(chunk, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert os.stat(chunk).st_mtime_ns == stat.st_mtime_ns and os.path.getsize(chunk) == stat.st_size
    with pytest.raises(SystemExit, match=r'chunk_00001\.bin fails its manifest checksum'):
        U.verified_chunk(folder, entry)
    with pytest.raises(SystemExit, match=r'chunk_00001\.bin fails its checksum'):
        prepare.verify_folder(folder)


def test_sft_mask_covers_exactly_the_assistant_turns(monkeypatch, tmp_path):
    rows = [{'problem': 'What is 2+3?', 'expected_answer': '5',
             'messages': [{'role': 'system', 'content': 'Reason step by step.'},
                          {'role': 'user', 'content': 'What is 2+3?'},
                          {'role': 'assistant', 'content': '2+3 = 5. The answer is \\boxed{5}.'}]},
            {'messages': [{'role': 'user', 'content': 'Factor x^2-1.'},
                          {'role': 'assistant', 'content': '(x-1)(x+1)'},
                          {'role': 'user', 'content': 'And x^2-4?'},
                          {'role': 'assistant', 'content': '(x-2)(x+2)'}]},
            {'messages': 'not a list'}]
    path = write_jsonl(tmp_path / 'sft.jsonl', rows)
    configure(monkeypatch, tmp_path, path)
    manifest = prepare.prepare_source('sft')
    folder = tmp_path / 'out' / 'sft'
    tokens = np.fromfile(folder / 'chunk_00000.bin', dtype=np.uint32)
    mask = np.fromfile(folder / 'chunk_00000.mask.bin', dtype=np.uint8)
    assert manifest['total_documents'] == 2 and manifest['bad_rows'] == 1
    assert tokens.size == mask.size and tokens[-1] == EOS_ID
    text = TOKENIZER.decode(tokens.tolist(), skip_special_tokens=False)
    assert text.startswith('<|im_start|>system\nReason step by step.<|im_end|>\n<|im_start|>user\nWhat is 2+3?')
    # masked runs decode to exactly the assistant contents with their closing <|im_end|>
    runs, current = [], []
    for token, m in zip(tokens.tolist(), mask.tolist()):
        if m:
            current.append(token)
        elif current:
            runs.append(TOKENIZER.decode(current, skip_special_tokens=False))
            current = []
    assert runs == ['2+3 = 5. The answer is \\boxed{5}.<|im_end|>', '(x-1)(x+1)<|im_end|>', '(x-2)(x+2)<|im_end|>']


def test_metamath_schema(monkeypatch, tmp_path):
    path = write_jsonl(tmp_path / 'mm.jsonl', [{'query': 'Compute 6*7.', 'response': 'The answer is: 42',
                                                'type': 'GSM_Rephrased'}])
    configure(monkeypatch, tmp_path, path, sft_sources='metamath')
    prepare.prepare_source('sft')
    folder = tmp_path / 'out' / 'sft'
    tokens = np.fromfile(folder / 'chunk_00000.bin', dtype=np.uint32)
    mask = np.fromfile(folder / 'chunk_00000.mask.bin', dtype=np.uint8).astype(bool)
    assert TOKENIZER.decode(tokens[mask].tolist(), skip_special_tokens=False) == 'The answer is: 42<|im_end|>'


PREPARE_ERRORS = [  # prepare.py's settings over configure's, for source math -> the line it stops with; {tmp}: a
    # folder holding empty.jsonl and wrong.jsonl (1,500 rows without 'text', checked every batch of 16); no HF_TOKEN
    ({'input': '{tmp}/empty.jsonl'}, r'.*empty\.jsonl is empty'),
    ({'input': '{tmp}/nothing*.jsonl'}, r'.*nothing\*\.jsonl matches no file'),
    ({'input': '{tmp}/wrong.jsonl'}, r"1,008 of 1,008 rows of local are malformed \(no usable 'text'\), above "
                                     r'max_bad_fraction=0\.01: wrong files or schema\?'),
    ({'input': ''}, r'HF_TOKEN is not set and nvidia/Nemotron-CC-Math-v1 is gated'),
]


@pytest.mark.parametrize('settings, line', PREPARE_ERRORS)
def test_bad_input_is_one_clear_line(monkeypatch, tmp_path, settings, line):
    (tmp_path / 'empty.jsonl').write_text('')
    write_jsonl(tmp_path / 'wrong.jsonl', [{'content': d} for d in documents(1500)])
    monkeypatch.delenv('HF_TOKEN', raising=False)
    monkeypatch.chdir(tmp_path)  # no .env here
    settings = {k: v.format(tmp=tmp_path) for k, v in settings.items()}
    configure(monkeypatch, tmp_path, settings.pop('input'), **settings)
    with pytest.raises(SystemExit, match=f'^error: {line}'):
        prepare.prepare_source('math')


def test_changed_arguments_on_an_existing_folder(monkeypatch, tmp_path):
    path = write_jsonl(tmp_path / 'math.jsonl', [{'text': d} for d in documents(20)])
    configure(monkeypatch, tmp_path, path)
    prepare.prepare_source('math')
    configure(monkeypatch, tmp_path, path, chunk_tokens=999)
    with pytest.raises(SystemExit, match='holds a preparation with different chunk_tokens'):
        prepare.prepare_source('math')


def test_cli_unknown_source():
    result = subprocess.run([sys.executable, 'prepare.py', '--source=maths'], cwd=ROOT, capture_output=True,
                            text=True)
    assert result.returncode == 1
    assert result.stderr.strip() == "error: unknown source 'maths'; choose from math, stem, code, sft, all"


# -----------------------------------------------------------------------------
# Nemotron-Math-v2 as it is: reasoning, tool rows, None fields, one trace per problem; special-token text

def sft_prepared(monkeypatch, tmp_path, rows, **overrides):
    os.makedirs(tmp_path, exist_ok=True)
    configure(monkeypatch, tmp_path, write_jsonl(tmp_path / 'sft.jsonl', rows), **overrides)
    manifest = prepare.prepare_source('sft')
    folder = tmp_path / 'out' / 'sft'
    tokens = np.concatenate([np.fromfile(folder / c['file'], dtype=np.uint32) for c in manifest['chunks']])
    mask = np.concatenate([np.fromfile(folder / c['mask_file'], dtype=np.uint8) for c in manifest['chunks']])
    return manifest, tokens, mask


def trained_runs(tokens, mask):
    runs, current = [], []
    for token, m in zip(tokens.tolist(), mask.tolist()):
        if m:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    return runs


def test_real_schema_with_tool_rows_prepares_and_counts(monkeypatch, tmp_path, capsys):
    rng = np.random.default_rng(0)
    rows = [row for i in range(1000) for row in prepare.sft_rows(rng, i)]  # 2,000 rows, half tool-integrated
    assert sum(bool(r['tools']) for r in rows) == 1000 and any(m['content'] is None for r in rows for m in r['messages'])
    manifest, tokens, mask = sft_prepared(monkeypatch, tmp_path, rows, chunk_tokens=50_000)
    skipped, stats = manifest['skipped'], manifest['sft']
    assert skipped['tool'] == 1000 and skipped['malformed'] == 0
    assert stats['conversations'] + skipped['extra_trace'] == 1000 == manifest['total_documents'] + skipped['extra_trace']
    assert stats['problems'] == stats['conversations'] and stats['assistant_tokens'] == int(mask.sum())
    out = capsys.readouterr().out
    assert f"{stats['conversations']:,} conversations of {stats['problems']:,} problems" in out and '1,000 tool' in out
    # the default renders the final solution only: no reasoning, no think tokens
    assert prepare.THINK_START not in tokens and b'Let me read' not in TOKENIZER.decode(tokens.tolist()).encode()


def test_reasoning_rendered_between_think_tokens_inside_the_loss(monkeypatch, tmp_path):
    rng = np.random.default_rng(1)
    rows = prepare.sft_rows(rng, 1)[:1]
    _, tokens, mask = sft_prepared(monkeypatch, tmp_path, rows, sft_reasoning=True)
    message = rows[0]['messages'][-1]
    runs = [TOKENIZER.decode(r, skip_special_tokens=False) for r in trained_runs(tokens, mask)]
    assert runs == [f"<think>\n{message['reasoning_content']}\n</think>\n\n{message['content']}<|im_end|>"]
    assert tokens.tolist().count(prepare.THINK_START) == 1 and tokens.tolist().count(prepare.THINK_END) == 1


def test_none_and_empty_fields(monkeypatch, tmp_path):
    m = prepare.message
    rows = [{'problem': 'p1', 'messages': [m('system', ''), m('user', 'What is 1+1?'), m('assistant', '2', None)]},
            {'problem': 'p2', 'messages': [m('system', None), m('user', 'What is 2+2?'), m('assistant', '4')]},
            {'problem': 'p3', 'messages': [m('user', None), m('assistant', '4')]},                 # no question
            {'problem': 'p4', 'messages': [m('user', 'Why?'), m('assistant', '')]},                 # no answer
            {'problem': 'p5', 'messages': [m('user', 'Why?'), m('assistant', '', 'because')]},      # reasoning only
            {'problem': 'p6', 'messages': [m('user', 'Hi'), m('assistant', 3)]},                    # not a string
            {'problem': 'p7', 'messages': [m('user', 'x'), m('assistant', None, None, [{'id': 'c'}]),
                                           m('tool', '1', tool_call_id='c', name='python'), m('assistant', '1')]}]
    manifest, tokens, mask = sft_prepared(monkeypatch, tmp_path, rows)
    assert manifest['total_documents'] == 2 and manifest['skipped'] == {'malformed': 4, 'tool': 1, 'extra_trace': 0}
    assert TOKENIZER.decode(tokens.tolist(), skip_special_tokens=False).startswith('<|im_start|>user\nWhat is 1+1?')
    manifest, _, _ = sft_prepared(monkeypatch, tmp_path / 'r', rows, sft_reasoning=True)  # p5 now has a target
    assert manifest['total_documents'] == 3 and manifest['skipped']['malformed'] == 3


def test_traces_per_problem_examples_and_budget(monkeypatch, tmp_path):
    m = prepare.message
    rows = [{'problem': f'problem {i // 3}', 'messages': [m('user', f'problem {i // 3}'), m('assistant', f'trace {i}')]}
            for i in range(30)]  # 10 problems, 3 traces each
    manifest, _, _ = sft_prepared(monkeypatch, tmp_path / 'a', rows)
    assert (manifest['sft']['conversations'], manifest['sft']['problems']) == (10, 10)
    assert manifest['skipped']['extra_trace'] == 20
    manifest, _, _ = sft_prepared(monkeypatch, tmp_path / 'b', rows, sft_traces_per_problem=0)
    assert (manifest['sft']['conversations'], manifest['sft']['problems']) == (30, 10)
    manifest, _, _ = sft_prepared(monkeypatch, tmp_path / 'c', rows, sft_traces_per_problem=2, sft_max_examples=7)
    assert (manifest['sft']['conversations'], manifest['sft']['problems']) == (7, 4)
    one = manifest['total_tokens'] / 7
    manifest, _, _ = sft_prepared(monkeypatch, tmp_path / 'd', rows, max_tokens=int(3.5 * one))
    assert manifest['sft']['conversations'] == 4  # the budget stops after the conversation that reaches it


def test_special_token_text_stays_text(monkeypatch, tmp_path):
    text = 'A tokenizer ends documents with <|endoftext|> and turns with <|im_end|>; here they are only text.'
    path = write_jsonl(tmp_path / 'math.jsonl', [{'text': f'{text} {i}'} for i in range(200)])
    configure(monkeypatch, tmp_path, path)
    manifest = prepare.prepare_source('math')
    tokens = np.concatenate(read_source(tmp_path / 'out' / 'math')[1]).tolist()
    assert tokens.count(EOS_ID) == 200 and tokens.count(prepare.IM_END) == 0  # one EOS per document, ours
    assert TOKENIZER.decode(tokens, skip_special_tokens=False).count('<|endoftext|>') == 400  # 200 text + 200 EOS
    m = prepare.message
    rows = [{'problem': f'p{i}', 'messages': [m('user', f'{text} {i}'), m('assistant', f'Noted: <|im_end|> {i}')]}
            for i in range(20)]
    _, tokens, mask = sft_prepared(monkeypatch, tmp_path / 'sft', rows)
    tokens = tokens.tolist()
    assert tokens.count(EOS_ID) == 20 and tokens.count(prepare.IM_END) == 40 and tokens.count(prepare.IM_START) == 40
    runs = [TOKENIZER.decode(r, skip_special_tokens=False) for r in trained_runs(np.array(tokens), mask)]
    assert runs[3] == 'Noted: <|im_end|> 3<|im_end|>'  # the text marker is trained as text, the real one closes


def test_code_dataset_config_name(monkeypatch, tmp_path):
    import datasets
    calls = []

    def load_dataset(dataset_id, config, **kwargs):
        calls.append(config)
        if config is None:
            raise ValueError("Config name is missing.\nPlease pick one among the available configs: ['data']")
        return datasets.Dataset.from_list([{'text': 'def f():\n    return 1\n'}]).to_iterable_dataset()
    monkeypatch.setattr(datasets, 'load_dataset', load_dataset)
    monkeypatch.setenv('HF_TOKEN', 'hf_test')
    configure(monkeypatch, tmp_path, '', max_tokens=10)
    with pytest.raises(SystemExit, match=r"Nemotron-CC-Code-v1 wants a config name \(Config name is missing.\): pass "
                                         r"--code_config=NAME"):
        prepare.prepare_source('code')
    monkeypatch.setattr(prepare, 'code_config', 'data')
    configure(monkeypatch, tmp_path / 'again', '', max_tokens=10)
    assert prepare.prepare_source('code')['total_documents'] == 1 and calls == [None, 'data']


def test_progress_bar_measures_the_local_file(monkeypatch, tmp_path, capsys):
    docs = documents()
    path = write_jsonl(tmp_path / 'math.jsonl', [{'text': d} for d in docs])
    configure(monkeypatch, tmp_path, path)
    prepare.prepare_source('math')
    bar = capsys.readouterr().err.replace('\r', '\n').strip().splitlines()[-1]
    assert f'{len(docs)}/{len(docs)}' in bar and 'row/s' in bar and '100%' in bar  # before: 'tok' against 7.00G
