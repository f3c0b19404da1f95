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


def test_held_out_perplexity_by_hand(tiny, tmp_path):
    folder = synthetic.write_source(str(tmp_path), 'math', n_tokens=3000, chunk_tokens=5000, manifest_eos=M.EOS_ID)
    manifest = json.load(open(os.path.join(folder, 'manifest.json')))
    result = E.held_out_perplexity(tiny, folder, held_tokens=700, max_tokens=10_000, context=32)
    tokens = np.concatenate([np.fromfile(os.path.join(folder, c['file']), dtype=np.uint32) for c in manifest['chunks']])
    held = torch.from_numpy(tokens[-700:].astype(np.int64))
    losses = []
    for start in range(0, 700 - 32, 32):
        window = held[start:start + 33]
        with torch.no_grad():
            losses.append(F.cross_entropy(tiny(window[None, :-1])[0], window[1:], reduction='none'))
    loss = torch.cat(losses).mean().item()
    assert result['tokens'] == 32 * len(losses)
    assert result['loss'] == pytest.approx(loss, rel=1e-5)
    assert result['perplexity'] == pytest.approx(math.exp(loss), rel=1e-5)


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
