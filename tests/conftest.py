import contextlib
import os
import subprocess
import sys

import pytest

# Inductor compiles in a pool of worker processes by default; on this suite's small graphs starting that pool costs more
# than it saves (bench.py's fused DeepSpeed smoke run: 80 s of CPU with it, 12 s without). Set before torch reads it,
# and inherited by every script a test starts.
os.environ.setdefault('TORCHINDUCTOR_COMPILE_THREADS', '1')
import torch  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from model import ModelConfig  # noqa: E402

# `make test` runs the suite on pytest-xdist workers, one thread each; the scripts they start inherit the same
if os.environ.get('PYTEST_XDIST_WORKER'):
    os.environ['OMP_NUM_THREADS'] = '1'
torch.set_num_threads(1 if os.environ.get('PYTEST_XDIST_WORKER') else 2)
if not torch.cuda.is_available():  # liger-kernel's Triton kernels run on the CPU only in Triton's interpreter; it is read
    os.environ.setdefault('TRITON_INTERPRET', '1')  # when a kernel is defined, so before anything imports liger_kernel


def engine_config(**overrides):
    """utils.make_engine's settings (utils.ENGINE_KEYS), as a stage script's globals hold them: plain PyTorch, float32,
    one micro-batch."""
    return {'backend': 'torch', 'dtype': 'float32', 'zero_stage': 0, 'micro_batch_size': 2, 'grad_accum_steps': 1,
            'grad_clip': 1.0, 'learning_rate': 1e-3, 'weight_decay': 0.1, 'beta1': 0.9, 'beta2': 0.95, 'adam_eps': 1e-8,
            'fused_adamw': False, **overrides}


def small_config(**overrides):
    """A model of the real shape family, small enough for CPU tests in milliseconds."""
    values = dict(vocab_size=512, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128, max_seq_len=128)
    values.update(overrides)
    return ModelConfig(**values)


def pytest_collection_modifyitems(items):
    """The slow tests first, longest (the demo) at the head: two workers then finish together instead of one running
    the demo alone at the end."""
    items.sort(key=lambda item: (item.get_closest_marker('slow') is None, 'test_pipeline' not in item.nodeid))


@pytest.fixture
def config():
    return small_config()


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
    """math, stem and code in prepare.py's chunk format (tests/synthetic.py), tiny vocabulary."""
    import synthetic
    folder = str(tmp_path_factory.mktemp('data'))
    for i, name in enumerate(('math', 'stem', 'code')):
        synthetic.write_source(folder, name, seed=i)
    return folder


@pytest.fixture(autouse=True)
def release_run_folders():
    """Stage scripts run in this process hold their folders (utils.hold_folder) until it ends; a test's folders are
    let go when the test ends, as a finished run's are when its process exits."""
    yield
    import utils
    for handle in utils.HELD_FOLDERS.values():
        handle.close()
    utils.HELD_FOLDERS.clear()


def everything_under(folder):
    return b''.join(open(os.path.join(root, f), 'rb').read() for root, _, files in os.walk(folder) for f in files)


def offline_wandb_run(folder):
    """The bytes of the one offline wandb run under {folder}/wandb (WANDB_MODE=offline, WANDB_DIR=folder)."""
    runs = [d for d in os.listdir(os.path.join(folder, 'wandb')) if d.startswith('offline-run-')]
    assert len(runs) == 1, runs
    return everything_under(os.path.join(folder, 'wandb', runs[0]))


def wandb_offline_env(folder):
    return {**os.environ, 'WANDB_MODE': 'offline', 'WANDB_DIR': str(folder), 'HF_TOKEN': 'hf_canary_do_not_log',
            'WANDB_SILENT': 'true', 'HF_DATASETS_OFFLINE': '1', 'HF_HUB_OFFLINE': '1'}


@contextlib.contextmanager
def held_by_another_process(folder, rank=0, lock='.lock'):
    """A live process holding `folder` as a stage script's rank would (utils.hold_folder) -> its pid."""
    holder = subprocess.Popen([sys.executable, '-c', f'import sys, utils; utils.hold_folder({str(folder)!r}, {rank}, '
                               f'{lock!r}); '
                               'print("held", flush=True); sys.stdin.read()'], cwd=ROOT, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == 'held\n'
        yield holder.pid
    finally:
        holder.kill()
        holder.wait()
