"""The CUDA-only checks: each attention kernel and the fused kernels against the frozen math, in bf16. Skipped without
CUDA. They import nothing but torch, pytest and model.py, so `make gpu-check` runs them on a bare CUDA machine."""
import pytest
import torch

import model as M
from conftest import small_config

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')]


def gqa_inputs(T=256):
    """A GQA of 16 query heads on 8 KV heads (head_dim 64, as the real model), in bf16 on CUDA, and two rows holding
    four and three documents."""
    config = small_config(d_model=1024, n_heads=16, n_kv_heads=8, max_seq_len=T)
    torch.manual_seed(0)
    attn = M.GQA(config).cuda()
    rope = tuple(t.cuda() for t in M.RoPE(config.head_dim, T)(T))
    x = torch.randn(2, T, config.d_model, device='cuda')
    tokens = torch.ones(2, T, dtype=torch.long, device='cuda')
    tokens[0, [40, 100, 190]] = 0
    tokens[1, [70, 71]] = 0  # a one-token document too
    return attn, rope, x, M.cu_seqlens_from_eos(tokens, eos_id=0)


def output_and_grads(attn, rope, x, cu_seqlens, max_seqlen):
    x = x.detach().requires_grad_()
    out = attn(x, rope, cu_seqlens, max_seqlen)
    out.float().square().mean().backward()
    grads = [x.grad, *(p.grad for p in attn.parameters())]
    attn.zero_grad(set_to_none=True)
    return torch.cat([t.float().flatten() for t in (out, *grads)])


@pytest.mark.parametrize('name', list(M.ATTENTION_KERNELS))
def test_attention_kernel_equals_the_masked_math_path_bf16(name):
    """Forward and backward: each kernel in bf16 is as close to the float32 masked SDPA math path as the frozen
    bf16 path is (document masking included: a kernel that attended across documents would be far off)."""
    if name not in M.available_attention():
        pytest.skip(f'{name} is not available here')
    attn, rope, x, (cu_seqlens, max_seqlen) = gqa_inputs()
    reference = output_and_grads(attn, rope, x, cu_seqlens, max_seqlen)  # float32, the frozen SDPA with its mask
    attn.to(torch.bfloat16)
    eager = output_and_grads(attn, rope, x.bfloat16(), cu_seqlens, max_seqlen)
    attn.attend = M.attention_kernel('cuda', name)  # for 'fa4', torch's FA4 registration switched on (off again below)
    kernel = output_and_grads(attn, rope, x.bfloat16(), cu_seqlens, max_seqlen)
    M.attention_kernel('cuda', 'sdpa')
    error = {what: ((r - reference).norm() / reference.norm()).item() for what, r in (('eager', eager), (name, kernel))}
    assert error[name] < max(2 * error['eager'], 1e-2), error
    unmasked = output_and_grads(attn, rope, x.bfloat16(), None, None)  # whole rows: attention crosses documents
    assert (unmasked - kernel).norm() > 10 * (kernel - reference).norm()


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


def small_training_step(attention='auto', loss_kernel='chunked', **wrappers):
    """A small model's loss and gradients through LanguageModelLoss on the card: document-masked, bf16 autocast, fused
    kernels and a recomputed block, the same weights, rows and Gumbel noise at every call."""
    config = small_config(d_model=256, n_heads=4, n_kv_heads=2, max_seq_len=256)
    torch.manual_seed(0)
    state = M.create_model(config).state_dict()
    idx = torch.randint(1, 512, (2, 257), device='cuda')
    idx[:, ::60] = 0
    model = M.create_model(config, device='cuda', attention=attention, fused=True, recompute_blocks=1,
                           **wrappers).train()
    model.load_state_dict(state)
    torch.manual_seed(1)
    with torch.autocast('cuda', dtype=torch.bfloat16):
        loss = M.LanguageModelLoss(model, 128, loss_kernel)(idx[:, :-1], idx[:, 1:],
                                                            *M.cu_seqlens_from_eos(idx[:, :-1], eos_id=0))
    loss.backward()
    return loss.item(), torch.cat([p.grad.float().flatten() for p in model.parameters()])


def test_training_step_on_each_kernel_gives_the_same_loss():
    results = {name: small_training_step(attention=name) for name in M.available_attention()}
    M.attention_kernel('cuda', 'sdpa')  # FA4's registration off again
    first_loss, first_grads = next(iter(results.values()))
    for name, (loss, grads) in results.items():
        assert loss == pytest.approx(first_loss, rel=1e-2), name
        assert grads.norm().item() == pytest.approx(first_grads.norm().item(), rel=3e-2), name


def test_padded_head_is_exact_and_faster_at_the_real_vocab(monkeypatch):
    """The loss's head at Qwen3's 151,669 rows, bf16: padded to HEAD_ROWS_MULTIPLE rows it gives the unpadded loss and
    gradients, and runs faster (unaligned, cuBLAS picks sm75 kernels: 42% of a pretrain step on an H200)."""
    torch.manual_seed(0)
    hidden = torch.randn(4096, 1024, device='cuda', dtype=torch.bfloat16, requires_grad=True)
    head = (torch.randn(151_669, 1024, device='cuda') * 0.02).bfloat16().requires_grad_()
    targets = torch.randint(0, 151_669, (4096,), device='cuda')

    def run(multiple, repeats=1):
        monkeypatch.setattr(M, 'HEAD_ROWS_MULTIPLE', multiple)
        for _ in range(repeats):
            loss = M.chunked_cross_entropy(hidden, head, targets, chunk_size=2048)
            grads = torch.autograd.grad(loss, (hidden, head))
        return loss, grads

    def seconds(multiple):
        run(multiple)
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run(multiple, repeats=5)
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 5e3

    (padded, padded_grads), (plain, plain_grads) = run(128), run(1)
    torch.testing.assert_close(padded, plain, rtol=1e-3, atol=1e-3)
    for a, b in zip(padded_grads, plain_grads):
        assert ((a.float() - b.float()).norm() / b.float().norm()).item() < 1e-2
    padded_s, plain_s = seconds(128), seconds(1)
    print(f"head, 4,096 positions x 151,669 rows, forward + backward: padded {1e3 * padded_s:.1f} ms, "
          f"unpadded {1e3 * plain_s:.1f} ms")
    assert padded_s < 0.8 * plain_s


def test_liger_loss_equals_the_chunked_loss_at_the_real_vocab_bf16():
    """loss_kernel='liger' on the card, Qwen3's 151,669 rows padded to 151,680, bf16: the chunked reference's loss and
    gradients (to bf16's rounding), the head's gradient accumulated in float32."""
    torch.manual_seed(0)
    hidden = torch.randn(2, 2048, 1024, device='cuda', dtype=torch.bfloat16)
    head = (torch.randn(151_669, 1024, device='cuda') * 0.02).bfloat16()
    targets = torch.randint(0, 151_669, (2, 2048), device='cuda')
    targets[0, :100] = -100
    results = {}
    for name in ('chunked', 'liger'):
        h, w = hidden.clone().requires_grad_(), head.clone().requires_grad_()
        loss = M.LOSS_KERNELS[name](h, w, targets, 2048)
        results[name] = (loss.float(), *(g.float() for g in torch.autograd.grad(loss, (h, w))))
    torch.testing.assert_close(results['liger'][0], results['chunked'][0], rtol=2e-3, atol=2e-3)
    for liger, chunked in zip(results['liger'][1:], results['chunked'][1:]):
        assert ((liger - chunked).norm() / chunked.norm()).item() < 2e-2


def test_each_lever_trains_as_the_default_path_bf16():
    """Each lever's loss and gradients against today's path (fused kernels, a recomputed block, the chunked loss)."""
    loss, grads = small_training_step()
    for name, lever in (('lean_mix', {'lean_mix': True}), ('compile_blocks', {'compile_blocks': True}),
                        ('liger', {'loss_kernel': 'liger'})):
        lever_loss, lever_grads = small_training_step(**lever)
        assert lever_loss == pytest.approx(loss, rel=1e-2), name
        assert ((lever_grads - grads).norm() / grads.norm()).item() < 3e-2, name
