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
    results = load_bench().main()
    out = capsys.readouterr().out
    assert set(results) == {'polyglu', 'vanilla'}
    # routing parameters per layer: alpha 256 x 4, beta 4, gate network 64 x 32 + 32 and 32 x 4 + 4
    assert results['polyglu']['params'] - results['vanilla']['params'] == 2 * (256 * 4 + 4 + 64 * 32 + 32 + 32 * 4 + 4)
    for r in results.values():
        assert r['step_s'] > 0 and r['tokens_per_s'] == pytest.approx(2 * 128 / r['step_s']) and r['mfu'] is None
    assert 'step-time ratio PolyGLU / VanillaLM' in out
    assert 'KiB a token a block for its backward' in out and 'targets' not in out  # no peak FLOP/s on CPU


def test_bench_checks_the_targets_against_a_peak(capsys):
    results = load_bench('--peak_flops_override=312e12', '--model_types=("polyglu",)').main()
    out = capsys.readouterr().out
    polyglu = results['polyglu']
    config = M.ModelConfig(vocab_size=1024, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=256)
    assert polyglu['mfu'] == pytest.approx(M.flops_per_token(config, 128) * polyglu['tokens_per_s'] / 312e12)
    met = polyglu['tokens_per_s'] >= 35_400  # 3 x 11,800 on an A100's peak
    assert f"tokens/s {polyglu['tokens_per_s']:,.0f} >= 35,400: {met}" in out and 'ratio' not in out



@pytest.mark.slow
def test_bench_through_deepspeed_with_the_pretrain_settings():
    """README's card check (DeepSpeed, fused kernels, partial checkpointing) on CPU; a subprocess, as DeepSpeed
    initialises torch.distributed once per process."""
    result = subprocess.run([sys.executable, 'bench.py', 'config/bench_tiny.py', '--backend=deepspeed', '--fused=True',
                             '--gradient_checkpointing=True', '--checkpoint_blocks=1'], cwd=ROOT, capture_output=True,
                            text=True, timeout=600, env={**os.environ, 'MASTER_PORT': str(28_500 + os.getpid() % 1000)})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert '(cpu, float32, deepspeed)' in result.stdout
    assert 'step-time ratio PolyGLU / VanillaLM' in result.stdout and 'checkpointing=True (1 blocks)' in result.stdout
    assert 'warning' not in result.stdout  # nothing compiles again once warmed up


@pytest.mark.slow
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
    unfused = load_bench('--memory_only=True').main()
    fused = load_bench('--memory_only=True', '--fused=True').main()
    # fused: no float32 copies in the norms, no per-activation tensors, no [tokens, d_ff] product kept
    assert fused['polyglu']['saved_kib_per_token'] < 0.4 * unfused['polyglu']['saved_kib_per_token']
    assert fused['vanilla']['saved_kib_per_token'] < 0.6 * unfused['vanilla']['saved_kib_per_token']
    # and fused PolyGLU keeps what fused SwiGLU keeps, up to its [d_ff, K] routing weights per row
    assert fused['polyglu']['saved_kib_per_token'] == pytest.approx(fused['vanilla']['saved_kib_per_token'], rel=0.02)
    bench = load_bench('--micro_batch_size=16', '--block_size=4096', '--n_layers=28')
    tokens, kib = 16 * 4096, fused['polyglu']['saved_kib_per_token']
    assert bench.activation_gb(kib, 0) == pytest.approx(28 * kib * 1024 * tokens / 1e9)
    assert bench.activation_gb(kib, 28) == pytest.approx((28 * 64 * 2 / 1024 + kib) * 1024 * tokens / 1e9)


def run_models(config, dtype, fused, checkpoint_blocks=None):
    """Output and all parameter gradients of one forward/backward from the same weights and Gumbel noise."""
    torch.manual_seed(0)
    state = M.create_model(config).state_dict()
    model = M.create_model(config, dtype=dtype, fused=fused, gradient_checkpointing=checkpoint_blocks is not None,
                           checkpoint_blocks=checkpoint_blocks or 0).train()
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
    for checkpoint_blocks in (None, 1):
        for fused, ref in zip(run_models(config, torch.float32, True, checkpoint_blocks), reference):
            torch.testing.assert_close(fused, ref, rtol=1e-5, atol=1e-6)
    # in bf16 the fused kernels (float32 inside) are no further from the float32 reference than the frozen math
    for fused, eager, ref in zip(run_models(config, torch.bfloat16, True), run_models(config, torch.bfloat16, False),
                                 reference):
        assert (fused - ref).norm() <= 1.1 * (eager - ref).norm()
        assert (fused - ref).norm() < 2e-2 * ref.norm()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
@pytest.mark.parametrize('model_type', ['polyglu', 'vanilla'])
def test_fused_kernels_equal_frozen_forward_cuda_bf16(model_type):
    config = small_config(model_type=model_type)
    torch.manual_seed(0)
    state = M.create_model(config).state_dict()
    idx = torch.randint(0, 512, (2, 48), device='cuda')
    results = {}
    for name, dtype, fused, autocast in (('fp32', torch.float32, False, False), ('eager', torch.bfloat16, False, False),
                                         ('fused', torch.bfloat16, True, False), ('autocast', torch.float32, True, True)):
        model = M.create_model(config, device='cuda', dtype=dtype, fused=fused).train()
        model.load_state_dict(state)
        torch.manual_seed(1)
        with torch.autocast('cuda', dtype=torch.bfloat16, enabled=autocast):
            out = model(idx)
        out.float().square().mean().backward()
        results[name] = torch.cat([out.float().flatten(), *(p.grad.float().flatten() for p in model.parameters())])
    error = {name: (r - results['fp32']).norm() / results['fp32'].norm() for name, r in results.items()}
    assert error['fused'] <= 1.1 * error['eager'] and error['autocast'] < 2e-2, error


@pytest.mark.slow
def test_pretrain_config_recomputes_the_fewest_blocks_that_fit():
    """config/pretrain.py's memory settings follow from the measured bytes a full-size block keeps."""
    import bench
    import train
    train, bench = importlib.reload(train), importlib.reload(bench)
    configure(vars(train), ['config/pretrain.py'])
    configure(vars(bench), ['--memory_only=True', f'--fused={train.fused}', '--device=cpu'])
    assert train.gradient_checkpointing and (bench.micro_batch_size, bench.block_size) == (16, 4096)
    kib = {model_type: r['saved_kib_per_token'] for model_type, r in bench.main().items()}
    for model_type in kib:  # the VanillaLM baseline runs with the same config
        assert bench.activation_gb(kib[model_type], train.checkpoint_blocks) <= bench.activation_budget_gb
    assert bench.activation_gb(kib['polyglu'], train.checkpoint_blocks - 1) > bench.activation_budget_gb


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
