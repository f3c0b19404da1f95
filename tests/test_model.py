import functools
import math
import re
import shutil

import pytest
import torch
import torch.nn.functional as F

import model as M
import synthetic
import utils as U
from conftest import small_config


def test_full_size_parameter_counts():
    total, routing = M.count_parameters(M.ModelConfig())
    assert total == 597_153_888
    assert routing == 1_380_960
    assert round(100 * routing / total, 2) == 0.23
    assert M.count_parameters(M.ModelConfig(model_type='vanilla')) == (595_772_928, 0)


def test_frozen_parameter_names_and_shapes():
    """The author's state-dict keys (SPEC.md), which the published checkpoints use, key for key."""
    with torch.device('meta'):
        model = M.PolychromaticLM(M.ModelConfig())
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    layer0 = {name[len('model_core.0.'):]: shape for name, shape in shapes.items() if name.startswith('model_core.0.')}
    assert layer0 == {
        'rmsnorm_1.gama': (1024,),
        'gqa.W_q.weight': (1024, 1024),
        'gqa.W_k.weight': (512, 1024),
        'gqa.W_v.weight': (512, 1024),
        'gqa.W_o.weight': (1024, 1024),
        'gqa.rmsnorm_q.gama': (64,),
        'gqa.rmsnorm_k.gama': (64,),
        'rmsnorm_2.gama': (1024,),
        'polyglu.alpha': (4096, 4),
        'polyglu.beta': (4,),
        'polyglu.W_gate.weight': (4096, 1024),
        'polyglu.W_up.weight': (4096, 1024),
        'polyglu.W_down.weight': (1024, 4096),
        'polyglu.gate_net.0.weight': (32, 1024),
        'polyglu.gate_net.0.bias': (32,),
        'polyglu.gate_net.2.weight': (4, 32),
        'polyglu.gate_net.2.bias': (4,),
    }
    for i in range(28):
        assert {n[len(f'model_core.{i}.'):]: s for n, s in shapes.items() if n.startswith(f'model_core.{i}.')} == layer0
    others = {n: s for n, s in shapes.items() if not n.startswith('model_core.')}
    assert others == {'embeddings.weight': (151_669, 1024), 'rmsnorm.gama': (1024,), 'output_head.weight': (151_669, 1024),
                      'rope.cosines': (4096, 32), 'rope.sins': (4096, 32)}
    assert model.output_head.weight is model.embeddings.weight  # tied: one parameter, two keys
    assert len(list(model.parameters())) == 2 + 17 * 28
    with torch.device('meta'):
        vanilla = M.PolychromaticLM(M.ModelConfig(model_type='vanilla'))
    assert {n for n in vanilla.state_dict() if n.startswith('model_core.0.')} == {
        f'model_core.0.{n}' for n in layer0 if not n.startswith('polyglu.')} | {
        f'model_core.0.swiglu.{m}.weight' for m in ('W_gate', 'W_up', 'W_down')}


def test_rope_tables_rotate_pairs_of_halves():
    rope = M.RoPE(head_dim=4, max_seq_len=8, theta=100.0)
    cos, sin = rope(3)
    assert cos.shape == (3, 2)
    assert cos[2].tolist() == pytest.approx([math.cos(2.0), math.cos(2.0 / 10)])
    x = torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 1, 1, 4).expand(1, 3, 1, 4)
    out = M.RoPE.rotate(x, cos, sin)[0, 2, 0]
    # feature i pairs with feature i + 2, rotated by position 2 times its frequency
    c0, s0, c1, s1 = math.cos(2.0), math.sin(2.0), math.cos(0.2), math.sin(0.2)
    assert out.tolist() == pytest.approx([1 * c0 - 3 * s0, 2 * c1 - 4 * s1, 3 * c0 + 1 * s0, 4 * c1 + 2 * s1])


def test_initialisation_statistics():
    torch.manual_seed(0)
    config = small_config(d_model=256, d_ff=1024, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=4096)
    model = M.PolychromaticLM(config)
    block = model.model_core[1]
    residual_std = 0.02 / math.sqrt(2 * 4)
    assert model.embeddings.weight.std().item() == pytest.approx(0.02, rel=0.02)
    assert block.gqa.W_q.weight.std().item() == pytest.approx(0.02, rel=0.02)
    assert block.ffn.W_gate.weight.std().item() == pytest.approx(0.02, rel=0.02)
    assert block.ffn.gate_net[0].weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert block.gqa.W_o.weight.std().item() == pytest.approx(residual_std, rel=0.02)
    assert block.ffn.W_down.weight.std().item() == pytest.approx(residual_std, rel=0.02)
    assert block.ffn.gate_net[0].bias.abs().max().item() == 0.0
    assert block.ffn.alpha.abs().max().item() == 0.0
    assert block.ffn.beta.tolist() == [1.0, 1.0, 1.0, 1.0]
    assert block.rmsnorm_1.gama.tolist() == [1.0] * 256
    assert model.tau == 1.0


def test_tau_schedule():
    model = M.PolychromaticLM(small_config())
    assert model.update_tau(0, 1000) == 1.0
    assert model.update_tau(500, 1000) == pytest.approx(0.55)
    assert model.update_tau(1000, 1000) == pytest.approx(0.1)
    assert model.update_tau(1500, 1000) == pytest.approx(0.1)  # clamped
    assert all(b.ffn.tau == pytest.approx(0.1) for b in model.model_core)
    assert model.tau == pytest.approx(0.1)


def test_polyglu_forward_is_the_spec_formula(config):
    torch.manual_seed(0)
    ffn = M.PolyGLU(config).eval()
    with torch.no_grad():
        ffn.alpha.normal_()
        ffn.beta.copy_(torch.tensor([0.5, 1.0, 1.5, 2.0]))
    ffn.tau = 0.3
    x = torch.randn(3, 10, config.d_model)
    f = ffn.gate_net(x.mean(dim=1))                                    # [B, K]
    g = torch.softmax((ffn.alpha + ffn.beta * f[:, None, :]) / 0.3, -1)  # [B, d_ff, K]
    h = x @ ffn.W_gate.weight.T
    activations = torch.stack([F.relu(h), torch.tanh(h), F.silu(h), F.gelu(h)], dim=-1)
    expected = ((activations * g[:, None]).sum(-1) * (x @ ffn.W_up.weight.T)) @ ffn.W_down.weight.T
    torch.testing.assert_close(ffn(x), expected, rtol=1e-5, atol=1e-6)


def test_vanilla_ffn_is_swiglu(config):
    ffn = M.SwiGLU(config)
    x = torch.randn(2, 5, config.d_model)
    expected = ffn.W_down(F.silu(ffn.W_gate(x)) * ffn.W_up(x))
    torch.testing.assert_close(ffn(x), expected)
    assert isinstance(M.PolychromaticLM(small_config(model_type="vanilla")).model_core[0].ffn, M.SwiGLU)


def test_routing_deterministic_in_eval_stochastic_in_train(config):
    torch.manual_seed(0)
    model = M.PolychromaticLM(config)
    idx = torch.randint(0, config.vocab_size, (2, 16))
    model.eval()
    torch.testing.assert_close(model(idx), model(idx), rtol=0, atol=0)
    model.train()
    assert (model(idx) - model(idx)).abs().max().item() > 1e-4


def test_routing_is_one_choice_per_sequence(config):
    model = M.PolychromaticLM(config).train()
    model(torch.randint(0, config.vocab_size, (3, 16)))
    assert model.model_core[0].ffn.last_logits.shape == (3, 1, config.d_ff, 4)


def test_routing_entropy_closed_form(config):
    model = M.PolychromaticLM(config).eval()
    preference = torch.tensor([2.0, 0.0, -1.0, 0.5])
    with torch.no_grad():
        for block in model.model_core:
            block.ffn.alpha.copy_(preference.expand(config.d_ff, 4))
            block.ffn.gate_net[2].weight.zero_()  # f(h) = 0: routing is alpha alone
            block.ffn.gate_net[2].bias.zero_()
    model.set_tau(0.5)
    model(torch.randint(0, config.vocab_size, (2, 8)))
    weights = [math.exp(a / 0.5) for a in preference.tolist()]
    p = [w / sum(weights) for w in weights]
    expected = -sum(q * math.log(q) for q in p)
    stats = M.routing_entropy(model)
    assert stats['routing/entropy_layer_00'] == pytest.approx(expected, rel=1e-5)
    assert stats['routing/entropy_layer_01'] == pytest.approx(expected, rel=1e-5)
    assert stats['routing/entropy_frac_mean'] == pytest.approx(expected / math.log(4), rel=1e-5)


def test_routing_entropy_bounds(config):
    model = M.PolychromaticLM(config).train()
    with torch.no_grad():
        for block in model.model_core:
            block.ffn.alpha.normal_(std=3.0)
    model(torch.randint(0, config.vocab_size, (2, 8)))
    stats = M.routing_entropy(model)
    assert set(stats) == {'routing/entropy_layer_00', 'routing/entropy_layer_01',
                          'routing/entropy_mean', 'routing/entropy_frac_mean'}
    assert all(0.0 <= v <= math.log(4) + 1e-6 for k, v in stats.items() if 'layer' in k)
    assert stats['routing/entropy_mean'] < 0.9 * math.log(4)  # random alpha: no longer uniform
    assert M.routing_entropy(M.PolychromaticLM(small_config(model_type='vanilla'))) == {}


def test_cu_seqlens_from_eos():
    eos = 7
    tokens = torch.tensor([[1, 2, eos, 3, 4, 5, eos, 6],
                           [eos, 1, 2, 3, 4, 5, 6, eos]])
    cu_seqlens, max_seqlen = M.cu_seqlens_from_eos(tokens, eos_id=eos)
    assert cu_seqlens.dtype == torch.int32
    assert cu_seqlens.tolist() == [0, 3, 7, 8, 9, 16]
    assert max_seqlen == 7


def attention_inputs(config, T=24, boundary=10, seed=0):
    torch.manual_seed(seed)
    attn = M.GQA(config)
    rope = M.RoPE(config.head_dim, config.max_seq_len)(T)
    x = torch.randn(1, T, config.d_model)
    tokens = torch.ones(1, T, dtype=torch.long)
    tokens[0, boundary - 1] = 0  # EOS (id 0 here) ends the first document
    return attn, rope, x, M.cu_seqlens_from_eos(tokens, eos_id=0)


def test_attention_does_not_cross_documents(config):
    attn, rope, x, (cu_seqlens, max_seqlen) = attention_inputs(config)
    changed = x.clone()
    changed[:, 10:] = torch.randn_like(changed[:, 10:])
    out, out_changed = attn(x, rope, cu_seqlens, max_seqlen), attn(changed, rope, cu_seqlens, max_seqlen)
    torch.testing.assert_close(out[:, :10], out_changed[:, :10], rtol=0, atol=0)
    assert (out[:, 10:] - out_changed[:, 10:]).abs().max() > 1e-3
    # without the document mask the second document would see the first
    assert (attn(x, rope)[:, 10:] - out[:, 10:]).abs().max() > 1e-4


def test_masked_attention_equals_each_document_alone(config):
    attn, rope, x, (cu_seqlens, max_seqlen) = attention_inputs(config)
    packed = attn(x, rope, cu_seqlens, max_seqlen)
    first = attn(x[:, :10], (rope[0][:10], rope[1][:10]))
    second = attn(x[:, 10:], (rope[0][:14], rope[1][:14]))  # alone, it starts at position 0
    torch.testing.assert_close(packed[:, :10], first, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(packed[:, 10:], second, rtol=1e-5, atol=1e-6)  # RoPE is relative


def test_recomputed_blocks_give_the_same_gradients(config):
    torch.manual_seed(0)
    idx = torch.randint(0, config.vocab_size, (2, 16))
    grads = []
    for blocks in (0, -1, 1):
        torch.manual_seed(1)
        model = M.create_model(config, recompute_blocks=blocks).train()
        wrapped = [isinstance(block.forward, functools.partial) for block in model.model_core]
        assert wrapped == {0: [False, False], -1: [True, True], 1: [True, False]}[blocks]
        torch.manual_seed(2)  # same Gumbel noise
        F.cross_entropy(model(idx).flatten(0, 1), idx.flatten()).backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[0], grads[1])
    torch.testing.assert_close(grads[0], grads[2])


def test_longer_than_context_is_a_clear_error(config):
    model = M.PolychromaticLM(config)
    with pytest.raises(ValueError, match='longer than max_seq_len=128'):
        model(torch.zeros(1, 129, dtype=torch.long))


def test_checkpoint_round_trip(tmp_path, config):
    torch.manual_seed(0)
    model = M.create_model(config)
    model.update_tau(300, 1000)
    optimizer = torch.optim.AdamW(model.parameters())
    idx = torch.randint(0, config.vocab_size, (2, 16))
    path = str(tmp_path / 'portable_42.pt')
    U.save_checkpoint(path, model, step=42, optimizer_state=optimizer.state_dict())
    loaded, info = U.load_checkpoint(path)
    assert (info['step'], info['tau']) == (42, pytest.approx(0.73))
    assert loaded.tau == pytest.approx(0.73) and not loaded.training
    torch.testing.assert_close(loaded(idx), model.eval()(idx), rtol=0, atol=0)
    state = torch.load(path, weights_only=True)
    assert set(state) == {'model_state_dict', 'optimizer_state_dict', 'scheduler_state_dict', 'step', 'tau',
                          'model_config', 'tensor_sha256'}
    assert state['tensor_sha256'] == {'model_state_dict': U.tensor_sha256(state['model_state_dict']),
                                      'optimizer_state_dict': U.tensor_sha256(optimizer.state_dict())}
    assert not any(p.name.endswith('.tmp') for p in tmp_path.iterdir())


def bad_checkpoint(kind, folder, config):
    """A checkpoint file damaged or mismatched as `kind` says -> its path."""
    path = str(folder / f'{kind}.pt')
    good = str(folder / 'good.pt')
    U.save_checkpoint(good, M.create_model(config), step=1)
    if kind == 'garbage':
        open(path, 'wb').write(b'not a checkpoint at all')
    elif kind == 'foreign':
        torch.save({'weights': torch.zeros(3)}, path)
    elif kind == 'vanilla':
        U.save_checkpoint(path, M.create_model(small_config(model_type='vanilla')), step=1)
    elif kind == 'truncated':
        open(path, 'wb').write(open(good, 'rb').read()[:2000])
    elif kind == 'tampered':  # by another tool, which records no digest
        tampered = torch.load(good, weights_only=True)
        tampered['model_state_dict']['model_core.0.polyglu.alpha'] = torch.zeros(64, 4)
        del tampered['tensor_sha256']
        torch.save(tampered, path)
    elif kind == 'flipped':
        shutil.copy(good, path)
        synthetic.flip_byte(path)
    return path


CHECKPOINT_ERRORS = [  # a checkpoint file (bad_checkpoint) loaded for the test's config -> the line it stops with
    ('missing', r'checkpoint .*missing\.pt not found'),
    ('garbage', r'.*garbage\.pt is not a readable checkpoint'),
    ('truncated', r'.*truncated\.pt is not a readable checkpoint'),
    ('foreign', r'.*foreign\.pt is not a PolychromaticLM checkpoint \(expected a portable \.pt'),
    ('vanilla', r".*vanilla\.pt holds a different model than configured.*model_type.*'polyglu', 'vanilla'"),
    ('flipped', r'.*flipped\.pt is damaged: its weights fail the sha256 recorded when it was saved \(a flipped bit'),
    ('tampered', r'.*tampered\.pt does not match its model config: .*wrong shape.*model_core\.0\.polyglu\.alpha: '
                 r'checkpoint \(64, 4\) vs model \(128, 4\)'),
]


@pytest.mark.parametrize('kind, line', CHECKPOINT_ERRORS)
def test_bad_checkpoints_are_one_line_errors(tmp_path, config, kind, line):
    path = bad_checkpoint(kind, tmp_path, config)
    with pytest.raises(SystemExit, match=f'^error: {line}'):
        U.load_checkpoint(path, config=config if kind == 'vanilla' else None)


def test_flops_per_token_full_model():
    config = M.ModelConfig()
    assert M.flops_per_token(config) == 6 * 597_153_888 + 6 * 28 * 1024 * 4096
    assert round(M.flops_per_token(config) / 1e9, 1) == 4.3  # SPEC/issue figure at context 4,096


def test_segment_attention_equals_the_masked_path(config):
    attn, rope, x, (cu_seqlens, max_seqlen) = attention_inputs(config)
    masked = attn(x, rope, cu_seqlens, max_seqlen)
    attn.attend = M.segment_attention
    torch.testing.assert_close(attn(x, rope, cu_seqlens, max_seqlen), masked, rtol=1e-5, atol=1e-6)


def packed_rows(B=2, T=40, boundaries=((9, 25), (30,))):
    """Two rows of three and two documents (EOS id 0 at the given positions) -> cu_seqlens, max_seqlen."""
    tokens = torch.ones(B, T, dtype=torch.long)
    for row, ends in enumerate(boundaries):
        tokens[row, list(ends)] = 0
    return M.cu_seqlens_from_eos(tokens, eos_id=0)


def outputs_and_input_grads(attn, kernels, x, rope, cu_seqlens, max_seqlen):
    """[(output, d sum(output^2) / dx)] of one GQA with each attention kernel in turn."""
    results = []
    for kernel in kernels:
        attn.attend = kernel
        out = attn(x, rope, cu_seqlens, max_seqlen)
        grad, = torch.autograd.grad(out.square().sum(), x)
        results.append((out, grad))
    return results


def test_efficient_attention_equals_the_masked_path():
    config = small_config(d_model=64, n_heads=4, n_kv_heads=2)
    torch.manual_seed(0)
    attn = M.GQA(config)
    T = 40
    rope = M.RoPE(config.head_dim, config.max_seq_len)(T)
    x = torch.randn(2, T, config.d_model, requires_grad=True)
    cu_seqlens, max_seqlen = packed_rows()
    results = outputs_and_input_grads(attn, (M.sdpa_attention, M.efficient_sdpa_attention), x, rope, cu_seqlens,
                                      max_seqlen)
    torch.testing.assert_close(results[1], results[0], rtol=1e-5, atol=1e-6)
    # one bias per batch, whatever the number of layers calling
    bias = M.document_bias(cu_seqlens, 2, T, torch.float32, 'cpu')
    assert bias is M.document_bias(cu_seqlens, 2, T, torch.float32, 'cpu') and bias.shape == (2, 1, T, T)
    assert bias[0, 0, 12, 9] == float('-inf') and bias[0, 0, 12, 10] == 0 and bias[1, 0, 5, 6] == float('-inf')


def per_document_attention(q, k, v, cu_seq_q, cu_seq_k, max_q, max_k, causal):
    """What FlashAttention-2's varlen kernel computes, on the CPU in float32: each document attends to itself alone,
    causally or not. Checks the arguments a wrong call would get silently wrong."""
    assert q.dim() == 3 and k.shape[1] <= q.shape[1] and q.shape[1] % k.shape[1] == 0, (q.shape, k.shape)
    assert q.dtype in (torch.bfloat16, torch.float16), 'FA2 takes bf16/fp16'
    assert cu_seq_q.dtype == cu_seq_k.dtype == torch.int32, 'cu_seq must be int32'
    assert type(max_q) is int and type(max_k) is int, 'the maxima are Python ints'
    bounds = cu_seq_q.tolist()
    assert max_q == max(b - a for a, b in zip(bounds[:-1], bounds[1:]))
    pieces = [F.scaled_dot_product_attention(*(t[a:b].float().transpose(0, 1) for t in (q, k, v)), is_causal=causal,
                                             enable_gqa=True).transpose(0, 1) for a, b in zip(bounds[:-1], bounds[1:])]
    return torch.cat(pieces).to(q.dtype)


# torch's varlen_attn as three releases spell it (torch/nn/attention/varlen.py): causal from a flag, then from
# `window_size == (-1, 0)`; GQA native, then behind enable_gqa
def varlen_attn_2_10(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, is_causal=False,
                     scale=None):
    return per_document_attention(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, causal=is_causal)


def varlen_attn_2_11(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                     window_size=(-1, -1)):
    return per_document_attention(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, causal=window_size == (-1, 0))


def varlen_attn_2_13(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                     window_size=(-1, -1), enable_gqa=False, seqused_k=None, block_table=None, num_splits=None):
    if not enable_gqa and query.shape[1] != key.shape[1]:
        raise ValueError('Expect query and key/value to have the same number of heads. Try setting enable_gqa=True')
    return per_document_attention(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, causal=window_size == (-1, 0))


@pytest.mark.parametrize('varlen_attn', [varlen_attn_2_10, varlen_attn_2_11, varlen_attn_2_13])
def test_varlen_wrapper_passes_causal_gqa_and_int32(monkeypatch, varlen_attn):
    """model.varlen_attention through a CPU stand-in for each signature of torch's varlen_attn: the arguments it
    needs (causal as the tuple (-1, 0) or is_causal=True, int32 cu_seq, int maxima, 16 query heads on 8 KV heads) and
    the per-document causal result of the masked SDPA path, forward and backward. With window_size=[-1, 0] (a list)
    the stand-in, like torch, computes non-causal attention and this test fails."""
    import torch.nn.attention.varlen
    monkeypatch.setattr(torch.nn.attention.varlen, 'varlen_attn', varlen_attn)
    config = small_config(d_model=256, n_heads=16, n_kv_heads=8)
    torch.manual_seed(0)
    attn = M.GQA(config)
    rope = M.RoPE(config.head_dim, config.max_seq_len)(40)
    x = torch.randn(2, 40, config.d_model, requires_grad=True)
    cu_seqlens, max_seqlen = packed_rows()
    (masked, masked_grad), (varlen, varlen_grad) = outputs_and_input_grads(
        attn, (M.sdpa_attention, M.varlen_attention), x, rope, cu_seqlens, max_seqlen)
    assert (varlen - masked).abs().max() < 2e-2 * masked.abs().max()  # bf16 inside the kernel
    assert (varlen_grad - masked_grad).norm() < 2e-2 * masked_grad.norm()
    whole_rows = attn(x, rope)  # without cu_seqlens every row is one causal sequence
    attn.attend = M.sdpa_attention
    assert (whole_rows - attn(x, rope)).abs().max() < 2e-2 * masked.abs().max()


def test_attention_kernel_choice(monkeypatch):
    """auto: flash-attn, else torch's varlen_attn, else efficient SDPA; the CPU always runs the frozen path."""
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    for flash, varlen, expected in ((True, True, M.flash_attention), (False, True, M.varlen_attention),
                                    (False, False, M.efficient_sdpa_attention)):
        monkeypatch.setattr(M, 'flash_available', lambda flash=flash: flash)
        monkeypatch.setattr(M, 'varlen_available', lambda varlen=varlen: varlen)
        for name in ('fa4_available', 'cudnn_available', 'flex_available'):  # chosen by name only: never 'auto'
            monkeypatch.setattr(M, name, lambda: False)
        assert M.attention_kernel('cuda:0') is expected
        assert M.attention_kernel('cpu') is M.sdpa_attention
    assert M.attention_kernel('cuda', 'sdpa') is M.efficient_sdpa_attention
    with pytest.raises(SystemExit, match="attention='varlen' is not available here .*available: sdpa"):
        M.attention_kernel('cuda', 'varlen')
    with pytest.raises(SystemExit, match="attention must be 'auto' or one of flash_attn, varlen, sdpa, fa4, cudnn, flex, got"):
        M.attention_kernel('cpu', 'flash')


def test_flash_attn_without_its_fa2_functions_is_not_available(monkeypatch):
    """flash-attn-4 installs only flash_attn.cute: `import flash_attn` works, flash_attn_varlen_func does not."""
    import sys
    import types
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setitem(sys.modules, 'flash_attn', types.ModuleType('flash_attn'))
    assert not M.flash_available()
    fa2 = types.ModuleType('flash_attn')
    fa2.flash_attn_func = fa2.flash_attn_varlen_func = lambda *args, **kwargs: None
    monkeypatch.setitem(sys.modules, 'flash_attn', fa2)
    assert M.flash_available()


def test_mfu_count_and_what_it_leaves_out():
    config = M.ModelConfig()
    block_params = (597_153_888 - 151_669 * 1024) / 28
    extra = M.recompute_flops_per_token(config, 4096, 8)
    assert extra == 8 * (2 * block_params + 2 * 1024 * 4096) + 2 * 1024 * 151_669
    # 8 recomputed blocks 7.5% and the loss chunks' second head forward 7.2% of the 4.29 GFLOP counted
    assert round(100 * extra / M.flops_per_token(config), 1) == 14.7


WRAP_ERRORS = [  # wrap_model's settings -> the one line it stops with
    ({'lean_mix': True}, "lean_mix=True rewrites the fused kernels' PolyGLU backward: set fused=True too"),
    ({'recompute_blocks': 3}, 'recompute_blocks must be -1 (all), 0 (none) or 1..2, got 3'),
    ({'selective_checkpointing': True}, 'selective_checkpointing=True chooses what the recomputed blocks keep'),
    ({'segment_pooling': True, 'recompute_blocks': 1}, 'segment_pooling=True is for evaluation, which runs without'),
    ({'segment_pooling': True, 'compile_blocks': True}, 'segment_pooling=True is for evaluation, which runs without'),
]


@pytest.mark.parametrize('wrapping, line', WRAP_ERRORS)
def test_wrap_model_refuses_a_combination_in_one_line(config, wrapping, line):
    with pytest.raises(SystemExit, match=re.escape(f'error: {line}')):
        M.create_model(config, **wrapping)


def test_segment_pooling_on_the_fused_kernels_is_exact_whatever_was_wrapped_before(config):
    """Packed requests are computed as if each ran alone, also on the fused kernels; wrap_model starts from the plain
    model, so an earlier wrapping (recomputation, segment pooling then fused) changes nothing, and rewrapping
    without segment pooling gives the frozen whole-row mean back."""
    torch.manual_seed(0)
    model = M.create_model(config, recompute_blocks=1).eval()
    with torch.no_grad():
        for block in model.model_core:  # routing that depends on the gate's input
            block.ffn.alpha.normal_()
            block.ffn.gate_net[2].weight.normal_()
    sequences = [[1, 2, 3, 4, 5], [7, 8, 9, 10, 11, 12, 13]]

    def packed_minus_alone():
        with torch.no_grad():
            packed = M.packed_hidden_states(model, sequences)[0]
            alone = torch.cat([M.packed_hidden_states(model, [s])[0] for s in sequences])
        return (packed - alone).abs().max().item()
    M.wrap_model(model, segment_pooling=True)
    M.wrap_model(model, fused=True, segment_pooling=True)
    assert model.wrapping['recompute_blocks'] == 0 and packed_minus_alone() < 1e-5
    assert all(type(block.ffn.forward) is functools.partial for block in model.model_core)
    M.wrap_model(model, fused=True)
    assert packed_minus_alone() > 1e-3  # one gate mean over both requests
    M.wrap_model(model)
    assert all('forward' not in m.__dict__ for m in model.modules()) and model.wrapping == M.WRAPPING
