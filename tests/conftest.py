import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from model import ModelConfig  # noqa: E402

torch.set_num_threads(2)
if not torch.cuda.is_available():  # liger-kernel's Triton kernels run on the CPU only in Triton's interpreter; it is read
    os.environ.setdefault('TRITON_INTERPRET', '1')  # when a kernel is defined, so before anything imports liger_kernel


def small_config(**overrides):
    """A model of the real shape family, small enough for CPU tests in milliseconds."""
    values = dict(vocab_size=512, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128, max_seq_len=128)
    values.update(overrides)
    return ModelConfig(**values)


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
