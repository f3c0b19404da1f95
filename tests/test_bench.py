import importlib
import os
import subprocess
import sys

import pytest
import torch

import model as M
from configurator import configure
from conftest import ROOT, small_config


def load_bench(*overrides):
    import bench
    bench = importlib.reload(bench)
    configure(vars(bench), ['config/bench_tiny.py', *overrides])
    return bench


def test_bench_smoke(capsys):
    polyglu, vanilla = load_bench().main()
    out = capsys.readouterr().out
    assert (polyglu['model_type'], vanilla['model_type']) == ('polyglu', 'vanilla')
    # routing parameters per layer: alpha 256 x 4, beta 4, gate network 64 x 32 + 32 and 32 x 4 + 4
    assert polyglu['params'] - vanilla['params'] == 2 * (256 * 4 + 4 + 64 * 32 + 32 + 32 * 4 + 4)
    for r in (polyglu, vanilla):
        assert r['step_s'] > 0 and r['tokens_per_s'] == pytest.approx(2 * 128 / r['step_s']) and r['mfu'] is None
        assert r['hours'] == pytest.approx(1e10 / r['tokens_per_s'] / 3600) and r['fits'] is None  # no card on the CPU
    assert f"step-time ratio PolyGLU / VanillaLM (sdpa_attention): {polyglu['step_s'] / vanilla['step_s']:.3f}" in out
    assert 'KiB a token a block for its backward' in out and 'targets' not in out  # no peak FLOP/s on CPU


def test_bench_checks_the_targets_against_a_peak(capsys):
    polyglu, = load_bench('--peak_flops_override=312e12', '--model_types=("polyglu",)').main()
    out = capsys.readouterr().out
    config = M.ModelConfig(vocab_size=1024, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=256)
    assert polyglu['mfu'] == pytest.approx(M.flops_per_token(config, 128) * polyglu['tokens_per_s'] / 312e12)
    # HFU adds the loss chunks' second head forward (no block is recomputed here): 2 x 64 x 1,024 a token
    assert polyglu['hfu'] == pytest.approx(polyglu['mfu'] * (1 + 2 * 64 * 1024 / M.flops_per_token(config, 128)))
    # at this MFU of an A100's 312 TFLOP/s, 10B tokens of this model's FLOPs a token, at $1.64 an hour
    a100_usd = 1e10 * M.flops_per_token(config, 128, polyglu['params']) / (polyglu['mfu'] * 312e12) / 3600 * 1.64
    assert f"MFU {100 * polyglu['mfu']:.1f}% >= 45%: False" in out and 'ratio' not in out
    assert f"projected A100 cost ${a100_usd:,.0f} <= $130: {a100_usd <= 130}" in out



@pytest.mark.slow
@pytest.mark.xdist_group('ports')
def test_bench_through_deepspeed_with_the_pretrain_settings():
    """README's card check (DeepSpeed, fused kernels, partial checkpointing) on CPU; a subprocess, as DeepSpeed
    initialises torch.distributed once per process."""
    result = subprocess.run([sys.executable, 'bench.py', 'config/bench_tiny.py', '--backend=deepspeed', '--fused=True',
                             '--recompute_blocks=1'], cwd=ROOT, capture_output=True,
                            text=True, timeout=600, env={**os.environ, 'MASTER_PORT': str(28_500 + os.getpid() % 1000)})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert '(cpu, float32, deepspeed, ZeRO-1)' in result.stdout
    assert 'step-time ratio PolyGLU / VanillaLM' in result.stdout and '1 of 2 blocks recomputed' in result.stdout
    assert 'warning' not in result.stdout  # nothing compiles again once warmed up


@pytest.mark.slow
@pytest.mark.xdist_group('ports')
def test_bench_frees_each_deepspeed_model_before_the_next():
    """DeepSpeed's hooks keep an engine's model alive after `del`; at full size that would be ~12 GB of weights and
    AdamW state beside the second model. A subprocess, for DeepSpeed's one torch.distributed per process."""
    code = """
import gc, weakref
import bench, model
from configurator import configure
configure(vars(bench), ['config/bench_tiny.py', '--backend=deepspeed'])
bench.device, bench.dtype = bench.resolve_device(bench.device, bench.dtype)
bench.init_distributed('deepspeed', 'cpu')
built = []
bench.create_model = lambda *a, **k: built.append(model.create_model(*a, **k)) or built[-1]
bench.measure('polyglu')
alive = weakref.ref(built.pop(0))
built.clear()
gc.collect()
print('freed' if alive() is None else 'alive')
"""
    result = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True, timeout=600,
                            env={**os.environ, 'MASTER_PORT': str(27_500 + os.getpid() % 1000)})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert result.stdout.strip().endswith('freed')

@pytest.mark.slow
def test_fused_kernels_keep_less_for_the_backward(capsys):
    unfused = {r['model_type']: r for r in load_bench('--memory_only=True').main()}
    fused = {r['model_type']: r for r in load_bench('--memory_only=True', '--fused=True').main()}
    # fused: no float32 copies in the norms, no per-activation tensors, no [tokens, d_ff] product kept
    assert fused['polyglu']['saved_kib_per_token'] < 0.4 * unfused['polyglu']['saved_kib_per_token']
    assert fused['vanilla']['saved_kib_per_token'] < 0.6 * unfused['vanilla']['saved_kib_per_token']
    # and fused PolyGLU keeps what fused SwiGLU keeps, up to its [d_ff, K] routing weights per row
    assert fused['polyglu']['saved_kib_per_token'] == pytest.approx(fused['vanilla']['saved_kib_per_token'], rel=0.02)
    bench = load_bench('--micro_batch_size=16', '--block_size=4096', '--n_layers=28')
    tokens, kib = 16 * 4096, fused['polyglu']['saved_kib_per_token']
    assert bench.activation_gb(kib, 0) == pytest.approx(28 * kib * 1024 * tokens / 1e9)
    assert bench.activation_gb(kib, 28) == pytest.approx((28 * 64 * 2 / 1024 + kib) * 1024 * tokens / 1e9)


def run_models(config, dtype, fused, recompute_blocks=None):
    """Output and all parameter gradients of one forward/backward from the same weights and Gumbel noise."""
    torch.manual_seed(0)
    state = M.create_model(config).state_dict()
    model = M.create_model(config, dtype=dtype, fused=fused, recompute_blocks=recompute_blocks or 0).train()
    model.load_state_dict(state)
    idx = torch.randint(0, 512, (2, 48), generator=torch.Generator().manual_seed(2))
    torch.manual_seed(1)
    out = model(idx)
    out.float().square().mean().backward()
    return out.float(), torch.cat([p.grad.float().flatten() for p in model.parameters()])


@pytest.mark.slow
@pytest.mark.parametrize('model_type', ['polyglu', 'vanilla'])
def test_fused_kernels_equal_frozen_forward_cpu(model_type):
    config = small_config(model_type=model_type)
    reference = run_models(config, torch.float32, fused=False)
    for recompute_blocks in (None, 1):
        for fused, ref in zip(run_models(config, torch.float32, True, recompute_blocks), reference):
            torch.testing.assert_close(fused, ref, rtol=1e-5, atol=1e-6)
    # in bf16 the fused kernels (float32 inside) are no further from the float32 reference than the frozen math
    for fused, eager, ref in zip(run_models(config, torch.bfloat16, True), run_models(config, torch.bfloat16, False),
                                 reference):
        assert (fused - ref).norm() <= 1.1 * (eager - ref).norm()
        assert (fused - ref).norm() < 2e-2 * ref.norm()


@pytest.mark.slow
def test_pretrain_config_recomputes_the_fewest_blocks_that_fit():
    """config/pretrain.py's memory settings follow from the measured bytes a full-size block keeps."""
    import bench
    import train
    train, bench = importlib.reload(train), importlib.reload(bench)
    configure(vars(train), ['config/pretrain.py'])
    configure(vars(bench), ['--memory_only=True', '--device=cpu', '--backend=torch'])
    assert train.recompute_blocks == 8 and (bench.micro_batch_size, bench.block_size, bench.fused) == (16, 4096, True)
    kib = {r['model_type']: r['saved_kib_per_token'] for r in bench.main()}
    for model_type in kib:  # the VanillaLM baseline runs with the same config
        assert bench.activation_gb(kib[model_type], train.recompute_blocks) <= bench.activation_budget_gb
    assert bench.activation_gb(kib['polyglu'], train.recompute_blocks - 1) > bench.activation_budget_gb


@pytest.mark.slow
def test_fused_mix_is_one_kernel_forward():
    """The fused forward is one compiled kernel: activations, routed mix and product with the up projection (on CPU's
    inductor here; the backward, with its reduction over tokens for the routing gradient, is a few)."""
    from torch._inductor import metrics
    gate, up, grad_h = torch.randn(3, 2, 64, 256, dtype=torch.bfloat16)
    g = torch.softmax(torch.randn(2, 1, 256, 4), -1).bfloat16()
    counts = {}
    for function, args in ((M.polyglu_mix, (gate, up, g)), (M.polyglu_mix_backward, (gate, up, g, grad_h))):
        metrics.reset()
        torch.compile(function, dynamic=False)(*args)
        counts[function.__name__] = metrics.generated_kernel_count
    assert counts == {'polyglu_mix': 1, 'polyglu_mix_backward': 4}


def test_bench_defaults_are_read_from_the_pretrain_config(tmp_path, monkeypatch):
    """bench.py's defaults are config/pretrain.py's settings, and a run whose file was edited is read from it at start
    (run_config, found from any folder; its values typed as a config file's are), the command line over it."""
    import bench
    import train
    bench, train = importlib.reload(bench), importlib.reload(train)
    configure(vars(train), ['config/pretrain.py'])
    for key in ('vocab_size', 'd_model', 'n_layers', 'n_heads', 'n_kv_heads', 'd_ff', 'block_size', 'micro_batch_size',
                'fused', 'recompute_blocks', 'loss_chunk_size', 'zero_stage', 'backend',
                'dtype', 'device', 'attention'):
        assert getattr(bench, key) == getattr(train, key), key
    assert (bench.micro_batch_size, bench.fused, bench.recompute_blocks, bench.zero_stage) == (16, True, 8, 1)
    edited = tmp_path / 'pretrain.py'
    edited.write_text(open(os.path.join(ROOT, 'config', 'pretrain.py')).read() + '\nmicro_batch_size = 12\n')
    bench.configure_run([f'--run_config={edited}', '--steps=2'])
    assert (bench.micro_batch_size, bench.steps) == (12, 2)
    bench.configure_run([f'--run_config={edited}', '--micro_batch_size=4'])
    assert bench.micro_batch_size == 4
    monkeypatch.chdir(tmp_path)  # the default names the repository's file from anywhere
    bench = importlib.reload(bench)
    bench.configure_run([])
    assert bench.micro_batch_size == 16
    edited.write_text('micro_batch_size = "16"\n')
    with pytest.raises(SystemExit, match=r"micro_batch_size must be int like its default 16, got str '16'"):
        bench.configure_run([f'--run_config={edited}'])
    with pytest.raises(SystemExit, match=r"^error: run_config='nope\.py' not found"):
        bench.configure_run(['--run_config=nope.py'])


@pytest.mark.slow
def test_bench_default_runs_the_pretrain_settings_shrunk(capsys):
    """The default path with only the sizes shrunk (and the CPU's device, dtype and backend): the pre-training run's
    fused kernels, its 8 recomputed blocks and its loss chunk are what gets timed."""
    import bench
    bench = importlib.reload(bench)
    configure(vars(bench), ['--vocab_size=1024', '--d_model=64', '--n_layers=9', '--n_heads=4', '--n_kv_heads=2',
                            '--d_ff=128', '--block_size=64', '--micro_batch_size=2', '--steps=1', '--warmup=1',
                            '--device=cpu', '--dtype=float32', '--backend=torch', '--model_types=("polyglu",)'])
    polyglu, = bench.main()
    out = capsys.readouterr().out
    assert 'x 8 micro-steps a step, fused=True' in out  # train.py's step: grad_accum_steps micro-batches, one update
    assert '8 of 9 blocks recomputed, loss chunked (chunk 2048)' in out
    assert polyglu['model_type'] == 'polyglu' and polyglu['tokens_per_s'] > 0


def test_exactness_rejects_one_wrong_ffn_or_routing_gradient(monkeypatch):
    """A lever that gets one FFN weight's gradient 5% wrong, or one routing weight's (α), is not exact, and the group it
    broke is named, while today's path (0 error in float32) passes. One norm over all the gradients (a coarser check)
    sees the FFN one 0.7% off, within its 1e-2, and α's 1e-5 off; the loss and Adam's update barely move."""
    bench = load_bench(*(f'--{k}={v}' for k, v in bench_dry_size().items()))
    build = bench.lever_model
    planted = iter([None, None, 'model_core.1.polyglu.W_down.weight', 'model_core.0.polyglu.alpha'])

    def lever_model(*args, **kwargs):
        model, loss_module = build(*args, **kwargs)
        name = next(planted)
        if name:
            dict(model.named_parameters())[name].register_hook(lambda grad: grad * 1.05)
        return model, loss_module
    monkeypatch.setattr(bench, 'lever_model', lever_model)
    rows = [{'lever': name, 'changes': {}, 'settings': bench.lever_settings()} for name in ('today', 'ffn', 'alpha')]
    data = [bench.batch(bench.np.random.default_rng(i), 2) for i in range(2)]
    bench.check_exactness(rows, data, bench.float32_reference(data))
    today, ffn, alpha = rows
    assert today['exact'] and (ffn['inexact'], alpha['inexact']) == (['grads/ffn'], ['grads/routing'])
    assert ffn['errors']['grads/ffn'] == pytest.approx(0.05, rel=1e-3) and ffn['errors']['grads/routing'] == 0.0
    # what a coarser check would look at: one norm over all gradients, the loss, and one AdamW update (≈ g/|g|)
    assert ffn['errors']['grads/all'] < 1e-2 and alpha['errors']['grads/all'] < 1e-4
    assert ffn['errors']['loss'] < 1e-5 and ffn['errors']['update/ffn'] < 1e-3


def bench_dry_size():
    import gpu_check
    return gpu_check.DRY_SIZE


def test_a_configuration_out_of_memory_is_reported_and_the_rest_measured(monkeypatch, capsys):
    bench = load_bench()
    measure = bench.measure

    def measure_or_fail(model_type, kernel='auto'):
        if model_type == 'vanilla':
            raise torch.OutOfMemoryError('CUDA out of memory. Tried to allocate 2.00 GiB')
        return measure(model_type, kernel)

    monkeypatch.setattr(bench, 'measure', measure_or_fail)
    polyglu, = bench.main()
    out = capsys.readouterr().out
    assert polyglu['model_type'] == 'polyglu' and bench.out_of_memory == ['vanilla on auto']
    assert 'vanilla on auto: out of memory (CUDA out of memory. Tried to allocate 2.00 GiB): raise recompute_blocks' in out
    assert 'step-time ratio' not in out
