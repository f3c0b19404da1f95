import importlib
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

import model as M
import utils as U
import synthetic
from conftest import ROOT, everything_under, offline_wandb_run, small_config, wandb_offline_env
from configurator import configure


def run_train(args):
    """train.py in this process, fresh module globals each time."""
    import train
    train = importlib.reload(train)
    configure(vars(train), args)
    train.main()
    return train


def losses(text):
    return [float(x) for x in re.findall(r'\| loss (\d+\.\d+) \|', text)]


def final_state(out_dir):
    return torch.load(os.path.join(out_dir, 'portable_final.pt'), weights_only=True)['model_state_dict']


def test_tiny_run_learns(data_dir, tmp_path, capsys):
    run_train(synthetic.train_args(data_dir, str(tmp_path), max_steps=150, log_interval=25, eval_interval=150,
                                   checkpoint_interval=0))
    out = capsys.readouterr().out
    curve = losses(out)
    assert len(curve) == 6 and curve == sorted(curve, reverse=True)
    assert curve[-1] < 0.5 * math.log(synthetic.VOCAB)  # ln(512) = 6.24: what an untrained model scores
    validation = float(re.search(r'validation .*\| loss (\d+\.\d+)', out).group(1))
    assert validation < 0.5 * math.log(synthetic.VOCAB)
    state = torch.load(tmp_path / 'portable_final.pt', weights_only=True)
    assert state['step'] == 150 and state['tau'] == pytest.approx(0.1)
    # what it was trained with: the whole resolved config, the code's commit, the libraries
    assert state['config']['max_steps'] == 150 and state['config']['learning_rate'] == 3e-3
    assert state['config']['val_tokens'] == 512 and state['config']['block_size'] == 32  # every key
    assert state['config']['beta2'] == 0.95 and state['config']['sources'] == ('math', 'stem', 'code')
    assert re.fullmatch(r'[0-9a-f]{40}', state['git']['commit']) and isinstance(state['git']['dirty'], bool)
    assert state['library_versions']['torch'] == torch.__version__ and state['library_versions']['lm_eval']
    # a new run from it at 10x the learning rate with no warm-up (a restart): Adam's kept moments hold the loss where it
    # was and let it fall; a fresh optimizer moves every weight by ~the learning rate and the loss jumps (measured: 2.11
    # -> 3.3, 4.0, 2.5 fresh; 1.94, 1.66, 1.43 kept)
    restart = dict(init_from=str(tmp_path), max_steps=4, log_interval=1, eval_interval=0, checkpoint_interval=0,
                   warmup_steps=0, learning_rate=3e-2, min_lr=3e-2)
    curves = {}
    for kept in (False, True):
        run_train(synthetic.train_args(data_dir, str(tmp_path / f'restart_{kept}'), init_optimizer=kept, **restart))
        curves[kept] = losses(capsys.readouterr().out)
    assert curves[True][0] == curves[False][0]  # the same weights before the first update
    assert max(curves[False][1:]) > curves[False][0] + 0.5
    assert max(curves[True][1:]) < curves[True][0] + 0.1


def test_learning_rate_schedule():
    import train
    train = importlib.reload(train)
    lr = lambda step: U.cosine_lr(step, train.learning_rate, train.warmup_steps, train.max_steps,  # noqa: E731
                                      train.min_lr)
    assert lr(0) == pytest.approx(1e-4 / 2000)
    assert lr(1999) == pytest.approx(1e-4)
    assert lr(2000 + (19_531 - 2000) // 2) == pytest.approx(5.5e-5, rel=1e-3)
    assert lr(19_531) == pytest.approx(1e-5)


def test_weight_decay_groups():
    model = M.PolychromaticLM(small_config())
    decay, no_decay = M.optimizer_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay['params']}
    exempt = {names[id(p)] for p in no_decay['params']}
    assert decay['weight_decay'] == 0.1 and no_decay['weight_decay'] == 0.0
    assert 'model_core.0.polyglu.alpha' in exempt and 'model_core.1.polyglu.alpha' in exempt
    assert {'model_core.0.polyglu.beta', 'model_core.0.rmsnorm_1.gama', 'model_core.0.polyglu.gate_net.0.bias'} <= exempt
    assert {'embeddings.weight', 'model_core.0.polyglu.W_gate.weight', 'model_core.0.polyglu.gate_net.0.weight'} <= decayed
    assert all(model.get_parameter(n).dim() >= 2 and not n.endswith('alpha') for n in decayed)
    assert len(decayed) + len(exempt) == len(names)


def test_mixture_schedule_and_sampled_shares():
    import train
    train = importlib.reload(train)
    train.max_steps = 1000
    source, _ = train.row_plan(3, 64, [train.segment_from(0)])
    baseline, anneal = source[:800 * 64], source[800 * 64:]  # 70/25/5 for the first 80% of the steps, 85/10/5 after
    np.testing.assert_allclose(np.bincount(baseline, minlength=3) / baseline.size, [0.70, 0.25, 0.05], atol=0.01)
    np.testing.assert_allclose(np.bincount(anneal, minlength=3) / anneal.size, [0.85, 0.10, 0.05], atol=0.015)


def test_same_global_batch_on_any_number_of_ranks(data_dir):
    """1 rank x grad_accum 4, 2 ranks x 2 and 4 ranks x 1 train the same windows in every step, and no window twice."""
    import train
    train = importlib.reload(train)
    configure(vars(train), synthetic.train_args(data_dir, '/unused', max_steps=20, micro_batch_size=2))
    train.device = 'cpu'
    data = [train.open_source(name) for name in ('math', 'stem', 'code')]
    plan = train.row_plan(3, 8, [train.segment_from(0)])
    steps = {}
    for world_size, accum in ((1, 4), (2, 2), (4, 1)):
        train.grad_accum_steps = accum
        steps[world_size] = [sorted(map(tuple, torch.cat([train.get_batch(data, plan, step, m, rank, world_size)[0]
                                                          for rank in range(world_size) for m in range(accum)]).tolist()))
                             for step in range(20)]
    assert steps[1] == steps[2] == steps[4]
    source, slot = plan
    assert len(set(zip(source.tolist(), slot.tolist()))) == len(source)  # a window is used once
    # micro-batch 2, grad_accum 2, 2 ranks: 8 rows a step, so step 3 is rows 24-31, micro-step 1 of rank 0 its third pair
    assert list(U.rank_rows(3, 1, 0, 2, 2, 2)) == [28, 29] and list(U.rank_rows(3, 1, 1, 2, 2, 2)) == [30, 31]


def test_chunked_loss_equals_full_loss():
    torch.manual_seed(0)
    hidden = torch.randn(2, 24, 16, requires_grad=True)
    head = torch.randn(100, 16, requires_grad=True)
    targets = torch.randint(0, 100, (2, 24))
    targets[0, :5] = -100  # ignored positions (SFT masks)
    chunked = M.chunked_cross_entropy(hidden, head, targets, chunk_size=7)
    full = torch.nn.functional.cross_entropy((hidden @ head.T).flatten(0, 1), targets.flatten(), ignore_index=-100)
    torch.testing.assert_close(chunked, full)
    grads_chunked = torch.autograd.grad(chunked, (hidden, head))
    grads_full = torch.autograd.grad(full, (hidden, head))
    for a, b in zip(grads_chunked, grads_full):
        torch.testing.assert_close(a, b)


def test_killed_and_resumed_run_is_exact(data_dir, tmp_path, capsys):
    whole, parts = str(tmp_path / 'whole'), str(tmp_path / 'parts')
    run_train(synthetic.train_args(data_dir, whole, max_steps=30, log_interval=1))
    whole_losses = losses(capsys.readouterr().out)
    run_train(synthetic.train_args(data_dir, parts, max_steps=30, log_interval=1, stop_after_steps=13))
    first = capsys.readouterr().out
    assert 'stop_after_steps=13: checkpoint saved at step 13' in first
    run_train(synthetic.train_args(data_dir, parts, max_steps=30, log_interval=1))
    second = capsys.readouterr().out
    assert 'resumed from step 13' in second
    assert losses(first) + losses(second) == whole_losses  # exact, not approximately
    for key, value in final_state(whole).items():
        assert torch.equal(value, final_state(parts)[key]), key
    assert sorted(os.listdir(parts)) == ['.lock', 'portable_10.pt', 'portable_13.pt', 'portable_20.pt', 'portable_final.pt',
                                         'train_log.jsonl']
    import json
    logged = [json.loads(line) for line in open(os.path.join(parts, 'train_log.jsonl'))]
    assert [round(e['train/loss'], 4) for e in logged if 'train/loss' in e] == whole_losses


def test_nan_guard_skips_then_stops(data_dir, tmp_path, capsys, monkeypatch):
    import train
    calls = []

    class Poisoned(M.LanguageModelLoss):
        def forward(self, *args):
            calls.append(1)
            loss = super().forward(*args)
            step = (len(calls) - 1) // 2  # grad_accum_steps = 2
            return loss * float('nan') if step == 3 or step >= 12 else loss

    def run(args):
        module = importlib.reload(train)
        monkeypatch.setattr(module, 'LanguageModelLoss', Poisoned)
        configure(vars(module), args)
        module.main()

    with pytest.raises(SystemExit, match=r'3 skipped updates in a row at step 14 \(max_bad_steps=3\): stopping; the last '
                                         r'good checkpoint'):
        run(synthetic.train_args(data_dir, str(tmp_path), max_steps=30, eval_interval=0, max_bad_steps=3))
    out = capsys.readouterr().out
    assert 'step 3: non-finite loss nan or grad norm nan: update skipped (1 in a row, 1 in all)' in out
    assert 'update skipped (3 in a row, 4 in all)' in out
    model, info = U.load_checkpoint(str(tmp_path / 'portable_10.pt'))
    step = info['step']
    assert step == 10 and all(torch.isfinite(p).all() for p in model.parameters())


TRAIN_ERRORS = [  # train.py's settings over synthetic.train_args' -> the line it stops with; {data}: the shared
    # synthetic data, {broken}: a copy whose stem chunk 1 is truncated to 1,000 bytes, {tmp}: an empty folder
    ({'data_dir': '{tmp}/nowhere'}, r'missing data folder .*nowhere/math .*run `python prepare\.py --source=math`'),
    ({'data_dir': '{broken}'}, r'.*chunk_00001\.bin has 1,000 bytes, its manifest says .*truncated or foreign'),
    ({'eos_id': 151643, 'vocab_size': 151669}, r".*foreign .*expected prepare\.py's polychromatic-tokens-v1 with eos 151643"),
    ({'block_size': 128}, r'block_size=128 exceeds max_seq_len=64'),
    ({'mixture_baseline': (0.5, 0.5)}, r"sources \('math', 'stem', 'code'\) and the mixtures \(0\.5, 0\.5\) / .* differ "
                                         r'in length'),
    ({'val_tokens': 10**6}, r'.*math \([\d,]+ tokens\) is too small to hold out val_tokens=1,000,000 and train on '
                            r'windows of 33 tokens: lower val_tokens or prepare more data'),
    ({'recompute_blocks': 3}, r'recompute_blocks must be -1 \(all\), 0 \(none\) or 1\.\.2, got 3'),
    ({'lean_mix': True}, r"lean_mix=True rewrites the fused kernels' PolyGLU backward: set fused=True too"),
]


@pytest.mark.parametrize('settings, line', TRAIN_ERRORS)
def test_bad_settings_and_data_are_one_clear_line(data_dir, tmp_path, settings, line):
    broken = tmp_path / 'broken'
    if settings.get('data_dir') == '{broken}':
        shutil.copytree(data_dir, broken)
        open(broken / 'stem' / 'chunk_00001.bin', 'r+b').truncate(1000)
    places = {'data': data_dir, 'broken': broken, 'tmp': tmp_path}
    settings = {k: v.format(**places) if isinstance(v, str) else v for k, v in settings.items()}
    with pytest.raises(SystemExit, match=f'^error: {line}'):
        run_train(synthetic.train_args(settings.pop('data_dir', data_dir), str(tmp_path / 'out'), **settings))


def train_until(args, line_start):
    """train.py in a process of its own, running on once it has printed a line starting with `line_start`."""
    process = subprocess.Popen([sys.executable, 'train.py', *args], cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    for line in process.stdout:
        if line.startswith(line_start):
            return process
    raise AssertionError(f"train.py ended without printing {line_start!r}")


def test_sigterm_saves_and_exits_cleanly(data_dir, tmp_path):
    args = synthetic.train_args(data_dir, str(tmp_path), max_steps=100_000, log_interval=1, eval_interval=0,
                                checkpoint_interval=0)
    process = train_until(args, 'step 5/')
    process.send_signal(signal.SIGTERM)
    out = process.communicate(timeout=60)[0]
    assert process.returncode == 0
    step = int(re.search(r'signal 15: checkpoint saved at step (\d+)', out).group(1))
    assert os.path.isfile(tmp_path / f'portable_{step}.pt')


def test_a_second_run_on_a_live_out_dir_stops_and_a_killed_one_never_blocks(data_dir, tmp_path):
    out = tmp_path / 'run'
    args = synthetic.train_args(data_dir, str(out), max_steps=100_000, log_interval=1, eval_interval=0,
                                checkpoint_interval=5)
    first = train_until(args, 'saved checkpoint at step 5')
    second = subprocess.run([sys.executable, 'train.py', *args], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert second.returncode == 1 and 'step' not in second.stdout  # it stopped before training a step
    assert re.fullmatch(rf"error: {out} is in use by a live run \(process {first.pid} on .*, started "
                        r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d: train\.py --data_dir=.*\): stop that run, or give this one "
                        r"another folder", second.stderr.strip())
    first.kill()  # -9: the lock dies with its process
    first.wait()
    third = subprocess.run([sys.executable, 'train.py', *args, '--stop_after_steps=2'], cwd=ROOT, capture_output=True,
                           text=True, timeout=120)
    assert third.returncode == 0, third.stderr[-2000:]
    assert re.search(r'resumed from step [1-9]\d* ', third.stdout)


def test_a_full_disk_is_one_line_and_the_resume_continues_exactly(data_dir, tmp_path, capsys, monkeypatch):
    """And the snapshots: one every snapshot_interval steps and at the end, never pruned, rewritten alike by a resume;
    one the disk cannot hold is skipped in one line, and the run goes on."""
    whole, parts = str(tmp_path / 'whole'), str(tmp_path / 'parts')
    settings = dict(max_steps=20, log_interval=1, checkpoint_interval=5, snapshot_interval=5, keep_checkpoints=1)
    run_train(synthetic.train_args(data_dir, whole, **settings))
    whole_losses = losses(capsys.readouterr().out)
    assert sorted(os.listdir(whole)) == ['.lock', 'portable_15.pt', 'portable_final.pt', 'snapshots', 'train_log.jsonl']
    assert sorted(os.listdir(f'{whole}/snapshots')) == [f'snapshot_{step}.pt' for step in (10, 15, 20, 5)]
    saving = torch.save

    def fills_the_disk(state, path):  # what torch.save does when the disk fills mid-write
        if state['step'] == 10:
            open(path, 'wb').write(b'PK' * 1000)
            raise RuntimeError('[enforce fail at inline_container.cc:672] . unexpected pos 2048 vs 1932')
        saving(state, path)
    monkeypatch.setattr(U.torch, 'save', fills_the_disk)
    with pytest.raises(SystemExit) as stopped:
        run_train(synthetic.train_args(data_dir, parts, **settings))
    assert re.fullmatch(rf"error: disk full: {parts}/portable_10\.pt needs about [\d.]+ MiB, [\d,.]+ MiB free "
                        r"\(RuntimeError while writing; its \.tmp removed\); the previous checkpoint "
                        rf"{parts}/portable_5\.pt is intact and `resume` continues from it: free space \(or lower "
                        r"keep_checkpoints\) and rerun the same command", str(stopped.value))
    assert sorted(os.listdir(parts)) == ['.lock', 'portable_5.pt', 'snapshots', 'train_log.jsonl']
    first = capsys.readouterr().out
    monkeypatch.setattr(U.torch, 'save', saving)
    free = U.shutil.disk_usage(parts).free
    monkeypatch.setattr(U.shutil, 'disk_usage', lambda folder: U.shutil._ntuple_diskusage(0, 0, 1000))
    with pytest.raises(SystemExit, match=r'disk full: .*portable_10\.pt needs about [\d.]+ MiB, 0\.0 MiB free '
                                         r'\(nothing written\)'):  # checked before it writes
        run_train(synthetic.train_args(data_dir, parts, **settings))
    assert free > 0 and sorted(os.listdir(parts)) == ['.lock', 'portable_5.pt', 'snapshots', 'train_log.jsonl']
    monkeypatch.undo()

    def fills_the_disk_at_a_snapshot(state, path):
        if path.endswith('snapshot_15.pt.tmp'):
            raise OSError(28, 'No space left on device')
        saving(state, path)
    monkeypatch.setattr(U.torch, 'save', fills_the_disk_at_a_snapshot)
    capsys.readouterr()
    run_train(synthetic.train_args(data_dir, parts, **settings))
    second = capsys.readouterr().out
    assert 'resumed from step 5' in second
    assert re.search(rf"\nwarning: disk full: {parts}/snapshots/snapshot_15\.pt needs about [\d.]+ MiB, [\d,.]+ MiB free "
                     r"\(OSError while writing; its \.tmp removed\); this snapshot is skipped and the run goes on: free "
                     r"space \(or raise snapshot_interval\) for the next\n", second)
    assert losses(first)[:5] + losses(second) == whole_losses
    for key, value in final_state(whole).items():
        assert torch.equal(value, final_state(parts)[key]), key
    assert sorted(os.listdir(f'{parts}/snapshots')) == ['snapshot_10.pt', 'snapshot_20.pt', 'snapshot_5.pt']
    for step in (5, 10, 20):  # the bf16 weights alone, and every script reads them as a checkpoint
        a, b = (torch.load(f'{run}/snapshots/snapshot_{step}.pt', weights_only=True) for run in (whole, parts))
        assert a['optimizer_state_dict'] is None and a['step'] == step and a['tokens'] == step * 4 * 2 * 32
        for key, value in a['model_state_dict'].items():
            assert value.dtype == (torch.float32 if 'rope' in key else torch.bfloat16), key
            assert torch.equal(value, b['model_state_dict'][key]), (step, key)
    model, info = U.load_checkpoint(f'{whole}/snapshots')  # a folder: its newest
    assert info['step'] == 20 and info['tau'] == pytest.approx(0.1)
    for key, value in final_state(whole).items():
        assert torch.equal(model.state_dict()[key], value if 'rope' in key else value.bfloat16().float()), key


def in_a_small_tmpfs(folder, script):
    """Run a shell script with a tmpfs mounted at `folder` (MOUNT SIZE and GROW SIZE lines in it mount and grow it),
    in a user and mount namespace of its own, so no root is needed; None where this machine cannot."""
    os.makedirs(folder, exist_ok=True)
    script = re.sub(r'^MOUNT (\S+)$', rf'mount -t tmpfs -o size=\1 tmpfs {folder}', script, flags=re.M)
    script = re.sub(r'^GROW (\S+)$', rf'mount -o remount,size=\1 {folder}', script, flags=re.M)
    try:
        probe = subprocess.run(['unshare', '--user', '--map-root-user', '--mount', 'sh', '-c',
                                f'mount -t tmpfs -o size=64k tmpfs {folder}'], capture_output=True, timeout=30)
    except (OSError, subprocess.SubprocessError):  # no unshare here
        return None
    if probe.returncode != 0:
        return None
    return subprocess.run(['unshare', '--user', '--map-root-user', '--mount', 'sh', '-c', script], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_a_real_full_disk_is_one_line(data_dir, tmp_path):
    """The same on a real small filesystem, where torch.save's own error is what a full disk gives."""
    args = synthetic.train_args(data_dir, str(tmp_path / 'disk' / 'run'), max_steps=20, log_interval=1,
                                checkpoint_interval=5)
    reference = subprocess.run([sys.executable, 'train.py', *synthetic.train_args(
        data_dir, str(tmp_path / 'whole'), max_steps=20, log_interval=1, checkpoint_interval=5)], cwd=ROOT,
        capture_output=True, text=True, timeout=300)
    size = os.path.getsize(tmp_path / 'whole' / 'portable_5.pt')
    command = shlex.join([sys.executable, 'train.py', *args])
    result = in_a_small_tmpfs(str(tmp_path / 'disk'), f"""
MOUNT {size // 2}
{command} > /dev/null 2> {tmp_path}/first.err
ls -a {tmp_path}/disk/run > {tmp_path}/first.ls
umount {tmp_path}/disk
MOUNT {size * 3 // 2 + 65536}
{command} > {tmp_path}/second.out 2> {tmp_path}/second.err
GROW {size * 8}
{command} > {tmp_path}/third.out
cp {tmp_path}/disk/run/portable_final.pt {tmp_path}/final.pt
""")
    if result is None:
        pytest.skip('no tmpfs can be mounted here (user namespaces are off); the ENOSPC test above covers the save')
    assert result.returncode == 0, result.stderr[-2000:]
    read = lambda name: open(tmp_path / name).read()  # noqa: E731
    assert re.fullmatch(r"error: disk full: .*/portable_5\.pt did not fit, [\d.]+ MiB free \(RuntimeError while "
                        r"writing; its \.tmp removed\); no earlier checkpoint is there, so a rerun starts from step 0: "
                        r"free space \(or lower keep_checkpoints\) and rerun the same command\n", read('first.err'))
    assert read('first.ls').split() == ['.', '..', '.lock', 'train_log.jsonl']
    assert re.fullmatch(r"error: disk full: .*/portable_10\.pt needs about [\d.]+ MiB, [\d.]+ MiB free \(nothing "
                        r"written\); the previous checkpoint .*/portable_5\.pt is intact and `resume` continues from "
                        r"it: .*\n", read('second.err'))
    assert 'resumed from step 5' in read('third.out')
    assert losses(read('second.out'))[:5] + losses(read('third.out')) == losses(reference.stdout)
    whole = final_state(tmp_path / 'whole')
    for key, value in torch.load(tmp_path / 'final.pt', weights_only=True)['model_state_dict'].items():
        assert torch.equal(value, whole[key]), key


@pytest.mark.slow
@pytest.mark.xdist_group('ports')
def test_deepspeed_matches_torch_and_resumes_exactly(data_dir, tmp_path, capsys, monkeypatch):
    """DeepSpeed on CPU (gloo, one process): ZeRO 1 and 2 give the torch path's losses (ZeRO 2 skipping a spike as it
    does); ZeRO 1's checkpoint resumes exactly; ZeRO 1 in bf16 with fused kernels, partial checkpointing and fused
    AdamW, stopped and resumed under plain PyTorch's bf16 engine, gives them to bf16 precision. DeepSpeed in
    subprocesses, as it initialises torch.distributed once per process."""
    def args(out_dir, **overrides):
        return synthetic.train_args(data_dir, str(tmp_path / out_dir), **{
            'max_steps': 16, 'log_interval': 1, 'eval_interval': 0, **overrides})

    def run(out_dir, plant_at=None, **overrides):
        script = ['train.py'] if plant_at is None else ['-c', PLANTED_SPIKE.format(step=plant_at)]
        result = subprocess.run([sys.executable, *script, *args(out_dir, **overrides)],
                                cwd=ROOT, capture_output=True, text=True, timeout=600,
                                env={**os.environ, 'MASTER_PORT': str(29_500 + os.getpid() % 1000)})
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
        return result.stdout

    run_train(args('torch'))
    reference = losses(capsys.readouterr().out)
    deepspeed_losses = {1: losses(run('zero1', backend='deepspeed', zero_stage=1))}
    np.testing.assert_allclose(deepspeed_losses[1], reference, rtol=1e-4)
    # ZeRO 2 with a spike planted at step 22: skipped as the torch path skips it (DeepSpeed's norm, our guard inside
    # its step), the losses alike; the gradient norms per group make up DeepSpeed's whole norm
    with monkeypatch.context() as patch:
        patch.setattr(M.LanguageModelLoss, 'forward', M.LanguageModelLoss.forward)
        synthetic.plant_spike(M.LanguageModelLoss, 22, grad_accum_steps=2)
        run_train(args('torch_spike', max_steps=26))
    torch_spike = capsys.readouterr().out
    zero2 = run('zero2', plant_at=22, backend='deepspeed', zero_stage=2, max_steps=26)
    for out in (torch_spike, zero2):
        assert re.findall(r'step (\d+): spike: .*update skipped \(1 in a row, 1 in all\)', out) == ['22']
    np.testing.assert_allclose(losses(zero2), losses(torch_spike), rtol=1e-4)
    import json
    for entry in (json.loads(line) for line in open(tmp_path / 'zero2' / 'train_log.jsonl')):
        if 'train/grad_norm' in entry:
            groups = [v for k, v in entry.items() if k.startswith('grad_norm/')]
            assert len(groups) == 5 and math.sqrt(sum(v * v for v in groups)) == pytest.approx(
                entry['train/grad_norm'], rel=1e-4)
    first = run('resumed', backend='deepspeed', stop_after_steps=7)
    assert not os.path.exists(tmp_path / 'resumed' / 'ds_checkpoint')  # nothing reads it: written only when asked
    size = os.path.getsize(tmp_path / 'resumed' / 'portable_7.pt') / 1e9
    assert re.search(rf"saved checkpoint at step 7 -> .*portable_7.pt \({size:.3g} GB in \d+\.\d s\)", first)
    second = run('resumed', backend='deepspeed', ds_checkpoint=True)
    assert 'resumed from step 7' in second
    assert losses(first) + losses(second) == deepspeed_losses[1]  # exact
    assert os.path.isfile(tmp_path / 'resumed' / 'ds_checkpoint' / 'latest')
    # the GPU run's settings (bf16 weights under DeepSpeed, compiled kernels, the first block recomputed) with fused
    # AdamW, stopped, then resumed by plain PyTorch's bf16 engine with fused AdamW: the same per-parameter state (Adam's
    # step where the fused kernel wants it); the losses are the float32 run's to bf16 precision
    bf16_settings = dict(dtype='bfloat16', fused=True, recompute_blocks=1, fused_adamw=True)
    stopped = run('bf16_fused', backend='deepspeed', stop_after_steps=7, **bf16_settings)
    masters = torch.load(tmp_path / 'bf16_fused' / 'portable_7.pt', weights_only=True)['model_state_dict']
    weight = masters['model_core.0.polyglu.W_gate.weight']  # the fp32 masters, not the module's bf16 rounding of them
    assert weight.dtype == torch.float32 and not torch.equal(weight, weight.bfloat16().float())
    run_train(args('bf16_fused', backend='torch', **bf16_settings))
    resumed = capsys.readouterr().out
    assert 'resumed from step 7' in resumed
    np.testing.assert_allclose(losses(stopped) + losses(resumed), reference, rtol=2e-3)


@pytest.mark.slow
def test_wandb_offline_logs_metrics_and_no_secret(data_dir, tmp_path):
    result = subprocess.run([sys.executable, 'train.py', *synthetic.train_args(data_dir, str(tmp_path / 'out'),
                             max_steps=10, wandb_log=True)], cwd=ROOT, capture_output=True, text=True,
                            env=wandb_offline_env(tmp_path), timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    run = offline_wandb_run(tmp_path)
    assert b'routing/entropy_layer_00' in run and b'train/grad_norm' in run and b'max_bad_steps' in run  # config too
    assert b'hf_canary_do_not_log' not in everything_under(tmp_path) + result.stdout.encode() + result.stderr.encode()


def test_resume_with_another_model_is_one_line(data_dir, tmp_path):
    run_train(synthetic.train_args(data_dir, str(tmp_path), max_steps=10, stop_after_steps=3, eval_interval=0))
    with pytest.raises(SystemExit, match=r"portable_3\.pt was trained with another model config; use another out_dir"):
        run_train(synthetic.train_args(data_dir, str(tmp_path), max_steps=10, d_model=48))


def test_wandb_without_login_is_one_line(data_dir, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith('WANDB_')}
    env['HOME'] = str(tmp_path)  # no ~/.netrc: not logged in
    result = subprocess.run([sys.executable, 'train.py', *synthetic.train_args(data_dir, str(tmp_path / 'out'),
                             wandb_log=True)], cwd=ROOT, capture_output=True, text=True, env=env, timeout=120,
                            stdin=subprocess.DEVNULL)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith('error: wandb could not start')
    assert 'Traceback' not in result.stderr


def test_init_from_an_author_file_starts_from_its_weights(data_dir, tmp_path, capsys):
    weights = synthetic.author_weights(seq_length=64)
    paths = synthetic.write_author_files(str(tmp_path / 'author'), weights)
    run_train(synthetic.train_args(data_dir, str(tmp_path / 'run'), init_from=paths['pt'], max_steps=2,
                                   learning_rate=0.0, min_lr=0.0, log_interval=1, checkpoint_interval=0))
    assert ('its weights only; a fresh optimizer (--init_optimizer=True keeps its moments); the learning-rate schedule '
            'from step 0') in capsys.readouterr().out
    state = final_state(str(tmp_path / 'run'))  # learning rate 0: the weights are still the author's
    assert all(torch.equal(state[k], v.float()) for k, v in weights.items() if not k.startswith('rope.'))
    with pytest.raises(SystemExit, match=r"different model than configured.*'d_model': \(48, 32\)"):
        run_train(synthetic.train_args(data_dir, str(tmp_path / 'other'), init_from=paths['pt'], d_model=48))


def test_plan_says_which_source_repeats(tmp_path, capsys):
    data = str(tmp_path / 'data')
    synthetic.write_source(data, 'math', n_tokens=6000, seed=0)  # ~180 windows of 32 tokens; 40 steps want ~240
    for i, name in enumerate(('stem', 'code')):
        synthetic.write_source(data, name, seed=i + 1)
    args = synthetic.train_args(data, str(tmp_path / 'run'), max_steps=40, eval_interval=0, checkpoint_interval=0,
                                val_tokens=256)
    with pytest.raises(SystemExit, match=r'math repeats [\d,]+ windows \(\d+\.\d% of its data\) from step \d+, in the '
                                         r'(anneal|baseline) phase.*--allow_repeats=True'):
        run_train(args + ['--allow_repeats=False'])
    run_train(args)
    out = capsys.readouterr().out
    used, available = (int(x.replace(',', '')) for x in re.search(r'math ([\d,]+) of ([\d,]+) windows', out).groups())
    assert used > available and 'warning: math repeats' in out and 'stem' not in out.split('warning:')[1]
    import prepare
    expected = prepare.planned_rows(40, 8, (0.70, 0.25, 0.05), (0.85, 0.10, 0.05), 0.8)[0]
    assert abs(used - expected) < 4 * math.sqrt(expected)  # the draw is random around the plan's expectation


def test_defaults_are_the_full_run_of_config_pretrain():
    """train.py's defaults are values a reader sees, and config/pretrain.py spells out the same run: equal wherever both
    set a key, except the settings that make it a GPU run (train.py's defaults also run on the CPU) and its snapshots
    (24 GB kept: a run asks for them)."""
    import train
    from configurator import config_file_values
    train = importlib.reload(train)
    gpu_run = {'device', 'dtype', 'fused', 'recompute_blocks', 'wandb_log', 'wandb_run_name',
               'snapshot_interval'}
    pretrain = config_file_values(os.path.join(ROOT, 'config', 'pretrain.py'))
    shared = set(pretrain) & set(vars(train))
    assert {'d_model', 'n_layers', 'mixture_baseline', 'max_steps', 'learning_rate', 'tau_end'} <= shared
    assert {k: pretrain[k] for k in shared - gpu_run} == {k: getattr(train, k) for k in shared - gpu_run}
    assert (train.device, train.fused, pretrain['device'], pretrain['fused']) == ('auto', False, 'cuda', True)


def test_prepare_budgets_follow_the_plan():
    import prepare
    import train
    train = importlib.reload(train)  # its defaults, whatever an earlier test configured
    budgets = prepare.plan_budgets()
    assert budgets == prepare.plan_budgets(**{k: getattr(train, k) for k in (
        'max_steps', 'micro_batch_size', 'grad_accum_steps', 'mixture_baseline', 'mixture_anneal', 'anneal_start',
        'block_size', 'val_tokens', 'sources')})  # train.py's defaults size the data as config/pretrain.py does
    tokens = 19_531 * 128 * 4096  # 10.24B
    # 70/25/5 for 80% of the steps, 85/10/5 after: 0.73, 0.22 and 0.05 of the tokens, plus the 2M held out
    for name, share in (('math', 0.73), ('stem', 0.22), ('code', 0.05)):
        assert budgets[name] == pytest.approx(share * tokens * 1.01 + 2_000_000, rel=2e-4)


PLANTED_SPIKE = ("import runpy, sys; sys.path[:0] = ['tests', '.']; import model, synthetic; "
                 "synthetic.plant_spike(model.LanguageModelLoss, {step}, grad_accum_steps=2); "
                 "sys.argv = ['train.py', *sys.argv[1:]]; runpy.run_path('train.py', run_name='__main__')")


def torchrun(args, nproc, port, timeout=300):
    command = [sys.executable, '-m', 'torch.distributed.run', f'--nproc_per_node={nproc}', f'--master_port={port}',
               'train.py', *args]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, 'OMP_NUM_THREADS': '1'})


@pytest.mark.slow
@pytest.mark.xdist_group('ports')
def test_two_rank_run_resumes_on_one_rank(data_dir, tmp_path):
    """Through a real launcher (torchrun, two CPU processes, gloo). 2 ranks x grad_accum 1 train the global batch of
    1 rank x grad_accum 2: the same losses, the logged loss being the mean over ranks, and the same validation loss
    from rows sharded over the ranks. Stopped at step 4, the 2-rank run continues on 1 rank with twice the
    accumulation: data order, optimizer state, schedule and Gumbel noise go on as in the uninterrupted run. A
    different global batch is one clear line."""
    port = 29_600 + os.getpid() % 300
    common = dict(max_steps=8, log_interval=1, eval_interval=4, checkpoint_interval=0, backend='deepspeed',
                  micro_batch_size=2)

    def single(out_dir, **overrides):
        return subprocess.run([sys.executable, 'train.py', *synthetic.train_args(data_dir, str(tmp_path / out_dir),
                               **{**common, **overrides})], cwd=ROOT, capture_output=True, text=True, timeout=300,
                              env={**os.environ, 'MASTER_PORT': str(port + 1)})
    whole = single('whole', grad_accum_steps=2)
    first = torchrun(synthetic.train_args(data_dir, str(tmp_path / 'moved'), **common, grad_accum_steps=1,
                                          stop_after_steps=4), 2, port)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    wrong = single('moved', grad_accum_steps=1)
    assert wrong.returncode != 0 and 'trained with 4 rows a step, this run has 2 x 1 x 1 ranks = 2' in wrong.stderr
    second = single('moved', grad_accum_steps=2)
    assert second.returncode == 0, second.stderr[-2000:]
    assert 'resumed from step 4' in second.stdout and '2 ranks' in first.stdout
    np.testing.assert_allclose(losses(first.stdout) + losses(second.stdout), losses(whole.stdout), rtol=1e-5)
    validation = [re.findall(r'step 4: validation math (\d+\.\d+)', out.stdout) for out in (first, whole)]
    assert len(validation[0]) == 1 and float(validation[0][0]) == pytest.approx(float(validation[1][0]), rel=1e-4)


@pytest.mark.slow
@pytest.mark.xdist_group('ports')
def test_a_signal_to_one_rank_stops_both_at_the_same_step(data_dir, tmp_path):
    """SIGTERM to rank 1 only (a pre-empted worker): the flag is all-reduced, so both ranks save at the same step and
    exit cleanly instead of one waiting in the save's barrier while the other sits in a gradient collective."""
    import signal
    import time
    port = 29_900 + os.getpid() % 90
    args = synthetic.train_args(data_dir, str(tmp_path / 'run'), max_steps=100_000, log_interval=1, eval_interval=0,
                                checkpoint_interval=0, backend='deepspeed', micro_batch_size=2, grad_accum_steps=1,
                                allow_repeats=True)
    command = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2', f'--master_port={port}', 'train.py',
               *args]
    launcher = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env={**os.environ, 'OMP_NUM_THREADS': '1'})
    lines = []
    for line in launcher.stdout:  # wait for training to run
        lines.append(line)
        if line.startswith('step 5/'):
            break
    workers = subprocess.run(['pgrep', '-f', f'train.py --data_dir={data_dir}'], capture_output=True, text=True)
    pids = [int(p) for p in workers.stdout.split() if int(p) != launcher.pid]
    ranks = {}
    for pid in pids:
        environ = open(f'/proc/{pid}/environ', 'rb').read().split(b'\0')
        rank = next((e.split(b'=')[1] for e in environ if e.startswith(b'RANK=')), None)
        if rank is not None:
            ranks[int(rank)] = pid
    os.kill(ranks[1], signal.SIGTERM)
    out = ''.join(lines) + launcher.communicate(timeout=120)[0]
    assert launcher.returncode == 0, out[-3000:]
    saved = re.findall(r'signal 15: checkpoint saved at step (\d+)', out)
    assert len(saved) == 1  # printed by rank 0, which never received the signal itself
    step = int(saved[0])
    state = torch.load(tmp_path / 'run' / f'portable_{step}.pt', weights_only=True)
    assert state['step'] == step and state['world_size'] == 2 and state['optimizer_state_dict']['format'] == 'per_parameter'


def schedule(train, segments, steps):
    return ([train.learning_rate_at(s, segments) for s in range(steps + 1)],
            [train.tau_at(s, segments) for s in range(steps + 1)])


@pytest.mark.parametrize('change_at, new_end', [(3, 60), (50, 60), (50, 51), (50, 200), (90, 300), (85, 88)])
def test_a_replan_keeps_every_schedule_whole(change_at, new_end):
    """max_steps 100 re-planned at a step of warm-up, the cosine or the anneal: the learning rate and tau go on from
    where they were, no step moves faster than the cosine over the steps left allows, tau never rises, and
    both end where the run ends; the annealed mixture covers the final 20% (from the change, if that is later) and
    never switches back."""
    import train
    train = importlib.reload(train)
    configure(vars(train), ['--max_steps=100', '--warmup_steps=10', '--learning_rate=1e-3', '--min_lr=1e-4'])
    planned = [train.segment_from(0)]
    train.max_steps = new_end
    segments = train.replan(planned, change_at)
    lr, tau = schedule(train, segments, new_end)
    before, _ = schedule(train, planned, 100)
    assert lr[:change_at + 1] == before[:change_at + 1]  # the steps before the change keep their schedule
    # from there, the cosine over the progress left: no step moves more than its steepest slope allows
    begin = max(change_at, 10)
    left = 1 - (begin - 10) / 90
    steepest = 0.5 * math.pi * (1e-3 - 1e-4) * left / (new_end - begin)
    assert all(abs(a - b) <= steepest * (1 + 1e-9) for a, b in zip(lr[begin + 1:], lr[begin:]))
    assert all(b <= a for a, b in zip(tau, tau[1:])) and all(b <= a for a, b in zip(lr[10:], lr[11:]))
    assert lr[new_end] == pytest.approx(1e-4) and tau[new_end - 1] == pytest.approx(0.1)
    anneal_from = segments[-1]['anneal_from']
    assert anneal_from <= max(change_at, 0.8 * new_end)  # the final 20%, or from the change if that is later
    assert anneal_from >= change_at or anneal_from == 80 <= change_at  # or already annealing since step 80


def test_shorten_and_extend_a_run_midway(data_dir, tmp_path, capsys):
    """Resumed with another max_steps, a run goes on: the learning rate and tau continuous at the change and at their
    ends at the new end, the steps already trained on their rows, no window twice, the annealed mixture (code only
    here) over the final 20%, each change recorded, the data plan's digest new. A finished run is not extended, and
    an end before the step reached is one line."""
    import json
    common = dict(log_interval=1, eval_interval=0, checkpoint_interval=0, mixture_baseline=(0.5, 0.5, 0.0),
                  mixture_anneal=(0.0, 0.0, 1.0))
    out = str(tmp_path / 'run')
    run_train(synthetic.train_args(data_dir, out, max_steps=40, stop_after_steps=10, **common))
    with pytest.raises(SystemExit, match=r"portable_10\.pt is at step 10: max_steps=10 would end the run before it; "
                                         r"pass a max_steps above 10"):
        run_train(synthetic.train_args(data_dir, out, max_steps=10, **common))
    capsys.readouterr()
    run_train(synthetic.train_args(data_dir, out, max_steps=24, learning_rate=2e-3, **common))
    assert re.search(r"changed since .*portable_10\.pt: max_steps 40 -> 24, learning_rate 0\.003 -> 0\.002; the "
                     r"schedule re-planned from step 10 to end at 24\n", capsys.readouterr().out)
    state = torch.load(os.path.join(out, 'portable_final.pt'), weights_only=True)
    assert state['step'] == 24 and state['tau'] == pytest.approx(0.1)
    assert state['config_changes'] == [{'step': 10, 'changes': {'max_steps': [40, 24], 'learning_rate': [3e-3, 2e-3]}}]
    log = [json.loads(line) for line in open(os.path.join(out, 'train_log.jsonl'))]
    tau = [e['train/tau'] for e in log if 'train/tau' in e]
    assert len(tau) == 24 and all(b <= a for a, b in zip(tau, tau[1:])) and tau[-1] == pytest.approx(0.1)
    assert max(a - b for a, b in zip(tau, tau[1:])) < 0.06  # 0.9 / 39 a step before, 0.9 x 0.75 / 14 after
    plans = [e['run']['data_plan'] for e in log if 'run' in e]
    assert len(plans) == 2 and plans[0] != plans[1]
    import train
    segments = state['scheduler_state_dict']['segments']
    assert [(s['step'], s['max_steps'], s['anneal_from']) for s in segments] == [(0, 40, 32.0), (10, 24, 0.8 * 24)]
    source, slot = train.row_plan(3, 8, segments)
    first, _ = train.row_plan(3, 8, segments[:1])[0], None
    assert np.array_equal(source[:80], first[:80])  # steps 0-9 kept their rows
    assert len(set(zip(source.tolist(), slot.tolist()))) == len(source)  # no window twice
    by_step = source.reshape(24, 8)
    assert (by_step[20:] == 2).all() and (by_step[:20] != 2).all()  # steps 20-23 (the final 20%) annealed
    # extended while its schedule runs: the same; once finished, a new run is the way on
    extended = str(tmp_path / 'extended')
    run_train(synthetic.train_args(data_dir, extended, max_steps=16, stop_after_steps=8, **common))
    run_train(synthetic.train_args(data_dir, extended, max_steps=30, **common))
    final = torch.load(os.path.join(extended, 'portable_final.pt'), weights_only=True)
    assert final['step'] == 30 and final['tau'] == pytest.approx(0.1)
    tau = [json.loads(line).get('train/tau') for line in open(os.path.join(extended, 'train_log.jsonl'))]
    tau = [t for t in tau if t is not None]
    assert len(tau) == 30 and all(b <= a for a, b in zip(tau, tau[1:]))
    with pytest.raises(SystemExit, match=r"portable_final\.pt finished its schedule at step 30 \(learning rate at "
                                         r"min_lr, tau at tau_end\).* --init_from=.*portable_final\.pt "
                                         r"--init_optimizer=True --out_dir=<a new folder>"):
        run_train(synthetic.train_args(data_dir, extended, max_steps=50, **common))


def test_a_spike_is_skipped_and_gradient_norms_are_logged_by_group(data_dir, tmp_path, capsys, monkeypatch):
    """A step whose loss (and so gradient) is 30x its neighbours' is skipped, once the window holds 20 steps: its
    checkpoint equals the one before it. Every logged step has the gradient's norm per group, which together are the
    whole norm."""
    monkeypatch.setattr(M.LanguageModelLoss, 'forward', M.LanguageModelLoss.forward)  # undone after the test
    synthetic.plant_spike(M.LanguageModelLoss, 24, grad_accum_steps=2)
    run_train(synthetic.train_args(data_dir, str(tmp_path), max_steps=27, log_interval=1, eval_interval=0,
                                   checkpoint_interval=1))
    out = capsys.readouterr().out
    assert re.findall(r'step (\d+): spike: loss [\d.]+ > [\d.]+ and grad_norm [\d.]+ > [\d.]+ \(10 robust sigmas '
                      r'above the median of the last 24 steps\): update skipped \(1 in a row, 1 in all\)', out) == ['24']
    before, after = (torch.load(tmp_path / f'portable_{step}.pt', weights_only=True) for step in (24, 25))
    for key, value in before['model_state_dict'].items():
        assert torch.equal(value, after['model_state_dict'][key]), key
    assert after['skipped_updates'] == 1 and len(after['recent']['loss']) == 24  # the spike is not in the window
    import json
    logged = [json.loads(line) for line in open(tmp_path / 'train_log.jsonl')]
    logged = [e for e in logged if 'train/grad_norm' in e]
    assert len(logged) == 27
    for entry in logged:
        groups = {k[10:]: v for k, v in entry.items() if k.startswith('grad_norm/')}
        assert set(groups) == {'embedding', 'attention', 'ffn', 'routing', 'norms'} and min(groups.values()) > 0
        assert math.sqrt(sum(v * v for v in groups.values())) == pytest.approx(entry['train/grad_norm'], rel=1e-5)


def test_a_budget_replans_the_run_to_fit_once(data_dir, tmp_path, capsys):
    """At $1 a second, after 3 untimed and 5 timed steps the projection of 60 steps exceeds budget_usd=$1 unless a step
    takes under ~16 ms (measured: 37 ms, so ~25 steps fit): max_steps is re-planned to what 97% of the budget buys at
    the measured speed, the schedule ends there whole, and the same command run again goes on with that plan.
    fit_budget=False only warns."""
    import json
    budget = dict(max_steps=60, budget_steps=5, budget_usd=1.0, usd_per_hour=3600, eval_interval=0,
                  checkpoint_interval=0)
    run_train(synthetic.train_args(data_dir, str(tmp_path / 'fit'), **budget))
    out = capsys.readouterr().out
    line = re.search(r'budget: 60 steps at ([\d.e-]+) s a step cost \$([\d.]+) in all \([\d.]+ h x 1 GPU x \$3600/h\), '
                     r'ending \d{4}-\d\d-\d\d \d\d:\d\d: over budget_usd=\$1\.00, so max_steps 60 -> (\d+) \(aiming at '
                     r'97% of it\), the schedule re-planned from step 8 to end there whole', out)
    assert line, out[-2000:]
    entry = next(json.loads(e) for e in open(tmp_path / 'fit' / 'train_log.jsonl') if 'budget/' in e)
    seconds_per_step, cost, fits = entry['budget/seconds_per_step'], entry['budget/projected_usd'], int(line.group(3))
    spent = cost - 52 * seconds_per_step  # seconds at $1 a second, before the 52 steps left
    assert fits == entry['budget/max_steps'] == max(9, int(8 + (0.97 * 1.0 - spent) / seconds_per_step))
    assert 8 < fits < 60
    state = torch.load(tmp_path / 'fit' / 'portable_final.pt', weights_only=True)
    assert state['step'] == fits and state['tau'] == pytest.approx(0.1)
    assert state['config_changes'] == [{'step': 8, 'changes': {'max_steps': [60, fits]}, 'reason': 'budget'}]
    assert state['config']['max_steps'] == 60  # what the command asked; the plan it ran is in the segments
    run_train(synthetic.train_args(data_dir, str(tmp_path / 'fit'), **budget))
    assert f'already trained to max_steps={fits}' in capsys.readouterr().out
    run_train(synthetic.train_args(data_dir, str(tmp_path / 'warn'), fit_budget=False,
                                   **{**budget, 'max_steps': 20, 'budget_usd': 0.3}))
    out = capsys.readouterr().out
    assert re.search(r'over budget_usd=\$0\.30; \d+ steps would fit \(fit_budget=False\)', out) and 'step 20/20' in out


def rank_pids(pattern, launcher_pid):
    """{rank: pid} of the worker processes a launcher started, from their environments."""
    workers = subprocess.run(['pgrep', '-f', pattern], capture_output=True, text=True)
    ranks = {}
    for pid in (int(p) for p in workers.stdout.split() if int(p) != launcher_pid):
        environ = open(f'/proc/{pid}/environ', 'rb').read().split(b'\0')
        rank = next((e.split(b'=')[1] for e in environ if e.startswith(b'RANK=')), None)
        if rank is not None:
            ranks[int(rank)] = pid
    return ranks


@pytest.mark.slow
@pytest.mark.xdist_group('ports')
def test_a_stalled_rank_ends_the_run_within_the_timeout(data_dir, tmp_path):
    """Rank 1 stopped (SIGSTOP) mid-run: rank 0, waiting in a collective, prints its stack once the step has run half
    collective_timeout_s, then ends the run at collective_timeout_s with one line naming the step and rank 1, the
    checkpoint before intact: seconds, not the process group's 30 minutes."""
    import time
    port = 29_700 + os.getpid() % 90
    args = synthetic.train_args(data_dir, str(tmp_path / 'run'), max_steps=100_000, log_interval=1, eval_interval=0,
                                checkpoint_interval=4, backend='deepspeed', micro_batch_size=2, grad_accum_steps=1,
                                collective_timeout_s=5, save_timeout_s=5)  # rank 0 may be in a save
    command = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2', f'--master_port={port}', 'train.py',
               *args]
    launcher = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env={**os.environ, 'OMP_NUM_THREADS': '1'})
    lines = []
    for line in launcher.stdout:
        lines.append(line)
        if line.startswith('step 25/'):
            break
    ranks = rank_pids(f'train.py --data_dir={data_dir}', launcher.pid)
    os.kill(ranks[1], signal.SIGSTOP)
    stopped = time.monotonic()
    try:
        for line in launcher.stdout:
            lines.append(line)
            if line.startswith('error: '):
                break
        waited = time.monotonic() - stopped
    finally:
        os.kill(ranks[1], signal.SIGKILL)
        launcher.communicate(timeout=120)
    out = ''.join(lines)
    at = r"(?:the save at )?step (\d+)"  # rank 0 may wait in a save's collective
    error = re.search(rf"error: {at} did not finish within 5 s on rank 0, waiting for rank 1 \(not responding, last "
                      rf"seen in {at}\): ending the run; the last checkpoint in .*/run is intact: resume with the same "
                      r"command once every rank is healthy\n", out)  # rank 1's place is published every 0.5 s
    assert error, out[-3000:]
    assert int(error.group(2)) <= int(error.group(1)) and waited < 5 + 10
    assert re.search(rf"rank 0: (?:the save at )?step {error.group(1)} has run [23] s \(a step's median: [\d.e-]+ s\); "
                     r"its stack:\n", out)
    assert re.search(r'File ".*/train\.py", line \d+ in main', out.split('its stack:')[1])  # the main thread's wait
    newest = U.numbered_checkpoints(str(tmp_path / 'run'), 'portable_')[-1]  # every 4 steps, the newest intact
    assert newest >= int(error.group(1)) - 4 and torch.load(tmp_path / 'run' / f'portable_{newest}.pt',
                                                           weights_only=True)['step'] == newest
