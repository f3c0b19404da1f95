"""make gpu-check (tests/gpu_check.py) without a GPU: one line, and the dry run of every stage on the CPU."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT


def test_gpu_check_without_cuda_is_one_line(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != 'GPU_CHECK_DRY'}
    result = subprocess.run([sys.executable, 'tests/gpu_check.py'], cwd=ROOT, capture_output=True, text=True,
                            timeout=300, env={**env, 'GPU_CHECK_DIR': str(tmp_path)})
    assert result.returncode == 2 and result.stdout.strip().count('\n') == 0, result.stdout + result.stderr
    assert result.stdout.startswith('gpu-check needs CUDA') and 'GPU_CHECK_DRY=1' in result.stdout


STOCK_IMAGE = """import sys
for name in ('deepspeed', 'lm_eval', 'wandb', 'liger_kernel'):  # what a stock CUDA PyTorch image lacks
    sys.modules[name] = None
"""


@pytest.mark.slow
def test_gpu_check_dry_run_runs_every_stage_on_a_stock_image(tmp_path):
    """`make gpu-check` end to end on the CPU at a tiny size, config/pretrain.py's switches (fused kernels, a recomputed
    block), with DeepSpeed, lm-eval, wandb and liger-kernel unimportable as on a stock CUDA PyTorch image (a
    sitecustomize that every process it starts reads): the plan, the CUDA tests (skipped here), the lever table, train.py
    stopped and resumed, eval.py's generation benchmark; the JSON, tables and log. compile_blocks is left to its own
    test (test_levers.py): its compilation would add ~35 s to this one on a cold cache."""
    (tmp_path / 'stock').mkdir()
    (tmp_path / 'stock' / 'sitecustomize.py').write_text(STOCK_IMAGE)
    env = {**os.environ, 'GPU_CHECK_DRY': '1', 'GPU_CHECK_DIR': str(tmp_path), 'PYTHONPATH': str(tmp_path / 'stock')}
    levers = 'loss_kernel=liger,lean_mix,fused_adamw,prefetch,selective_checkpointing,no_recompute'
    result = subprocess.run([sys.executable, 'tests/gpu_check.py', f'--levers={levers}'], cwd=ROOT,
                            capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    report = json.load(open(tmp_path / 'gpu_check.json'))
    stages = report['stages']
    assert {name: s['status'] for name, s in stages.items()} == {
        'cuda tests': 'skipped', 'speed levers': 'ok', 'train, stop, resume': 'ok', 'generation': 'ok'}
    env_line = next(line for line in result.stdout.splitlines() if line.startswith('environment:'))
    assert all(f'{name} no' in env_line for name in ('deepspeed', 'liger_kernel', 'lm_eval', 'wandb'))
    # the plan: every stage's micro-batches and limit, 8 minutes together
    plan = report['plan']
    # 6 rows here (today and 5 levers; liger is not installed), each warmed and timed 3 times; today 3 more; the
    # recommended warmed and timed beside today 3 times; VanillaLM today and recommended; the profile
    assert plan['speed levers']['micro_batches'] == 6 * (1 + 3) + 3 + (1 + 2 * 3) + 2 * (1 + 3) + 1
    assert sum(stage['limit_s'] for stage in plan.values()) <= 480
    assert 'limits together 480 s = 8.0 min' in result.stdout
    levers = {row['lever']: row for row in stages['speed levers']['rows']}
    assert levers['loss_kernel=liger']['skipped'].startswith("loss_kernel='liger' needs liger-kernel")
    for name in ('today', 'lean_mix', 'fused_adamw', 'prefetch', 'selective_checkpointing', 'no_recompute'):
        row = levers[name]
        assert row['exact'] and max(row['errors'].values()) < bench_floor(), (name, row['errors'])
        today_samples = 9 if 'recommended' in levers else 6  # timed again at the end, and beside the recommended
        assert len(row['samples']) == (today_samples if name == 'today' else 3) and row['step_s'] > 0
        tokens = row['settings']['micro_batch_size'] * row['settings']['grad_accum_steps'] * 64
        assert tokens == 128 and row['tokens_per_s'] == pytest.approx(tokens / row['step_s'])
    assert levers['today']['settings']['fused'] and levers['today']['settings']['recompute_blocks'] == 1
    assert levers['no_recompute']['settings']['micro_batch_size'] == 1 and levers['today']['errors']['loss'] == 0.0
    assert stages['speed levers']['line'].startswith('python train.py config/pretrain.py')
    assert {row['lever'] for row in stages['speed levers']['vanilla']} >= {'today'}
    assert 'PolyGLU/VanillaLM (today)' in open(tmp_path / 'levers.txt').read()
    train = stages['train, stop, resume']
    assert sorted(map(int, train['losses_resumed'])) == list(range(1, 7)) and train['max_loss_difference'] < 1e-4
    assert train['losses_uninterrupted']['6'] < train['losses_uninterrupted']['1']  # the check's data is learnable
    assert len(train['saves']) == 3 and stages['generation']['new_tokens_per_s'] > 0
    assert report['environment']['cuda'] is False and report['dry_run'] is True
    log = open(tmp_path / 'gpu_check.log').read()
    assert 'gpu-check summary' in log and 'resumed from step 3' in log and log.endswith('gpu_check.log\n')
    assert "plain PyTorch's bf16 engine instead" not in log  # float32 here; the fallback is the bf16 path's
    assert not os.path.exists(tmp_path / 'work')  # the checkpoints it wrote are gone


def bench_floor():
    import bench
    return bench.EXACT_FLOOR['float32']


@pytest.mark.slow
def test_gpu_check_killed_mid_way_keeps_what_it_measured(tmp_path):
    """A check killed at any moment (the rented window ends) keeps what it measured: gpu_check.json (its plan, and the
    stages finished, rewritten after each) and the lever table's finished rows in levers.json and levers.txt. Here it is
    killed as soon as the lever table has timed a round."""
    env = {**os.environ, 'GPU_CHECK_DRY': '1', 'GPU_CHECK_DIR': str(tmp_path)}
    check = subprocess.Popen([sys.executable, 'tests/gpu_check.py', '--stages=levers',
                              '--levers=fused_adamw'], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and not timed_rows(tmp_path / 'levers.json'):
            time.sleep(0.2)
    finally:
        os.killpg(check.pid, signal.SIGKILL)
        check.wait()
    rows = timed_rows(tmp_path / 'levers.json')
    assert rows and all(row['errors']['loss'] == 0.0 or row['exact'] for row in rows)
    report = json.load(open(tmp_path / 'gpu_check.json'))  # written before the first stage: the plan
    assert set(report['plan']) == {'speed levers'} and report['stages'] == {}
    assert 'today' in open(tmp_path / 'levers.txt').read()


def timed_rows(path):
    try:
        return [row for row in json.load(open(path))['rows'] if row.get('samples')]
    except (OSError, ValueError):
        return []
