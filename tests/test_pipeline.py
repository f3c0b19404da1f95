"""The demo pipeline end to end, smaller: embedded sample -> prepare (real Qwen3 tokenizer) -> train -> sft ->
eval (the harness on the sample's local tasks, held-out perplexity) -> analyze -> chat with the SFT model through stdin
-> export it, and read the export back."""
import json
import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT
import model as M
import utils as U


def run(*args, cwd, stdin=None, stderr=False):
    env = {**os.environ, 'HF_DATASETS_OFFLINE': '1', 'HF_HUB_OFFLINE': '1'}
    result = subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=900, env=env,
                            input=stdin)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return (result.stdout, result.stderr) if stderr else result.stdout


@pytest.mark.slow
def test_demo_pipeline(tmp_path):
    for name in ('model.py', 'utils.py', 'configurator.py', 'prepare.py', 'train.py', 'sft.py', 'eval.py',
                 'analyze.py', 'sample.py', 'export.py'):
        os.symlink(os.path.join(ROOT, name), tmp_path / name)
    os.symlink(os.path.join(ROOT, 'config'), tmp_path / 'config')
    run('prepare.py', '--sample=data/demo/raw', cwd=tmp_path)
    for source in ('math', 'stem', 'code', 'sft'):
        out = run('prepare.py', f'--source={source}', f'--input=data/demo/raw/{source}.jsonl',
                  '--output_base=data/demo/tokenized', '--tokenizer=packaged', '--num_proc=2', cwd=tmp_path)
        assert re.search(rf'{source}: [\d,]+ (tokens|conversations)', out)
    assert re.search(r'sft: 400 conversations of 400 problems, [\d,]+ tokens .* 0 malformed, 400 tool', out)
    out = run('prepare.py', '--verify=data/demo/tokenized/math', cwd=tmp_path)
    assert 'OK' in out
    train = ['train.py', 'config/tiny.py', '--max_steps=60', '--eval_interval=60', '--checkpoint_interval=30']
    out = run(*train, cwd=tmp_path)
    losses = [float(x) for x in re.findall(r'\| loss (\d+\.\d+) \|', out)]
    assert losses[0] > 7.0 and losses[-1] < 6.0  # ln(151,669) = 11.9
    assert 'already trained to max_steps=60' in run(*train, cwd=tmp_path)  # a re-run reuses the result
    model, info = U.load_checkpoint(str(tmp_path / 'checkpoints/demo/portable_final.pt'))
    step, tau = info['step'], info['tau']
    assert step == 60 and tau == pytest.approx(0.1) and model.config.d_model == 48
    out = run('sft.py', 'config/tiny_sft.py', '--init_from=checkpoints/demo/portable_final.pt', '--block_size=64',
              '--eval_interval=1000', cwd=tmp_path)
    validation = [float(v) for v in re.findall(r'validation loss (\d+\.\d+) per assistant token', out)]
    assert len(validation) == 2 and validation[1] < validation[0] - 0.5
    tau = U.load_checkpoint(str(tmp_path / 'checkpoints/demo/portable_sft_final.pt'))[1]['tau']
    assert tau == 0.1
    run('eval.py', 'config/tiny_eval.py', '--checkpoint=checkpoints/demo/portable_sft_final.pt', '--limit=8',
        '--perplexity_tokens=1000', cwd=tmp_path)
    report = json.load(open(tmp_path / 'results/demo/eval.json'))
    assert set(report['results']) == {'demo_arith_mc', 'demo_arith_gen'}
    assert set(report['perplexity']) == {'math', 'stem', 'code'} and report['perplexity']['math']['perplexity'] < 100
    out = run('analyze.py', 'config/tiny_analyze.py', '--max_tokens=2000', cwd=tmp_path)
    summary = json.load(open(tmp_path / 'figures/demo/summary.json'))
    assert summary['causality_audit']['mean_kl'] > 0
    assert len([f for f in os.listdir(tmp_path / 'figures/demo') if f.endswith('.png')]) == 8
    # chat through stdin: ChatML turns, each reply ended by <|im_end|> (never printed) or max_new_tokens, then EOF
    sft_checkpoint = 'checkpoints/demo/portable_sft_final.pt'
    out, err = run('sample.py', f'--checkpoint={sft_checkpoint}', '--max_new_tokens=40', cwd=tmp_path, stderr=True,
                   stdin='Ana shares 47 pencils among 5 friends. How many each?\nAnd how many are left?\n')
    replies = re.findall(r'^assistant> (.*)$', out, re.M)
    assert len(replies) == 2 and all(replies) and '<|im_end|>' not in ''.join(replies)
    assert re.search(r'chat, temperature 0.8, top_k 200, exact generation', err)  # chat: the SFT model's default
    assert re.search(r'[\d,]+ new tokens in [\d.]+s: [\d.]+ tokens/s', err)
    # the export reads back with the SFT checkpoint's logits, its tokenizer beside it
    out = run('export.py', f'--checkpoint={sft_checkpoint}', '--out_dir=checkpoints/demo/export', cwd=tmp_path)
    assert 'read back with identical logits' in out
    card = open(tmp_path / 'checkpoints/demo/export/README.md').read()
    assert re.search(r'Fine-tuned \(SFT, loss on the assistant tokens of ChatML conversations\) for \d+ steps of 4 '
                     r'packed conversation rows, from `checkpoints/demo/portable_final.pt`', card)
    assert re.search(r'SFT data, `sft`: `local` \(data/demo/raw/sft.jsonl\); [\d,]+ tokens prepared', card)
    assert "The base's data, `math`" in card and "The base's data, `sft`" not in card
    assert re.search(r'Command: `sft\.py config/tiny_sft\.py --init_from=', card)
    reloaded, info = U.load_checkpoint(str(tmp_path / 'checkpoints/demo/export'))
    assert info['stage'] == 'sft' and info['step'] == U.load_checkpoint(str(tmp_path / sft_checkpoint))[1]['step']
