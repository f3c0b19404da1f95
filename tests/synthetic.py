"""Small token data in prepare.py's real chunk + manifest format, with a tiny vocabulary so CPU tests are fast."""
import os

import numpy as np

import prepare

VOCAB = 512
EOS = 1


def counting_documents(n_tokens, seed):
    """Documents that count upward from a random start (mod VOCAB): learnable, so losses fall fast."""
    rng = np.random.default_rng(seed)
    docs, total = [], 0
    while total < n_tokens:
        length = int(rng.integers(20, 200))
        start = int(rng.integers(2, VOCAB))
        doc = (start + np.arange(length)) % (VOCAB - 2) + 2
        docs.append(np.append(doc, EOS).astype(np.uint32))
        total += length + 1
    return docs


def write_source(data_dir, name, n_tokens=60_000, chunk_tokens=20_000, seed=0, manifest_eos=EOS):
    """manifest_eos: eval.py and analyze.py check for the real EOS id; the tokens still fit the tiny vocabulary."""
    folder = os.path.join(data_dir, name)
    os.makedirs(folder, exist_ok=True)
    chunks, pending = [], []
    for doc in counting_documents(n_tokens, seed):
        if pending and sum(map(len, pending)) + len(doc) > chunk_tokens:
            chunks.append(np.concatenate(pending))
            pending = []
        pending.append(doc)
    chunks.append(np.concatenate(pending))
    entries = []
    for i, tokens in enumerate(chunks):
        entry = prepare.write_chunk(folder, i, tokens)
        entry['documents'] = int(np.count_nonzero(tokens == EOS))
        entries.append(entry)
    manifest = {'format': prepare.MANIFEST_FORMAT, 'source': name, 'tokenizer': 'synthetic', 'eos_id': manifest_eos,
                'dtype': 'uint32', 'vocab_size': VOCAB, 'chunks': entries,
                'total_tokens': int(sum(c.size for c in chunks)), 'complete': True}
    prepare.save_manifest(folder, manifest)
    return folder


def train_args(data_dir, out_dir, **overrides):
    """--key=value arguments for a tiny train.py run on synthetic data."""
    settings = dict(data_dir=data_dir, out_dir=out_dir, vocab_size=VOCAB, eos_id=EOS, d_model=32, n_layers=2,
                    n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=64, block_size=32, micro_batch_size=4,
                    grad_accum_steps=2, max_steps=20, warmup_steps=5, learning_rate=3e-3, min_lr=3e-4,
                    val_tokens=512, eval_rows=4, backend='torch', device='cpu', dtype='float32', log_interval=5,
                    eval_interval=10, checkpoint_interval=10, wandb_log=False)
    settings.update(overrides)
    return [f'--{k}={v}' for k, v in settings.items()]
