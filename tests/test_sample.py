"""sample.py: greedy output is eval.py's exact generation, chat is ChatML turns that stop at <|im_end|> and fit
max_seq_len, and a prompt too long is one line. A small model with a word tokenizer saved beside its checkpoint (where
tokenizer='auto' finds it)."""
import importlib
import io
import re

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

import eval as E
import model as M
import utils as U
import sample as S
from configurator import configure
from conftest import small_config

SPECIAL = {'user': 500, 'assistant': 501, 'system': 502, '<|im_start|>': 503, '<|im_end|>': 504}


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp('sft')
    tok = Tokenizer(models.WordLevel({**{f'w{i}': i for i in range(500)}, **SPECIAL}, unk_token='w0'))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix='##')
    tok.add_special_tokens(['<|im_start|>', '<|im_end|>'])
    tok.save(str(folder / 'tokenizer.json'))
    torch.manual_seed(0)
    model = M.create_model(small_config(max_seq_len=64))
    with torch.no_grad():
        for block in model.model_core:  # routing that depends on the whole sequence: a stale cache would show
            block.ffn.alpha.normal_(std=2.0)
            block.ffn.gate_net[0].weight.normal_(std=1.0)
    checkpoint = str(folder / 'portable_sft_final.pt')
    U.save_checkpoint(checkpoint, model, step=7, stage='sft')
    return checkpoint, tok


def run(args, monkeypatch, capsys, stdin='', fresh=True):
    """sample.py's main with these arguments and stdin -> what it printed. fresh=False keeps the module's patches."""
    monkeypatch.setattr('sys.stdin', io.StringIO(stdin))
    module = importlib.reload(S) if fresh else S
    configure(vars(module), args + ['--device=cpu'])
    module.main()
    return capsys.readouterr()


def test_greedy_sample_is_evals_exact_generation(setup, monkeypatch, capsys):
    checkpoint, tok = setup
    prompt = 'w5 w17 w230 w9'
    out = run([f'--checkpoint={checkpoint}', f'--prompt={prompt}', '--chat=False', '--temperature=0',
               '--max_new_tokens=12'], monkeypatch, capsys)
    model, _ = U.load_checkpoint(checkpoint)
    expected = E.generate_texts(M.wrap_model(model, segment_pooling=True), tok, [(tok.encode(prompt).ids, [], 12)], 4096)[0]
    assert out.out.rstrip('\n') == prompt + expected and len(expected.split()) == 12
    assert re.search(r'12 new tokens in [\d.]+s: [\d.]+ tokens/s \(exact generation on cpu\)', out.err)


def test_sampling_is_seeded_and_samples_differ(setup, monkeypatch, capsys):
    checkpoint, _ = setup
    args = [f'--checkpoint={checkpoint}', '--prompt=w1 w2', '--chat=False', '--temperature=1.5', '--top_k=50',
            '--num_samples=2', '--max_new_tokens=10']
    first = run(args, monkeypatch, capsys).out
    samples = first.split('-' * 40)
    assert len(samples) == 2 and samples[0].strip() != samples[1].strip()
    assert run(args, monkeypatch, capsys).out == first                             # the same seed: the same text
    assert run(args + ['--seed=7'], monkeypatch, capsys).out != first


def scripted_replies(monkeypatch, words_per_reply):
    """Chat replies of the model's own greedy tokens, each ended after `words_per_reply` by <|im_end|> (a tiny random
    model never writes it), and every prompt the generation was given."""
    prompts, calls = [], []
    real_generate = S.generate_exact

    def generate(model, requests, budget, pick, stop):
        prompts.append(list(requests[0][0]))
        return real_generate(model, requests, budget, pick, stop)

    def sampler(temperature, top_k, seed):
        def pick(logits):
            calls.append(1)
            return [SPECIAL['<|im_end|>']] if len(calls) % (words_per_reply + 1) == 0 else logits.argmax(-1).tolist()
        return pick
    monkeypatch.setattr(S, 'generate_exact', generate)
    monkeypatch.setattr(S, 'sampler', sampler)
    return prompts


def test_chat_is_chatml_turns_that_stop_at_im_end(setup, monkeypatch, capsys):
    checkpoint, tok = setup
    importlib.reload(S)
    prompts = scripted_replies(monkeypatch, words_per_reply=3)
    out = run([f'--checkpoint={checkpoint}', '--system=w400', '--max_new_tokens=20'], monkeypatch, capsys,
              stdin='w1 w2\nw3\n', fresh=False)  # chat: the default for an SFT checkpoint
    replies = re.findall(r'assistant> (.*)', out.out)
    assert len(replies) == 2 and all(len(reply.split()) == 3 for reply in replies)  # stopped at <|im_end|>, unprinted
    assert not any('<|im_end|>' in reply for reply in replies)
    conversation = [{'role': 'system', 'content': 'w400'}, {'role': 'user', 'content': 'w1 w2'}]
    assert prompts[0] == tok.encode(S.chatml(conversation)).ids
    conversation += [{'role': 'assistant', 'content': replies[0]}, {'role': 'user', 'content': 'w3'}]
    assert prompts[1] == tok.encode(S.chatml(conversation)).ids
    assert re.search(r'^8 new tokens .*tokens/s', out.err, re.M)  # each reply's <|im_end|> was generated too


def test_chat_keeps_within_max_seq_len_and_ends_on_ctrl_c(setup, monkeypatch, capsys):
    checkpoint, _ = setup
    importlib.reload(S)
    prompts = scripted_replies(monkeypatch, words_per_reply=4)
    message = ' '.join(f'w{i}' for i in range(10, 22))  # 12 words: 17 tokens of ChatML with the headers
    too_long = ' '.join(f'w{i}' for i in range(100, 170))
    out = run([f'--checkpoint={checkpoint}', '--max_new_tokens=8'], monkeypatch, capsys,
              stdin='\n'.join([message, too_long, message, message, message]) + '\n', fresh=False)
    assert re.search(r'error: that message is 75 tokens in ChatML, no room for a reply within max_seq_len=64: '
                     r'shorten it', out.out)
    assert len(prompts) == 4 and all(len(ids) + 8 <= 64 for ids in prompts)
    assert prompts[1][:len(prompts[0])] == prompts[0] and len(prompts[1]) > len(prompts[0])  # nothing lost to it
    assert 'oldest turns no longer fit max_seq_len=64: dropped' in out.out
    # Ctrl-C, at the prompt or while a reply is written, ends the session cleanly: a new line, no traceback
    monkeypatch.setattr('builtins.input', lambda text='': (_ for _ in ()).throw(KeyboardInterrupt))
    assert run([f'--checkpoint={checkpoint}'], monkeypatch, capsys, fresh=False).out.endswith('Ctrl-C ends\n\n')
    monkeypatch.setattr('builtins.input', lambda text='': 'w1')
    monkeypatch.setattr(S, 'generate_exact', lambda *args: (_ for _ in ()).throw(KeyboardInterrupt))
    assert run([f'--checkpoint={checkpoint}'], monkeypatch, capsys, fresh=False).out.endswith('assistant> \n')


SAMPLE_ERRORS = [  # sample.py's arguments (beside --checkpoint) -> the line it stops with; {tmp}/prompt.txt: 80 words
    ('--prompt=FILE:{tmp}/prompt.txt --chat=False', r'the prompt is 80 tokens; the model reads at most max_seq_len=64 '),
    ('--prompt=FILE:{tmp}/missing.txt', r'prompt file .*missing\.txt not found \(--prompt=FILE:path reads a text file\)'),
    ('--prompt=w1 --generation=beam', r"generation must be 'exact' or 'cached', got 'beam'"),
    ('--checkpoint={tmp}/nothing.pt', r'checkpoint .*nothing\.pt not found'),
]


@pytest.mark.parametrize('arguments, line', SAMPLE_ERRORS)
def test_bad_input_is_one_clear_line(setup, monkeypatch, capsys, tmp_path, arguments, line):
    (tmp_path / 'prompt.txt').write_text(' '.join(f'w{i}' for i in range(80)))
    with pytest.raises(SystemExit, match=f'^error: {line}'):
        run([f'--checkpoint={setup[0]}', *arguments.format(tmp=tmp_path).split()], monkeypatch, capsys)


def test_cached_generation_says_its_bound(setup, monkeypatch, capsys):
    checkpoint, _ = setup
    out = run([f'--checkpoint={checkpoint}', '--prompt=w3 w4', '--chat=False', '--generation=cached',
               '--temperature=0', '--max_new_tokens=6'], monkeypatch, capsys)
    assert 'refresh_threshold=0.05 since the last full forward' in out.err
    assert re.search(r'6 new tokens .*\(cached generation on cpu; \d+ full refreshes in 5 cached steps\)', out.err)

