"""The PolyGLU vs VanillaLM ablation: the budget of config/ablation.py, paired data plans, the interval arithmetic of
analyze.py --compare, and `make ablation` end to end at the CPU miniature (config/tiny_ablation.py)."""
import importlib
import json
import math
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import model as M
import synthetic
from configurator import configure
from conftest import ROOT

ARMS = ('polyglu', 'vanilla')


def run_analyze(args):
    import analyze
    analyze = importlib.reload(analyze)
    configure(vars(analyze), args)
    analyze.main()
    return json.load(open(os.path.join(analyze.output, 'summary.json')))['comparison']


def test_ablation_config_is_a_budget_sized_pair():
    from bench import run_settings
    from utils import projected_cost
    settings = run_settings(os.path.join(ROOT, 'config', 'ablation.py'))
    tokens = settings['max_steps'] * settings['micro_batch_size'] * settings['grad_accum_steps'] * settings['block_size']
    for arm in ARMS:
        config = M.ModelConfig(**{k: settings[k] for k in ('vocab_size', 'd_model', 'n_layers', 'n_heads', 'n_kv_heads',
                                                           'd_ff', 'max_seq_len')}, model_type=arm)
        parameters = M.count_parameters(config)[0]
        assert 120e6 < parameters < 130e6  # the 125M class
        assert 19.9 < tokens / parameters < 20.1
        cost = projected_cost(M.flops_per_token(config, settings['block_size'], parameters), tokens)
        hours, dollars = re.search(r'([\d.]+) A100-hours, \$(\d+) at 40% MFU', cost).groups()
        assert 4 < float(hours) < 6 and 5 <= int(dollars) <= 15, cost  # measured: 5.0 h, $8 a run
    assert settings['model_type'] == 'polyglu' and 'init_seed' not in settings  # the arm and seed come from make
    import bench  # config/bench_ablation.py times this run's step and prices its tokens at the measured rate
    timed = configure(dict(vars(bench)), [os.path.join(ROOT, 'config', 'bench_ablation.py')])
    assert timed['token_budget'] == tokens
    for key in ('vocab_size', 'd_model', 'n_layers', 'n_heads', 'd_ff', 'block_size', 'micro_batch_size', 'fused',
                'recompute_blocks', 'backend', 'dtype'):
        assert timed[key] == settings[key], key


def trained_tokens(data_dir, out_dir, **overrides):
    """train.py in this process, every row it feeds the model (training and validation) recorded."""
    import train
    train = importlib.reload(train)
    configure(vars(train), synthetic.train_args(data_dir, out_dir, **overrides))
    rows, to_device = [], train.to_device
    train.to_device = lambda r, *args, **kwargs: rows.append(r.copy()) or to_device(r, *args, **kwargs)
    train.main()
    log = [json.loads(line) for line in open(os.path.join(out_dir, 'train_log.jsonl'))]
    weights = torch.load(os.path.join(out_dir, 'portable_final.pt'), weights_only=True)['model_state_dict']
    return np.concatenate(rows), log[0]['run'], weights


def test_paired_arms_train_on_the_same_tokens(data_dir, tmp_path):
    poly, poly_run, _ = trained_tokens(data_dir, str(tmp_path / 'p'), model_type='polyglu', init_seed=1)
    vanilla, vanilla_run, _ = trained_tokens(data_dir, str(tmp_path / 'v'), model_type='vanilla', init_seed=2)
    assert poly.shape == (20 * 8 + 2 * 3 * 4, 33)  # 20 steps x 8 rows, then 2 evaluations of 3 sources x 4 rows
    assert np.array_equal(poly, vanilla)  # token for token, in the same order
    assert poly_run['data_plan'] == vanilla_run['data_plan']
    assert (poly_run['model_type'], poly_run['init_seed'], vanilla_run['init_seed']) == ('polyglu', 1, 2)
    other, other_run, _ = trained_tokens(data_dir, str(tmp_path / 'o'), model_type='polyglu', seed=7)
    assert not np.array_equal(poly, other) and other_run['data_plan'] != poly_run['data_plan']


def test_init_seed_moves_the_weights_not_the_data(data_dir, tmp_path):
    default, _, weights_default = trained_tokens(data_dir, str(tmp_path / 'a'), max_steps=2, eval_interval=0)
    same, _, weights_same = trained_tokens(data_dir, str(tmp_path / 'b'), max_steps=2, eval_interval=0, init_seed=1337)
    other, _, weights_other = trained_tokens(data_dir, str(tmp_path / 'c'), max_steps=2, eval_interval=0, init_seed=5)
    assert np.array_equal(default, other) and np.array_equal(default, same)
    assert all(torch.equal(v, weights_same[k]) for k, v in weights_default.items())  # -1 means seed: runs as before
    assert not torch.equal(weights_default['embeddings.weight'], weights_other['embeddings.weight'])
    with pytest.raises(SystemExit, match=r"trained with init_seed=5, this run has init_seed=1337: resuming would change "
                                         r"its Gumbel noise midway; pass --init_seed=5"):
        trained_tokens(data_dir, str(tmp_path / 'c'), max_steps=4, eval_interval=0)


def write_log(folder, final_loss, val_loss, init_seed, data_plan='plan-a', steps=20, speed=1000.0):
    """A train_log.jsonl as train.py writes it: the run line, a loss falling to final_loss, validation at 10 and 20."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, 'train_log.jsonl'), 'w') as f:
        f.write(json.dumps({'step': 0, 'run': {'model_type': 'x', 'init_seed': init_seed, 'data_plan': data_plan}}) + '\n')
        for step in range(1, steps + 1):
            f.write(json.dumps({'step': step, 'train/tokens': 100 * step, 'train/tokens_per_sec': speed,
                                'train/loss': final_loss + (steps - step) * 0.1}) + '\n')
            if step % 10 == 0:
                f.write(json.dumps({'step': step, 'train/tokens': 100 * step, 'val/math': val_loss + 0.5,
                                    'val/loss': val_loss + (steps - step) * 0.1}) + '\n')
    return folder


def arms_of(tmp_path, poly, vanilla, **kwargs):
    runs = {arm: [write_log(str(tmp_path / f'{arm}{i}'), loss, loss, init_seed=i, **kwargs)
                  for i, loss in enumerate(losses)] for arm, losses in zip(ARMS, (poly, vanilla))}
    return f"polyglu={','.join(runs['polyglu'])} vanilla={','.join(runs['vanilla'])}"


def test_paired_interval_by_hand(tmp_path):
    # polyglu - vanilla = 0.10, 0.20, 0.30: mean 0.2, sample sd 0.1, t(0.975, 2 df) = 4.303 from a t table,
    # half-width 4.303 x 0.1 / sqrt(3) = 0.2484
    compare = arms_of(tmp_path, [2.10, 2.20, 2.30], [2.00, 2.00, 2.00])
    comparison = run_analyze([f'--compare={compare}', f"--output={tmp_path / 'out'}"])
    for stats in (comparison['train_loss'], comparison['validation']['domains']['loss'],
                  comparison['validation']['domains']['math']):
        assert stats['differences'] == pytest.approx([0.1, 0.2, 0.3])
        assert stats['mean'] == pytest.approx(0.2)
        assert stats['ci95'] == pytest.approx([0.2 - 0.2484, 0.2 + 0.2484], abs=1e-4)
    assert comparison['validation']['tokens'] == 2000 and comparison['pairs'] == 3
    assert comparison['curve']['mean'][-1] == pytest.approx(0.2)
    assert comparison['data_plans'] == 'identical' and comparison['speed_ratio'] == 1.0
    assert comparison['verdict'] == ('polyglu - vanilla validation loss at 2,000 tokens = +0.2000 (95% CI -0.0484 to '
                                     '+0.4484, 3 paired seeds): the interval includes zero, so these runs cannot tell '
                                     'the arms apart')
    assert os.path.getsize(tmp_path / 'out' / 'loss_comparison.png') > 10_000


def test_intervals_use_the_t_table():
    import analyze
    for df, table in ((1, 12.706), (2, 4.303), (4, 2.776), (9, 2.262), (29, 2.045)):
        values = np.zeros(df + 1)
        values[0] = 1.0  # mean 1/n, standard deviation sqrt(1/n)
        n, mean, (low, high) = analyze.interval(values)
        assert (high - mean) / math.sqrt(1 / n) * math.sqrt(n) == pytest.approx(table, abs=5e-4)


def test_verdict_says_no_more_than_the_data(tmp_path):
    lower = run_analyze([f"--compare={arms_of(tmp_path / 'a', [1.90, 1.91, 1.92], [2.0, 2.0, 2.0])}",
                         f"--output={tmp_path / 'a'}"])
    assert lower['validation']['domains']['loss']['ci95'][1] < 0
    assert lower['verdict'].endswith('the interval excludes zero; polyglu has the lower validation loss, at this one '
                                     'scale, data mix and learning rate')
    one = run_analyze([f"--compare={arms_of(tmp_path / 'b', [1.9], [2.0])}", f"--output={tmp_path / 'b'}"])
    assert one['validation']['domains']['loss']['ci95'] is None and one['curve']['ci95'] is None
    assert 'no interval exists with one seed' in one['verdict']


def test_compare_refuses_what_is_not_paired(tmp_path):
    a = write_log(str(tmp_path / 'a'), 2.0, 2.0, init_seed=1)
    b = write_log(str(tmp_path / 'b'), 2.0, 2.0, init_seed=2)
    c = write_log(str(tmp_path / 'c'), 2.0, 2.0, init_seed=1, data_plan='plan-b')
    cases = ((f'polyglu={a},{b} vanilla={c}', 'polyglu has 2 runs and vanilla 1'),
             (f'polyglu={a} vanilla={c}', 'trained on different data'),
             (f'polyglu={a},{a} vanilla={b},{c}', 'is listed twice'),
             (f'polyglu={a},{c} vanilla={b},{b}', 'share an init_seed'),
             (f'polyglu={a}', 'give two arms'))
    for compare, message in cases:
        with pytest.raises(SystemExit, match=message):
            run_analyze([f'--compare={compare}', f"--output={tmp_path / 'out'}"])


@pytest.mark.slow
def test_make_ablation_miniature(tmp_path):
    """The README's command at the tiny config, 2 arms x 2 seeds x 10 steps, stopped in its first run, resumed, then
    rerun: the comparison of paired runs, and a rerun that skips the finished ones."""
    data = str(tmp_path / 'data')
    for i, name in enumerate(('math', 'stem', 'code')):  # and ARGS shrink the vocabulary to the data's
        synthetic.write_source(data, name, seed=i)
    runs = tmp_path / 'ablation'

    def make(args=''):
        command = ['make', '--no-print-directory', '-C', ROOT, 'ablation', 'SEEDS=2', f'ABLATION_DIR={runs}',
                   'ABLATION_CONFIG=config/tiny_ablation.py', f'ARGS=--data_dir={data} --vocab_size={synthetic.VOCAB} --eos_id={synthetic.EOS} {args}', f'PY={sys.executable}']
        return subprocess.run(command, capture_output=True, text=True, timeout=600)

    stopped = make('--stop_after_steps=5')  # what Ctrl-C does too: a checkpoint, then train.py exits cleanly
    assert stopped.returncode != 0 and f'{runs}/polyglu-seed1 stopped before its end: make ablation resumes it' in \
        stopped.stdout and not os.path.exists(runs / 'vanilla-seed1'), stopped.stdout[-2000:] + stopped.stderr[-2000:]
    result = make()
    out = result.stdout
    assert result.returncode == 0, out[-3000:] + result.stderr[-3000:]
    assert 'resumed from step 5' in out and len(re.findall(r'done: 10 steps', out)) == 4
    assert len(set(re.findall(r'data plan ([0-9a-f]{16})', out))) == 1
    comparison = json.load(open(runs / 'comparison' / 'summary.json'))['comparison']
    assert comparison['pairs'] == 2 and comparison['data_plans'] == 'identical'
    assert [arm['init_seeds'] for arm in comparison['arms']] == [[1, 2], [1, 2]]
    assert list(comparison['validation']['domains']) == ['math', 'stem', 'code', 'loss']
    assert comparison['verdict'] in out and os.path.isfile(runs / 'comparison' / 'loss_comparison.png')

    shutil.rmtree(runs / 'comparison')
    rerun = make()
    assert rerun.returncode == 0 and rerun.stdout.count('finished, skipped') == 4 and 'train.py' not in rerun.stdout
    assert json.load(open(runs / 'comparison' / 'summary.json'))['comparison'] == comparison
