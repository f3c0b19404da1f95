"""
Exec-style config, nanoGPT's way with real errors. A stage script defines its defaults as module globals,
then calls configure(globals()):

    $ python train.py config/pretrain.py --max_iters=100 --wandb_log=False

Each config file (plain Python assigning globals) is exec'd in order, then each --key=value is parsed with
ast.literal_eval (a bare word stays a string). Keys must exist among the defaults and values must have the
default's type (an int is accepted where a float is expected). Mistakes end the run with one line that
names the key and the fix. `--local_rank=N`, which the deepspeed launcher appends, is accepted.
"""
import ast
import difflib
import os
import sys

LAUNCHER_KEYS = ('local_rank',)  # added by `deepspeed` / torch.distributed launchers; read from env instead
CONFIG_TYPES = (int, float, bool, str, tuple, list, type(None))


def config_keys(namespace):
    """The configurable globals: lower-case names of plain values (UPPER_CASE constants and imports are not)."""
    return [k for k, v in namespace.items()
            if not k.startswith('_') and k.islower() and isinstance(v, CONFIG_TYPES)]


def fail(message):
    raise SystemExit(f"error: {message}")


def nearest(key, keys):
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
    fail(f"{source}: {key} must be {type(default).__name__} like its default {default!r}, "
         f"got {type(value).__name__} {value!r}{hint}")


def parse_value(raw, default):
    if isinstance(default, str):
        return raw  # strings need no quotes: --out_dir=out/run1
    try:
        return ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return raw


def configure(namespace, argv=None):
    """Apply config files and --key=value overrides to `namespace` (a script's globals()).
    Returns {key: value} of the final config, for logging."""
    argv = sys.argv[1:] if argv is None else argv
    keys = config_keys(namespace)
    for arg in argv:
        if not arg.startswith('--'):
            if not os.path.isfile(arg):
                available = sorted(f"config/{f}" for f in os.listdir('config')) if os.path.isdir('config') else []
                fail(f"config file {arg} not found; available: {', '.join(available) or 'none'}")
            file_globals = {'__file__': arg}  # a config may build on another beside it (config/tiny_ablation.py)
            with open(arg) as f:
                exec(compile(f.read(), arg, 'exec'), file_globals)
            for key, value in file_globals.items():
                if key.startswith('_') or not isinstance(value, CONFIG_TYPES):
                    continue  # modules, helper functions
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
            fail(f"unknown config key '{key}' in {arg}; {nearest(key, keys)}")
        namespace[key] = checked(key, parse_value(raw, namespace[key]), namespace[key], arg)
    return {k: namespace[k] for k in keys}
