"""export.py: the release folder (safetensors in the author's layout, config, tokenizer, card) reads back with the
checkpoint's logits, as a folder and as a (mocked) hub repo; the card states only what was measured; the upload is
mocked, and every hub refusal is one line."""
import importlib
import json
import os
import re
import shutil
import subprocess
import sys

import huggingface_hub
import pytest
import torch
from safetensors import safe_open
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

import export as X
import model as M
import utils as U
import synthetic
import utils
from configurator import configure
from conftest import ROOT

DIMS = dict(vocab_size=512, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=128)  # the author
TOKEN = 'hf_secret_write_token_123'                                           # weights' dims in tests/synthetic.py


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    """A real tiny train.py run (checkpoint, train_log.jsonl, its command and data recorded) and a word tokenizer."""
    import train
    folder = tmp_path_factory.mktemp('run')
    data_dir, out_dir = str(folder / 'data'), str(folder / 'out')
    for i, source in enumerate(('math', 'stem', 'code')):
        synthetic.write_source(data_dir, source, seed=i)
    args = synthetic.train_args(data_dir, out_dir, max_steps=10, eval_interval=10, checkpoint_interval=10,
                                **{k: v for k, v in DIMS.items() if k != 'vocab_size'})
    argv, sys.argv = sys.argv, ['train.py'] + args
    try:
        train = importlib.reload(train)
        configure(vars(train), args)
        train.main()
    finally:
        sys.argv = argv
    tok = Tokenizer(models.WordLevel({f'w{i}': i for i in range(512)}, unk_token='w0'))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix='##')
    tok.save(str(folder / 'tokenizer.json'))
    return os.path.join(out_dir, 'portable_final.pt'), str(folder / 'tokenizer.json')


def export(args, capsys=None):
    import export as X
    X = importlib.reload(X)
    configure(vars(X), args)
    X.main()
    return capsys.readouterr().out if capsys else None


def logits(model, ids=torch.arange(40)[None] * 13 % 512):
    with torch.no_grad():
        return model(ids)


def rounded(model, dtype=torch.bfloat16):
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(dtype).float())
    return model


def test_export_reads_back_with_the_checkpoints_logits_in_the_authors_layout(trained, tmp_path, capsys):
    checkpoint, tokenizer = trained
    out = export([f'--checkpoint={checkpoint}', f'--out_dir={tmp_path}/release', f'--tokenizer={tokenizer}'], capsys)
    assert re.search(r'to .*release: model.safetensors \(bfloat16\), .* read back with identical logits', out)
    assert sorted(os.listdir(tmp_path / 'release')) == ['README.md', 'config.json', 'model.safetensors',
                                                        'tokenizer.json', 'tokenizer_config.json']
    # the same keys, shapes and dtypes as the author's model.safetensors of the same dims, the tied head stored once
    author = synthetic.write_author_files(str(tmp_path / 'author'), synthetic.author_weights())['safetensors']
    layout = lambda path: {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype())  # noqa: E731
                           for f in [safe_open(path, framework='pt')] for k in f.keys()}
    assert layout(f'{tmp_path}/release/model.safetensors') == layout(author)
    assert 'output_head.weight' not in layout(author)
    # read back: bf16 weights, the checkpoint's logits at bf16, its step and tau, the tokenizer found beside it
    original, info = U.load_checkpoint(checkpoint)
    reloaded, reloaded_info = U.load_checkpoint(f'{tmp_path}/release')
    assert torch.equal(logits(reloaded), logits(rounded(original)))
    assert (reloaded_info['step'], reloaded_info['tau'], reloaded_info['tokens']) == (10, info['tau'], 10 * 8 * 32)
    assert utils.checkpoint_tokenizer(reloaded_info) == f'{tmp_path}/release/tokenizer.json'
    config = json.load(open(tmp_path / 'release/config.json'))
    assert {k: config[k] for k in ('model_type', 'd_model', 'n_layers', 'n_heads', 'n_kv_heads', 'head_dim', 'd_ff',
                                   'max_seq_len', 'rope_theta', 'activations', 'tau', 'step', 'tokens')} == \
        {'model_type': 'polyglu', 'd_model': 32, 'n_layers': 2, 'n_heads': 4, 'n_kv_heads': 2, 'head_dim': 8,
         'd_ff': 64, 'max_seq_len': 128, 'rope_theta': 10_000.0, 'activations': ['relu', 'tanh', 'silu', 'gelu'],
         'tau': info['tau'], 'step': 10, 'tokens': 2560}
    assert config['producer']['name'] == 'PolychromaticLM' and config['producer']['version']
    assert config['tokenizer'] == 'a local tokenizer.json (copied here)'
    # float32: no rounding at all
    export([f'--checkpoint={checkpoint}', f'--out_dir={tmp_path}/fp32', f'--tokenizer={tokenizer}', '--dtype=float32'])
    assert torch.equal(logits(U.load_checkpoint(f'{tmp_path}/fp32')[0]), logits(U.load_checkpoint(checkpoint)[0]))


def test_damaged_weights_are_never_exported_and_an_export_carries_its_digest(trained, tmp_path):
    checkpoint, tokenizer = trained
    flipped = str(tmp_path / 'portable_final.pt')
    shutil.copy(checkpoint, flipped)
    synthetic.flip_byte(flipped)
    with pytest.raises(SystemExit, match=r'^error: .*portable_final\.pt is damaged: its weights fail the sha256'):
        export([f'--checkpoint={flipped}', f'--out_dir={tmp_path}/release', f'--tokenizer={tokenizer}'])
    export([f'--checkpoint={checkpoint}', f'--out_dir={tmp_path}/release', f'--tokenizer={tokenizer}'])
    release = tmp_path / 'release' / 'model.safetensors'
    data = bytearray(release.read_bytes())
    data[-100] ^= 0x01  # the last tensor's bytes: the safetensors header (its length, then JSON) is at the start
    release.write_bytes(bytes(data))
    with pytest.raises(SystemExit, match=r'^error: .*model\.safetensors is damaged: its weights fail the sha256'):
        U.load_checkpoint(str(tmp_path / 'release'))


def test_the_authors_checkpoint_exports_to_the_authors_file(tmp_path, trained):
    """Their portable .pt exported is their model.safetensors: every tensor equal, bit for bit."""
    weights = synthetic.author_weights()
    paths = synthetic.write_author_files(str(tmp_path / 'author'), weights)
    export([f'--checkpoint={paths["pt"]}', f'--out_dir={tmp_path}/release', f'--tokenizer={trained[1]}'])
    with safe_open(paths['safetensors'], framework='pt') as theirs, \
            safe_open(f'{tmp_path}/release/model.safetensors', framework='pt') as ours:
        assert set(theirs.keys()) == set(ours.keys())
        for key in theirs.keys():
            assert torch.equal(theirs.get_tensor(key), ours.get_tensor(key)), key


def test_a_mocked_hub_repo_of_the_export_loads_with_the_same_logits(trained, tmp_path, monkeypatch):
    checkpoint, tokenizer = trained
    export([f'--checkpoint={checkpoint}', f'--out_dir={tmp_path}/release', f'--tokenizer={tokenizer}'])
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_OFFLINE', False)
    monkeypatch.setattr(huggingface_hub, 'list_repo_files', lambda repo_id, token=None: os.listdir(tmp_path / 'release'))
    fetched = []
    monkeypatch.setattr(huggingface_hub, 'hf_hub_download', lambda repo_id, filename, token=None:
                        fetched.append(filename) or str(tmp_path / 'release' / filename))
    model, info = U.load_checkpoint('hf:me/tiny')
    assert fetched == ['model.safetensors', 'tokenizer.json']
    assert torch.equal(logits(model), logits(U.load_checkpoint(f'{tmp_path}/release')[0]))
    assert utils.checkpoint_tokenizer(info).endswith('release/tokenizer.json')


def test_transformers_reads_the_tokenizer_files(trained, tmp_path, monkeypatch):
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    export([f'--checkpoint={trained[0]}', f'--out_dir={tmp_path}/release', f'--tokenizer={trained[1]}'])
    from transformers import AutoTokenizer
    theirs = AutoTokenizer.from_pretrained(str(tmp_path / 'release'))
    ours = Tokenizer.from_file(trained[1])
    assert theirs('w5 w17 w300')['input_ids'] == ours.encode('w5 w17 w300').ids == [5, 17, 300]
    conversation = [{'role': 'system', 'content': 'w1'}, {'role': 'user', 'content': 'w2 w3'},
                    {'role': 'assistant', 'content': 'w4'}, {'role': 'user', 'content': 'w5'}]
    assert theirs.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True) == \
        utils.chatml(conversation)  # sft.py's ChatML


def eval_report(checkpoint, tmp_path, file=None):
    """eval.py's JSON as it writes it (keys, the harness's metric names, the perplexity protocol)."""
    report = {'checkpoint': checkpoint, 'file': file or checkpoint, 'command': f'eval.py --checkpoint={checkpoint}',
              'chat': False, 'scoring': 'harness', 'complete': True,
              'results': {'gsm8k': {'alias': 'gsm8k', 'exact_match,strict-match': 0.0125,
                                    'exact_match_stderr,strict-match': 0.003, 'exact_match,flexible-extract': 0.02,
                                    'exact_match_stderr,flexible-extract': 0.004}},
              'n-shot': {'gsm8k': 5},
              'perplexity': {'math': {'protocol': 'validation', 'loss': 1.2, 'perplexity': 3.3201, 'tokens': 4096}}}
    path = str(tmp_path / 'eval.json')
    json.dump(report, open(path, 'w'))
    return path


def test_the_card_states_what_was_measured_and_by_which_command(trained, tmp_path, capsys):
    checkpoint, tokenizer = trained
    summary = {'checkpoint': checkpoint, 'file': checkpoint, 'command': 'analyze.py --checkpoint=x',
               'routing_entropy_mean_nats': 0.1234, 'routing_entropy_mean_fraction': 0.089,
               'per_layer': {'dynamic_entropy_mean': [0.2, 0.0468]}}
    json.dump(summary, open(tmp_path / 'summary.json', 'w'))
    export([f'--checkpoint={checkpoint}', f'--out_dir={tmp_path}/release', f'--tokenizer={tokenizer}',
            f'--eval_results={eval_report(checkpoint, tmp_path)}', f'--analysis={tmp_path}/summary.json'])
    card = open(tmp_path / 'release/README.md').read()
    log = [json.loads(line) for line in open(os.path.join(os.path.dirname(checkpoint), 'train_log.jsonl'))]
    assert 'Pre-trained on 2,560 tokens in 10 steps (8 rows of 32 tokens a step, 1 process(es))' in card
    assert f"Training loss {log[-2]['train/loss']:.3f} at step 10" in card
    assert f"Validation loss {log[-1]['val/loss']:.3f} at step 10 (math {log[-1]['val/math']:.3f}" in card
    assert re.search(r'Command: `train\.py --data_dir=\S+ --out_dir=\S+ .*--max_steps=10', card)
    assert re.search(r'Data, `math`: unrecorded; 60,\d+ tokens prepared, tokenizer `synthetic`', card)  # no dataset id
    assert f'Measured by `eval.py --checkpoint={checkpoint}`' in card
    assert '| gsm8k | exact_match (strict-match) | 0.0125 | ± 0.0030 | 5 |' in card
    assert 'Perplexity, math: 3.32 (4,096 tokens; protocol `validation`)' in card
    assert 'Measured by `analyze.py --checkpoint=x`' in card and '0.1234 nats (8.9% of ln 4)' in card
    assert 'Per layer (nats, first to last): 0.200, 0.047' in card
    # nothing measured, nothing stated
    export([f'--checkpoint={checkpoint}', f'--out_dir={tmp_path}/bare', f'--tokenizer={tokenizer}'])
    bare = open(tmp_path / 'bare/README.md').read()
    assert 'No benchmark was run on these weights' in bare and '## Routing' not in bare and 'Perplexity' not in bare
    # results measured on other weights are refused
    other = str(tmp_path / 'other.pt')
    U.save_checkpoint(other, M.create_model(M.ModelConfig(**DIMS)), step=3)
    with pytest.raises(SystemExit, match=r"other\.pt.*, not .*portable_final\.pt: a card shows only figures measured .*"
                                         r"run eval\.py on it, or drop --eval_results="):
        export([f'--checkpoint={checkpoint}', f'--out_dir={tmp_path}/x', f'--tokenizer={tokenizer}',
                f'--eval_results={eval_report(other, tmp_path)}'])


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """A mocked hub: HfApi's create_repo and create_commit record their calls (the commit: each file's path in the repo
    and its bytes); HF_TOKEN from the repository's .env (utils.DOTENV, here in tmp_path)."""
    calls = []

    def create_repo(api, repo_id, **kw):
        calls.append(('create', repo_id, {**kw, 'token': api.token}))
        return f'https://huggingface.co/{repo_id}'

    def create_commit(api, repo_id, operations, **kw):
        files = {op.path_in_repo: open(op.path_or_fileobj, 'rb').read() for op in operations}
        calls.append(('commit', repo_id, {**kw, 'token': api.token, 'files': files}))
    monkeypatch.setattr(huggingface_hub.HfApi, 'create_repo', create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, 'create_commit', create_commit)
    monkeypatch.setattr(huggingface_hub, 'is_offline_mode', lambda: False)
    monkeypatch.delenv('HF_TOKEN', raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(utils, 'DOTENV', str(tmp_path / '.env'))
    (tmp_path / '.env').write_text(f'HF_TOKEN={TOKEN}\n')
    return calls


def test_push_uploads_the_folder_private_unless_public(trained, tmp_path, hub, capsys):
    checkpoint, tokenizer = trained
    out = export([f'--checkpoint={checkpoint}', '--out_dir=release', f'--tokenizer={tokenizer}', '--push=me/tiny-lm'],
                 capsys)
    (_, repo_id, create), (_, commit_repo, commit) = hub
    assert repo_id == commit_repo == 'me/tiny-lm' and create['private'] is True and create['token'] == TOKEN
    assert commit['token'] == TOKEN and sorted(commit['files']) == sorted(os.listdir(tmp_path / 'release'))
    assert 'uploaded release to https://huggingface.co/me/tiny-lm (private)' in out and TOKEN not in out
    card = open(tmp_path / 'release/README.md').read()
    assert card.count('# tiny-lm') == 1 and 'sample.py --checkpoint=hf:me/tiny-lm' in card
    hub.clear()
    export([f'--checkpoint={checkpoint}', '--out_dir=release', f'--tokenizer={tokenizer}', '--push=me/tiny-lm',
            '--public=True'])
    assert hub[0][2]['private'] is False


def test_a_push_uploads_the_release_and_nothing_else(trained, tmp_path, hub, capsys):
    checkpoint, tokenizer = trained
    args = [f'--checkpoint={checkpoint}', f'--tokenizer={tokenizer}', '--push=me/tiny-lm']
    # a folder with anything else in it (a repository's root: .env and its README; a run's folder; a README of its own
    # without an export's config.json) is refused
    (tmp_path / 'README.md').write_text('# my repository\n')
    (tmp_path / 'docs').mkdir()
    (tmp_path / 'docs' / 'README.md').write_text('# my docs\n')
    for folder, held in (('.', r'\.env, docs'), (os.path.dirname(checkpoint), r'portable_final\.pt, train_log\.jsonl'),
                         ('docs', 'README.md')):
        with pytest.raises(SystemExit, match=rf'^error: {folder} holds {held}.*not only a previous export: export '
                                             r'writes into a new folder \(a push uploads what it writes there\)'):
            export(args + [f'--out_dir={folder}'])
    assert hub == [] and (tmp_path / 'README.md').read_text() == '# my repository\n' == \
        (tmp_path / 'docs' / 'README.md').read_text().replace('docs', 'repository')
    # a previous export is replaced, a killed export's temporary file removed, and only the release goes up
    export(args + ['--out_dir=release'])
    (tmp_path / 'release' / 'model.safetensors.tmp').write_bytes(b'half of a killed export')
    hub.clear()
    export(args + ['--out_dir=release'])
    (_, _, commit), = (call for call in hub if call[0] == 'commit')
    assert sorted(commit['files']) == sorted(X.RELEASE_FILES) == sorted(os.listdir(tmp_path / 'release'))
    assert commit['files']['model.safetensors'] == (tmp_path / 'release' / 'model.safetensors').read_bytes()


@pytest.mark.parametrize('fault', sorted(synthetic.HUB_FAULTS))
def test_upload_faults_are_one_line(fault, trained, tmp_path, hub, monkeypatch, capsys):
    checkpoint, tokenizer = trained

    def refuse(*args, **kwargs):
        raise synthetic.hub_fault(fault, url='https://huggingface.co/api/models/me/tiny-lm/preupload/main')
    monkeypatch.setattr(huggingface_hub.HfApi, 'create_commit', refuse)
    with pytest.raises(SystemExit) as stop:
        export([f'--checkpoint={checkpoint}', '--out_dir=release', f'--tokenizer={tokenizer}', '--push=me/tiny-lm'])
    message = str(stop.value)
    assert message.startswith('error: upload of hf:me/tiny-lm failed: ') and '\n' not in message and TOKEN not in message
    assert re.search(synthetic.HUB_FAULTS[fault] if fault != 'forbidden' else r'may not write there \(403\)', message)
    assert TOKEN not in capsys.readouterr().out


EXPORT_ERRORS = [  # export.py's arguments and whether the hub is offline -> the line it stops with; no HF_TOKEN
    ('--push=me/tiny-lm', False, r'upload of hf:me/tiny-lm needs a write token: put HF_TOKEN=\.\.\. in the environment'),
    ('--push=me/tiny-lm', True, r'upload of hf:me/tiny-lm failed: HF_HUB_OFFLINE is set: unset it to upload'),
    ('--push=tiny-lm', False, r"push= takes a hub model id owner/name, got 'tiny-lm'"),
    ('--dtype=int8', False, r'dtype must be one of .*, got .int8.'),
    ('--eval_results={tmp}/none.json', False, r'.*none\.json not found'),
]


@pytest.mark.parametrize('arguments, offline, line', EXPORT_ERRORS)
def test_bad_input_is_one_line_and_uploads_nothing(trained, tmp_path, hub, monkeypatch, arguments, offline, line):
    checkpoint, tokenizer = trained
    os.remove(tmp_path / '.env')
    monkeypatch.setattr(huggingface_hub, 'is_offline_mode', lambda: offline)
    with pytest.raises(SystemExit, match=f'^error: {line}'):
        export([f'--checkpoint={checkpoint}', '--out_dir=release', f'--tokenizer={tokenizer}',
                *arguments.format(tmp=tmp_path).split()])
    assert hub == []


def card_blocks(card, language):
    """The code blocks of the card's Use section in one language ('' for the shell)."""
    use = card.split('\n## Use\n')[1].split('\n## ')[0]
    return re.findall(rf'^```{language}\n(.*?)^```$', use, flags=re.M | re.S)


def test_the_cards_use_lines_run_against_the_export(trained, tmp_path):
    """What a stranger copies from the hub page: every line of the card's Use section, run as it stands (offline: the
    benchmark swapped for a local task of the same kind, generation cut short)."""
    checkpoint, tokenizer = trained
    export([f'--checkpoint={checkpoint}', f'--out_dir={tmp_path}/release', f'--tokenizer={tokenizer}'])
    card = open(tmp_path / 'release/README.md').read().replace('/path/to/this/folder', str(tmp_path / 'release'))
    (tmp_path / 'tasks').mkdir()
    (tmp_path / 'tasks' / 'rows.jsonl').write_text(''.join(json.dumps({'question': f'w{i} w{i + 1}', 'choices': [
        f'w{i + 2}', f'w{i + 3}'], 'answer': 0}) + '\n' for i in range(3)))
    (tmp_path / 'tasks' / 'local_mc.yaml').write_text(f"""task: local_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {tmp_path}/tasks/rows.jsonl
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
""")
    offline = {'--tasks=paper': f'--tasks=local_mc --include_path={tmp_path}/tasks --perplexity=False '
                                f'--output={tmp_path}/eval.json',
               '--tasks hellaswag': f'--tasks local_mc --include_path {tmp_path}/tasks',
               '--output_path results/': f'--output_path {tmp_path}/results/'}  # not into the code's folder
    env = {**os.environ, 'HF_DATASETS_OFFLINE': '1', 'HF_HUB_OFFLINE': '1'}
    (shell,), (python,) = card_blocks(card, ''), card_blocks(card, 'python')
    for line in shell.strip().splitlines():
        for benchmark, local in offline.items():
            line = line.replace(benchmark, local)
        if line.startswith('python sample.py'):
            line += ' --max_new_tokens=4'
        result = subprocess.run(line.replace('python', sys.executable, 1), shell=True, cwd=ROOT, env=env,
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, (line, result.stderr[-2000:])
    assert json.load(open(tmp_path / 'eval.json'))['results']['local_mc']['acc,none'] >= 0
    assert any(name.startswith('results_') for _, _, names in os.walk(tmp_path / 'results') for name in names)
    result = subprocess.run([sys.executable, '-c', python + 'print(info["step"], model.config.d_model)'], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ['10', '32']


def test_the_card_carries_the_results_as_a_model_index_and_the_runs_provenance(trained, tmp_path):
    checkpoint, tokenizer = trained
    report = json.load(open(eval_report(checkpoint, tmp_path)))
    report.update(configs={'gsm8k': {'dataset_path': 'openai/gsm8k', 'dataset_name': 'main', 'test_split': 'test'}},
                  lm_eval_version='0.4.13')
    json.dump(report, open(tmp_path / 'eval.json', 'w'))
    export([f'--checkpoint={checkpoint}', f'--out_dir={tmp_path}/release', f'--tokenizer={tokenizer}',
            f'--eval_results={tmp_path}/eval.json', '--name=tiny-test'])
    card = huggingface_hub.ModelCard.load(tmp_path / 'release' / 'README.md')
    results = {(r.dataset_type, r.dataset_config, r.dataset_split, r.metric_type, r.metric_name, r.metric_value)
               for r in card.data.eval_results}
    assert results == {('openai/gsm8k', 'main', 'test', 'exact_match', 'exact_match (strict-match)', 0.0125),
                       ('openai/gsm8k', 'main', 'test', 'exact_match', 'exact_match (flexible-extract)', 0.02)}
    assert card.data.model_name == 'tiny-test' and card.data.eval_results[0].task_name == 'gsm8k'
    info = U.load_checkpoint(checkpoint)[1]
    assert f"- Code: PolychromaticLM at commit `{info['git']['commit']}`" in card.text
    assert f"torch {torch.__version__}" in card.text and '"max_steps": 10' in card.text
