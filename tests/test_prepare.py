import json
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import prepare
from conftest import ROOT
from model import EOS_ID
from utils import get_tokenizer

TOKENIZER = get_tokenizer('packaged')


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


def test_bad_input_is_one_clear_line(monkeypatch, tmp_path):
    empty = tmp_path / 'empty.jsonl'
    empty.write_text('')
    configure(monkeypatch, tmp_path, str(empty))
    with pytest.raises(SystemExit, match='empty.jsonl is empty'):
        prepare.prepare_source('math')
    configure(monkeypatch, tmp_path, str(tmp_path / 'nothing*.jsonl'))
    with pytest.raises(SystemExit, match='matches no file'):
        prepare.prepare_source('math')
    rows = [{'content': d} for d in documents(1500)]  # wrong schema: no 'text'; checked every batch of 16
    configure(monkeypatch, tmp_path, write_jsonl(tmp_path / 'wrong.jsonl', rows))
    with pytest.raises(SystemExit, match=r"1,008 of 1,008 rows of local are malformed \(no usable 'text'\)"):
        prepare.prepare_source('math')
    configure(monkeypatch, tmp_path, '')
    monkeypatch.delenv('HF_TOKEN', raising=False)
    monkeypatch.chdir(tmp_path)  # no .env here
    with pytest.raises(SystemExit, match='HF_TOKEN is not set and nvidia/Nemotron-CC-Math-v1 is gated'):
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
