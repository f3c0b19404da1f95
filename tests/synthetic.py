"""Small token data in prepare.py's real chunk + manifest format, with a tiny vocabulary so CPU tests are fast."""
import os

import numpy as np
import torch

import prepare

VOCAB = 512
EOS = 1


def counting_documents(n_tokens, seed, eos=EOS, max_length=200):
    """Documents that count upward from a random start (mod VOCAB): learnable, so losses fall fast."""
    rng = np.random.default_rng(seed)
    docs, total = [], 0
    while total < n_tokens:
        length = int(rng.integers(min(20, max_length - 1), max_length))
        start = int(rng.integers(2, VOCAB))
        doc = (start + np.arange(length)) % (VOCAB - 2) + 2
        docs.append(np.append(doc, eos).astype(np.uint32))
        total += length + 1
    return docs


def write_source(data_dir, name, n_tokens=60_000, chunk_tokens=20_000, seed=0, manifest_eos=EOS, eos=EOS,
                 max_length=200):
    """manifest_eos: eval.py and analyze.py check for the real EOS id; the tokens still fit the tiny vocabulary.
    eos: the id ending each document (the real one, with manifest_eos, for a model of the full vocabulary)."""
    folder = os.path.join(data_dir, name)
    chunks, pending = [], []
    for doc in counting_documents(n_tokens, seed, eos, max_length):
        if pending and sum(map(len, pending)) + len(doc) > chunk_tokens:
            chunks.append(np.concatenate(pending))
            pending = []
        pending.append(doc)
    chunks.append(np.concatenate(pending))
    return prepare.write_source(folder, name, chunks, manifest_eos, VOCAB, 'synthetic')


def train_args(data_dir, out_dir, **overrides):
    """--key=value arguments for a tiny train.py run on synthetic data."""
    settings = dict(data_dir=data_dir, out_dir=out_dir, vocab_size=VOCAB, eos_id=EOS, d_model=32, n_layers=2,
                    n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=64, block_size=32, micro_batch_size=4,
                    grad_accum_steps=2, max_steps=20, warmup_steps=5, learning_rate=3e-3, min_lr=3e-4,
                    val_tokens=512, eval_rows=4, backend='torch', device='cpu', dtype='float32', log_interval=5,
                    eval_interval=10, checkpoint_interval=10, wandb_log=False)
    settings.update(overrides)
    return [f'--{k}={v}' for k, v in settings.items()]


def author_weights(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, seq_length=128, vocab=512, seed=0):
    """A state dict spelled out from the author's frozen names and shapes (SPEC.md), not from model.py: random bf16
    weights, routing strong enough that a misplaced alpha or gate would change the logits, and the RoPE tables the
    author's RoPE keeps ([seq_length, head_dim / 2], theta 10,000)."""
    import torch
    g = torch.Generator().manual_seed(seed)
    hd = d_model // n_heads
    normal = lambda *shape, std=0.02: torch.randn(*shape, generator=g) * std  # noqa: E731
    weights = {'embeddings.weight': normal(vocab, d_model, std=0.5), 'rmsnorm.gama': 1 + normal(d_model, std=0.1)}
    for i in range(n_layers):
        p = f'model_core.{i}.'
        weights.update({
            p + 'rmsnorm_1.gama': 1 + normal(d_model, std=0.1), p + 'rmsnorm_2.gama': 1 + normal(d_model, std=0.1),
            p + 'gqa.W_q.weight': normal(n_heads * hd, d_model, std=0.2),
            p + 'gqa.W_k.weight': normal(n_kv_heads * hd, d_model, std=0.2),
            p + 'gqa.W_v.weight': normal(n_kv_heads * hd, d_model, std=0.2),
            p + 'gqa.W_o.weight': normal(d_model, n_heads * hd, std=0.2),
            p + 'gqa.rmsnorm_q.gama': 1 + normal(hd, std=0.1), p + 'gqa.rmsnorm_k.gama': 1 + normal(hd, std=0.1),
            p + 'polyglu.W_gate.weight': normal(d_ff, d_model, std=0.2),
            p + 'polyglu.W_up.weight': normal(d_ff, d_model, std=0.2),
            p + 'polyglu.W_down.weight': normal(d_model, d_ff, std=0.2),
            p + 'polyglu.alpha': normal(d_ff, 4, std=0.2), p + 'polyglu.beta': 1 + normal(4, std=0.1),
            p + 'polyglu.gate_net.0.weight': normal(32, d_model, std=1.0), p + 'polyglu.gate_net.0.bias': normal(32),
            p + 'polyglu.gate_net.2.weight': normal(4, 32, std=0.05), p + 'polyglu.gate_net.2.bias': normal(4),
        })
    weights['output_head.weight'] = weights['embeddings.weight']
    inv_freq = 1.0 / 10_000.0 ** (torch.arange(0, hd, 2).float() / hd)
    angles = torch.outer(torch.arange(seq_length).float(), inv_freq)
    weights.update({'rope.cosines': angles.cos(), 'rope.sins': angles.sin()})
    return {k: v.to(torch.bfloat16) for k, v in weights.items()}


def write_author_files(folder, weights, step=19_531, tau=0.1):
    """The author's two release formats: the trainer's portable .pt (weights, DeepSpeed's ZeRO optimizer state with
    the DeepSpeed objects its state_dict holds, a scheduler, step, tau) and a .safetensors of the weights with the tied
    head stored once. -> {'pt': path, 'safetensors': path}."""
    import torch
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address
    from safetensors.torch import save_file
    os.makedirs(folder, exist_ok=True)
    flat = torch.cat([v.float().flatten() for k, v in weights.items() if not k.startswith(('rope.', 'output_head'))])
    optimizer = {'loss_scaler': LossScaler(1.0), 'dynamic_loss_scale': False, 'overflow': False, 'clip_grad': 1.0,
                 'base_optimizer_state': {'state': {0: {'step': torch.tensor(step), 'exp_avg': torch.zeros_like(flat),
                                                        'exp_avg_sq': torch.zeros_like(flat)}},
                                          'param_groups': [{'lr': 1e-5, 'betas': (0.9, 0.95), 'params': [0]}]},
                 'single_partition_of_fp32_groups': [flat], 'zero_stage': ZeroStageEnum.optimizer_states,
                 'group_paddings': [0], 'partition_count': [1], 'ds_version': '0.19.8',
                 'param_slice_mappings': [{'embeddings.weight': fragment_address(numel=10, start=0)}]}
    paths = {'pt': os.path.join(folder, 'author_final.pt'), 'safetensors': os.path.join(folder, 'model.safetensors')}
    torch.save({'model': weights, 'optimizer': optimizer, 'scheduler': {'last_epoch': step, '_step_count': step + 1},
                'step': step, 'tau': tau}, paths['pt'])
    save_file({k: v.contiguous() for k, v in weights.items() if k != 'output_head.weight'}, paths['safetensors'])
    return paths


def hub_fault(kind, url='https://huggingface.co/api/models/someone/model'):
    """The exception huggingface_hub 2.x raises for each way a hub call fails, built the way it builds them (its own
    hf_raise_for_status on an httpx2 response; the transport's own errors; a full disk)."""
    import errno

    import httpx2
    from huggingface_hub.errors import LocalEntryNotFoundError
    from huggingface_hub.utils import hf_raise_for_status
    responses = {'bad token': (401, {'X-Error-Message': 'Invalid credentials in Authorization header'}),
                 'forbidden': (403, {}), 'gated': (403, {'X-Error-Code': 'GatedRepo'}),
                 'not found': (404, {'X-Error-Code': 'RepoNotFound'}), 'private': (401, {})}
    if kind in responses:
        status, headers = responses[kind]
        try:
            hf_raise_for_status(httpx2.Response(status, headers=headers, request=httpx2.Request('GET', url)))
        except Exception as e:
            return e
    if kind == 'dropped':  # a download whose connection fails: wrapped, the cause kept
        try:
            raise hub_fault('no network')
        except Exception as cause:
            try:
                raise LocalEntryNotFoundError('An error happened while trying to locate the file on the Hub')
            except LocalEntryNotFoundError as e:
                e.__cause__ = cause
                return e
    return {'no network': httpx2.ConnectError('[Errno -2] Name or service not known'),
            'timeout': httpx2.ReadTimeout('The read operation timed out'),
            'full disk': OSError(errno.ENOSPC, 'No space left on device')}[kind]


HUB_FAULTS = {'no network': 'no connection to the hub .*HF_HUB_OFFLINE=1', 'dropped': 'no connection to the hub',
              'timeout': 'did not answer in time .*retry', 'bad token': r'token was refused \(401\): put a valid one',
              'forbidden': r'\(403\)', 'gated': 'gated: accept its terms', 'not found': r'no such repo \(404\)',
              'private': r'no such repo \(401\), or it is private', 'full disk': 'disk is full: free space'}


def plant_spike(loss_class, step, grad_accum_steps, factor=30.0):
    """Multiply the training loss of one step (so its gradients) by `factor`, as a bad batch would spike it."""
    forward, calls = loss_class.forward, [0]

    def spiking(self, *args):
        loss = forward(self, *args)
        if not torch.is_grad_enabled():  # an evaluation
            return loss
        calls[0] += 1
        return loss * factor if (calls[0] - 1) // grad_accum_steps == step else loss
    loss_class.forward = spiking


def flip_byte(path):
    """Flip one bit in the middle of the largest tensor stored in a torch zip checkpoint (the embedding), as a bad disk
    or a torn copy would: the zip's own CRC is never checked by torch.load."""
    import struct
    import zipfile
    with zipfile.ZipFile(path) as archive:
        entry = max((e for e in archive.infolist() if '/data/' in e.filename), key=lambda e: e.file_size)
    with open(path, 'r+b') as f:
        f.seek(entry.header_offset + 26)
        name_length, extra_length = struct.unpack('<HH', f.read(4))
        f.seek(entry.header_offset + 30 + name_length + extra_length + entry.file_size // 2)
        byte = f.read(1)[0]
        f.seek(-1, 1)
        f.write(bytes([byte ^ 0x40]))
