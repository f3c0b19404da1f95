"""Damaged data and checkpoints, reproduced as a user would meet them: one clear line, or a safe fallback."""
import importlib
import json
import os
import re
import shutil

import numpy as np
import pytest

import model as M
import synthetic
from configurator import configure


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
