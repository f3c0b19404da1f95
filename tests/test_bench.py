import importlib

import pytest
import torch

import model as M
from configurator import configure
from conftest import small_config


def test_bench_smoke(capsys):
    import bench
    bench = importlib.reload(bench)
    configure(vars(bench), ['config/bench_tiny.py'])
    results = bench.main()
    out = capsys.readouterr().out
    assert set(results) == {'polyglu', 'vanilla'}
    # routing parameters per layer: alpha 256 x 4, beta 4, gate network 64 x 32 + 32 and 32 x 4 + 4
    assert results['polyglu']['params'] - results['vanilla']['params'] == 2 * (256 * 4 + 4 + 64 * 32 + 32 + 32 * 4 + 4)
    for r in results.values():
        assert r['step_s'] > 0 and r['tokens_per_s'] == pytest.approx(2 * 128 / r['step_s']) and r['mfu'] is None
    assert 'step-time ratio PolyGLU / VanillaLM' in out


def fused_matches_reference(device, dtype, tolerance):
    torch.manual_seed(0)
    reference = M.create_model(small_config(), device=device, dtype=dtype).train()
    fused = M.create_model(small_config(), device=device, dtype=dtype, fused=True).train()
    fused.load_state_dict(reference.state_dict())
    idx = torch.randint(0, 512, (2, 48), device=device)
    outputs, grads = [], []
    for model in (reference, fused):
        torch.manual_seed(1)  # the same Gumbel noise
        out = model(idx)
        out.float().square().mean().backward()
        outputs.append(out.float())
        grads.append(torch.cat([p.grad.float().flatten() for p in model.parameters()]))
    torch.testing.assert_close(outputs[1], outputs[0], rtol=tolerance, atol=tolerance)
    torch.testing.assert_close(grads[1], grads[0], rtol=tolerance, atol=tolerance)


@pytest.mark.slow
def test_fused_polyglu_equals_frozen_forward_cpu():
    fused_matches_reference('cpu', torch.float32, 1e-5)  # torch.compile runs on CPU too


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
def test_fused_polyglu_equals_frozen_forward_cuda_bf16():
    fused_matches_reference('cuda', torch.bfloat16, 2e-2)
