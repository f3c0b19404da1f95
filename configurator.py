"""
Exec-style config, nanoGPT's way with real errors. A stage script defines its defaults as module globals,
then calls configure(globals()):

    $ python train.py config/pretrain.py --max_steps=100 --wandb_log=False
    $ python train.py --help                  # every key, its default and its comment

Each config file (plain Python assigning globals) is exec'd in order, then each --key=value is parsed with
ast.literal_eval (a bare word stays a string). Keys must exist among the defaults and values must have the
default's type (an int is accepted where a float is expected). Mistakes end the run with one line that
names the key and the fix (a renamed key names its new name). `--local_rank=N`, which the deepspeed launcher appends,
is accepted. It also holds `fail`, the one-line error every script ends a bad run with.
"""
import ast
import difflib
import itertools
import os
import re
import sys

LAUNCHER_KEYS = ('local_rank',)  # added by `deepspeed` / torch.distributed launchers; read from env instead
CONFIG_TYPES = (int, float, bool, str, tuple, list, type(None))
# old key -> the key that now holds its setting: an old command line or config file gets the new name
RENAMED = {'checkpoint_blocks': 'recompute_blocks', 'gradient_checkpointing': 'recompute_blocks'}
SECRET_NAME = re.compile(r'(?:^|_)(?:token|api_key|secret|password)$')  # hf_token, not val_tokens or tokenizer
# what a secret looks like: a hub or wandb token, or any long unbroken run of letters and digits (a key or a password)
SECRET_VALUE = re.compile(r'hf_[A-Za-z0-9]{8,}|[A-Za-z0-9_]{32,}')


def config_keys(namespace):
    """The configurable globals: lower-case names of plain values (UPPER_CASE constants and imports are not)."""
    return [k for k, v in namespace.items()
            if not k.startswith('_') and k.islower() and isinstance(v, CONFIG_TYPES)]


def fail(message):
    """End the run with one line that names the problem and the fix."""
    raise SystemExit(f"error: {message}")


def shown(key, text):
    """Text of a value as an error line may show it: never a value that looks like a secret, or that a secret's key
    holds."""
    return '<hidden: it looks like a secret>' if SECRET_NAME.search(key.lower()) or SECRET_VALUE.search(text) else text


def nearest(key, keys):
    if RENAMED.get(key) in keys:
        return f"did you mean '{RENAMED[key]}'? ({key} is now {RENAMED[key]})"
    match = difflib.get_close_matches(key, keys, n=1)
    return f"did you mean '{match[0]}'?" if match else f"valid keys: {', '.join(sorted(keys))}"


def checked(key, value, default, source):
    """value converted to the default's type, or a clear error."""
    if default is None or type(value) is type(default):
        return value
    if isinstance(default, float) and type(value) is int:
        return float(value)
    if isinstance(default, (tuple, list)) and isinstance(value, (tuple, list)):
        return type(default)(value)
    hint = " (write True or False)" if isinstance(default, bool) else ""
    if source.startswith('--'):  # the argument itself
        source = f"--{key}={shown(key, source.split('=', 1)[-1])}"
    fail(f"{source}: {key} must be {type(default).__name__} like its default {default!r}, "
         f"got {type(value).__name__} {shown(key, repr(value))}{hint}")


def parse_value(raw, default):
    if isinstance(default, str):
        return raw  # strings need no quotes: --out_dir=out/run1
    try:
        return ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return raw


def config_file_values(path):
    """A config file's plain values: the file is exec'd with __file__ set (a config may build on one beside it, as
    config/tiny_ablation.py does); modules and helper functions are left out."""
    file_globals = {'__file__': path}
    with open(path) as f:
        exec(compile(f.read(), path, 'exec'), file_globals)
    return {k: v for k, v in file_globals.items() if not k.startswith('_') and isinstance(v, CONFIG_TYPES)}


def usage(namespace, keys):
    """--help: the script's summary, then every config key with its current value and the comment beside it in the
    script (and the comment lines under it)."""
    lines, comments = [], {}
    path = namespace.get('__file__')
    if path and os.path.isfile(path):
        with open(path) as f:
            lines = f.read().splitlines()
    for i, line in enumerate(lines):
        key = line.split('=', 1)[0].strip() if '=' in line and not line.startswith((' ', '#')) else None
        if key in keys and not comments.get(key):
            notes = [line.split('  # ', 1)[1]] if '  # ' in line else []
            notes += [more.strip()[2:] for more in itertools.takewhile(lambda l: l.startswith(' ') and
                                                                       l.strip().startswith('#'), lines[i + 1:])]
            comments[key] = ' '.join(notes)
    summary = (namespace.get('__doc__') or '').strip().split('\n\n')[0]
    width = min(40, max(len(f"--{k}={namespace[k]!r}") for k in keys))
    return '\n'.join([summary, '', 'config keys (--key=value, or a config/*.py file assigning them):'] +
                     [f"  {f'--{k}={namespace[k]!r}':<{width}}  {comments.get(k, '')}".rstrip() for k in keys])


def configure(namespace, argv=None):
    """Apply config files and --key=value overrides to `namespace` (a script's globals()).
    Returns {key: value} of the final config, for logging."""
    argv = sys.argv[1:] if argv is None else argv
    keys = config_keys(namespace)
    for arg in argv:
        if arg in ('--help', '-h'):
            print(usage(namespace, keys))
            sys.exit(0)
        if not arg.startswith('--'):
            if not os.path.isfile(arg):
                available = sorted(f"config/{f}" for f in os.listdir('config')) if os.path.isdir('config') else []
                fail(f"config file {arg} not found; available: {', '.join(available) or 'none'}")
            for key, value in config_file_values(arg).items():
                if key not in keys:
                    fail(f"{arg}: unknown config key '{key}'; {nearest(key, keys)}")
                namespace[key] = checked(key, value, namespace[key], arg)
            continue
        if '=' not in arg:
            fail(f"argument {arg} needs a value: write {arg}=VALUE")
        key, raw = arg[2:].split('=', 1)
        if key in LAUNCHER_KEYS and key not in keys:
            continue
        if key not in keys:
            fail(f"unknown config key '{key}' in --{key}={shown(key, raw)}; {nearest(key, keys)}")
        namespace[key] = checked(key, parse_value(raw, namespace[key]), namespace[key], arg)
    return {k: namespace[k] for k in keys}
