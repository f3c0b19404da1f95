"""The author's published formats (SPEC.md): a portable .pt and a .safetensors, built here at a tiny size from the
author's names, load into our model with the author's logits; a hub id resolves to the right file, offline too."""
import logging
import os
import pickle
import re

import pytest
import torch
from safetensors import safe_open

import model as M
import utils as U
import synthetic


@pytest.fixture(scope='module')
def author(tmp_path_factory):
    weights = synthetic.author_weights(seq_length=96)
    return weights, synthetic.write_author_files(str(tmp_path_factory.mktemp('author')), weights)


def direct_logits(weights, idx):
    """The same weights put into the project's model directly, by key."""
    model = M.PolychromaticLM(M.ModelConfig(vocab_size=512, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64,
                                            max_seq_len=96))
    model.load_state_dict({k: v.float() for k, v in weights.items() if not k.startswith('rope.')}, strict=False)
    model.set_tau(0.1)
    with torch.no_grad():
        return model.eval()(idx)


def test_both_author_formats_give_the_logits_of_the_same_weights(author, capsys):
    weights, paths = author
    idx = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(1))
    expected = direct_logits(weights, idx)
    for kind, path in paths.items():
        model, info = U.load_checkpoint(path)
        assert (info['format'], info['tau']) == ({'pt': 'author portable', 'safetensors': 'safetensors'}[kind], 0.1)
        assert info['model_config'] == {**info['model_config'], 'vocab_size': 512, 'd_model': 32, 'n_layers': 2,
                                        'n_heads': 4, 'n_kv_heads': 2, 'd_ff': 64, 'max_seq_len': 96}
        assert model.output_head.weight is model.embeddings.weight
        with torch.no_grad():
            torch.testing.assert_close(model(idx), expected, rtol=0, atol=0)
    out = capsys.readouterr().out
    assert 'names 3 classes that were not run' in out  # DeepSpeed's LossScaler, ZeroStageEnum, fragment_address
    assert 'records no tau; using 0.1' in out            # the safetensors file has no tau
    _, info = U.load_checkpoint(paths['pt'])
    assert info['step'] == 19_531
    with safe_open(paths['safetensors'], framework='pt') as f:
        assert 'output_head.weight' not in f.keys()      # the tied head stored once


def test_our_state_dict_moves_to_the_author_key_for_key(author):
    weights, _ = author
    model, _ = U.load_checkpoint(author[1]['pt'])
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == {k: tuple(v.shape) for k, v in weights.items()}


class Payload:
    """What a hostile pickle looks like: unpickling it would call exec."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').close()",)


def test_pickled_code_in_the_optimizer_entry_never_runs(tmp_path):
    weights = synthetic.author_weights()
    marker = str(tmp_path / 'ran')
    torch.save({'model': weights, 'optimizer': {'hook': Payload(marker)}, 'step': 3, 'tau': 0.5}, tmp_path / 'a.pt')
    with pytest.raises(pickle.UnpicklingError):  # what plain weights_only does with it
        torch.load(tmp_path / 'a.pt', weights_only=True)
    model, info = U.load_checkpoint(str(tmp_path / 'a.pt'))
    assert not os.path.exists(marker) and info['step'] == 3 and model.tau == 0.5


def damaged(tmp_path, name, change):
    weights = dict(synthetic.author_weights())
    change(weights)
    path = str(tmp_path / f'{name}.pt')
    torch.save({'model': weights, 'step': 1, 'tau': 0.1}, path)
    with pytest.raises(SystemExit) as error:
        U.load_checkpoint(path)
    message = str(error.value)
    assert '\n' not in message and message.startswith(f'error: {path}')
    return message


def test_missing_extra_or_wrong_shape_tensor_is_one_line(tmp_path):
    assert "missing ['model_core.1.polyglu.beta']" in damaged(
        tmp_path, 'missing', lambda w: w.pop('model_core.1.polyglu.beta'))
    assert "unexpected ['model_core.0.polyglu.gamma']" in damaged(
        tmp_path, 'extra', lambda w: w.update({'model_core.0.polyglu.gamma': torch.zeros(4)}))
    assert "model_core.1.gqa.W_v.weight: checkpoint (8, 32) vs model (16, 32)" in damaged(
        tmp_path, 'shape', lambda w: w.update({'model_core.1.gqa.W_v.weight': torch.zeros(8, 32)}))
    assert "no tensor 'embeddings.weight'" in damaged(
        tmp_path, 'headless', lambda w: [w.pop('embeddings.weight'), w.pop('output_head.weight')])
    assert 'output head that differs from its embedding' in damaged(
        tmp_path, 'untied', lambda w: w.update({'output_head.weight': w['output_head.weight'] + 1}))
    assert 'RoPE table rope.cosines differs from theta=10000.0' in damaged(
        tmp_path, 'theta', lambda w: w.update({'rope.cosines': torch.ones(128, 4)}))


def test_architecture_inferred_from_shapes(tmp_path):
    weights = synthetic.author_weights(d_model=48, n_layers=3, n_heads=6, n_kv_heads=3, d_ff=80, seq_length=40, vocab=300)
    del weights['rope.cosines'], weights['rope.sins']  # without the table, max_seq_len is SPEC's 4,096
    path = str(tmp_path / 'w.pt')
    torch.save({'model': weights, 'step': 1, 'tau': 0.2}, path)
    model, info = U.load_checkpoint(path)
    config = model.config
    assert (config.vocab_size, config.d_model, config.n_layers, config.n_heads, config.n_kv_heads, config.head_dim,
            config.d_ff, config.max_seq_len) == (300, 48, 3, 6, 3, 8, 80, 4096)
    with pytest.raises(SystemExit, match=r"different model than configured.*'d_model': \(1024, 48\)"):
        U.load_checkpoint(path, config=M.ModelConfig())


def test_vanilla_state_dict_loads(tmp_path):
    model = M.PolychromaticLM(M.ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, d_ff=48,
                                            max_seq_len=16, model_type='vanilla'))
    from safetensors.torch import save_file
    weights = {k: v for k, v in model.state_dict().items() if k != 'output_head.weight'}
    save_file(weights, str(tmp_path / 'vanilla.safetensors'))
    loaded, info = U.load_checkpoint(str(tmp_path / 'vanilla.safetensors'))
    assert loaded.config.model_type == 'vanilla' and info['tau'] is None
    idx = torch.arange(16)[None]
    with torch.no_grad():
        torch.testing.assert_close(loaded(idx), model.eval()(idx), rtol=0, atol=0)


# -----------------------------------------------------------------------------
# hub ids

def test_hub_id_fetches_the_safetensors_else_the_pt(author, monkeypatch, tmp_path):
    import huggingface_hub.constants
    _, paths = author
    calls = []
    repos = {'tylerxdurden/PolyChromaticLM-1.0-instruct-0.6B': ['README.md', 'config.json', 'model.safetensors'],
             'tylerxdurden/PolyChromaticLM-1.0-base-0.6B': ['README.md', 'checkpoint_step_19531.pt']}
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_OFFLINE', False)
    monkeypatch.setattr(huggingface_hub, 'list_repo_files', lambda repo_id, token=None: repos[repo_id])

    def download(repo_id, filename, token=None):
        calls.append((repo_id, filename, token))
        return paths['safetensors' if filename.endswith('.safetensors') else 'pt']
    monkeypatch.setattr(huggingface_hub, 'hf_hub_download', download)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv('HF_TOKEN', raising=False)
    monkeypatch.setattr(U, 'DOTENV', str(tmp_path / '.env'))  # the repository's .env
    (tmp_path / '.env').write_text('HF_TOKEN=hf_from_dotenv\n')
    for repo_id, kind in (('tylerxdurden/PolyChromaticLM-1.0-instruct-0.6B', 'safetensors'),
                          ('tylerxdurden/PolyChromaticLM-1.0-base-0.6B', 'author portable')):
        _, info = U.load_checkpoint(f'hf:{repo_id}')
        assert info['format'] == kind
    assert calls == [('tylerxdurden/PolyChromaticLM-1.0-instruct-0.6B', 'model.safetensors', 'hf_from_dotenv'),
                     ('tylerxdurden/PolyChromaticLM-1.0-base-0.6B', 'checkpoint_step_19531.pt', 'hf_from_dotenv')]


@pytest.mark.parametrize('fault', sorted(synthetic.HUB_FAULTS))
def test_hub_download_faults_are_one_line(fault, monkeypatch, capsys, caplog):
    """Each way a download fails is one line naming the id, the cause and the fix (a dead network was a 40-line httpx2
    traceback), whether the listing or the download itself fails."""
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_OFFLINE', False)

    def fail(*args, **kwargs):  # after huggingface_hub's retries, which it announces as warnings
        logging.getLogger('huggingface_hub.utils._http').warning('Retrying in 8s [Retry 5/5].')
        raise synthetic.hub_fault(fault)
    for listing, download in ((fail, None), (lambda repo_id, token=None: ['model.safetensors'], fail)):
        monkeypatch.setattr(huggingface_hub, 'list_repo_files', listing)
        monkeypatch.setattr(huggingface_hub, 'hf_hub_download', download)
        with pytest.raises(SystemExit) as stop:
            U.load_checkpoint('hf:someone/model')
        message = str(stop.value)
        assert message.startswith('error: download of hf:someone/model failed: ') and '\n' not in message
        assert re.search(synthetic.HUB_FAULTS[fault], message), message
    assert 'Retrying' not in capsys.readouterr().err + caplog.text  # the one line is all that is said


def test_a_repo_without_weights_is_one_line(monkeypatch):
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_OFFLINE', False)
    monkeypatch.setattr(huggingface_hub, 'list_repo_files', lambda repo_id, token=None: ['README.md'])
    with pytest.raises(SystemExit, match=r'no \.safetensors or \.pt checkpoint in hf:someone/weightless'):
        U.load_checkpoint('hf:someone/weightless')


def fake_hub_cache(cache, repo_id, files):
    """The Hugging Face cache's layout (models--owner--name/refs/main -> snapshots/<commit>/files), as a download
    leaves it."""
    commit = '0123456789abcdef0123456789abcdef01234567'
    repo = os.path.join(cache, 'models--' + repo_id.replace('/', '--'))
    os.makedirs(os.path.join(repo, 'refs'))
    with open(os.path.join(repo, 'refs', 'main'), 'w') as f:
        f.write(commit)
    os.makedirs(os.path.join(repo, 'snapshots', commit))
    for name, source in files.items():
        with open(source, 'rb') as src, open(os.path.join(repo, 'snapshots', commit, name), 'wb') as dst:
            dst.write(src.read())


def test_hub_id_offline_reads_the_cache(author, monkeypatch, tmp_path):
    import huggingface_hub.constants
    _, paths = author
    fake_hub_cache(str(tmp_path / 'hub'), 'tylerxdurden/PolyChromaticLM-1.0-base-0.6B',
                   {'README.md': paths['pt'], 'author_final.pt': paths['pt']})
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_OFFLINE', True)
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_CACHE', str(tmp_path / 'hub'))
    monkeypatch.setattr(huggingface_hub, 'list_repo_files', None)  # offline: never asked
    model, info = U.load_checkpoint('hf:tylerxdurden/PolyChromaticLM-1.0-base-0.6B')
    assert info['file'].endswith('author_final.pt') and info['step'] == 19_531
    with pytest.raises(SystemExit, match='HF_HUB_OFFLINE is set and it is not in the local cache'):
        U.load_checkpoint('hf:tylerxdurden/PolyChromaticLM-1.0-instruct-0.6B')


def test_folder_picks_its_checkpoint(tmp_path, author):
    _, paths = author
    model = M.create_model(M.ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, d_ff=48,
                                         max_seq_len=16))
    for step in (5, 10):
        U.save_checkpoint(str(tmp_path / f'portable_{step}.pt'), model, step=step)
    assert U.load_checkpoint(str(tmp_path))[1]['step'] == 10
    U.save_checkpoint(str(tmp_path / 'portable_final.pt'), model, step=12)
    assert U.load_checkpoint(str(tmp_path))[1]['step'] == 12
