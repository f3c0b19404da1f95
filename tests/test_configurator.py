import importlib
import os
import re
import subprocess
import sys

import pytest

from configurator import config_keys, configure
from conftest import ROOT


def defaults():
    import math  # noqa: F401  (modules and functions in a script's globals are not config)
    return {'learning_rate': 1e-4, 'max_iters': 100, 'wandb_log': True, 'out_dir': 'checkpoints',
            'betas': (0.9, 0.95), 'init_from': None, 'EOS_ID': 151643, 'math': math, '_private': 1}


def test_overrides_and_types():
    ns = defaults()
    config = configure(ns, ['--max_iters=7', '--learning_rate=3', '--out_dir=out/run1', '--wandb_log=False',
                            '--betas=(0.8, 0.9)', '--init_from=checkpoints/portable_final.pt'])
    assert ns['max_iters'] == 7
    assert ns['learning_rate'] == 3.0 and isinstance(ns['learning_rate'], float)
    assert ns['out_dir'] == 'out/run1'
    assert ns['wandb_log'] is False
    assert ns['betas'] == (0.8, 0.9)
    assert ns['init_from'] == 'checkpoints/portable_final.pt'
    assert set(config) == {'learning_rate', 'max_iters', 'wandb_log', 'out_dir', 'betas', 'init_from'}


def test_config_file_then_overrides(tmp_path):
    path = tmp_path / 'run.py'
    path.write_text("import math\nmax_iters = 50\nlearning_rate = 2 * math.pi\n")
    ns = defaults()
    configure(ns, [str(path), '--max_iters=60'])
    assert ns['max_iters'] == 60 and ns['learning_rate'] == pytest.approx(6.2832, rel=1e-4)


def test_launcher_local_rank_is_accepted():
    ns = defaults()
    configure(ns, ['--local_rank=0', '--max_iters=3'])
    assert ns['max_iters'] == 3 and 'local_rank' not in ns


@pytest.mark.parametrize('argv, message', [
    (['--learning_rat=1e-3'], "unknown config key 'learning_rat' in --learning_rat=1e-3; did you mean 'learning_rate'?"),
    (['--zzz=1'], "unknown config key 'zzz' in --zzz=1; valid keys: betas, init_from, learning_rate"),
    (['--max_iters=abc'], "--max_iters=abc: max_iters must be int like its default 100, got str 'abc'"),
    (['--max_iters=1.5'], "max_iters must be int like its default 100, got float 1.5"),
    (['--wandb_log=yes'], "wandb_log must be bool like its default True, got str 'yes' (write True or False)"),
    (['--max_iters'], "argument --max_iters needs a value: write --max_iters=VALUE"),
    (['--EOS_ID=3'], "unknown config key 'EOS_ID'"),
    (['config/does_not_exist.py'], "config file config/does_not_exist.py not found; available:"),
])
def test_errors_are_one_clear_line(argv, message):
    with pytest.raises(SystemExit) as e:
        configure(defaults(), argv)
    text = str(e.value)
    assert text.startswith('error: ') and message in text and '\n' not in text


def test_config_file_errors(tmp_path):
    path = tmp_path / 'bad.py'
    path.write_text("max_iter = 5\n")
    with pytest.raises(SystemExit, match=r"bad\.py: unknown config key 'max_iter'; did you mean 'max_iters'\?"):
        configure(defaults(), [str(path)])
    path.write_text("max_iters = '5'\n")
    with pytest.raises(SystemExit, match="max_iters must be int like its default 100, got str '5'"):
        configure(defaults(), [str(path)])


def test_every_config_file_loads_into_its_script():
    """A misspelt key in any config/*.py is caught here, not at the start of a paid run."""
    import importlib
    from conftest import ROOT
    folder = os.path.join(ROOT, 'config')
    for name in sorted(os.listdir(folder)):
        script = next((s for s in ('bench', 'sft', 'eval', 'analyze') if s in name), 'train')
        module = importlib.import_module(script)
        settings = configure(dict(vars(module)), [os.path.join(folder, name)])
        assert settings, name


@pytest.mark.parametrize('script', ['prepare', 'train', 'sft', 'eval', 'analyze', 'bench', 'sample', 'export'])
def test_help_lists_every_key_with_its_default_and_comment(script, capsys):
    """A researcher's first move, `python train.py --help`: every config key, its default and the comment beside it
    (it once answered 'error: argument --help needs a value')."""
    module = importlib.import_module(script)
    with pytest.raises(SystemExit) as exit_status:
        configure(vars(module), ['--help'])
    assert exit_status.value.code == 0
    out = capsys.readouterr().out
    for key in config_keys(vars(module)):
        assert f"--{key}={getattr(module, key)!r}" in out
    assert out.startswith(module.__doc__.strip().split('\n\n')[0])


def test_help_through_the_command_line_and_comments():
    result = subprocess.run([sys.executable, 'train.py', '--help'], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert re.search(r"--max_steps=19531 +~10B tokens at 512K tokens a step", result.stdout)  # the plan's comment
    assert re.search(r"--max_bad_steps=10 +skipped updates in a row \(non-finite, or spikes\) before the run stops",
                     result.stdout)


@pytest.mark.parametrize('old', ['checkpoint_blocks', 'gradient_checkpointing'])
def test_a_renamed_key_names_its_new_name(old):
    with pytest.raises(SystemExit, match=rf"unknown config key '{old}' .*did you mean 'recompute_blocks'\? "
                                         rf"\({old} is now recompute_blocks\)"):
        configure({'recompute_blocks': 0}, [f'--{old}=True'])
