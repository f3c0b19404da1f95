import importlib
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

import analyze as A
import model as M
import utils as U
import synthetic
from configurator import configure
from conftest import ROOT, everything_under, offline_wandb_run, small_config, wandb_offline_env

FIGURES = {'causality_audit.png', 'domain_routing.png', 'gate_contribution.png', 'neuron_map_layer_00.png',
           'neuron_map_layer_01.png', 'neurotransmitter_map_dynamic.png', 'neurotransmitter_map_static.png',
           'routing_entropy.png', 'summary.json'}


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp('data'))
    for i, name in enumerate(('math', 'code')):
        synthetic.write_source(folder, name, n_tokens=6000, chunk_tokens=10_000, seed=i, manifest_eos=M.EOS_ID)
    return folder


def checkpoint(tmp_path, name, alpha=None, gate=True, strong_gate=False, **overrides):
    torch.manual_seed(0)
    model = M.create_model(small_config(**overrides))
    model.set_tau(0.5)
    with torch.no_grad():
        for layer, block in enumerate(model.model_core):
            if strong_gate:  # as after training: the gate moves routing with the text
                block.ffn.gate_net[0].weight.normal_(std=1.0)
                block.ffn.gate_net[2].weight.normal_(std=1.0)
            if alpha is not None:
                block.ffn.alpha.copy_(torch.as_tensor(alpha[layer]).expand_as(block.ffn.alpha))
            if not gate:  # f(h) = 0: routing is alpha alone, on any text
                block.ffn.gate_net[2].weight.zero_()
                block.ffn.gate_net[2].bias.zero_()
    path = str(tmp_path / f'{name}.pt')
    U.save_checkpoint(path, model, step=5, val_tokens=1000)
    return path


def run_analyze(args):
    import analyze
    analyze = importlib.reload(analyze)
    configure(vars(analyze), args)
    analyze.main()
    return json.load(open(os.path.join(analyze.output, 'summary.json')))


def args(path, data_dir, output, **overrides):
    settings = dict(checkpoint=path, data_dir=data_dir, output=output, seq_len=32, max_tokens=640, batch_tokens=256,
                    audit_sequences=3, device='cpu')
    settings.update(overrides)
    return [f'--{k}={v}' for k, v in settings.items()]


def test_entropy_and_maps_recover_a_hand_set_alpha(tmp_path, data_dir):
    preference = [[6.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 6.0]]  # layer 0 prefers ReLU, layer 1 GELU
    path = checkpoint(tmp_path, 'set', alpha=preference, gate=False)
    summary = run_analyze(args(path, data_dir, str(tmp_path / 'figures')))
    layers = summary['per_layer']
    for layer, logits in enumerate(preference):
        p = torch.softmax(torch.tensor(logits) / 0.5, -1)
        closed_form = -(p * p.log()).sum().item()
        assert layers['static_entropy_mean'][layer] == pytest.approx(closed_form, rel=1e-4)
        assert layers['dynamic_entropy_mean'][layer] == pytest.approx(closed_form, rel=1e-4)  # the gate is off
        assert layers['kl_dynamic_vs_static'][layer] == pytest.approx(0.0, abs=1e-6)
        expected_shares = [1.0 if k == int(np.argmax(logits)) else 0.0 for k in range(4)]
        assert layers['static_shares'][layer] == expected_shares
        assert layers['dynamic_shares'][layer] == expected_shares
    assert layers['collapsed_fraction_static'] == [1.0, 1.0]  # entropy 0.0003 nats < 0.1
    assert set(os.listdir(tmp_path / 'figures')) == FIGURES
    assert all(os.path.getsize(tmp_path / 'figures' / f) > 1000 for f in FIGURES)
    assert {'checkpoint', 'step', 'tau', 'model_type', 'activations', 'max_entropy_nats', 'causality_audit',
            'per_layer', 'collapse_threshold', 'routing_entropy_mean_fraction', 'routing_entropy_mean_nats',
            'gumbel_noise_effect'} <= set(summary)
    assert set(layers['domain_mean_routing']) == {'math', 'code'} and 'math|code' in layers['domain_total_variation']


def test_causality_audit_zero_for_vanilla_not_for_polyglu(tmp_path, data_dir):
    vanilla = run_analyze(args(checkpoint(tmp_path, 'vanilla', model_type='vanilla'), data_dir, str(tmp_path / 'v')))
    audit = vanilla['causality_audit']
    assert audit['mean_kl'] == 0.0 and audit['max_abs_delta_log_p'] == 0.0
    assert audit['relative_change_per_layer'] == [0.0, 0.0]
    assert sorted(os.listdir(tmp_path / 'v')) == ['causality_audit.png', 'summary.json']  # no routing to map
    polyglu = run_analyze(args(checkpoint(tmp_path, 'poly', strong_gate=True), data_dir, str(tmp_path / 'p')))
    audit = polyglu['causality_audit']
    assert audit['mean_kl'] > 0 and audit['max_abs_delta_log_p'] > 0
    assert all(change > 0 for change in audit['relative_change_per_layer'])


def test_two_runs_compared_at_equal_tokens(tmp_path):
    for name, offset in (('poly', 0.0), ('vanilla', 0.25)):
        os.makedirs(tmp_path / name)
        with open(tmp_path / name / 'train_log.jsonl', 'w') as f:
            for step in range(1, 11):
                f.write(json.dumps({'step': step, 'train/tokens': 1000 * step, 'train/loss': 5 - 0.1 * step + offset})
                        + '\n')
            f.write(json.dumps({'step': 10, 'train/tokens': 10_000, 'val/loss': 4.0 + offset}) + '\n')
    import analyze
    analyze = importlib.reload(analyze)
    configure(vars(analyze), [f"--compare={tmp_path / 'poly'},{tmp_path / 'vanilla'}", f"--output={tmp_path / 'f'}"])
    analyze.main()  # training logs only: no checkpoint is read
    comparison = json.load(open(tmp_path / 'f' / 'summary.json'))['comparison']
    assert comparison['train_loss']['mean'] == pytest.approx(-0.25) and comparison['train_loss']['ci95'] is None
    assert comparison['validation']['domains']['loss']['mean'] == pytest.approx(-0.25)
    assert comparison['data_plans'].startswith('not recorded') and 'no interval exists' in comparison['verdict']
    assert sorted(os.listdir(tmp_path / 'f')) == ['loss_comparison.png', 'summary.json']


ANALYZE_ERRORS = [  # analyze.py's settings over args' -> the line it stops with; {tmp}: a folder with no log,
    # {c}: a checkpoint in it, {other}: one of another width
    ({'checkpoint': '{tmp}/missing.pt'}, r'checkpoint .*missing\.pt not found'),
    ({'data_dir': '{tmp}/empty'}, r'no text to analyse: no prepared math/stem/code under .*empty; give data=name=path'),
    ({'data': 'math={tmp}/none.bin'}, r"data for 'math': .*none\.bin is neither a prepared folder nor a file"),
    ({'compare': '{tmp},{tmp}'}, r'no training log at .*: train\.py writes train_log\.jsonl into its out_dir'),
    ({'compare': 'polyglu={tmp}'}, r"compare='polyglu=.*': give two arms, 'polyglu=dir1,dir2 vanilla=dir3,dir4' "
                                    r'\(quoted: one argument\)'),
    ({'run': '{tmp}'}, r'no training log at .*: --run takes a train\.py or sft\.py out_dir'),
    ({'shift': '{c}'}, r"shift='.*c\.pt': give two checkpoints, 'base\.pt,fine_tuned\.pt'"),
    ({'shift': '{c},{other}'}, r'shift= compares two PolyGLU checkpoints of one architecture; .*c\.pt is'),
    ({'output': '{c}/figures'}, r'cannot create .*figures \(.*\); choose another --output'),
]


@pytest.mark.parametrize('settings, line', ANALYZE_ERRORS)
def test_bad_input_is_one_clear_line(tmp_path, data_dir, settings, line):
    places = {'tmp': tmp_path, 'c': checkpoint(tmp_path, 'c'), 'other': checkpoint(tmp_path, 'other', d_model=48)}
    settings = {k: v.format(**places) for k, v in settings.items()}
    with pytest.raises(SystemExit, match=f'^error: {line}'):
        run_analyze(args(settings.pop('checkpoint', places['c']), settings.pop('data_dir', data_dir),
                         settings.pop('output', str(tmp_path / 'f')), **settings))


def test_gumbel_noise_effect_small_when_routing_is_sharp(tmp_path, data_dir):
    sharp = run_analyze(args(checkpoint(tmp_path, 'sharp', alpha=[[8.0, 0, 0, 0]] * 2, gate=False), data_dir,
                             str(tmp_path / 's')))
    uniform = run_analyze(args(checkpoint(tmp_path, 'uniform', strong_gate=True), data_dir, str(tmp_path / 'u')))
    assert sharp['gumbel_noise_effect']['mean_kl'] < 0.1 * uniform['gumbel_noise_effect']['mean_kl']  # measured: 46x
    assert uniform['gumbel_noise_effect']['mean_kl'] > 0 and 0 <= uniform['gumbel_noise_effect']['top1_agreement'] <= 1


@pytest.mark.parametrize('kind', ['pt', 'safetensors'])
def test_analyze_runs_on_the_author_formats(kind, tmp_path, data_dir):
    weights = synthetic.author_weights()
    path = synthetic.write_author_files(str(tmp_path / 'author'), weights)[kind]
    summary = run_analyze(args(path, data_dir, str(tmp_path / 'figures')))
    assert summary['tau'] == 0.1 and set(os.listdir(tmp_path / 'figures')) == FIGURES
    for layer in range(2):  # the static maps are the author's alpha at tau 0.1
        p = torch.softmax(weights[f'model_core.{layer}.polyglu.alpha'].float() / 0.1, -1)
        entropy = -(p * p.log()).sum(-1).mean().item()
        assert summary['per_layer']['static_entropy_mean'][layer] == pytest.approx(entropy, rel=1e-4)


@pytest.mark.slow
def test_precision_measures_what_bf16_rounding_does_at_tau_0_1(tmp_path, data_dir):
    """alpha 1/3 and 1/3 + 1e-3 on two activations: bf16 (spacing 2^-9 there) rounds both to 0.33398, so the rounded
    module routes a near-tie as a tie, a change that tau 0.1 magnifies tenfold; alphas bf16 holds exactly (0.5, 0.25),
    with no gate, cannot move at all. The head-gradient sum in bf16 is off by bf16's rounding, not more."""
    near_tie = [[1 / 3, 1 / 3 + 1e-3, 0.0, 0.0], [0.0, 1 / 3 + 1e-3, 1 / 3, 0.0]]
    exact = [[0.5, 0.25, 0.0, 0.0], [0.0, 0.5, 0.25, 0.0]]
    effects = {}
    for name, alpha, gate in (('near_tie', near_tie, True), ('exact', exact, False)):
        path = checkpoint(tmp_path, name, alpha=alpha, gate=gate)
        state = torch.load(path, weights_only=True)
        state['tau'] = 0.1
        torch.save(state, path)
        summary = run_analyze(args(path, data_dir, str(tmp_path / name), precision=True))
        effects[name] = summary['precision']
    routing = {name: effect['bf16_routing_parameters'] for name, effect in effects.items()}
    assert routing['exact'] == {'kl': 0.0, 'top1_agreement': 1.0, 'loss_change': 0.0}
    assert routing['near_tie']['kl'] > 1e-6 and routing['near_tie']['top1_agreement'] < 1.0
    head = effects['near_tie']['bf16_head_gradient_sum']
    assert head['steps'] == 20 and head['chunks'] == 32 and 1e-4 < head['head_gradient_relative_error'] < 2e-2


def test_wandb_offline_logs_the_figures_and_the_summary(tmp_path, data_dir):
    path = checkpoint(tmp_path, 'trained')
    state = torch.load(path, weights_only=True)
    torch.save({**state, 'config': {'wandb_project': 'my-pretraining-project'}}, path)
    result = subprocess.run([sys.executable, 'analyze.py', *args(path, data_dir, str(tmp_path / 'figures'),
                                                                 wandb_log=True)], cwd=ROOT, capture_output=True,
                            text=True, env=wandb_offline_env(tmp_path), timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    run = offline_wandb_run(tmp_path)
    assert b'my-pretraining-project' in run and b'analyze-trained' in run
    images = sorted(f for _, _, files in os.walk(tmp_path / 'wandb') for f in files if f.endswith('.png'))
    assert [re.sub(r'_\d+_[0-9a-f]+\.png$', '.png', f) for f in images] == sorted(f for f in FIGURES if f != 'summary.json')
    summary = json.load(open(tmp_path / 'figures' / 'summary.json'))
    for key in ('routing_entropy_mean_nats', 'routing_entropy_mean_fraction'):  # the run's summary: key, then value
        assert re.search(rb'analyze/' + key.encode() + rb'.{1,8}' + str(summary[key]).encode(), run, re.S), key
    assert b'hf_canary_do_not_log' not in everything_under(tmp_path) + result.stdout.encode() + result.stderr.encode()


@pytest.fixture(scope='module')
def run_with_snapshots(tmp_path_factory):
    """A tiny train.py run on the analysed format (the real EOS id in the manifests), with 4 snapshots."""
    import train
    folder = tmp_path_factory.mktemp('run')
    data = str(folder / 'data')
    for i, name in enumerate(('math', 'stem', 'code')):
        synthetic.write_source(data, name, n_tokens=8000, seed=i, manifest_eos=M.EOS_ID)
    out_dir = str(folder / 'run')
    module = importlib.reload(train)
    configure(vars(module), synthetic.train_args(data, out_dir, eos_id=M.EOS_ID, max_steps=20, snapshot_interval=5,
                                                 checkpoint_interval=0, learning_rate=1e-2, val_tokens=800))
    module.main()
    return data, out_dir


def test_routing_over_training_is_each_snapshot_analysed_alone(run_with_snapshots, tmp_path):
    data, out_dir = run_with_snapshots
    summary = run_analyze(args('', data, str(tmp_path / 'run'), run=out_dir))['run']
    figures = {'training_dynamics.png', 'entropy_over_training.png', 'activation_shares_over_training.png',
               'neurotransmitter_maps_over_training.png', 'summary.json'} | {name for name, *_ in A.DYNAMICS}
    assert set(os.listdir(tmp_path / 'run')) == figures
    log = [json.loads(line) for line in open(os.path.join(out_dir, 'train_log.jsonl'))]
    dynamics = summary['dynamics']
    assert dynamics['step'] == [5, 10, 15, 20] and dynamics['tokens_per_step'] == 4 * 2 * 32
    assert dynamics['series']['train/lr'] == [e['train/lr'] for e in log if 'train/lr' in e]
    assert set(dynamics['validation']) == {'step', 'math', 'stem', 'code', 'loss'} and dynamics['validation']['step'] \
        == [10, 20]
    snapshots = summary['routing']['snapshots']
    assert [s['step'] for s in snapshots] == [5, 10, 15, 20]
    for snapshot in snapshots:
        alone = run_analyze(args(snapshot['file'], data, str(tmp_path / f"alone_{snapshot['step']}")))
        assert alone['step'] == snapshot['step'] and alone['tau'] == snapshot['tau']
        for key, values in snapshot['per_layer'].items():
            assert np.allclose(values, alone['per_layer'][key], rtol=1e-6, atol=0), (snapshot['step'], key)
    entropies = np.array([s['per_layer']['dynamic_entropy_mean'] for s in snapshots])
    assert np.ptp(entropies, 0).min() > 1e-3  # routing moved: the curves are not one checkpoint four times
    assert A.first_below([5, 10, 15], [0.5, 0.05, 0.01]) == 10 and A.first_below([5, 10, 15], [0.05, 0.5, 0.01]) == 15
    assert A.first_below([5, 10], [0.5, 0.2]) is None


def test_a_shift_of_a_checkpoint_against_itself_is_zero(run_with_snapshots, tmp_path):
    data, out_dir = run_with_snapshots
    final = os.path.join(out_dir, 'portable_final.pt')
    same = run_analyze(args('', data, str(tmp_path / 'same'), shift=f'{final},{final}'))['shift']
    layers = same['per_layer']
    assert layers['kl'] == [0.0, 0.0] and layers['top_activation_changed'] == [0.0, 0.0]
    assert layers['shares_base'] == layers['shares_fine_tuned'] and same['kl_mean'] == 0.0
    assert sorted(os.listdir(tmp_path / 'same')) == ['routing_shift.png', 'summary.json']
    moved = run_analyze(args('', data, str(tmp_path / 'moved'), shift=f'{out_dir}/snapshots/snapshot_5.pt,{final}'))
    assert min(moved['shift']['per_layer']['kl']) > 1e-4 and moved['shift']['steps'] == [5, 20]


def test_a_run_without_snapshots_draws_its_log(tmp_path):
    """A log alone (a run that kept no snapshots): the dynamics, a re-plan and a skipped update marked where they
    happened, the last entry of a step winning, a torn last line ignored."""
    os.makedirs(tmp_path / 'run')
    with open(tmp_path / 'run' / 'train_log.jsonl', 'w') as f:
        for step in range(10, 110, 10):
            f.write(json.dumps({'step': step, 'train/loss': 9.0 - step / 20, 'train/lr': 1e-3, 'train/tau': 1 - step / 200,
                                'train/tokens': 512 * step, 'train/skipped': float(step == 70),
                                'train/skipped_steps': int(step >= 70), 'grad_norm/routing': 0.01}) + '\n')
        f.write(json.dumps({'step': 50, 'changes': {'max_steps': [100, 120]}}) + '\n')
        f.write(json.dumps({'step': 100, 'train/tokens': 51_200, 'val/math': 4.5, 'val/loss': 4.4}) + '\n')
        f.write(json.dumps({'step': 100, 'train/loss': 3.5, 'train/tokens': 51_200}) + '\n')  # a resumed step, again
        f.write('{"step": 110, "train/lo')
    summary = run_analyze([f"--run={tmp_path / 'run'}", f"--output={tmp_path / 'f'}"])['run']
    assert 'routing' not in summary and set(os.listdir(tmp_path / 'f')) == {
        'training_dynamics.png', 'summary.json'} | {name for name, *_ in A.DYNAMICS}
    dynamics = summary['dynamics']
    assert dynamics['step'] == list(range(10, 110, 10)) and dynamics['series']['train/loss'][-1] == 3.5
    assert dynamics['replans'] == [50] and dynamics['skipped_at'] == [70] and dynamics['tokens_per_step'] == 512
    assert dynamics['validation'] == {'step': [100], 'math': [4.5], 'loss': [4.4]}


def test_a_log_torn_by_a_kill_is_read_to_its_last_whole_line(tmp_path):
    """--compare's and --run's readers share one parser: the torn last line of a killed run is skipped, the last entry
    of a step wins."""
    import analyze
    entries = [{'step': 1, 'train/loss': 5.0, 'train/tokens': 100}, {'step': 2, 'train/loss': 4.5, 'train/tokens': 200},
               {'step': 2, 'train/loss': 4.0, 'train/tokens': 200}, {'step': 2, 'train/tokens': 200, 'val/math': 4.25}]
    (tmp_path / 'train_log.jsonl').write_text(''.join(json.dumps(e) + '\n' for e in entries) + '{"step": 3, "train/lo')
    log = analyze.read_log(str(tmp_path))
    assert log['points'][:, 1].tolist() == [5.0, 4.0] and log['validation'] == {200: {'math': 4.25}}
    dynamics = analyze.training_dynamics(str(tmp_path / 'train_log.jsonl'))
    assert dynamics['step'] == [1, 2] and dynamics['validation'] == {'step': [2], 'math': [4.25]}
