import importlib
import json
import os
import re
import shutil

import numpy as np
import pytest
import torch

import model as M
import utils as U
import prepare
import synthetic
from configurator import configure
from conftest import held_by_another_process

TINY = dict(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=128)


@pytest.fixture(scope='module')
def sft_data(tmp_path_factory):
    """The embedded sample's conversations (Nemotron-Math-v2 schema) prepared with the real Qwen3 tokenizer."""
    root = tmp_path_factory.mktemp('sft')
    raw = prepare.make_sample(str(root / 'raw'), documents=(1, 1, 1), conversations=60)
    with pytest.MonkeyPatch.context() as patch:
        for key, value in dict(input=os.path.join(raw, 'sft.jsonl'), output_base=str(root / 'tokenized'),
                               tokenizer='packaged', num_proc=1, chunk_tokens=10**8, max_tokens=-1,
                               sft_sources='nemotron').items():
            patch.setattr(prepare, key, value)
        prepare.prepare_source('sft')
    return str(root / 'tokenized' / 'sft')


@pytest.fixture(scope='module')
def pretrained(tmp_path_factory):
    """A tiny 'pre-trained' checkpoint (initialised weights, tau at its end value) in the portable format."""
    folder = tmp_path_factory.mktemp('pretrained')
    paths = {}
    for model_type in ('polyglu', 'vanilla'):
        torch.manual_seed(0)
        model = M.create_model(M.ModelConfig(model_type=model_type, **TINY))
        model.set_tau(0.1)
        paths[model_type] = str(folder / f'{model_type}.pt')
        U.save_checkpoint(paths[model_type], model, step=1000)
    return paths


def sft_args(data_dir, init_from, out_dir, **overrides):
    settings = dict(init_from=init_from, data_dir=data_dir, out_dir=out_dir, block_size=64, val_fraction=0.1,
                    epochs=1, micro_batch_size=2, grad_accum_steps=2, learning_rate=3e-3, min_lr=3e-4,
                    warmup_steps=2, loss_chunk_size=32, backend='torch', device='cpu', dtype='float32',
                    log_interval=1, eval_interval=0, checkpoint_interval=0, wandb_log=False)
    settings.update(overrides)
    return [f'--{k}={v}' for k, v in settings.items()]


def run_sft(args):
    import sft
    sft = importlib.reload(sft)
    configure(vars(sft), args)
    sft.main()
    return sft


def training_loss(sft_module, checkpoint, n_rows=8):
    """Mean assistant-token loss of a checkpoint on the first rows it was fine-tuned on."""
    tokens, masks, starts, lengths, problems = sft_module.load_conversations()
    train_ids = np.flatnonzero(~sft_module.held_out_problems(problems, sft_module.val_fraction))
    order = np.random.default_rng([sft_module.seed, 0]).permutation(train_ids)
    rows = sft_module.pack(starts, np.minimum(lengths, 65), order, 65)[:n_rows]
    model, _ = U.load_checkpoint(checkpoint)
    x, y, cu_seqlens, max_seqlen = sft_module.batch_to_device(tokens, masks, rows)
    with torch.no_grad():
        return M.LanguageModelLoss(model)(x, y, cu_seqlens, max_seqlen).item()


def test_sft_lowers_assistant_loss_with_tau_frozen(sft_data, pretrained, tmp_path, capsys):
    sft = run_sft(sft_args(sft_data, pretrained['polyglu'], str(tmp_path), eval_interval=100))
    out = capsys.readouterr().out
    before, after = training_loss(sft, pretrained['polyglu']), training_loss(sft, str(tmp_path / 'portable_sft_final.pt'))
    assert after < before - 1.0
    validation = [float(v) for v in re.findall(r'validation loss (\d+\.\d+) per assistant token', out)]
    assert len(validation) == 2 and validation[1] < validation[0]
    assert set(re.findall(r'\| tau (\S+) \|', out)) == {'0.1'}
    tau = U.load_checkpoint(str(tmp_path / 'portable_sft_final.pt'))[1]['tau']
    assert tau == 0.1


def test_tau_is_asserted_not_just_set(sft_data, pretrained, tmp_path, monkeypatch):
    import sft
    sft = importlib.reload(sft)
    real_load_model, real_step_batches, loaded = sft.load_model, sft.step_batches, []

    def load_model():
        loaded.append(real_load_model())
        return loaded[-1]

    def annealing_step_batches(*args):
        loaded[0][0].update_tau(5, 10)  # something anneals tau behind SFT's back, during step 0
        return real_step_batches(*args)
    monkeypatch.setattr(sft, 'load_model', load_model)
    monkeypatch.setattr(sft, 'step_batches', annealing_step_batches)
    configure(vars(sft), sft_args(sft_data, pretrained['polyglu'], str(tmp_path)))
    with pytest.raises(SystemExit, match='tau moved away from 0.1 during SFT'):
        sft.main()


def test_no_gradient_at_masked_positions(sft_data):
    import sft
    sft = importlib.reload(sft)
    sft.data_dir, sft.device = sft_data, 'cpu'
    tokens, masks, starts, lengths, _ = sft.load_conversations()
    rows = sft.pack(starts, np.minimum(lengths, 65), np.arange(6), 65)[:2]
    x, y, cu_seqlens, max_seqlen = sft.batch_to_device(tokens, masks, rows)
    assert (y != -100).any() and (y == -100).any()
    model = M.create_model(M.ModelConfig(**TINY))
    hidden = model.hidden_states(x, cu_seqlens, max_seqlen).detach().requires_grad_()
    logits = torch.nn.functional.linear(hidden, model.embeddings.weight)
    logits.retain_grad()
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-100).backward()
    masked = y == -100
    assert logits.grad[masked].abs().max().item() == 0.0
    assert (logits.grad[~masked].abs().sum(-1) > 0).all()
    # the chunked loss used by sft.py gives the same zero gradients on the hidden states
    hidden.grad = None
    M.chunked_cross_entropy(hidden, model.embeddings.weight, y, chunk_size=16).backward()
    assert hidden.grad[masked].abs().max().item() == 0.0 and (hidden.grad[~masked].abs().sum(-1) > 0).all()


def test_packing_keeps_every_row_full_and_conversations_whole():
    import sft
    starts, lengths = np.array([0, 10, 30, 35, 60]), np.array([10, 20, 5, 25, 8])
    rows = sft.pack(starts, lengths, np.arange(5), capacity=32)
    # each row 32, no padding; a conversation that does not fit is context (untrained) at the end of a row
    assert rows == [[(0, 10, True), (10, 20, True), (30, 2, False)], [(30, 5, True), (35, 25, True), (60, 2, False)]]
    assert sft.pack(starts, lengths, np.arange(5), 32, keep_partial=True)[-1] == [(60, 8, True)]


def test_resumed_sft_is_exact(sft_data, pretrained, tmp_path, capsys):
    whole, parts = str(tmp_path / 'whole'), str(tmp_path / 'parts')
    run_sft(sft_args(sft_data, pretrained['polyglu'], whole))
    losses = lambda text: re.findall(r'\| loss (\d+\.\d+) \|', text)  # noqa: E731
    whole_losses = losses(capsys.readouterr().out)
    run_sft(sft_args(sft_data, pretrained['polyglu'], parts, stop_after_steps=4))
    first = capsys.readouterr().out
    run_sft(sft_args(sft_data, pretrained['polyglu'], parts))
    second = capsys.readouterr().out
    assert 'resumed from SFT step 4' in second
    assert losses(first) + losses(second) == whole_losses
    a = torch.load(os.path.join(whole, 'portable_sft_final.pt'), weights_only=True)['model_state_dict']
    b = torch.load(os.path.join(parts, 'portable_sft_final.pt'), weights_only=True)['model_state_dict']
    assert all(torch.equal(a[k], b[k]) for k in a)


SFT_ERRORS = [  # sft.py's settings over sft_args' -> the line it stops with; {tmp}: an empty folder, {vanilla}: a
    # VanillaLM checkpoint
    ({'init_from': '{tmp}/missing.pt'}, r'checkpoint .*missing\.pt not found'),
    ({'init_from': '{vanilla}'}, r".*vanilla\.pt is a vanilla model but model_type='polyglu': fix model_type or pick"),
    ({'data_dir': '{tmp}/nothing'}, r'missing data folder .*nothing'),
    ({'block_size': 256}, r"block_size=256 exceeds the model's max_seq_len=128"),
    ({'long_conversations': 'wrap'}, r"long_conversations must be 'truncate' or 'skip', got 'wrap'"),
    ({'micro_batch_size': 64}, r'\d+ packed rows are fewer than one step\'s \d+: lower micro_batch_size or'),
    ({'recompute_blocks': 3}, r'recompute_blocks must be -1 \(all\), 0 \(none\) or 1\.\.2, got 3'),
]


@pytest.mark.parametrize('settings, line', SFT_ERRORS)
def test_bad_settings_are_one_clear_line(sft_data, pretrained, tmp_path, settings, line):
    places = {'tmp': tmp_path, 'vanilla': pretrained['vanilla']}
    settings = {k: v.format(**places) if isinstance(v, str) else v for k, v in settings.items()}
    given = sft_args(settings.pop('data_dir', sft_data), settings.pop('init_from', pretrained['polyglu']),
                     str(tmp_path / 'out'), **settings)
    with pytest.raises(SystemExit, match=f'^error: {line}'):
        run_sft(given)


def test_reordered_problem_ids_are_caught_before_they_move_the_held_out_split(sft_data, pretrained, tmp_path):
    data = str(tmp_path / 'sft')
    shutil.copytree(sft_data, data)
    problems = os.path.join(data, 'chunk_00000.problems.bin')
    ids = np.fromfile(problems, dtype=np.uint64)
    ids[::-1].tofile(problems)  # the same size, every held-out conversation now named by a training problem's id
    with pytest.raises(SystemExit, match=r'^error: .*chunk_00000\.problems\.bin fails its manifest checksum'):
        run_sft(sft_args(data, pretrained['polyglu'], str(tmp_path / 'out')))
    with pytest.raises(SystemExit, match=r'^error: .*chunk_00000\.problems\.bin fails its checksum \(it decides which '
                                         r'problems are held out\)'):
        prepare.verify_folder(data)


def test_a_vanilla_checkpoint_fine_tunes_as_vanilla(sft_data, pretrained, tmp_path):
    run_sft(sft_args(sft_data, pretrained['vanilla'], str(tmp_path / 'baseline'), model_type='vanilla'))
    assert os.path.isfile(tmp_path / 'baseline' / 'portable_sft_final.pt')


def test_a_folder_held_by_a_live_run_stops_sft_at_once(sft_data, pretrained, tmp_path):
    with held_by_another_process(tmp_path / 'run') as pid:
        with pytest.raises(SystemExit, match=rf"^error: .*run is in use by a live run \(process {pid} on "):
            run_sft(sft_args(sft_data, pretrained['polyglu'], str(tmp_path / 'run')))
    run_sft(sft_args(sft_data, pretrained['polyglu'], str(tmp_path / 'run')))  # its holder gone, the folder is free
    assert os.path.isfile(tmp_path / 'run' / 'portable_sft_final.pt')


@pytest.mark.slow
@pytest.mark.xdist_group('ports')
def test_deepspeed_sft_matches_torch(sft_data, pretrained, tmp_path):
    import subprocess
    import sys

    from conftest import ROOT

    def run(backend):
        result = subprocess.run([sys.executable, 'sft.py', *sft_args(sft_data, pretrained['polyglu'],
                                 str(tmp_path / backend), backend=backend)], cwd=ROOT, capture_output=True, text=True,
                                timeout=600, env={**os.environ, 'MASTER_PORT': str(28_500 + os.getpid() % 1000)})
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
        return [float(x) for x in re.findall(r'\| loss (\d+\.\d+) \|', result.stdout)]

    torch_losses, deepspeed_losses = run('torch'), run('deepspeed')
    assert len(torch_losses) > 5
    np.testing.assert_allclose(deepspeed_losses, torch_losses, rtol=1e-4)
    assert os.path.isfile(tmp_path / 'deepspeed' / 'portable_sft_final.pt')


def test_conversations_across_several_chunks(tmp_path):
    raw = prepare.make_sample(str(tmp_path / 'raw'), documents=(1, 1, 1), conversations=60)
    with pytest.MonkeyPatch.context() as patch:
        for key, value in dict(input=os.path.join(raw, 'sft.jsonl'), output_base=str(tmp_path / 'tokenized'),
                               tokenizer='packaged', num_proc=1, chunk_tokens=1000, max_tokens=-1,
                               sft_sources='nemotron').items():
            patch.setattr(prepare, key, value)
        manifest = prepare.prepare_source('sft')
    import sft
    sft = importlib.reload(sft)
    sft.data_dir = str(tmp_path / 'tokenized' / 'sft')
    tokens, masks, starts, lengths, _ = sft.load_conversations()
    assert len(manifest['chunks']) > 3 and len(starts) == 60 and lengths.sum() == manifest['total_tokens']
    for start, length in zip(starts, lengths):
        ids = sft.piece(tokens, start, length)
        assert ids[0] == prepare.IM_START and ids[-1] == M.EOS_ID and (ids == M.EOS_ID).sum() == 1
        assert sft.piece(masks, start, length).sum() > 0  # every conversation has assistant tokens


@pytest.mark.parametrize('kind', ['pt', 'safetensors'])
def test_sft_starts_from_the_author_formats(kind, sft_data, tmp_path, capsys):
    weights = synthetic.author_weights(vocab=M.ModelConfig.vocab_size, seq_length=TINY['max_seq_len'])
    path = synthetic.write_author_files(str(tmp_path / 'author'), weights)[kind]
    run_sft(sft_args(sft_data, path, str(tmp_path / 'sft')))
    step = {'pt': 19_531, 'safetensors': 0}[kind]
    assert f'SFT from {path} (pre-training step {step}, tau 0.1)' in capsys.readouterr().out
    model, info = U.load_checkpoint(str(tmp_path / 'sft' / 'portable_sft_final.pt'))
    assert info['init_from'] == path and info['tau'] == 0.1
    moved = (model.embeddings.weight - weights['embeddings.weight'].float()).abs().max().item()
    assert 0 < moved < 0.1  # fine-tuned from the author's weights, not from a fresh init (std 0.5 apart)


def test_no_assistant_token_trained_twice_in_an_epoch():
    import sft
    starts, lengths = np.array([0, 10, 30, 35, 60, 68]), np.array([10, 20, 5, 25, 8, 30])
    rows = sft.pack(starts, lengths, np.arange(6), capacity=32)
    trained = {}
    for row in rows:
        for start, length, is_trained in row:
            trained[start] = trained.get(start, 0) + length * is_trained
    # every conversation of the kept rows is trained exactly once and whole; the cut-off ones only as context
    assert all(trained[s] in (0, n) for s, n in zip(starts, lengths))
    assert sum(trained.values()) == sum(n for row in rows for _, n, t in row if t)
    mask = np.ones(100, np.uint8)
    ids, row_mask = sft.row_arrays(([np.arange(100)], np.array([0, 100])), ([mask], np.array([0, 100])), rows[0])
    assert row_mask.tolist() == [1] * 30 + [0] * 2 and ids.tolist() == list(range(30)) + [30, 31]


def test_step_loss_is_the_mean_per_assistant_token(sft_data):
    """Two micro-batches with different numbers of assistant tokens: step_batches' weights make sft.py's step (the mean
    of weight x loss over its micro-batches) the mean over all the step's assistant tokens, not a mean of
    per-micro-batch means."""
    import sft
    sft = importlib.reload(sft)
    sft.data_dir, sft.device, sft.micro_batch_size, sft.grad_accum_steps = sft_data, 'cpu', 1, 2
    tokens, masks, starts, lengths, _ = sft.load_conversations()
    rows = sft.pack(starts, np.minimum(lengths, 65), np.arange(len(starts)), 65)
    batches, weights = sft.step_batches(tokens, masks, rows, 0, 0, 1)
    counts = [int((y != -100).sum()) for _, y, _, _ in batches]
    assert counts[0] != counts[1] and weights == pytest.approx([n * 2 / sum(counts) for n in counts])
    torch.manual_seed(0)
    objective = M.LanguageModelLoss(M.create_model(M.ModelConfig(**TINY)).eval())  # no Gumbel noise
    step_loss = sum(objective(*b) * w for b, w in zip(batches, weights)) / 2
    # by hand: the sum of every assistant token's loss over the step's count of them
    per_token = sum(objective(*b) * n for b, n in zip(batches, counts)) / sum(counts)
    assert step_loss.item() == pytest.approx(per_token.item(), rel=1e-6)
    assert step_loss.item() != pytest.approx(np.mean([objective(*b).item() for b in batches]), rel=1e-3)


def test_held_out_by_problem_and_cost_shown(sft_data, pretrained, tmp_path, capsys):
    import sft
    problems = np.repeat(np.array([5, 3, 9, 1, 7], dtype=np.uint64), 3)  # 5 problems, 3 traces each
    held = sft.held_out_problems(problems, 0.4)
    assert held.sum() == 6 and set(problems[held]).isdisjoint(problems[~held])
    run_sft(sft_args(sft_data, pretrained['polyglu'], str(tmp_path)))
    out = capsys.readouterr().out
    hours, dollars = re.search(r'projected cost: ([\d.]+) A100-hours, \$([\d,]+) at 40% MFU', out).groups()
    assert float(dollars.replace(',', '')) == pytest.approx(float(hours) * 1.64, abs=1)


@pytest.mark.slow
@pytest.mark.xdist_group('ports')
def test_two_rank_sft_resumes_on_one_rank(sft_data, pretrained, tmp_path):
    """sft.py through torchrun on 2 CPU ranks, stopped, then continued on 1 rank with twice the accumulation: the losses
    of an uninterrupted 1-rank run (the same global batch, data, optimizer state and noise)."""
    import subprocess
    import sys

    from conftest import ROOT
    port = 28_100 + os.getpid() % 300

    def run(out_dir, ranks, **overrides):
        args = sft_args(sft_data, pretrained['polyglu'], str(tmp_path / out_dir), backend='deepspeed',
                        val_fraction=0.5, **overrides)  # half the problems: 6 steps or more
        launcher = [sys.executable, '-m', 'torch.distributed.run', f'--nproc_per_node={ranks}', f'--master_port={port}'] \
            if ranks > 1 else [sys.executable]
        result = subprocess.run([*launcher, 'sft.py', *args], cwd=ROOT, capture_output=True, text=True, timeout=600,
                                env={**os.environ, 'MASTER_PORT': str(port + 1), 'OMP_NUM_THREADS': '1'})
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
        return [float(x) for x in re.findall(r'\| loss (\d+\.\d+) \|', result.stdout)], result.stdout

    whole, _ = run('whole', 1, grad_accum_steps=2)
    first, two_ranks = run('moved', 2, grad_accum_steps=1, stop_after_steps=3)
    second, out = run('moved', 1, grad_accum_steps=2)
    assert 'resumed from SFT step 3' in out and len(whole) >= 6
    assert two_ranks.count('stop_after_steps=3: checkpoint saved at step 3') == 1  # rank 0 alone prints
    np.testing.assert_allclose(first + second, whole, rtol=1e-5)


def test_resume_refuses_another_init_from_and_skips_a_damaged_checkpoint(sft_data, pretrained, tmp_path, capsys):
    import shutil
    out = str(tmp_path / 'run')
    run_sft(sft_args(sft_data, pretrained['polyglu'], out, stop_after_steps=2, checkpoint_interval=1))
    other = str(tmp_path / 'other.pt')  # a checkpoint of another size: before, a 34-line size-mismatch traceback
    U.save_checkpoint(other, M.create_model(M.ModelConfig(**{**TINY, 'd_model': 48})), step=1)
    same = str(tmp_path / 'same.pt')    # the same size: before, a silent continuation of the other run's weights
    shutil.copy(pretrained['polyglu'], same)
    for init_from in (other, same):
        with pytest.raises(SystemExit, match=rf"holds an SFT run from init_from='{re.escape(pretrained['polyglu'])}'.*"
                                             rf"not '{re.escape(init_from)}': use a new out_dir, or resume=''"):
            run_sft(sft_args(sft_data, init_from, out))
    newest = os.path.join(out, 'portable_sft_2.pt')
    with open(newest, 'r+b') as f:
        f.truncate(os.path.getsize(newest) // 2)
    capsys.readouterr()
    run_sft(sft_args(sft_data, pretrained['polyglu'], out))
    printed = capsys.readouterr().out
    assert 'portable_sft_2.pt is damaged' in printed and 'resumed from SFT step 1' in printed


def test_nan_guard_skips_then_stops_after_max_bad_steps(sft_data, pretrained, tmp_path, capsys, monkeypatch):
    """sft.py's non-finite steps, as train.py's: skipped and counted, and max_bad_steps in a row stop the run."""
    import sft
    calls = []

    class Poisoned(M.LanguageModelLoss):
        def forward(self, *args):
            calls.append(1)
            loss = super().forward(*args)
            return loss * float('nan') if len(calls) >= 3 else loss  # eval_interval=0: a forward is a micro-batch

    module = importlib.reload(sft)
    monkeypatch.setattr(module, 'LanguageModelLoss', Poisoned)
    configure(vars(module), sft_args(sft_data, pretrained['polyglu'], str(tmp_path), eval_interval=0, max_bad_steps=2,
                                     grad_accum_steps=1))
    with pytest.raises(SystemExit, match=r'2 non-finite steps in a row at step 3: stopping; the last good checkpoint'):
        module.main()
    assert 'step 2: non-finite loss nan or grad norm nan: update skipped (1 in a row, 1 in all)' in capsys.readouterr().out


def test_sft_writes_a_log_that_analyze_reads(sft_data, pretrained, tmp_path):
    """sft_log.jsonl, in train_log.jsonl's format: analyze.py reads an SFT run as it reads a pre-training run."""
    import analyze
    run_sft(sft_args(sft_data, pretrained['polyglu'], str(tmp_path), log_interval=1, eval_interval=2))
    entries = [json.loads(line) for line in open(tmp_path / 'sft_log.jsonl')]
    steps = [e['step'] for e in entries if 'train/loss' in e]
    assert steps == list(range(1, len(steps) + 1)) and len(steps) >= 4
    validated = sorted({0, *range(2, len(steps) + 1, 2), len(steps)})  # before step 1, every 2 steps, at the end
    assert [e['step'] for e in entries if 'val/loss' in e] == validated
    log = analyze.read_log(str(tmp_path / 'sft_log.jsonl'))
    assert len(log['points']) == len(steps) and len(log['validation']) == len(validated)
