import importlib
import json
import math
import os
import re
import subprocess
import sys
from functools import partial

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

import eval as E
import model as M
import utils as U
import synthetic
from configurator import configure
from conftest import ROOT, everything_under, offline_wandb_run, small_config, wandb_offline_env


@pytest.fixture(scope='module')
def tiny():
    torch.manual_seed(0)
    model = M.create_model(small_config(max_seq_len=64)).eval()
    with torch.no_grad():
        for block in model.model_core:  # routing that depends strongly on the gate, so pooling mistakes would show
            block.ffn.alpha.normal_(std=2.0)
            block.ffn.gate_net[0].weight.normal_(std=1.0)
            block.ffn.gate_net[2].weight.normal_(std=1.0)
    return M.wrap_model(model, segment_pooling=True)


@pytest.fixture(scope='module')
def word_tokenizer():
    """512 words 'w0'..'w511', one token each: decode joins with spaces, so stop strings are testable."""
    tok = Tokenizer(models.WordLevel({f'w{i}': i for i in range(512)}, unk_token='w0'))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix='##')
    return tok


def requests(n=8, seed=0):
    rng = np.random.default_rng(seed)
    return [(rng.integers(0, 512, int(rng.integers(3, 30))).tolist(), rng.integers(0, 512, int(rng.integers(1, 6))).tolist())
            for _ in range(n)]


def test_loglikelihood_equals_log_probs_of_the_logits(tiny):
    for (context, continuation), (log_prob, greedy) in zip(requests(), E.score(tiny, requests(), budget=4096)):
        ids = torch.tensor([context + continuation])
        with torch.no_grad():
            logits = tiny(ids[:, :-1])[0].log_softmax(-1)
        rows = logits[len(context) - 1:]
        expected = rows.gather(1, torch.tensor(continuation)[:, None]).sum().item()
        assert log_prob == pytest.approx(expected, abs=1e-4)
        assert greedy == bool((rows.argmax(-1) == torch.tensor(continuation)).all())


def test_scores_do_not_depend_on_batch_size(tiny):
    batch_of_8 = E.score(tiny, requests(), budget=4096)  # all eight in one packed forward
    assert len(E.packs([33] * 8, 4096)) == 1
    one_by_one = E.score(tiny, requests(), budget=1)    # one request per forward
    for (a, greedy_a), (b, greedy_b) in zip(batch_of_8, one_by_one):
        assert a == pytest.approx(b, abs=1e-4) and greedy_a == greedy_b


def test_segment_pooling_changes_nothing_but_the_packing(tiny):
    a, b = torch.randint(0, 512, (1, 11)), torch.randint(0, 512, (1, 20))
    with torch.no_grad():
        packed = tiny(torch.cat([a, b], 1), torch.tensor([0, 11, 31], dtype=torch.int32), 20)
        torch.testing.assert_close(packed[:, :11], tiny(a), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(packed[:, 11:], tiny(b), atol=1e-5, rtol=1e-5)
        row_mean = M.PolychromaticLM.forward(tiny, torch.cat([a, b], 1))  # no cu_seqlens: the frozen row mean
    assert (row_mean[:, :11] - tiny(a)).abs().max() > 1e-3


def greedy_alone(model, ids, n):
    ids = list(ids)
    for _ in range(n):
        with torch.no_grad():
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids


def test_generation_is_exact_and_stops(tiny, word_tokenizer):
    prompts = [(context, [], 6) for context, _ in requests(5)]
    outputs = E.generate_texts(tiny, word_tokenizer, prompts, budget=4096)
    for (context, _, n), text in zip(prompts, outputs):
        expected = greedy_alone(tiny, context, n)[len(context):]
        assert text == word_tokenizer.decode(expected)
    # a stop string ends generation and is cut off
    context = prompts[0][0]
    full = word_tokenizer.decode(greedy_alone(tiny, context, 6)[len(context):])
    stop = full.split()[3]
    stopped = E.generate_texts(tiny, word_tokenizer, [(context, ['unused', stop], 6)], budget=4096)[0]
    assert stopped == full[:full.find(stop)] and len(stopped) < len(full)


def test_cached_generation_is_exact_when_it_refreshes_every_step(tiny, word_tokenizer, monkeypatch, capsys):
    prompts = [(context, [], 5) for context, _ in requests(3)]
    exact = E.generate_texts(tiny, word_tokenizer, prompts, budget=4096)
    monkeypatch.setattr(E, 'refresh_threshold', -1.0)  # every step refreshes: must equal exact generation
    assert E.generate_texts(tiny, word_tokenizer, prompts, 4096, cached=True) == exact
    monkeypatch.setattr(E, 'refresh_threshold', 10.0)  # never refreshes: stale keys/values, a real approximation
    E.generate_texts(tiny, word_tokenizer, prompts, 4096, cached=True)
    assert '0 refreshes in 12 cached steps' in capsys.readouterr().out


def test_vanilla_cached_generation_is_exact(word_tokenizer):
    torch.manual_seed(0)
    vanilla = M.create_model(small_config(model_type='vanilla', max_seq_len=64), segment_pooling=True).eval()
    prompts = [(context, [], 5) for context, _ in requests(3)]
    assert E.generate_texts(vanilla, word_tokenizer, prompts, 4096, cached=True) == \
        E.generate_texts(vanilla, word_tokenizer, prompts, 4096)


def test_held_out_perplexity_is_document_masked_by_hand(tmp_path):
    torch.manual_seed(0)
    model = M.create_model(small_config(vocab_size=M.ModelConfig.vocab_size, max_seq_len=64)).eval()
    folder = synthetic.write_source(str(tmp_path), 'math', n_tokens=3000, chunk_tokens=5000, manifest_eos=M.EOS_ID,
                                    eos=M.EOS_ID, max_length=12)  # short documents: several in every window
    manifest = json.load(open(os.path.join(folder, 'manifest.json')))
    result = E.held_out_perplexity(M.wrap_model(model, segment_pooling=True), folder, held_tokens=700, max_tokens=10_000, context=32)
    tokens = np.concatenate([np.fromfile(os.path.join(folder, c['file']), dtype=np.uint32) for c in manifest['chunks']])
    held = torch.from_numpy(tokens[-700:].astype(np.int64))
    masked, unmasked = [], []
    for start in range(0, 700 - 32, 32):
        window = held[start:start + 33]
        x = window[None, :-1]
        with torch.no_grad(), E.whole_row_pooling(model):  # the frozen forward: training's gate, masked attention
            masked.append(F.cross_entropy(model(x, *M.cu_seqlens_from_eos(x))[0], window[1:], reduction='none'))
            unmasked.append(F.cross_entropy(model(x)[0], window[1:], reduction='none'))
    loss = torch.cat(masked).mean().item()
    assert result['tokens'] == 32 * len(masked) and result['windows'] == len(masked)
    assert result['loss'] == pytest.approx(loss, rel=1e-5)
    assert result['perplexity'] == pytest.approx(math.exp(loss), rel=1e-5)
    assert abs(torch.cat(unmasked).mean().item() - loss) > 1e-4  # masking matters on these windows


def test_perplexity_equals_train_validation(tmp_path):
    import train
    data = str(tmp_path / 'data')
    for i, name in enumerate(('math', 'stem', 'code')):
        synthetic.write_source(data, name, n_tokens=8000, seed=i, manifest_eos=M.EOS_ID, eos=M.EOS_ID, max_length=40)
    out_dir = str(tmp_path / 'run')
    module = importlib.reload(train)
    configure(vars(module), synthetic.train_args(data, out_dir, vocab_size=M.ModelConfig.vocab_size, eos_id=M.EOS_ID,
                                                 max_steps=4, eval_interval=4, eval_rows=5, val_tokens=800,
                                                 log_interval=4))
    module.main()
    validation = [json.loads(line) for line in open(os.path.join(out_dir, 'train_log.jsonl')) if 'val/math' in line][-1]
    output = str(tmp_path / 'eval.json')
    run_eval([f'--checkpoint={out_dir}/portable_final.pt', '--tasks=', f'--output={output}', '--tokenizer=packaged',
              '--perplexity_tokens=160', '--device=cpu'])  # 5 windows of 32: train.py's eval_rows
    report = json.load(open(output))['perplexity']
    for name in ('math', 'stem', 'code'):
        assert report[name]['windows'] == 5 and report[name]['context'] == 32
        assert report[name]['loss'] == pytest.approx(validation[f'val/{name}'], rel=1e-5)


TASKS = {
    'poly_mc.yaml': """task: poly_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {folder}/mc.jsonl
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
  - metric: acc_norm
""",
    'poly_mc2.yaml': """include: poly_mc.yaml
task: poly_mc2
doc_to_text: "Q: {{{{question}}}} A:"
""",
    'poly_group.yaml': """group: poly_group
task: [poly_mc, poly_mc2]
aggregate_metric_list:
  - metric: acc
    weight_by_size: true
""",
    'poly_remote.yaml': """task: poly_remote
dataset_path: polychromatic-tests/not-on-the-hub
output_type: multiple_choice
test_split: test
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: 0
""",
    'poly_gen.yaml': """task: poly_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {folder}/gen.jsonl
test_split: test
output_type: generate_until
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 6
metric_list:
  - metric: exact_match
""",
}


@pytest.fixture(scope='module')
def harness_setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp('tasks')
    with open(folder / 'mc.jsonl', 'w') as f:
        for i in range(6):
            f.write(json.dumps({'question': f'What is {i} + {i}?', 'choices': [str(2 * i), str(2 * i + 1), 'seven'],
                                'answer': 0}) + '\n')
    with open(folder / 'gen.jsonl', 'w') as f:
        for i in range(4):
            f.write(json.dumps({'question': f'What is {i} times 3?', 'answer': str(3 * i)}) + '\n')
    for name, text in TASKS.items():
        (folder / name).write_text(text.format(folder=folder))
    torch.manual_seed(0)
    checkpoint = str(folder / 'tiny.pt')
    U.save_checkpoint(checkpoint, M.create_model(M.ModelConfig(d_model=32, n_layers=1, n_heads=4, n_kv_heads=2,
                                                               d_ff=64, max_seq_len=256)), step=7)
    return str(folder), checkpoint


def run_eval(args):
    module = eval_module(args)
    module.main()
    return module


def test_harness_runs_local_tasks(harness_setup, tmp_path, monkeypatch, capsys):
    folder, checkpoint = harness_setup
    monkeypatch.setenv('HF_DATASETS_OFFLINE', '1')
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    output = str(tmp_path / 'results' / 'eval.json')
    module = run_eval([f'--checkpoint={checkpoint}', '--tasks=poly_mc,poly_gen', f'--include_path={folder}',
                       f'--output={output}', '--tokenizer=packaged', '--perplexity=False', '--device=cpu'])
    report = json.load(open(output))
    assert report['step'] == 7 and report['wall_time_s'] > 0
    from importlib.metadata import version
    assert report['lm_eval_version'] == version('lm_eval') and report['library_versions']['torch'] == torch.__version__
    # every key the harness returns, so that the result can be traced and re-run
    assert {'configs', 'higher_is_better', 'n-samples', 'versions', 'n-shot', 'config', 'git_hash', 'date',
            'pretty_env_info', 'transformers_version'} <= set(report)
    assert report['configs']['poly_mc']['dataset_path'] == 'json' and report['n-samples']['poly_gen']['effective'] == 4
    assert report['higher_is_better']['poly_mc']['acc'] is True and report['eval_config']['tasks'] == 'poly_mc,poly_gen'
    acc = report['results']['poly_mc']['acc,none']
    assert 0.0 <= report['results']['poly_gen']['exact_match,none'] <= 1.0
    assert '|poly_mc' in capsys.readouterr().out  # the summary table
    # the harness's accuracy is what our own scores give: argmax over the choices' log-likelihoods
    model, _ = U.load_checkpoint(checkpoint)
    M.wrap_model(model, segment_pooling=True)
    tok = module.get_tokenizer('packaged')
    correct = 0
    for i in range(6):
        context = tok.encode(f'Question: What is {i} + {i}?\nAnswer:', add_special_tokens=False).ids
        choices = [tok.encode(' ' + c, add_special_tokens=False).ids for c in (str(2 * i), str(2 * i + 1), 'seven')]
        scores = [s for s, _ in E.score(model, [(context, c) for c in choices], 4096)]
        correct += int(np.argmax(scores) == 0)
    assert acc == pytest.approx(correct / 6)


EVAL_ERRORS = [  # eval.py's arguments -> the line it stops with; {checkpoint} and {tasks}: harness_setup's, {tmp}: a
    # folder holding the file `file`
    ('--checkpoint={tmp}/nothing.pt', r'checkpoint .*nothing\.pt not found'),
    ('--tasks=poly_mcq --include_path={tasks}', r"unknown task 'poly_mcq'; did you mean poly_mc"),
    ('--output={tmp}/file/r.json', r'cannot write results to .*file/r\.json \(.*\); choose another --output'),
    ('--prompt=w1', r'--prompt moved to sample\.py: python sample\.py --checkpoint=.* --prompt=\.\.\.'),
    ('--generation=beam', r"generation must be 'exact' or 'cached', got 'beam'"),
    ('--perplexity_protocol=mine', r"perplexity_protocol must be 'validation' or 'author', got 'mine'"),
    ('--paper_model=large', r"paper_model must be 'auto', 'base' or 'instruct', got 'large'"),
    ('--tasks=paper --num_fewshot=5', r'tasks=paper runs every task at the shots the author ran .*drop --num_fewshot'),
    ('--checkpoints={tmp}/nothing', r"checkpoints='.*nothing': no \.pt or \.safetensors there \(train\.py "
                                    r'--snapshot_interval=N writes'),
]


@pytest.mark.parametrize('arguments, line', EVAL_ERRORS)
def test_bad_input_is_one_clear_line(harness_setup, tmp_path, monkeypatch, arguments, line):
    tasks, checkpoint = harness_setup
    (tmp_path / 'file').write_text('')
    monkeypatch.setenv('HF_DATASETS_OFFLINE', '1')
    given = [f'--checkpoint={checkpoint}', f'--output={tmp_path}/r.json', '--tokenizer=packaged', '--device=cpu']
    given += arguments.format(checkpoint=checkpoint, tasks=tasks, tmp=tmp_path).split()
    with pytest.raises(SystemExit, match=f'^error: {line}'):
        run_eval(given)


@pytest.fixture(scope='module')
def author_files(tmp_path_factory):
    weights = synthetic.author_weights(vocab=M.ModelConfig.vocab_size, n_layers=1, seq_length=256)
    return synthetic.write_author_files(str(tmp_path_factory.mktemp('author')), weights)


@pytest.mark.parametrize('kind', ['pt', 'safetensors'])
def test_eval_runs_on_the_author_formats(kind, author_files, harness_setup, tmp_path, monkeypatch):
    folder, _ = harness_setup
    data = str(tmp_path / 'data')
    synthetic.write_source(data, 'math', n_tokens=3000, chunk_tokens=10_000, manifest_eos=M.EOS_ID)
    monkeypatch.setenv('HF_DATASETS_OFFLINE', '1')
    output = str(tmp_path / 'eval.json')
    run_eval([f'--checkpoint={author_files[kind]}', '--tasks=poly_mc', f'--include_path={folder}', f'--output={output}',
              '--tokenizer=packaged', f'--data_dir={data}', '--val_tokens=1000', '--perplexity_tokens=1000',
              '--device=cpu'])
    report = json.load(open(output))
    assert report['format'] == {'pt': 'author portable', 'safetensors': 'safetensors'}[kind]
    assert 0.0 <= report['results']['poly_mc']['acc,none'] <= 1.0
    model, _ = U.load_checkpoint(author_files[kind])
    expected = E.held_out_perplexity(M.wrap_model(model, segment_pooling=True), os.path.join(data, 'math'), 1000, 1000, 256)
    assert report['perplexity']['math']['loss'] == pytest.approx(expected['loss'], rel=1e-6)


@pytest.mark.slow
def test_scoring_memory_does_not_grow_with_the_vocabulary():
    """8,192 scored positions in one pack (two rows of 4,096, as loglikelihood_rolling sends them) at the full
    vocabulary: keeping every position's log-probs would take 5.0 GB (float32) plus a copy; gathering the targets per
    chunk keeps the peak near one chunk's logits (0.6 GB). Measured here: 1.2 GiB above the start, the model and inputs
    included."""
    import subprocess
    import sys
    from conftest import ROOT
    script = """
import resource, numpy as np, torch, model as M, utils as U, eval as E
torch.manual_seed(0)
model = M.create_model(M.ModelConfig(d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, d_ff=64), segment_pooling=True)
requests = [([M.EOS_ID], np.random.default_rng(i).integers(0, 151_669, 4095).tolist()) for i in range(2)]
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
assert len(E.packs([4096] * 2, 8_192)) == 1
E.score(model.eval(), requests, 8_192)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 2**20)
"""
    result = subprocess.run([sys.executable, '-c', script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    peak_gib = float(result.stdout.split()[-1])
    assert peak_gib < 2.0, f'scoring peaked {peak_gib:.2f} GiB above its start'


def eval_module(args):
    """eval.py with fresh globals, keeping the harness's task indexes (eval.task_index) as one process does."""
    task_index = E.task_index
    module = importlib.reload(E)
    module.task_index = task_index
    configure(vars(module), args)
    return module


def test_chat_format_for_fine_tuned_checkpoints_and_samples(harness_setup, tmp_path, monkeypatch):
    folder, _ = harness_setup
    monkeypatch.setenv('HF_DATASETS_OFFLINE', '1')
    torch.manual_seed(0)
    checkpoint = str(tmp_path / 'portable_sft_final.pt')
    U.save_checkpoint(checkpoint, M.create_model(M.ModelConfig(d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, d_ff=64,
                                                               max_seq_len=512)), step=3, stage='sft')
    reports = {}
    for mode in ('auto', 'plain'):
        output = str(tmp_path / mode / 'eval.json')
        module = eval_module([f'--checkpoint={checkpoint}', '--tasks=poly_mc,poly_gen', f'--include_path={folder}',
                              f'--output={output}', '--tokenizer=packaged', '--perplexity=False', '--device=cpu',
                              '--limit=3', '--num_fewshot=2', '--log_samples=True']
                             + (['--chat=False'] if mode == 'plain' else []))
        stops = []
        real = module.generate_texts
        monkeypatch.setattr(module, 'generate_texts', lambda m, tok, prompts, *a, **k:
                            stops.extend(p[1] for p in prompts) or real(m, tok, prompts, *a, **k))
        module.main()
        report = json.load(open(output))
        samples = {task: [json.loads(line) for line in open(path)] for task, path in report['samples'].items()}
        reports[mode] = (report, samples, stops)
    (chat, chat_samples, chat_stops), (plain, plain_samples, plain_stops) = reports['auto'], reports['plain']
    assert chat['chat'] is True and plain['chat'] is False  # fine-tuned: chat by default, recorded
    assert chat['n-shot'] == plain['n-shot'] == {'poly_mc': 2, 'poly_gen': 2}
    for task in ('poly_mc', 'poly_gen'):
        assert len(chat_samples[task]) == 3 and {'doc', 'arguments', 'resps', 'filtered_resps'} <= set(chat_samples[task][0])
    context = chat_samples['poly_gen'][0]['arguments'][0][0]
    assert context.startswith('<|im_start|>user\nQuestion:') and context.endswith('<|im_start|>assistant\n')
    assert context.count('<|im_start|>user') == 3 and context.count('<|im_start|>assistant') == 3  # 2 shots as turns
    plain_context = plain_samples['poly_gen'][0]['arguments'][0][0]
    assert '<|im_start|>' not in plain_context and plain_context.count('Question:') == 3
    assert all('<|im_end|>' in until for until in chat_stops) and not any('<|im_end|>' in u for u in plain_stops)
    assert 'acc' in chat_samples['poly_mc'][0] and 'exact_match' in chat_samples['poly_gen'][0]


def author_log_prob(model, context, continuation):
    """The author's wrapper (src/evaluation/model_wrapper.py), by hand: the whole of context + continuation through the
    frozen forward, the last token included, and log p of each continuation token from the position before it."""
    ids = torch.tensor([context + continuation])
    with torch.no_grad():
        log_probs = M.PolychromaticLM.forward(model, ids)[0].float().log_softmax(-1)
    return sum(log_probs[i - 1, ids[0, i]].item() for i in range(len(context), ids.shape[1]))


def test_author_scoring_feeds_the_last_token_through_the_gate(tiny):
    harness = E.score(tiny, requests(), 4096)
    author = E.score(tiny, requests(), 4096, author=True)
    for (context, continuation), (ours, _), (theirs, _) in zip(requests(), harness, author):
        assert theirs == pytest.approx(author_log_prob(tiny, context, continuation), abs=1e-4)
    # the last token moves every position's gate mean, so the two protocols score differently
    assert max(abs(a[0] - b[0]) for a, b in zip(harness, author)) > 1e-3
    alone = E.score(tiny, requests(), 1, author=True)  # one request per forward: packing changes nothing
    assert [a for a, _ in alone] == pytest.approx([a for a, _ in author], abs=1e-4)


def test_gumbel_routing_is_the_author_noise_seeded_per_request(tiny):
    """paper_routing_seeds: the frozen class in train mode samples torch's gumbel_softmax, as the author's class did at
    evaluation. A request scored under noise seed 3 equals that, drawn after torch.manual_seed(its request seed)."""
    noisy = E.score(tiny, requests(), 4096, author=True, noise_seed=3)
    for (context, continuation), (log_prob, _) in zip(requests(), noisy):
        torch.manual_seed(E.request_seed(3, context + continuation))
        for block in tiny.model_core:
            block.ffn.train()
        try:
            expected = author_log_prob(tiny, context, continuation)
        finally:
            tiny.eval()
        assert log_prob == pytest.approx(expected, abs=1e-4)
    alone = E.score(tiny, requests(), 1, author=True, noise_seed=3)  # the same noise in any packing
    assert [a for a, _ in alone] == pytest.approx([a for a, _ in noisy], abs=1e-4)
    other_seed = E.score(tiny, requests(), 4096, author=True, noise_seed=4)
    deterministic = E.score(tiny, requests(), 4096, author=True)
    assert max(abs(a[0] - b[0]) for a, b in zip(noisy, other_seed)) > 1e-3
    assert max(abs(a[0] - b[0]) for a, b in zip(noisy, deterministic)) > 1e-3
    assert 'routing_weights' not in vars(tiny.model_core[0].ffn)  # the wrapper is gone: deterministic again
    assert E.score(tiny, requests(), 4096, author=True) == deterministic


def test_author_perplexity_by_hand(tmp_path):
    """src/evaluation/domain_perplexity.py: the last chunk with >= 100K tokens (here 3,000), n = min(244, (len-(S+1)) //
    (S+1)) windows at i * stride, full causal attention and one gate mean per window, exp(mean loss)."""
    torch.manual_seed(0)
    model = M.create_model(small_config(vocab_size=M.ModelConfig.vocab_size, max_seq_len=8)).eval()
    with torch.no_grad():  # logits and routing that depend strongly on the context
        model.embeddings.weight.normal_(std=0.3)
        for block in model.model_core:
            block.ffn.alpha.normal_(std=2.0)
            block.ffn.gate_net[0].weight.normal_(std=1.0)
            block.ffn.gate_net[2].weight.normal_(std=1.0)
    folder = synthetic.write_source(str(tmp_path), 'math', n_tokens=20_000, chunk_tokens=9_000, manifest_eos=M.EOS_ID,
                                    eos=M.EOS_ID, max_length=8)  # 8-token documents: windows cross them
    manifest = json.load(open(os.path.join(folder, 'manifest.json')))
    sizes = [c['tokens'] for c in manifest['chunks']]
    assert len(sizes) == 3 and sizes[-1] < 3000 <= sizes[-2]  # the last chunk is a small remainder: the one before
    result = E.author_perplexity(M.wrap_model(model, segment_pooling=True), folder, 8, min_chunk=3000)
    tokens = np.fromfile(os.path.join(folder, manifest['chunks'][1]['file']), dtype=np.uint32).astype(np.int64)
    n = min(244, (len(tokens) - 9) // 9)
    stride = (len(tokens) - 9) // n
    assert n == 244 and stride > 9  # both rules at work: the cap, and windows spread over the chunk
    losses = []
    for i in range(n):
        window = torch.from_numpy(tokens[i * stride:i * stride + 9])
        with torch.no_grad():
            logits = M.PolychromaticLM.forward(model, window[None, :-1])[0]  # the frozen forward, no document mask
        losses.append(F.cross_entropy(logits.float(), window[1:], reduction='sum').item())
    loss = sum(losses) / (n * 8)
    assert (result['windows'], result['stride'], result['tokens'], result['chunk']) == (n, stride, n * 8,
                                                                                       manifest['chunks'][1]['file'])
    assert result['loss'] == pytest.approx(loss, rel=1e-5) and result['perplexity'] == math.exp(result['loss'])
    with torch.no_grad():
        masked = [F.cross_entropy(model(ids[None, :-1], *M.cu_seqlens_from_eos(ids[None, :-1]))[0], ids[1:])
                  for ids in (torch.from_numpy(tokens[i * stride:i * stride + 9]) for i in range(n))]
    assert abs(torch.stack(masked).mean().item() - loss) > 1e-3  # document masking would have shown
    assert E.author_perplexity(model, folder, 8, min_chunk=10 ** 9)['chunk'] == manifest['chunks'][-1]['file']
    assert E.author_perplexity(model, folder, 4096) is None  # no chunk holds two windows: said and skipped by main


def test_the_card_tables():
    """The author's reports: the metric per row, both columns, and their means (39.48 base, 36.59 instruct)."""
    metrics = {task: metric for task, metric, *_ in E.PAPER}
    assert {t for t, m in metrics.items() if m == 'acc_norm'} == {'hellaswag', 'arc_easy', 'arc_challenge', 'piqa',
                                                                 'openbookqa', 'sciq'}
    assert {t for t, m in metrics.items() if m == 'acc'} == {'winogrande', 'boolq', 'mmlu_stem', 'lambada_openai'}
    assert round(np.mean([base for *_, base, _ in E.PAPER]), 2) == 39.48
    assert round(np.mean([instruct for *_, instruct in E.PAPER]), 2) == 36.59
    assert E.PAPER_LAMBADA_PERPLEXITY['base'] == 911.8 and E.PAPER_STATED_SHOTS == {'mmlu_stem': 5}
    # the card's "5-shot" MMLU-STEM: the pinned harness's MMLU sets no num_fewshot, so the author's run was 0-shot
    import lm_eval
    mmlu = os.path.join(os.path.dirname(lm_eval.__file__), 'tasks', 'mmlu', 'default')
    texts = [open(os.path.join(mmlu, name)).read() for name in ('_default_template_yaml', '_mmlu_stem.yaml')]
    assert 'dataset_path: cais/mmlu' in texts[0] and not any('num_fewshot' in text for text in texts)


def paper_run(folder, checkpoint, output, monkeypatch, *extra):
    """tasks=paper through the real path, on local tasks standing in for the card's ten (the hub's are not offline)."""
    module = eval_module([f'--checkpoint={checkpoint}', '--tasks=paper', f'--include_path={folder}', f'--output={output}',
                          '--tokenizer=packaged', '--perplexity=False', '--device=cpu', *extra])
    monkeypatch.setattr(module, 'PAPER', [('poly_mc', 'acc_norm', 50.0, 40.0), ('poly_group', 'acc', 30.0, 20.0)])
    monkeypatch.setattr(module, 'PAPER_STATED_SHOTS', {'poly_group': 2})
    shots = []
    real = module.evaluate_task
    monkeypatch.setattr(module, 'evaluate_task', lambda lm, manager, task, n, *a: shots.append((task, n)) or
                        real(lm, manager, task, n, *a))
    module.main()
    return module, json.load(open(output)), shots


def test_paper_runs_the_author_protocol(harness_setup, tmp_path, monkeypatch, capsys):
    folder, _ = harness_setup
    monkeypatch.setenv('HF_DATASETS_OFFLINE', '1')
    torch.manual_seed(0)
    checkpoint = str(tmp_path / 'portable_sft_final.pt')  # a fine-tuned model: the instruct column, plain prompts
    U.save_checkpoint(checkpoint, M.create_model(M.ModelConfig(d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, d_ff=64,
                                                               max_seq_len=256)), step=3, stage='sft')
    module, report, shots = paper_run(folder, checkpoint, str(tmp_path / 'paper.json'), monkeypatch,
                                      '--log_samples=True', '--paper_routing_seeds=2')
    out = capsys.readouterr().out
    assert shots[:3] == [('poly_mc', None), ('poly_group', None), ('poly_group', 2)]  # as run, then the stated shots
    assert report['chat'] is False and report['scoring'] == 'author' and report['complete'] is True
    paper = report['paper']
    assert paper['model'] == 'instruct'
    rows = {row['benchmark']: row for row in paper['rows']}
    assert (rows['poly_mc']['metric'], rows['poly_mc']['shots'], rows['poly_mc']['prompts']) == ('acc_norm', 0, 'plain')
    assert rows['poly_group@2-shot']['shots'] == 2 and rows['poly_group@2-shot']['protocol'] == "the card's stated shots"
    assert rows['poly_mc']['protocol'] == rows['poly_group']['protocol'] == "the author's"
    assert rows['poly_mc']['card'] == 40.0 and paper['mean']['card'] == 30.0  # the instruct column
    assert rows['poly_mc']['ours'] == pytest.approx(100 * report['results']['poly_mc']['acc_norm,none'])
    assert paper['mean']['ours'] == pytest.approx((rows['poly_mc']['ours'] + rows['poly_group']['ours']) / 2)
    # acc_norm by hand: the author's log-probs of each choice, divided by its length in bytes, argmax
    model, _ = U.load_checkpoint(checkpoint)
    tok = module.get_tokenizer('packaged')
    samples = [json.loads(line) for line in open(report['samples']['poly_mc'])]
    assert '<|im_start|>' not in samples[0]['arguments'][0][0]  # plain, though the model is fine-tuned
    correct = 0
    for i in range(6):
        context = tok.encode(f'Question: What is {i} + {i}?\nAnswer:', add_special_tokens=False).ids
        choices = [' ' + c for c in (str(2 * i), str(2 * i + 1), 'seven')]
        scores = [author_log_prob(model, context, tok.encode(c, add_special_tokens=False).ids) / len(c.encode())
                  for c in choices]
        correct += int(np.argmax(scores) == 0)
    assert report['results']['poly_mc']['acc_norm,none'] == pytest.approx(correct / 6)
    # the author's noisy routing, two seeds: mean and spread beside the deterministic score
    noisy = [100 * r['acc_norm,none'] for r in report['paper_routing']['results']['poly_mc']]
    assert len(noisy) == 2 and rows['poly_mc']['noisy_values'] == pytest.approx(noisy)
    assert rows['poly_mc']['noisy_mean'] == pytest.approx(np.mean(noisy))
    assert rows['poly_mc']['noisy_std'] == pytest.approx(np.std(noisy, ddof=1))
    assert 'noisy' not in str(rows['poly_group@2-shot'].keys())
    assert 'against the author\'s model card, instruct column' in out and 'poly_group@2-shot' in out
    assert 'ours is deterministic' in out and 'most likely 0-shot' in out
    # paper_model= overrides the provenance; chat=True gives ChatML rows, labelled as such
    _, report, _ = paper_run(folder, checkpoint, str(tmp_path / 'chat.json'), monkeypatch, '--paper_model=base',
                             '--chat=True')
    assert report['paper']['model'] == 'base' and report['paper']['rows'][0]['prompts'] == 'ChatML'
    assert report['paper']['rows'][0]['protocol'] == 'ours: author scoring, ChatML' and report['paper']['mean']['card'] == 40


def test_default_shots_are_the_tasks_own(harness_setup, tmp_path, monkeypatch):
    """num_fewshot=-1 passes none to the harness: each task's default, as the author's scripts ran (MMLU-STEM 0-shot,
    lm-eval's MMLU template sets no num_fewshot); num_fewshot=N sets every task."""
    _, checkpoint = harness_setup
    import lm_eval
    calls = []
    monkeypatch.setattr(lm_eval, 'simple_evaluate', lambda **kwargs: calls.append((kwargs['tasks'], kwargs['num_fewshot']))
                        or {'results': {}})
    for extra in ([], ['--num_fewshot=5']):
        run_eval([f'--checkpoint={checkpoint}', '--tasks=gsm8k,mmlu_stem', '--tokenizer=packaged', '--perplexity=False',
                  '--device=cpu', f'--output={tmp_path}/r.json', *extra])
    assert calls == [(['gsm8k'], None), (['mmlu_stem'], None), (['gsm8k'], 5), (['mmlu_stem'], 5)]


PACKED_HIDDEN_STATES = M.packed_hidden_states


def count_forwards(module, monkeypatch, stop_after=None):
    """The sequences each packed forward runs (eval.py's scoring, model.py's generation); a KeyboardInterrupt (a kill)
    after `stop_after` forwards."""
    forwards = []
    real = PACKED_HIDDEN_STATES

    def counting(model, sequences):
        if len(forwards) == stop_after:
            raise KeyboardInterrupt
        forwards.append(len(sequences))
        return real(model, sequences)
    monkeypatch.setattr(module, 'packed_hidden_states', counting)
    monkeypatch.setattr(M, 'packed_hidden_states', counting)  # generate_exact's
    return forwards


def test_an_interrupted_evaluation_resumes_exactly(harness_setup, tmp_path, monkeypatch, capsys):
    folder, checkpoint = harness_setup
    monkeypatch.setenv('HF_DATASETS_OFFLINE', '1')
    args = [f'--checkpoint={checkpoint}', '--tasks=poly_mc,poly_gen', f'--include_path={folder}', '--tokenizer=packaged',
            '--perplexity=False', '--device=cpu', '--log_samples=True', '--batch_tokens=40']
    whole = eval_module(args + [f'--output={tmp_path}/whole/eval.json'])
    forwards = count_forwards(whole, monkeypatch)
    whole.main()
    total = 6 * 3 + 4  # loglikelihood requests + generations
    assert len(forwards) > 8  # small packs: many forwards to stop between
    # killed in poly_gen's last forwards, after poly_mc finished: its results and samples are on disk already
    output = f'{tmp_path}/run/eval.json'
    first = eval_module(args + [f'--output={output}'])
    count_forwards(first, monkeypatch, stop_after=len(forwards) - 3)
    with pytest.raises(KeyboardInterrupt):
        first.main()
    partial = json.load(open(output))
    assert partial['complete'] is False and set(partial['results']) == {'poly_mc'}
    mc_samples = open(partial['samples']['poly_mc']).read()
    [store] = [os.path.join(f'{tmp_path}/run/eval_answers', name) for name in os.listdir(f'{tmp_path}/run/eval_answers')]
    answered = len(open(store).read().splitlines())
    assert 18 <= answered < total  # every loglikelihood, and the generations that finished
    with open(store, 'a') as f:
        f.write('{"key": "a line the kill cut sh')  # a torn last line is dropped, not fatal
    second = eval_module(args + [f'--output={output}'])
    rest = count_forwards(second, monkeypatch)
    capsys.readouterr()
    second.main()
    progress = capsys.readouterr().err  # requests done / total, starting from what the store answered
    assert 'loglikelihood: 100%' in progress and '18/18' in progress and f'{answered - 18}/4 [' in progress
    assert len(open(store).read().splitlines()) == total  # only the rest was computed, each answer once
    assert 0 < sum(rest) < sum(forwards)
    resumed, uninterrupted = json.load(open(output)), json.load(open(f'{tmp_path}/whole/eval.json'))
    assert resumed['complete'] is True and resumed['answers_reused'] == answered
    assert resumed['results'] == uninterrupted['results']
    for task in ('poly_mc', 'poly_gen'):
        fields = lambda path: [(r['resps'], r['filtered_resps']) for r in map(json.loads, open(path))]  # noqa: E731
        assert fields(resumed['samples'][task]) == fields(uninterrupted['samples'][task])
    assert open(resumed['samples']['poly_mc']).read() == mc_samples
    # another setting is another store: nothing reused
    other = eval_module(args + [f'--output={output}', '--max_gen_toks=7'])
    again = count_forwards(other, monkeypatch)
    other.main()
    assert again == forwards  # everything computed again (the tasks set their own max_gen_toks: the same answers)
    assert len(os.listdir(f'{tmp_path}/run/eval_answers')) == 2


def test_generation_answers_arrive_one_by_one(tiny, word_tokenizer):
    """Continuous batching: a short request is recorded while long ones still run, so a kill loses only what was
    running (the author's GSM8K run lost everything at 98%)."""
    prompts = [(context, [], n) for (context, _), n in zip(requests(4), (8, 2, 8, 8))]
    order = []
    outputs = E.generate_texts(tiny, word_tokenizer, prompts, budget=4096, record=lambda i, text: order.append(i))
    assert order[0] == 1 and sorted(order) == [0, 1, 2, 3]
    for (context, _, n), text in zip(prompts, outputs):
        assert text == word_tokenizer.decode(greedy_alone(tiny, context, n)[len(context):])
    assert E.generate_texts(tiny, word_tokenizer, prompts, budget=1) == outputs  # one request at a time: the same


def test_unreachable_task_data_is_one_line(harness_setup, tmp_path, monkeypatch):
    folder, checkpoint = harness_setup
    monkeypatch.setenv('HF_DATASETS_OFFLINE', '1')
    args = [f'--checkpoint={checkpoint}', f'--include_path={folder}', '--tokenizer=packaged', '--perplexity=False',
            '--device=cpu', f'--output={tmp_path}/r.json']
    with pytest.raises(SystemExit, match=r"task poly_remote: its data \(polychromatic-tests/not-on-the-hub\) cannot be "
                                         r"fetched .*run once online .* HF_DATASETS_OFFLINE=1"):
        run_eval(args + ['--tasks=poly_remote'])
    module = eval_module(args + ['--tasks=gsm8k'])  # the network failing as it did for a new user: the hub's own error
    import lm_eval

    def unreachable(**kwargs):
        raise ConnectionError("Couldn't reach 'openai/gsm8k' on the Hub (LocalEntryNotFoundError)")
    monkeypatch.setattr(lm_eval, 'simple_evaluate', unreachable)
    with pytest.raises(SystemExit, match=r"task gsm8k: its data \(openai/gsm8k\) cannot be fetched \(ConnectionError\)"):
        module.main()


def test_no_tokenizer_without_text(harness_setup, tmp_path, monkeypatch):
    """Perplexity-only and benchmark runs tokenize nothing: no hub tokenizer, offline or not."""
    _, checkpoint = harness_setup
    data = str(tmp_path / 'data')
    synthetic.write_source(data, 'math', n_tokens=3000, chunk_tokens=10_000, manifest_eos=M.EOS_ID)
    module = eval_module([f'--checkpoint={checkpoint}', '--tasks=', f'--data_dir={data}', '--val_tokens=1000',
                          '--perplexity_tokens=1000', '--device=cpu', f'--output={tmp_path}/p.json',
                          '--tokenizer=nobody/no-such-tokenizer'])
    monkeypatch.setattr(module, 'get_tokenizer', lambda *a: pytest.fail('a tokenizer was loaded'))
    module.main()
    assert json.load(open(f'{tmp_path}/p.json'))['perplexity']['math']['protocol'] == 'validation'
    monkeypatch.setattr(module, 'perplexity_protocol', 'author')
    monkeypatch.setattr(module, 'AUTHOR_MIN_CHUNK', 10)
    module.main()
    assert json.load(open(f'{tmp_path}/p.json'))['perplexity']['math']['protocol'] == 'author'


def harness_cli(*arguments, timeout=300):
    env = {**os.environ, 'HF_DATASETS_OFFLINE': '1', 'HF_HUB_OFFLINE': '1'}
    return subprocess.run([sys.executable, 'eval.py', 'lm_eval', '--model', 'polychromatic', *arguments], cwd=ROOT,
                          capture_output=True, text=True, env=env, timeout=timeout)


def test_the_lm_eval_command_line_scores_as_eval_py_does(harness_setup, tmp_path, monkeypatch):
    folder, checkpoint = harness_setup
    monkeypatch.setenv('HF_DATASETS_OFFLINE', '1')
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    run_eval([f'--checkpoint={checkpoint}', '--tasks=poly_mc,poly_gen', f'--include_path={folder}',
              f'--output={tmp_path}/own/eval.json', '--tokenizer=packaged', '--perplexity=False', '--device=cpu',
              '--log_samples=True', '--resume=False'])
    own = {task: [json.loads(line) for line in open(tmp_path / 'own' / 'eval_samples' / f'{task}.jsonl')]
           for task in ('poly_mc', 'poly_gen')}
    arguments = ['--model_args', f'pretrained={checkpoint},tokenizer=packaged,batch_tokens=4096', '--device', 'cpu',
                 '--tasks', 'poly_mc,poly_gen', '--include_path', folder, '--output_path', str(tmp_path / 'harness'),
                 '--log_samples', '--use_cache', str(tmp_path / 'cache' / 'answers')]
    first = harness_cli(*arguments)
    assert first.returncode == 0, first.stderr[-3000:]
    # the harness's own layout: {output_path}/{the model, named after the weights}/results_{date}.json, samples_*
    written = sorted(os.listdir(tmp_path / 'harness' / checkpoint.replace('/', '__')))
    assert [re.sub(r'\d{4}-\d\d-\d\dT[\d-]+\.\d+', 'DATE', name) for name in written] == [
        'results_DATE.json', 'samples_poly_gen_DATE.jsonl', 'samples_poly_mc_DATE.jsonl']
    results = json.load(open(tmp_path / 'harness' / checkpoint.replace('/', '__') / written[0]))
    assert results['config']['checkpoint_sha256'] == U.file_digest(checkpoint) and results['config']['step'] == 7
    for task, name in (('poly_gen', written[1]), ('poly_mc', written[2])):
        theirs = [json.loads(line) for line in open(tmp_path / 'harness' / checkpoint.replace('/', '__') / name)]
        as_text = lambda value: [as_text(v) for v in value] if isinstance(value, list) else str(value)  # noqa: E731
        assert [as_text(s['resps']) for s in theirs] == [as_text(s['resps']) for s in own[task]]  # to the bit
    # --use_cache: a second run computes nothing
    second = harness_cli(*arguments)
    assert second.returncode == 0, second.stderr[-3000:]
    assert 'Cached requests: 18, Requests remaining: 0' in second.stderr  # poly_mc: 6 questions x 3 choices
    assert 'Cached requests: 4, Requests remaining: 0' in second.stderr   # poly_gen
    wrong = harness_cli('--model_args', f'checkpoint={checkpoint},temperature=0.5', '--tasks', 'poly_mc',
                        '--include_path', folder)
    assert wrong.returncode == 1 and wrong.stderr.strip().splitlines()[-1] == (
        "error: --model_args temperature= is not a setting of the polychromatic model; it takes checkpoint, "
        "pretrained, dtype, device, attention, tokenizer, batch_tokens, max_gen_toks, generation, refresh_threshold, "
        "seed")


def test_the_command_line_indexes_only_include_path_when_it_holds_every_task(harness_setup, monkeypatch):
    import lm_eval.tasks
    from lm_eval._cli import HarnessCLI
    folder, checkpoint = harness_setup
    monkeypatch.setattr(sys, 'argv', sys.argv)
    indexes = []
    monkeypatch.setattr(HarnessCLI, 'execute', lambda self, args: indexes.append(lm_eval.tasks.TaskManager))
    for tasks in ('poly_mc,poly_gen', 'poly_mc,gsm8k'):
        E.harness_command_line(['--model', 'polychromatic', '--model_args', f'checkpoint={checkpoint}', '--tasks', tasks,
                                '--include_path', folder])
    local, full = indexes
    assert local.keywords == {'include_defaults': False} and not isinstance(full, partial)
    with pytest.raises(SystemExit, match='--model_args top_p= is not a setting'):
        E.harness_command_line(['--model', 'polychromatic', '--model_args', 'top_p=0.9', '--tasks', 'gsm8k'])


def test_sampling_is_honoured_seeded_per_request_or_refused(tiny, word_tokenizer):
    from lm_eval.api.instance import Instance

    class Words:  # the word tokenizer behind the harness's text interface
        encode = staticmethod(lambda text, add_special_tokens=False: word_tokenizer.encode(text))
        decode = staticmethod(lambda ids, skip_special_tokens=False: word_tokenizer.decode(ids))

    def generate(pairs):
        lm = E.HarnessLM(tiny, Words)
        return lm.generate_until([Instance('generate_until', {}, (context, kwargs), i) for i, (context, kwargs) in
                                  enumerate(pairs)])

    greedy = {'until': ['w7'], 'max_gen_toks': 8}
    sampled = {**greedy, 'do_sample': True, 'temperature': 1.0, 'top_k': 50}
    prompt = 'w1 w2 w3 w4'
    repeats = generate([(prompt, sampled)] * 4)  # a task's repeats: four copies of one request
    assert len(set(repeats)) >= 3  # each copy its own draw
    assert generate([(prompt, sampled)] * 4) == repeats  # seeded: the same draws again
    mixed = generate([('w9 w9', greedy), (prompt, sampled), ('w5', sampled), (prompt, sampled), (prompt, sampled),
                      (prompt, sampled)])
    assert mixed[1:2] + mixed[3:] == repeats  # whatever it is batched with
    assert generate([(prompt, greedy)] * 2) == generate([(prompt, {**greedy, 'temperature': 0.0})] * 2)
    assert generate([(prompt, {**greedy, 'do_sample': True, 'temperature': 0.0})]) == generate([(prompt, greedy)])[:1]
    with pytest.raises(SystemExit, match=r"^error: generation argument top_p=0\.9 cannot be honoured here \(only "
                                         r"until, max_gen_toks, do_sample, temperature, top_k\): drop it"):
        generate([(prompt, {**sampled, 'top_p': 0.9})])
    neutral = [(prompt, {**sampled, 'top_p': 1.0, 'num_beams': 1})]  # values that ask for nothing: accepted
    assert generate(neutral) == generate(neutral)
    with pytest.raises(SystemExit, match=r"temperature=0\.7, top_k=None without do_sample=True would decode greedily"):
        generate([(prompt, {**greedy, 'temperature': 0.7})])


def test_wandb_offline_logs_the_results_into_the_training_project(harness_setup, tmp_path):
    folder, _ = harness_setup
    checkpoint = str(tmp_path / 'trained.pt')
    torch.manual_seed(0)
    U.save_checkpoint(checkpoint, M.create_model(M.ModelConfig(d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, d_ff=64,
                                                               max_seq_len=256)), step=7,
                      config={'wandb_project': 'my-pretraining-project'})
    result = subprocess.run([sys.executable, 'eval.py', f'--checkpoint={checkpoint}', '--tasks=poly_mc',
                             f'--include_path={folder}', f'--output={tmp_path}/eval.json', '--tokenizer=packaged',
                             '--perplexity=False', '--device=cpu', '--wandb_log=True'], cwd=ROOT, capture_output=True,
                            text=True, env=wandb_offline_env(tmp_path), timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    run = offline_wandb_run(tmp_path)
    accuracy = json.load(open(tmp_path / 'eval.json'))['results']['poly_mc']['acc,none']
    assert b'my-pretraining-project' in run and b'eval-trained' in run  # the training run's project, its own name
    tables = [os.path.join(root, f) for root, _, files in os.walk(tmp_path / 'wandb') for f in files
              if f.endswith('.table.json')]
    assert len(tables) == 1 and 'media/table/eval/results' in tables[0]  # the table, with each figure a row
    assert ['poly_mc', 'acc', 'none', accuracy] in [row[:4] for row in json.load(open(tables[0]))['data']]
    assert b'hf_canary_do_not_log' not in everything_under(tmp_path) + result.stdout.encode() + result.stderr.encode()


def test_benchmarks_over_training_are_single_evaluations_and_resume(harness_setup, tmp_path, monkeypatch, capsys):
    """eval.py --checkpoints over 3 snapshots: each report is the single evaluation of that snapshot; a sweep killed
    in its second snapshot resumes there, reading the first and the answers the second had."""
    folder, _ = harness_setup
    monkeypatch.setenv('HF_DATASETS_OFFLINE', '1')
    snapshots = tmp_path / 'run' / 'snapshots'
    for step in (10, 20, 30):
        torch.manual_seed(step)  # three different models, as three points of one run would be
        U.save_snapshot(str(tmp_path / 'run'), f'snapshot_{step}.pt', M.create_model(M.ModelConfig(
            d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=256)), step, {'tokens': step * 100})
    for i, name in enumerate(('math', 'stem', 'code')):
        synthetic.write_source(str(tmp_path / 'data'), name, n_tokens=1200, seed=i, manifest_eos=M.EOS_ID)
    settings = ['--tasks=poly_mc', f'--include_path={folder}', '--tokenizer=packaged', f'--data_dir={tmp_path}/data',
                '--val_tokens=300', '--perplexity_tokens=256', '--device=cpu', '--batch_tokens=32']
    alone, forwards = {}, []
    for step in (10, 20, 30):
        single = eval_module(settings + [f'--checkpoint={snapshots}/snapshot_{step}.pt',
                                         f'--output={tmp_path}/alone_{step}.json'])
        forwards = count_forwards(single, monkeypatch)
        single.main()
        alone[step] = json.load(open(f'{tmp_path}/alone_{step}.json'))
    assert len({report['perplexity']['math']['perplexity'] for report in alone.values()}) == 3
    args = settings + [f'--checkpoints={snapshots}', f'--output={tmp_path}/sweep/eval.json']
    per_checkpoint = len(forwards)
    assert per_checkpoint > 4
    killed = eval_module(args)
    count_forwards(killed, monkeypatch, stop_after=per_checkpoint + per_checkpoint // 2)  # within the second
    with pytest.raises(KeyboardInterrupt):
        killed.main()
    capsys.readouterr()
    resumed = eval_module(args)
    rest = count_forwards(resumed, monkeypatch)
    resumed.main()
    out = capsys.readouterr().out
    assert out.count('evaluated already with these settings') == 1 and 0 < len(rest) < 2 * per_checkpoint
    for run in ('sweep',):
        table = json.load(open(f'{tmp_path}/{run}/eval.json'))
        assert [(c['step'], c['tokens']) for c in table['checkpoints']] == [(10, 1000), (20, 2000), (30, 3000)]
        for metric in ('acc', 'acc_norm'):
            assert table['metrics'][f'poly_mc {metric}']['value'] == [alone[s]['results']['poly_mc'][f'{metric},none']
                                                                      for s in (10, 20, 30)]
        for source in ('math', 'stem', 'code'):
            assert table['metrics'][f'{source} held-out perplexity']['value'] == [
                alone[s]['perplexity'][source]['perplexity'] for s in (10, 20, 30)]
        assert os.path.getsize(f'{tmp_path}/{run}/eval_over_training.png') > 1000
        assert open(f'{tmp_path}/{run}/eval.csv').read().splitlines()[0] == ('step,tokens,checkpoint,poly_mc acc,'
            'poly_mc acc_norm,math held-out perplexity,stem held-out perplexity,code held-out perplexity')
