"""
make gpu-check: everything a fresh GPU must pass before the run is paid for, in at most 8 minutes.

    python tests/gpu_check.py                                   # = make gpu-check
    python tests/gpu_check.py --stages=levers,train --levers=lean_mix,compile_blocks   # a part of it
    GPU_CHECK_DRY=1 python tests/gpu_check.py                   # end to end on the CPU at a tiny size (the suite does)

It runs, in order, each stage within its own time limit (STAGE_LIMITS_S; the plan is printed first): the environment;
the CUDA tests (tests/test_cuda.py); bench.py's lever table at full size in its own process (rows that share one model's
weights, timed in interleaved rounds, each checked against float32, the recommended setting run as a row, VanillaLM
beside it, the profile); train.py for a few steps on token chunks written here, stopped and resumed, with the save of a
full-size checkpoint timed; and exact generation at full size (eval.py --benchmark). gpu_check.json, summary.txt,
levers.json and levers.txt in results/gpu_check/ (or $GPU_CHECK_DIR) are rewritten after every stage and every round
of rows, so a check killed at any moment keeps what it measured. It needs only torch, numpy and pytest (DeepSpeed,
liger-kernel and flash-attn where installed) and says what it skipped. Without CUDA it stops with exit status 2, unless
GPU_CHECK_DRY=1. Every argument but --stages is bench.py's: the run it checks is bench.py's, config/pretrain.py's.
"""
import importlib.util
import json
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a script from the root
import bench  # noqa: E402
from configurator import configure, fail  # noqa: E402
from model import EOS_ID, available_attention, create_model  # noqa: E402
from utils import LAUNCHER_GRACE_S, file_digest, save_checkpoint  # noqa: E402

stages = 'all'                   # the stages to run: all, or some of cuda,levers,train,generation

# (liger's kernels run in Triton's interpreter here: its cost grows with the tokens and the vocabulary)
DRY_SIZE = dict(vocab_size=512, d_model=64, n_layers=3, n_heads=4, n_kv_heads=2, d_ff=256, block_size=64,
                micro_batch_size=2, grad_accum_steps=1, loss_chunk_size=32, recompute_blocks=1, device='cpu',
                dtype='float32', backend='torch')
# Each stage's time limit: together 8 minutes. A stage ends cleanly at its limit (a subprocess is killed, the lever table
# stops starting rows LIMIT_MARGIN_S before it) with what it measured kept.
STAGE_LIMITS_S = {'cuda tests': 75, 'speed levers': 210, 'train, stop, resume': 150, 'generation': 45}
STAGE_NAMES = {'cuda': 'cuda tests', 'levers': 'speed levers', 'train': 'train, stop, resume', 'generation': 'generation'}
LIMIT_MARGIN_S = 20
H200_MICRO_BATCH_S = 1.124   # one 16 x 4,096 micro-batch of today's path, measured on an H200 (docs/benchmarks.md)
TRAIN_STEPS, STOP_AT = 6, 3      # the resume check: an uninterrupted run against one stopped at STOP_AT and resumed
GENERATION = {'requests': 8, 'new_tokens': 64}
# the resumed losses against the uninterrupted ones: float32 on the CPU repeats exactly; bf16 on a GPU only as far as
# kernels whose atomics reorder sums allow. A resume that loses Adam's moments is off by 0.009 in the dry run.
LOSS_TOLERANCE = {'float32': 1e-4, 'bfloat16': 1e-2}


def check_plan(names):
    """What each stage will run, printed before the first: full-size micro-batches at the H200's measured seconds, the
    model builds and compilations around them (their time is what the stage's limit leaves), and the limit."""
    rows = bench.lever_rows(bench.levers or 'all')
    lever_work = bench.budget(rows)
    work = {'cuda tests': (0, "tests/test_cuda.py: small models, the padded head and liger's loss at the real vocabulary"),
            'speed levers': (lever_work['micro_batches'], f"{len([r for r in rows if 'changes' in r])} rows, "
                             f"{lever_work['full_size_builds']} full-size and {lever_work['two_block_builds']} 2-block "
                             f"model builds, {lever_work['compiled_settings']} compiled settings"),
            'train, stop, resume': (2 * TRAIN_STEPS, "train.py 3 times: each a full-size build, DeepSpeed's start and "
                                    "a ~10 GB save"),
            'generation': (0, f"eval.py --benchmark: a full-size load, {GENERATION['requests']} requests x "
                           f"{GENERATION['new_tokens']} new tokens")}
    print(f"gpu-check plan (micro-batches of {bench.micro_batch_size} x {bench.block_size} tokens at the H200's measured "
          f"{H200_MICRO_BATCH_S} s; each stage stops at its limit):")
    for name in names:
        micro_batches, what = work[name]
        print(f"  {name:<21} {micro_batches:>3} micro-batches ({micro_batches * H200_MICRO_BATCH_S:>4.0f} s) + {what}; "
              f"limit {STAGE_LIMITS_S[name]} s")
    total = sum(STAGE_LIMITS_S[name] for name in names)
    print(f"  {'all':<21} {sum(work[n][0] for n in names):>3} micro-batches "
          f"({sum(work[n][0] for n in names) * H200_MICRO_BATCH_S:>4.0f} s); limits together {total} s = "
          f"{total / 60:.1f} min")
    return {name: {'micro_batches': work[name][0], 'work': work[name][1], 'limit_s': STAGE_LIMITS_S[name]}
            for name in names}


class Tee:
    """stdout that is also written to the check's log file."""

    def __init__(self, *streams):
        self.streams = streams

    def write(self, text):
        for stream in self.streams:
            stream.write(text)
            stream.flush()

    def flush(self):
        for stream in self.streams:
            stream.flush()


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def run_logged(args, timeout):
    """Run a command in the repository, echoing its output as it comes -> (exit status, output). Killed after
    `timeout` seconds, so that a hang cannot eat the rented hour. Its own MASTER_PORT: this process may hold one."""
    env = {**os.environ, 'PYTHONUNBUFFERED': '1', 'MASTER_PORT': str(free_port())}
    process = subprocess.Popen(args, cwd=bench.ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    timer = threading.Timer(max(1.0, timeout), process.kill)
    timer.start()
    lines = []
    for line in process.stdout:
        print(f"    {line}", end='')
        lines.append(line)
    process.wait()
    timer.cancel()
    if process.returncode < 0:
        lines.append(f"killed at its time limit, {timeout:.0f} s\n")
    return process.returncode, ''.join(lines)


def last_line(output):
    return (output.strip().splitlines() or [''])[-1][:200]


def environment():
    """One line: the card, its driver, torch and its CUDA, and the kernels and packages that are there."""
    packages = ('deepspeed', 'flash_attn', 'triton', 'liger_kernel', 'lm_eval', 'wandb')
    installed = {name: importlib.util.find_spec(name) is not None for name in packages}
    env = {'python': platform.python_version(), 'torch': torch.__version__, 'torch_cuda': torch.version.cuda,
           'cuda': torch.cuda.is_available(), 'kernels': available_attention(), **installed}
    if env['cuda']:
        try:
            driver = subprocess.run(['nvidia-smi', '--query-gpu=driver_version', '--format=csv,noheader'],
                                    capture_output=True, text=True, timeout=30).stdout.strip().splitlines()[0]
        except (OSError, IndexError, subprocess.SubprocessError):
            driver = 'unknown'
        env.update(gpu=torch.cuda.get_device_name(), capability='.'.join(map(str, torch.cuda.get_device_capability())),
                   memory_gib=round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1), driver=driver)
    print(f"environment: {env.get('gpu', 'no GPU')} (sm {env.get('capability', '-')}, {env.get('memory_gib', '-')} GiB, "
          f"driver {env.get('driver', '-')}) | Python {env['python']} | torch {env['torch']} (CUDA {env['torch_cuda']}) "
          f"| attention kernels: {', '.join(env['kernels']) or 'none (CPU)'} | "
          + ' | '.join(f"{name} {'yes' if installed[name] else 'no'}" for name in packages))
    return env


def stage_cuda_tests(limit):
    code, output = run_logged([sys.executable, '-m', 'pytest', '-q', '-p', 'no:cacheprovider', 'tests/test_cuda.py'],
                              timeout=limit)
    counts = {word: int(n) for n, word in re.findall(r'(\d+) (passed|failed|skipped|error)', output)}
    if code not in (0, 5) or counts.get('failed') or counts.get('error'):
        raise RuntimeError(f"tests/test_cuda.py: {counts or last_line(output)}")
    if not counts.get('passed'):
        return 'skipped', f"{counts.get('skipped', 0)} skipped (no CUDA)", counts
    return 'ok', ', '.join(f"{n} {word}" for word, n in counts.items()), counts


def stage_levers(limit, folder, dry):
    """The lever table in its own process (a crash or a hang of one lever cannot take the check with it), killed at the
    stage's limit; its rows, written after every round to levers.json, are what the stage reports."""
    out = os.path.join(folder, 'levers.json')
    if os.path.exists(out):
        os.remove(out)
    sizes = [f'--{k}={v}' for k, v in DRY_SIZE.items()] if dry else []
    overrides = [arg for arg in sys.argv[1:] if not arg.startswith(('--gpu_check', '--stages', '--levers'))]
    code, output = run_logged([sys.executable, 'bench.py', *overrides, *sizes, f'--levers={bench.levers or "all"}',
                               f'--levers_json={out}', f'--levers_seconds={limit - LIMIT_MARGIN_S}'], timeout=limit)
    if not os.path.exists(out):
        raise RuntimeError(f"bench.py --levers exited {code} before its first row: {last_line(output)}")
    with open(out) as f:
        result = json.load(f)
    rows = {row['lever']: row for row in result['rows']}
    today, best = rows['today'], rows.get(result.get('recommended'), rows['today'])
    if 'tokens_per_s' not in today:
        raise RuntimeError(f"today's path was not timed: {today.get('error') or last_line(output)}")
    mfu = (lambda row: f", MFU {100 * row['mfu']:.1f}%" if row.get('mfu') is not None else '')
    vanilla = {row['lever']: row for row in result.get('vanilla', []) if row.get('step_s')}
    ratio = f", PolyGLU/VanillaLM {today['step_s'] / vanilla['today']['step_s']:.3f}" if 'today' in vanilla else ''
    best_line = (f"recommended {best['tokens_per_s']:,.0f} tokens/s{mfu(best)}" if best is not today else
                 "no lever measured faster and exact")
    summary = (f"today {today['tokens_per_s']:,.0f} tokens/s{mfu(today)}{ratio}; {best_line}; {best['hours']:,.0f} h / "
               f"${best['hours'] * bench.usd_per_hour:,.0f} for {bench.token_budget:.0e} tokens; {result.get('line', '')}")
    failed = [row['lever'] for row in result['rows'] if row.get('error')] + (['the table'] if result.get('error') else [])
    inexact = [row['lever'] for row in result['rows'] if row.get('exact') is False]
    if code != 0 or not result['finished']:
        return 'partial', summary + f"; stopped at the time limit or exit {code}", result
    if failed or inexact:
        return 'warning', summary + ''.join(f"; {what}: {', '.join(names)}" for what, names in
                                            (('failed', failed), ('not exact', inexact)) if names), result
    return 'ok', summary, result


def check_folder():
    return os.environ.get('GPU_CHECK_DIR', os.path.join(bench.ROOT, 'results', 'gpu_check'))


def write_check_data(folder, eos):
    """math, stem and code as prepare.py writes them (one chunk and its manifest each): random ids, skewed towards the
    first of 4,096 (a unigram the model learns within the check's few steps, so that a resume that lost its state shows
    in the losses), an EOS every ~1,000 tokens."""
    rng = np.random.default_rng(bench.seed)
    rows = TRAIN_STEPS * bench.micro_batch_size + 4   # every row of the check's steps, and the held-out rows
    for name in ('math', 'stem', 'code'):
        tokens = (rng.random(rows * (bench.block_size + 1)) ** 3 * min(4096, bench.vocab_size)).astype(np.uint32)
        tokens[tokens == eos] = eos + 1
        tokens[rng.random(tokens.size) < 1 / 1000] = eos
        tokens[-1] = eos
        os.makedirs(os.path.join(folder, name), exist_ok=True)
        tokens.tofile(os.path.join(folder, name, 'chunk_00000.bin'))
        chunk = {'file': 'chunk_00000.bin', 'tokens': int(tokens.size),
                 'sha256': file_digest(os.path.join(folder, name, 'chunk_00000.bin'))}
        with open(os.path.join(folder, name, 'manifest.json'), 'w') as f:
            json.dump({'format': 'polychromatic-tokens-v1', 'source': name, 'tokenizer': 'random (gpu-check)',
                       'eos_id': eos, 'dtype': 'uint32', 'vocab_size': bench.vocab_size, 'chunks': [chunk],
                       'total_tokens': int(tokens.size), 'complete': True}, f)


def train_losses(out_dir):
    with open(os.path.join(out_dir, 'train_log.jsonl')) as f:
        return {entry['step']: entry['train/loss'] for entry in map(json.loads, f) if 'train/loss' in entry}


def stage_train(limit, work):
    """train.py with config/pretrain.py's settings for TRAIN_STEPS steps of one micro-batch, uninterrupted, and again
    stopped at STOP_AT and resumed: the losses must agree. Every save is a checkpoint of the configured model (full
    size on a GPU), timed against the launchers' grace. The three runs share the stage's limit."""
    deadline = time.perf_counter() + limit
    eos = EOS_ID if bench.vocab_size > EOS_ID else 1
    write_check_data(os.path.join(work, 'data'), eos)
    sizes = {k: vars(bench)[k] for k in ('vocab_size', 'd_model', 'n_layers', 'n_heads', 'n_kv_heads', 'd_ff',
                                       'block_size', 'micro_batch_size', 'loss_chunk_size', 'recompute_blocks',
                                       'fused', 'device', 'dtype', 'backend', 'zero_stage')}
    settings = dict(sizes, max_seq_len=max(bench.block_size, 4096), eos_id=eos, data_dir=os.path.join(work, 'data'),
                    max_steps=TRAIN_STEPS, grad_accum_steps=1, warmup_steps=1, learning_rate=1e-3, min_lr=1e-4,
                    val_tokens=2 * bench.block_size, eval_rows=1, eval_interval=0, checkpoint_interval=0, log_interval=1,
                    keep_checkpoints=1, wandb_log=False, attention=bench.attention if bench.attention != 'all' else 'auto')
    args = [sys.executable, 'train.py', bench.RUN_CONFIG, *(f'--{k}={v}' for k, v in settings.items())]
    saves, outputs = [], []
    for name, extra in (('uninterrupted', []), ('stopped', [f'--stop_after_steps={STOP_AT}']), ('resumed', [])):
        out_dir = os.path.join(work, 'uninterrupted' if name == 'uninterrupted' else 'resumed')
        print(f"  train.py, {name} ({TRAIN_STEPS} steps{f', stop at {STOP_AT}' if extra else ''})")
        code, output = run_logged([*args, f'--out_dir={out_dir}', *extra], timeout=deadline - time.perf_counter())
        if code != 0:
            raise RuntimeError(f"train.py ({name}) exited {code}: {last_line(output)}")
        outputs.append(output)
        saves += [(float(gb), float(s)) for gb, s in re.findall(r'saved checkpoint .*\(([\d.e+-]+) GB in ([\d.]+) s', output)]
        if name == 'uninterrupted':
            reference = train_losses(out_dir)
            shutil.rmtree(out_dir)  # a full-size checkpoint is ~10 GB of disk
    resumed = train_losses(os.path.join(work, 'resumed'))
    if f"resumed from step {STOP_AT}" not in outputs[2] or sorted(resumed) != sorted(reference):
        raise RuntimeError(f"the resumed run did not continue from step {STOP_AT}: steps {sorted(resumed)}")
    difference, tolerance = max(abs(resumed[s] - reference[s]) for s in reference), LOSS_TOLERANCE[bench.dtype]
    size, seconds = max(saves, key=lambda save: save[1])
    info = {'losses_uninterrupted': reference, 'losses_resumed': resumed, 'max_loss_difference': difference,
            'save_gb': size, 'save_s': seconds, 'saves': saves}
    summary = (f"losses over {TRAIN_STEPS} steps {reference[1]:.3f} -> {reference[TRAIN_STEPS]:.3f}, resumed at "
               f"{STOP_AT}: max |difference| {difference:.5f} (<= {tolerance:g}); slowest save {size:.3g} GB in "
               f"{seconds:.1f} s (<= {LAUNCHER_GRACE_S} s)")
    if difference > tolerance:
        raise RuntimeError(f"the resumed losses leave the uninterrupted ones: {summary}")
    if seconds > LAUNCHER_GRACE_S:
        return 'warning', summary + ': a pre-emption would kill the save; use a faster disk for out_dir', info
    return 'ok', summary, info


def stage_generation(limit, checkpoint, dry):
    """eval.py's benchmark on the checkpoint the train stage wrote (the configured model, trained for a few steps)."""
    extra = (['--benchmark_requests=2', '--max_gen_toks=4', '--benchmark_prompt_tokens=32', '--batch_tokens=256'] if dry
             else [f"--benchmark_requests={GENERATION['requests']}", f"--max_gen_toks={GENERATION['new_tokens']}"])
    code, output = run_logged([sys.executable, 'eval.py', f'--checkpoint={checkpoint}', '--benchmark=True',
                               f'--device={bench.device}', f'--dtype={bench.dtype}', *extra], timeout=limit)
    rate = re.search(r'([\d.]+) new tokens/s, ([\d.]+) TFLOP/s', output)
    hours = re.search(r'full GSM8K .*: ([\d.]+) hours', output)
    if code != 0 or not rate or not hours:
        raise RuntimeError(f"eval.py --benchmark exited {code}: {last_line(output)}")
    info = {'new_tokens_per_s': float(rate[1]), 'tflops': float(rate[2]), 'gsm8k_hours': float(hours[1])}
    return 'ok', (f"exact generation {info['new_tokens_per_s']:,.1f} new tokens/s ({info['tflops']:.3f} TFLOP/s); full "
                  f"GSM8K, worst case: {info['gsm8k_hours']:.2f} h"), info


def summary_lines(report):
    env = report['environment']
    lines = [f"gpu-check summary: {env.get('gpu', 'CPU (dry run)')}, torch {env['torch']}, "
             f"{report['seconds'] / 60:.1f} min of {sum(STAGE_LIMITS_S.values()) / 60:.0f}",
             f"{'stage':<22} {'status':<8} {'seconds':>7} {'limit':>5}  result"]
    for name, s in report['stages'].items():
        lines.append(f"{name:<22} {s['status']:<8} {s['seconds']:>7.0f} {STAGE_LIMITS_S[name]:>5}  {s['summary']}")
    return '\n'.join(lines) + '\n'


def run_gpu_check():
    """The stages in order, each kept in the report as it ends -> exit status 1 if any failed."""
    dry = os.environ.get('GPU_CHECK_DRY') == '1'
    if not dry and not torch.cuda.is_available():
        print("gpu-check needs CUDA (none here: torch.cuda.is_available() is False); GPU_CHECK_DRY=1 runs it on the "
              "CPU at a tiny size")
        sys.exit(2)
    names = list(STAGE_NAMES.values()) if stages == 'all' else [STAGE_NAMES.get(n.strip(), n.strip())
                                                                 for n in stages.split(',') if n.strip()]
    unknown = [name for name in names if name not in STAGE_LIMITS_S]
    if unknown:
        raise SystemExit(f"error: unknown stages {unknown}: --stages=all or some of {','.join(STAGE_NAMES)}")
    folder = check_folder()
    work = os.path.join(folder, 'work')
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    log = open(os.path.join(folder, 'gpu_check.log'), 'w')
    sys.stdout = Tee(sys.__stdout__, log)
    if dry:
        configure(vars(bench), [f'--{k}={v}' for k, v in DRY_SIZE.items()])
        print(f"gpu-check, dry run (GPU_CHECK_DRY=1): every stage on the CPU at a tiny size: {DRY_SIZE}")
    report = {'dry_run': dry, 'started': time.strftime('%Y-%m-%d %H:%M:%S'), 'environment': environment(),
              'plan': check_plan(names), 'stages': {}, 'seconds': 0.0}

    def save():  # after every stage: a check killed at any moment keeps what it measured
        bench.write_json(os.path.join(folder, 'gpu_check.json'), report)
        with open(os.path.join(folder, 'summary.txt'), 'w') as f:
            f.write(summary_lines(report))

    def stage(name, function, *args):
        print(f"\n== {name} (limit {STAGE_LIMITS_S[name]} s)")
        start = time.perf_counter()
        try:
            status, summary, info = function(STAGE_LIMITS_S[name], *args)
        except (Exception, SystemExit) as e:  # one stage's failure must not cost the others' GPU minutes
            status, summary, info = 'failed', f"{type(e).__name__}: {last_line(str(e))}", {}
        report['stages'][name] = {'status': status, 'summary': summary, 'seconds': time.perf_counter() - start, **info}
        report['seconds'] = sum(s['seconds'] for s in report['stages'].values())
        print(f"== {name}: {status} ({report['stages'][name]['seconds']:.0f} s): {summary}")
        save()

    save()
    if 'cuda tests' in names:
        stage('cuda tests', stage_cuda_tests)
    if 'speed levers' in names:
        stage('speed levers', stage_levers, folder, dry)
    try:
        bench.setup(distributed=False)  # the stages run their own processes
    except (Exception, SystemExit) as e:
        for name in ('train, stop, resume', 'generation'):
            if name in names:
                report['stages'][name] = {'status': 'failed', 'summary': f"set-up: {e}", 'seconds': 0}
        names = []
    if 'train, stop, resume' in names:
        stage('train, stop, resume', stage_train, work)
    if 'generation' in names:
        checkpoint = os.path.join(work, 'resumed', 'portable_final.pt')
        if not os.path.isfile(checkpoint):  # the train stage failed or did not run: generation still gets measured
            checkpoint = os.path.join(work, 'initialised.pt')
            save_checkpoint(checkpoint, create_model(bench.model_config(bench.model_types[0])), step=0)
        stage('generation', stage_generation, checkpoint, dry)
    shutil.rmtree(work, ignore_errors=True)
    save()
    print('\n' + summary_lines(report), end='')
    print(f"-> {os.path.join(folder, 'gpu_check.json')}, {os.path.join(folder, 'summary.txt')}, "
          f"{os.path.join(folder, 'levers.txt')}, {os.path.join(folder, 'gpu_check.log')}")
    sys.stdout = sys.__stdout__
    log.close()
    return 1 if any(s['status'] == 'failed' for s in report['stages'].values()) else 0


def main(argv):
    """--stages is this script's; every other argument configures bench.py's run."""
    global stages
    for arg in argv:
        if arg.startswith('--stages'):
            stages = arg.partition('=')[2] or fail("--stages needs a value: --stages=all or some of "
                                                   f"{','.join(STAGE_NAMES)}")
    bench.configure_run([arg for arg in argv if not arg.startswith('--stages')])
    return run_gpu_check()


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
