"""Damaged data and checkpoints, reproduced as a user would meet them: one clear line, or a safe fallback."""
import importlib
import json
import os
import re
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import eval as E
import model as M
import synthetic
import utils as U
from configurator import configure
from conftest import small_config


def copy_of(data_dir, tmp_path):
    return shutil.copytree(data_dir, str(tmp_path / 'data'))


def run_train(args):
    import train
    train = importlib.reload(train)
    configure(vars(train), args)
    train.main()
    return train


def test_garbage_bytes_of_the_right_size_stop_the_run(data_dir, tmp_path):
    data = copy_of(data_dir, tmp_path)
    run_train(synthetic.train_args(data, str(tmp_path / 'ok'), max_steps=2, eval_interval=0, checkpoint_interval=0))
    cache = json.load(open(os.path.join(data, 'math', 'verified.json')))
    manifest = json.load(open(os.path.join(data, 'math', 'manifest.json')))
    assert sorted(cache) == [c['file'] for c in manifest['chunks']]  # hashed once, then cached
    with open(os.path.join(data, 'math', 'chunk_00000.bin'), 'r+b') as f:
        f.write(os.urandom(64))  # same size, new mtime: the cache no longer vouches for it
    with pytest.raises(SystemExit, match=r'math/chunk_00000\.bin fails its manifest checksum .*--verify'):
        run_train(synthetic.train_args(data, str(tmp_path / 'bad'), max_steps=2))


def test_token_ids_past_the_vocabulary_are_one_line(data_dir, tmp_path):
    import eval as E
    data = copy_of(data_dir, tmp_path)
    held_out = synthetic.write_source(str(tmp_path / 'eval'), 'math', n_tokens=3000, chunk_tokens=1000,
                                      manifest_eos=M.EOS_ID)  # what eval.py reads
    for folder in (os.path.join(data, 'math'), held_out):
        path = os.path.join(folder, 'chunk_00001.bin')
        tokens = np.fromfile(path, dtype=np.uint32)
        tokens[::50] = 200_000  # before: IndexError deep inside the embedding
        tokens.tofile(path)
    with pytest.raises(SystemExit, match=r'chunk_00001\.bin fails its manifest checksum'):
        run_train(synthetic.train_args(data, str(tmp_path / 'run'), max_steps=2))
    model = M.create_model(M.ModelConfig(vocab_size=synthetic.VOCAB, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2,
                                         d_ff=48, max_seq_len=64))
    with pytest.raises(SystemExit, match=r'chunk_00001\.bin fails its manifest checksum'):
        E.held_out_perplexity(model, held_out, 1000, 1000, 32)


def test_invalid_manifest_is_one_line(data_dir, tmp_path, monkeypatch):
    import eval as E
    import prepare
    data = copy_of(data_dir, tmp_path)
    with open(os.path.join(data, 'math', 'manifest.json'), 'w') as f:
        f.write('{"format": "polychromatic-tokens-v1", "chunks": [')
    pattern = r'math/manifest\.json is not valid JSON .*re-run prepare\.py'
    with pytest.raises(SystemExit, match=pattern):
        run_train(synthetic.train_args(data, str(tmp_path / 'run'), max_steps=2))
    model = M.create_model(M.ModelConfig(vocab_size=synthetic.VOCAB, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2,
                                         d_ff=48, max_seq_len=64))
    with pytest.raises(SystemExit, match=pattern):
        E.held_out_perplexity(model, os.path.join(data, 'math'), 1000, 1000, 32)
    rows = tmp_path / 'math.jsonl'
    rows.write_text('{"text": "a document"}\n')
    for key, value in dict(input=str(rows), output_base=data, tokenizer='packaged', num_proc=1).items():
        monkeypatch.setattr(prepare, key, value)
    with pytest.raises(SystemExit, match=pattern):
        prepare.prepare_source('math')


def test_damaged_newest_checkpoint_falls_back_and_the_log_has_each_step_once(data_dir, tmp_path, capsys):
    out = tmp_path / 'run'
    args = synthetic.train_args(data_dir, str(out), max_steps=12, log_interval=1, eval_interval=5,
                                checkpoint_interval=5)
    run_train(args + ['--stop_after_steps=12'])  # saves at 5, 10 (and at 12, which a crash loses below)
    os.remove(out / 'portable_final.pt')
    size = os.path.getsize(out / 'portable_10.pt')
    with open(out / 'portable_10.pt', 'r+b') as f:
        f.truncate(size // 2)  # a save cut short
    (out / 'portable_12.pt.tmp').write_bytes(b'half a file')
    capsys.readouterr()
    run_train(args)
    printed = capsys.readouterr().out
    assert re.search(r'warning: .*portable_10\.pt is damaged .*falling back', printed)
    assert 'resumed from step 5' in printed and 'portable_5.pt' in printed
    assert not list(out.glob('*.tmp'))
    log = [json.loads(line) for line in open(out / 'train_log.jsonl')]
    train_steps = [e['step'] for e in log if 'train/loss' in e]
    val_steps = [e['step'] for e in log if 'val/loss' in e]
    assert train_steps == list(range(1, 13)) and val_steps == [5, 10, 12]  # each once, though 6-12 ran twice


def test_a_resume_falls_back_past_a_flipped_bit(tmp_path, capsys):
    model = M.create_model(small_config())
    optimizer = torch.optim.AdamW(model.parameters())
    for step in (10, 20):
        U.save_checkpoint(str(tmp_path / f'portable_{step}.pt'), model, step, optimizer.state_dict())
    synthetic.flip_byte(str(tmp_path / 'portable_20.pt'))
    path, state = U.resume_state(str(tmp_path), 'portable_', is_master=True)
    assert path == str(tmp_path / 'portable_10.pt') and state['step'] == 10
    assert capsys.readouterr().out == (f"warning: {tmp_path}/portable_20.pt is damaged (ValueError: its "
                                       "model_state_dict fail the sha256 recorded when it was saved); falling back "
                                       "to the newest intact checkpoint before it\n")


def test_a_torn_log_line_is_dropped_on_resume_with_one_line(tmp_path, capsys):
    log = tmp_path / 'train_log.jsonl'
    log.write_text('{"step": 5, "train/loss": 4.0}\n{"step": 10, "train/loss": 3.5}\n{"step": 15, "train/lo')
    U.trim_log(str(log), 10)
    assert log.read_text() == '{"step": 5, "train/loss": 4.0}\n{"step": 10, "train/loss": 3.5}\n'
    assert capsys.readouterr().out == f"{log}: dropped 1 torn line (a run killed while writing its log)\n"


def test_malformed_stored_answers_are_computed_again(capsys):
    lm = SimpleNamespace(answers={}, author=False, noise_seed=None, answered=0, file=None,
                         cache_hook=SimpleNamespace(add_partial=lambda *args: None))
    answer = E.HarnessLM.answer.__get__(lm)
    requests = [SimpleNamespace(args=(f'context {i}', ' continuation')) for i in range(4)]
    computed = []

    def compute(todo, record, progress, keys):
        computed.append(list(todo))
        for j in range(len(todo)):
            record(j, [-1.0, True])
    answer('loglikelihood', requests, compute)
    stored = list(lm.answers)
    for key, damaged in zip(stored[1:], ([0.5, True], 'text', [float('nan'), False])):  # what a damaged store holds
        lm.answers[key] = damaged
    assert answer('loglikelihood', requests, compute) == [[-1.0, True]] * 4
    assert computed == [[0, 1, 2, 3], [1, 2, 3]]
    assert '3 stored loglikelihood answers are malformed (a damaged store): computed again' in capsys.readouterr().out
    assert [E.valid_answer('generate_until', v) for v in ('', 3)] == [True, False]
    assert [E.valid_answer('loglikelihood_rolling', v) for v in (-3.5, 0.0, 1.0, True, None)] == [True, True] + [False] * 3
