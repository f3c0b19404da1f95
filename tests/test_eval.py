import importlib
import json
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

import eval as E
import model as M
import synthetic
from configurator import configure
from conftest import small_config


@pytest.fixture(scope='module')
def tiny():
    torch.manual_seed(0)
    model = M.create_model(small_config(max_seq_len=64)).eval()
    with torch.no_grad():
        for block in model.model_core:  # routing that depends strongly on the gate, so pooling mistakes would show
            block.ffn.alpha.normal_(std=2.0)
            block.ffn.gate_net[0].weight.normal_(std=1.0)
            block.ffn.gate_net[2].weight.normal_(std=1.0)
    return M.enable_segment_pooling(model)


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
    outputs = E.generate_exact(tiny, word_tokenizer, prompts, budget=4096)
    for (context, _, n), text in zip(prompts, outputs):
        expected = greedy_alone(tiny, context, n)[len(context):]
        assert text == word_tokenizer.decode(expected)
    # a stop string ends generation and is cut off
    context = prompts[0][0]
    full = word_tokenizer.decode(greedy_alone(tiny, context, 6)[len(context):])
    stop = full.split()[3]
    stopped = E.generate_exact(tiny, word_tokenizer, [(context, ['unused', stop], 6)], budget=4096)[0]
    assert stopped == full[:full.find(stop)] and len(stopped) < len(full)


def test_cached_generation_is_exact_when_it_refreshes_every_step(tiny, word_tokenizer, monkeypatch, capsys):
    prompts = [(context, [], 5) for context, _ in requests(3)]
    exact = E.generate_exact(tiny, word_tokenizer, prompts, budget=4096)
    monkeypatch.setattr(E, 'refresh_threshold', -1.0)  # every step refreshes: must equal exact generation
    assert E.generate_cached(tiny, word_tokenizer, prompts) == exact
    monkeypatch.setattr(E, 'refresh_threshold', 10.0)  # never refreshes: stale keys/values, a real approximation
    E.generate_cached(tiny, word_tokenizer, prompts)
    assert '0 refreshes in 12 cached steps' in capsys.readouterr().out


def test_vanilla_cached_generation_is_exact(word_tokenizer):
    torch.manual_seed(0)
    vanilla = M.enable_segment_pooling(M.create_model(small_config(model_type='vanilla', max_seq_len=64)).eval())
    prompts = [(context, [], 5) for context, _ in requests(3)]
    assert E.generate_cached(vanilla, word_tokenizer, prompts) == E.generate_exact(vanilla, word_tokenizer, prompts, 4096)


def test_held_out_perplexity_is_document_masked_by_hand(tmp_path):
    torch.manual_seed(0)
    model = M.create_model(small_config(vocab_size=M.ModelConfig.vocab_size, max_seq_len=64)).eval()
    folder = synthetic.write_source(str(tmp_path), 'math', n_tokens=3000, chunk_tokens=5000, manifest_eos=M.EOS_ID,
                                    eos=M.EOS_ID, max_length=12)  # short documents: several in every window
    manifest = json.load(open(os.path.join(folder, 'manifest.json')))
    result = E.held_out_perplexity(M.enable_segment_pooling(model), folder, held_tokens=700, max_tokens=10_000, context=32)
    tokens = np.concatenate([np.fromfile(os.path.join(folder, c['file']), dtype=np.uint32) for c in manifest['chunks']])
    held = torch.from_numpy(tokens[-700:].astype(np.int64))
    masked, unmasked = [], []
    for start in range(0, 700 - 32, 32):
        window = held[start:start + 33]
        x = window[None, :-1]
        with torch.no_grad(), M.whole_row_pooling(model):  # the frozen forward: training's gate, masked attention
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
    M.save_checkpoint(checkpoint, M.create_model(M.ModelConfig(d_model=32, n_layers=1, n_heads=4, n_kv_heads=2,
                                                               d_ff=64, max_seq_len=256)), step=7)
    return str(folder), checkpoint


def run_eval(args):
    module = importlib.reload(E)
    configure(vars(module), args)
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
    acc = report['results']['poly_mc']['acc,none']
    assert 0.0 <= report['results']['poly_gen']['exact_match,none'] <= 1.0
    assert '|poly_mc' in capsys.readouterr().out  # the summary table
    # the harness's accuracy is what our own scores give: argmax over the choices' log-likelihoods
    model, _ = M.load_checkpoint(checkpoint)
    M.enable_segment_pooling(model)
    tok = module.get_tokenizer('packaged')
    correct = 0
    for i in range(6):
        context = tok.encode(f'Question: What is {i} + {i}?\nAnswer:', add_special_tokens=False).ids
        choices = [tok.encode(' ' + c, add_special_tokens=False).ids for c in (str(2 * i), str(2 * i + 1), 'seven')]
        scores = [s for s, _ in E.score(model, [(context, c) for c in choices], 4096)]
        correct += int(np.argmax(scores) == 0)
    assert acc == pytest.approx(correct / 6)


def test_bad_input_is_one_clear_line(harness_setup, tmp_path, monkeypatch):
    folder, checkpoint = harness_setup
    with pytest.raises(SystemExit, match='checkpoint .*nothing.pt not found'):
        run_eval([f'--checkpoint={tmp_path}/nothing.pt', f'--output={tmp_path}/r.json'])
    monkeypatch.setenv('HF_DATASETS_OFFLINE', '1')
    with pytest.raises(SystemExit, match="unknown task 'poly_mcq'; did you mean poly_mc"):
        run_eval([f'--checkpoint={checkpoint}', '--tasks=poly_mcq', f'--include_path={folder}',
                  f'--output={tmp_path}/r.json', '--tokenizer=packaged', '--device=cpu'])
    blocker = tmp_path / 'file'
    blocker.write_text('')
    with pytest.raises(SystemExit, match='cannot write results to .*file/r.json'):
        run_eval([f'--checkpoint={checkpoint}', f'--output={blocker}/r.json'])


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
    model, _ = M.load_checkpoint(author_files[kind])
    expected = E.held_out_perplexity(M.enable_segment_pooling(model), os.path.join(data, 'math'), 1000, 1000, 256)
    assert report['perplexity']['math']['loss'] == pytest.approx(expected['loss'], rel=1e-6)


@pytest.mark.slow
def test_scoring_memory_does_not_grow_with_the_vocabulary():
    """16,384 scored positions in one pack (batch_tokens=16384, as loglikelihood_rolling sends them) at the full vocabulary:
    keeping every position's log-probs would take 9.9 GB (float32) plus a copy; gathering the targets per chunk keeps
    the peak near one chunk's logits (0.6 GB). Measured here: 1.2 GiB above the start, the model and inputs included."""
    import subprocess
    import sys
    from conftest import ROOT
    script = """
import resource, numpy as np, torch, model as M, eval as E
torch.manual_seed(0)
model = M.enable_segment_pooling(M.create_model(M.ModelConfig(d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, d_ff=64)))
requests = [([M.EOS_ID], np.random.default_rng(i).integers(0, 151_669, 4095).tolist()) for i in range(4)]
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
assert len(E.packs([4096] * 4, 16_384)) == 1
E.score(model.eval(), requests, 16_384)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 2**20)
"""
    result = subprocess.run([sys.executable, '-c', script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    peak_gib = float(result.stdout.split()[-1])
    assert peak_gib < 2.0, f'scoring peaked {peak_gib:.2f} GiB above its start'


def eval_module(args):
    module = importlib.reload(E)
    configure(vars(module), args)
    return module


def test_chat_format_for_fine_tuned_checkpoints_and_samples(harness_setup, tmp_path, monkeypatch):
    folder, _ = harness_setup
    monkeypatch.setenv('HF_DATASETS_OFFLINE', '1')
    torch.manual_seed(0)
    checkpoint = str(tmp_path / 'portable_sft_final.pt')
    M.save_checkpoint(checkpoint, M.create_model(M.ModelConfig(d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, d_ff=64,
                                                               max_seq_len=512)), step=3, stage='sft')
    reports = {}
    for mode in ('auto', 'plain'):
        output = str(tmp_path / mode / 'eval.json')
        module = eval_module([f'--checkpoint={checkpoint}', '--tasks=poly_mc,poly_gen', f'--include_path={folder}',
                              f'--output={output}', '--tokenizer=packaged', '--perplexity=False', '--device=cpu',
                              '--limit=3', '--num_fewshot=2', '--log_samples=True']
                             + (['--chat=False'] if mode == 'plain' else []))
        stops = []
        real = module.generate_exact
        monkeypatch.setattr(module, 'generate_exact', lambda m, tok, prompts, *a: stops.extend(p[1] for p in prompts)
                            or real(m, tok, prompts, *a))
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


def test_shot_counts_and_the_paper_table(monkeypatch, tmp_path, capsys):
    import lm_eval
    calls = []

    def fake_evaluate(model, tasks, num_fewshot, **kwargs):
        calls.append((tuple(tasks), num_fewshot))
        return {'results': {t: {'acc,none': 0.25, 'acc_stderr,none': 0.01, 'acc_norm,none': 0.3,
                                'acc_norm_stderr,none': 0.02} for t in tasks},
                'n-shot': {t: num_fewshot or 0 for t in tasks}}
    monkeypatch.setattr(lm_eval, 'simple_evaluate', fake_evaluate)
    module = eval_module([])
    results = module.run_tasks(None, ['gsm8k', 'mmlu_stem'])
    assert calls == [(('gsm8k',), None), (('mmlu_stem',), 5)]  # MMLU-STEM 5-shot, as the model card reports it
    assert results['n-shot'] == {'gsm8k': 0, 'mmlu_stem': 5}
    calls.clear()
    results = module.run_tasks(None, [task for task, *_ in module.PAPER])
    assert calls == [(('hellaswag', 'arc_easy', 'arc_challenge', 'piqa', 'winogrande', 'boolq', 'sciq', 'openbookqa',
                       'lambada_openai'), None), (('mmlu_stem',), 5)]  # the harness's 0-shot defaults, MMLU 5-shot
    rows = module.paper_comparison(results, {'math': {'perplexity': 4.0}})
    by_name = {row[0]: row for row in rows}
    assert by_name['hellaswag'][3:7] == (pytest.approx(30.0), pytest.approx(2.0), 28.51, pytest.approx(1.49))
    assert by_name['mmlu_stem'][2:7] == (5, pytest.approx(25.0), pytest.approx(1.0), 25.28, pytest.approx(-0.28))
    assert by_name['math perplexity'][3:7] == (4.0, None, 3.56, pytest.approx(0.44))
    assert by_name['code perplexity'][3] is None
    module.print_paper_comparison(rows, 'demo')
    out = capsys.readouterr().out
    assert 'hellaswag' in out and '+1.49' in out and 'not run' in out and 'loglikelihood-based' in out
