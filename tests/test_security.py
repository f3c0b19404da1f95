"""What the project reads from outside and does not control: `.env`, the command line, checkpoint files from the hub,
a shared folder. docs/security.md says what each check guards; the export's push is tested in test_export.py, damaged
files in test_damage.py (and a chunk's in test_prepare.py and test_sft.py)."""
import errno
import fcntl
import json
import os
import time

import pytest
import torch
from safetensors.torch import save_file

import configurator
import eval as E
import model as M
import synthetic
import utils as U
from conftest import held_by_another_process, small_config


# -----------------------------------------------------------------------------
# 2. .env gives only its secrets, and a command line never echoes one

def test_dotenv_gives_only_its_secrets_and_names_the_rest(tmp_path, monkeypatch, capsys):
    env = tmp_path / 'repo' / '.env'
    env.parent.mkdir()
    env.write_text("# secrets\nHF_TOKEN='hf_from_dotenv'\nexport WANDB_API_KEY=abc123\nHF_ENDPOINT=http://127.0.0.1:8765\n"
                   "GIT_CONFIG_COUNT=1\nGIT_CONFIG_KEY_0=core.fsmonitor\nGIT_CONFIG_VALUE_0=touch /tmp/pwned\n")
    for key in ('HF_TOKEN', 'WANDB_API_KEY', 'HF_ENDPOINT', 'GIT_CONFIG_COUNT', 'GIT_CONFIG_KEY_0', 'GIT_CONFIG_VALUE_0'):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(U, 'DOTENV', str(env))
    monkeypatch.setattr(U, 'IGNORED_DOTENV_KEYS', set())
    U.load_dotenv()
    assert os.environ['HF_TOKEN'] == 'hf_from_dotenv' and os.environ['WANDB_API_KEY'] == 'abc123'
    assert not {'HF_ENDPOINT', 'GIT_CONFIG_COUNT', 'GIT_CONFIG_KEY_0', 'GIT_CONFIG_VALUE_0'} & set(os.environ)
    line = capsys.readouterr().err
    assert line == (f"{env}: ignored HF_ENDPOINT, GIT_CONFIG_COUNT, GIT_CONFIG_KEY_0, GIT_CONFIG_VALUE_0: .env gives "
                    "only HF_TOKEN, WANDB_API_KEY; set other variables in the environment\n")
    U.load_dotenv()  # named once a process
    assert capsys.readouterr().err == ''
    # the environment wins, and a .env in the folder a script runs from is not read
    monkeypatch.setenv('HF_TOKEN', 'hf_from_environment')
    monkeypatch.delenv('WANDB_API_KEY')
    monkeypatch.chdir(tmp_path)
    (tmp_path / '.env').write_text('WANDB_API_KEY=from_the_working_folder\n')
    monkeypatch.setattr(U, 'DOTENV', str(tmp_path / 'none' / '.env'))
    U.load_dotenv()
    assert os.environ['HF_TOKEN'] == 'hf_from_environment' and 'WANDB_API_KEY' not in os.environ


@pytest.mark.parametrize('argv', [['--hf_token=hf_AbCdEfGhIjKlMnOpQrSt'], ['--max_iters=hf_AbCdEfGhIjKlMnOpQrSt'],
                                  ['--wandb_api_key=0123456789abcdef0123456789abcdef01234567']])
def test_a_rejected_argument_never_echoes_a_secret(argv):
    with pytest.raises(SystemExit) as stop:
        configurator.configure({'max_iters': 100, 'tokenizer': 'auto'}, argv)
    message = str(stop.value)
    assert argv[0].split('=')[1] not in message and '<hidden: it looks like a secret>' in message, message

# -----------------------------------------------------------------------------
# 3. a file cannot steer its loader; 4. its config is checked before anything is allocated


def test_a_checkpoint_cannot_set_what_the_loader_derives(tmp_path):
    other = str(tmp_path / 'other.pt')
    U.save_checkpoint(other, M.create_model(small_config()), step=5)
    path = str(tmp_path / 'claims.pt')
    state = torch.load(other, weights_only=True)
    state.update(file=other, format='safetensors', file_sha256=U.file_digest(other), sha256='0' * 64,
                 anything='else', step=7)
    torch.save(state, path)
    _, info = U.load_checkpoint(path)
    assert (info['file'], info['format'], info['step']) == (path, 'portable', 7)
    assert 'anything' not in info and 'sha256' not in info
    # eval.py's answer store and report name the weights by the bytes loaded, not by what the file says
    assert E.weights_digest(info) == U.file_digest(path) != U.file_digest(other)
    state['step'] = '7'
    torch.save(state, path)
    with pytest.raises(SystemExit, match=rf'^error: {path} records step as str: a damaged or foreign checkpoint$'):
        U.load_checkpoint(path)


def tiny_safetensors(path, **model_config):
    """The tensors of a 2-layer model, with a recorded model_config that says otherwise."""
    model = M.create_model(small_config())
    weights = {k: v.contiguous() for k, v in model.state_dict().items() if k != 'output_head.weight'}
    config = {**vars(small_config()), **model_config}
    save_file(weights, path, metadata={'step': '1', 'model_config': json.dumps(config)})
    return path


@pytest.mark.parametrize('claim, line', [
    ({'d_model': 32_768, 'n_layers': 1000}, r"model config disagrees with its tensors; \(config, tensors\): "
                                            r"\{'d_model': \(32768, 64\), 'n_layers': \(1000, 2\)\}.*nothing was allocated"),
    ({'n_layers': 2e6}, r'has n_layers=2000000\.0, not int'),
    ({'vocab_size': 2 ** 48}, r'has vocab_size=281,474,976,710,656, outside 1\.\.1,048,576'),
    ({'max_seq_len': 10 ** 9}, r'has max_seq_len=1,000,000,000, outside 1\.\.131,072'),
    ({'rope_theta': float('nan')}, r'has rope_theta=nan, outside \(0, inf\)'),
])
def test_a_config_that_disagrees_or_is_out_of_bounds_stops_before_allocating(tmp_path, claim, line):
    path = tiny_safetensors(str(tmp_path / 'model.safetensors'), **claim)
    start = time.perf_counter()
    with pytest.raises(SystemExit, match=f'^error: .*model.safetensors(\'s)? {line}'):
        U.load_checkpoint(path)
    assert time.perf_counter() - start < 5


def test_a_layer_count_out_of_bounds_stops_before_allocating(tmp_path):
    weights = dict(synthetic.author_weights())
    weights['model_core.2000000.polyglu.beta'] = torch.zeros(1)
    torch.save({'model': weights}, tmp_path / 'deep.pt')
    with pytest.raises(SystemExit, match=r'deep\.pt has n_layers=2,000,001, outside 1\.\.1,024'):
        U.load_checkpoint(str(tmp_path / 'deep.pt'))

# -----------------------------------------------------------------------------
# 6. locks on every rank, before anything is deleted; a filesystem that cannot lock; durable writes


def test_a_second_launch_stops_on_every_rank_before_deleting_anything(tmp_path):
    live = tmp_path / 'run'
    live.mkdir()
    (live / 'portable_20.pt.tmp').write_bytes(b'the live run is saving this')
    with held_by_another_process(live, rank=1) as pid:
        with pytest.raises(SystemExit, match=rf'^error: {live} is in use by a live run \(process {pid} on '):
            U.hold_folder(str(live), rank=1)
        U.resume_state(str(live), 'portable_', is_master=False)  # what a rank other than 0 runs: it deletes nothing
    assert (live / 'portable_20.pt.tmp').exists()
    U.hold_folder(str(live))
    U.resume_state(str(live), 'portable_', is_master=True)  # rank 0, holding the lock: a killed save's leftovers go
    assert not (live / 'portable_20.pt.tmp').exists()


def test_eval_analyze_and_export_hold_their_output(tmp_path, monkeypatch):
    import analyze as A
    import export as X
    results = tmp_path / 'results'
    monkeypatch.setattr(E, 'output', str(results / 'eval.json'))
    monkeypatch.setattr(A, 'output', str(tmp_path / 'figures'))
    for folder, lock, start in ((results, '.eval.json.lock', E.check_output_folder),
                                (tmp_path / 'figures', '.lock', A.main),
                                (tmp_path / 'release', '.lock', lambda: X.release_folder(str(tmp_path / 'release')))):
        with held_by_another_process(folder, lock=lock) as pid:
            with pytest.raises(SystemExit, match=rf'^error: {folder} is in use by a live run \(process {pid} on '):
                start()
    monkeypatch.setattr(E, 'output', str(results / 'other.json'))
    with held_by_another_process(results, lock='.eval.json.lock'):
        E.check_output_folder()  # another output in the same folder is another evaluation's


@pytest.mark.parametrize('code', [errno.ENOLCK, errno.EOPNOTSUPP])
def test_a_filesystem_that_cannot_lock_is_its_own_line(tmp_path, monkeypatch, code):
    def refuse(handle, operation):
        raise OSError(code, os.strerror(code))
    monkeypatch.setattr(fcntl, 'flock', refuse)
    with pytest.raises(SystemExit, match=rf'^error: {tmp_path} is on a filesystem that cannot lock files '
                                         rf'\({errno.errorcode[code]}\), so two runs there would overwrite each other'):
        U.hold_folder(str(tmp_path))


def test_a_checkpoint_is_on_the_disk_before_its_name(tmp_path, monkeypatch):
    calls, fsync, replace = [], os.fsync, os.replace
    monkeypatch.setattr(os, 'fsync', lambda fd: calls.append(('fsync', os.readlink(f'/proc/self/fd/{fd}'))) or fsync(fd))
    monkeypatch.setattr(os, 'replace', lambda a, b: calls.append(('replace', str(a), str(b))) or replace(a, b))
    path = str(tmp_path / 'portable_1.pt')
    U.save_checkpoint(path, M.create_model(small_config()), step=1)
    assert calls == [('fsync', f'{path}.tmp'), ('replace', f'{path}.tmp', path), ('fsync', str(tmp_path))]
