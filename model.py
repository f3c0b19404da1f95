"""
PolychromaticLM: a ~600M decoder-only transformer whose FFN layers use PolyGLU (per-neuron routing over ReLU, Tanh,
SiLU and GELU), and what a state dict and a forward pass need. It imports none of the project's other files.

Where things go (docs/tests.md, "Where code lives"): model.py holds what a state dict and a forward pass need, in this
order; utils.py holds the file, process and network code that two or more stages share (checkpoint files, loaders,
engines, logs); a stage's own machinery stays in its script.

  1. The frozen architecture: ModelConfig, RMSNorm, RoPE, GQA, PolyGLU, SwiGLU, TransformerBlock, PolychromaticLM.
     Class and parameter names, shapes, init and forward math are the author's (docs/SPEC.md; the published
     checkpoints depend on them), pinned by tests/test_model.py: wrap them, never edit them.
  2. How they compute: the attention kernels, the compiled elementwise kernels, segment pooling, whole-block
     compilation and recomputation, each a per-instance patch that wrap_model alone applies, in one fixed order.
  3. The training loss: the tied head in checkpointed chunks, or fused by liger-kernel.
  4. The model's numbers: parameters, FLOPs a token, routing entropy, AdamW's groups.
  5. A model from a state dict: its config read off the shapes, every shape checked (utils.load_checkpoint reads the
     file).
  6. Generation: exact (a full forward a token) and cached (approximate), continuous batching.
"""
import collections
import contextlib
import inspect
import math
from dataclasses import asdict, dataclass, fields
from functools import lru_cache, partial
from types import MethodType

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import (CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts,
                                     noop_context_fn)

EOS_ID = 151_643  # <|endoftext|>, the document separator of the Qwen3 tokenizer
ACTIVATION_NAMES = ('relu', 'tanh', 'silu', 'gelu')
ACTIVATIONS = (F.relu, torch.tanh, F.silu, F.gelu)


@dataclass
class ModelConfig:
    vocab_size: int = 151_669
    d_model: int = 1024
    n_layers: int = 28
    n_heads: int = 16
    n_kv_heads: int = 8
    d_ff: int = 4096
    max_seq_len: int = 4096
    rope_theta: float = 10_000.0
    n_activations: int = 4
    model_type: str = 'polyglu'  # 'polyglu' | 'vanilla' (SwiGLU baseline, VanillaLM)
    gate_hidden: int = 32        # width of PolyGLU's gate network
    norm_eps: float = 1e-6

    @property
    def head_dim(self):
        return self.d_model // self.n_heads

    def __post_init__(self):
        if self.model_type not in ('polyglu', 'vanilla'):
            raise SystemExit(f"error: model_type must be 'polyglu' or 'vanilla', got {self.model_type!r}")
        if self.d_model % self.n_heads or self.n_heads % self.n_kv_heads:
            raise SystemExit(f"error: d_model ({self.d_model}) must divide into n_heads ({self.n_heads}) heads, "
                             f"and n_heads into n_kv_heads ({self.n_kv_heads}) groups")
        if self.n_activations != len(ACTIVATIONS):
            raise SystemExit(f"error: n_activations must be {len(ACTIVATIONS)} ({', '.join(ACTIVATION_NAMES)})")

# =============================================================================
# 1. The frozen architecture
# =============================================================================

class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.gama = nn.Parameter(torch.ones(dim))  # (sic) the author's name, which the published checkpoints use

    def forward(self, x):
        # normalise in float32: bf16 sums of squares over 1024 features lose too much precision
        normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.gama


class RoPE(nn.Module):
    """Rotary positions (rotate-half convention, as Qwen3). No parameters. The tables `cosines` and `sins`
    [max_seq_len, head_dim / 2] are persistent buffers because the author's checkpoints hold them."""

    def __init__(self, head_dim, max_seq_len, theta=10_000.0):
        super().__init__()
        self.max_seq_len = max_seq_len
        inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), inv_freq)  # [max_seq_len, head_dim/2]
        self.register_buffer('cosines', angles.cos())
        self.register_buffer('sins', angles.sin())

    def forward(self, seq_len):
        if seq_len > self.max_seq_len:
            raise ValueError(f"sequence of {seq_len} tokens is longer than max_seq_len={self.max_seq_len}")
        return self.cosines[:seq_len], self.sins[:seq_len]

    @staticmethod
    def rotate(x, cos, sin):
        # x: [B, T, H, D]; cos, sin: [T, D/2]. The first half of the features pairs with the second.
        cos, sin = cos[:, None, :].to(x.dtype), sin[:, None, :].to(x.dtype)
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def document_mask(cu_seqlens, B, T, device):
    """[B, T, T]: query i may attend key j when j <= i and both lie in one document (cu_seqlens: see sdpa_attention)."""
    positions = torch.arange(B * T, device=device)
    doc = torch.searchsorted(cu_seqlens[1:].to(positions.dtype), positions, right=True).view(B, T)
    return (doc[:, :, None] == doc[:, None, :]) & torch.ones(T, T, dtype=torch.bool, device=device).tril()


def sdpa_attention(q, k, v, cu_seqlens=None, max_seqlen=None):
    """Causal attention with PyTorch SDPA; with cu_seqlens, a block-diagonal causal mask so that no token
    attends across a document boundary. q: [B, T, H, D], k/v: [B, T, H_kv, D] -> [B, T, H, D].
    cu_seqlens index the flattened B*T tokens, and every row start is a boundary (see cu_seqlens_from_eos)."""
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    if cu_seqlens is None:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    else:
        mask = document_mask(cu_seqlens, q.shape[0], q.shape[2], q.device)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None], enable_gqa=True)
    return out.transpose(1, 2)


class GQA(nn.Module):
    """Grouped-query attention with QK-norm and RoPE. `self.attend` is the attention kernel; the flash patch
    swaps it per instance (see set_attention_kernel), the projections and their math stay as they are."""

    def __init__(self, config):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        self.W_q = nn.Linear(config.d_model, config.n_heads * self.head_dim, bias=False)
        self.W_k = nn.Linear(config.d_model, config.n_kv_heads * self.head_dim, bias=False)
        self.W_v = nn.Linear(config.d_model, config.n_kv_heads * self.head_dim, bias=False)
        self.W_o = nn.Linear(config.n_heads * self.head_dim, config.d_model, bias=False)
        self.rmsnorm_q = RMSNorm(self.head_dim, config.norm_eps)
        self.rmsnorm_k = RMSNorm(self.head_dim, config.norm_eps)
        self.attend = sdpa_attention

    def forward(self, x, rope, cu_seqlens=None, max_seqlen=None):
        B, T, _ = x.shape
        cos, sin = rope
        q = RoPE.rotate(self.rmsnorm_q(self.W_q(x).view(B, T, self.n_heads, self.head_dim)), cos, sin)
        k = RoPE.rotate(self.rmsnorm_k(self.W_k(x).view(B, T, self.n_kv_heads, self.head_dim)), cos, sin)
        v = self.W_v(x).view(B, T, self.n_kv_heads, self.head_dim)
        out = self.attend(q, k, v, cu_seqlens, max_seqlen)
        return self.W_o(out.reshape(B, T, -1))


def sequence_mean(x, cu_seqlens=None):
    """The frozen PolyGLU pooling: the mean over the whole row, [B, T, C] -> [B, 1, C]. It ignores document
    boundaries on purpose (SPEC.md: in pre-training the row is the sequence)."""
    return x.mean(dim=1, keepdim=True)


class PolyGLU(nn.Module):
    """SwiGLU with state-conditional activation routing: every neuron mixes K activations (ReLU, Tanh, SiLU,
    GELU) with weights g = GumbelSoftmax(alpha + beta * f(mean_t h), tau), one choice per sequence and neuron.
    Train mode samples Gumbel noise; eval mode is deterministic, softmax((alpha + beta * f) / tau)."""

    def __init__(self, config):
        super().__init__()
        K = config.n_activations
        self.W_gate = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.W_up = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.W_down = nn.Linear(config.d_ff, config.d_model, bias=False)
        self.alpha = nn.Parameter(torch.zeros(config.d_ff, K))  # static preference; zeros = uniform routing
        self.beta = nn.Parameter(torch.ones(K))
        self.gate_net = nn.Sequential(nn.Linear(config.d_model, config.gate_hidden), nn.ReLU(),
                                      nn.Linear(config.gate_hidden, K))
        self.tau = 1.0
        self.pool = sequence_mean   # a hook: eval.py's cached generation swaps in a running mean
        self.last_logits = None     # routing logits of the last forward, detached, for entropy logging

    def routing_logits(self, pooled):
        # pooled: [B, S, C] -> [B, S, d_ff, K]; in float32 because tau = 0.1 sharpens bf16 rounding tenfold
        return self.alpha.float() + self.beta.float() * self.gate_net(pooled).float()[..., None, :]

    def routing_weights(self, logits):
        if self.training:
            return F.gumbel_softmax(logits, tau=self.tau, hard=False, dim=-1)
        return torch.softmax(logits / self.tau, dim=-1)

    def forward(self, x, cu_seqlens=None):
        logits = self.routing_logits(self.pool(x, cu_seqlens))  # [B, 1, d_ff, K] (or [B, T, d_ff, K])
        self.last_logits = logits.detach()
        g = self.routing_weights(logits).to(x.dtype)
        gate = self.W_gate(x)
        mixed = sum(g[..., k] * act(gate) for k, act in enumerate(ACTIVATIONS))
        return self.W_down(mixed * self.W_up(x))


class SwiGLU(nn.Module):
    """The VanillaLM FFN: the same three matrices as PolyGLU, SiLU only, no routing."""

    def __init__(self, config):
        super().__init__()
        self.W_gate = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.W_up = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.W_down = nn.Linear(config.d_ff, config.d_model, bias=False)

    def forward(self, x, cu_seqlens=None):
        return self.W_down(F.silu(self.W_gate(x)) * self.W_up(x))


class TransformerBlock(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.rmsnorm_1 = RMSNorm(config.d_model, config.norm_eps)
        self.gqa = GQA(config)
        self.rmsnorm_2 = RMSNorm(config.d_model, config.norm_eps)
        if config.model_type == 'polyglu':
            self.polyglu = PolyGLU(config)
        else:
            self.swiglu = SwiGLU(config)

    @property
    def ffn(self):
        """The feed-forward module, PolyGLU or (VanillaLM) SwiGLU."""
        return self._modules.get('polyglu') or self._modules['swiglu']

    def forward(self, x, rope, cu_seqlens=None, max_seqlen=None):
        x = x + self.gqa(self.rmsnorm_1(x), rope, cu_seqlens, max_seqlen)
        return x + self.ffn(self.rmsnorm_2(x), cu_seqlens)


class PolychromaticLM(nn.Module):
    """embedding -> n_layers blocks -> RMSNorm -> head tied to the embedding. With model_type='vanilla'
    this is VanillaLM, the SwiGLU baseline."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.embeddings = nn.Embedding(config.vocab_size, config.d_model)
        self.model_core = nn.ModuleList(TransformerBlock(config) for _ in range(config.n_layers))
        self.rmsnorm = RMSNorm(config.d_model, config.norm_eps)
        self.rope = RoPE(config.head_dim, config.max_seq_len, config.rope_theta)
        self.apply(self._init_weights)
        # residual-branch outputs: scaled so the residual stream's variance does not grow with depth
        for block in self.model_core:
            for proj in (block.gqa.W_o, block.ffn.W_down):
                proj.weight.data.mul_(1.0 / math.sqrt(2 * config.n_layers))
        # tied after the init, so the shared matrix is drawn once; the state dict holds it under both names
        self.output_head = nn.Linear(config.d_model, config.vocab_size, bias=False, device='meta')
        self.output_head.weight = self.embeddings.weight

    @staticmethod
    def _init_weights(module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def hidden_states(self, idx, cu_seqlens=None, max_seqlen=None):
        """Final normalised hidden states [B, T, d_model]; the head is applied by forward or, in chunks,
        by the training loss (the full [B*T, vocab] logits need not exist)."""
        x = self.embeddings(idx)
        rope = self.rope(idx.shape[1])
        for block in self.model_core:
            x = block(x, rope, cu_seqlens, max_seqlen)
        return self.rmsnorm(x)

    def forward(self, idx, cu_seqlens=None, max_seqlen=None):
        return self.output_head(self.hidden_states(idx, cu_seqlens, max_seqlen))

    @property
    def tau(self):
        polyglus = [m for m in self.modules() if isinstance(m, PolyGLU)]
        return polyglus[0].tau if polyglus else None

    def set_tau(self, tau):
        for m in self.modules():
            if isinstance(m, PolyGLU):
                m.tau = float(tau)

    def update_tau(self, step, total_steps, tau_start=1.0, tau_end=0.1):
        """Linear Gumbel-temperature anneal from tau_start to tau_end over total_steps, clamped at tau_end."""
        tau = max(tau_end, tau_start - (tau_start - tau_end) * step / max(1, total_steps))
        self.set_tau(tau)
        return tau

# =============================================================================
# 2. How the frozen classes compute: the patches wrap_model applies
# =============================================================================
# wrap_model's patches last the model's life. The frozen classes' hook points (GQA.attend, PolyGLU.pool and
# PolyGLU.routing_weights) also serve context managers for a single pass (generation's hooked, eval.py's
# gumbel_routing), which put back what they found.

def cu_seqlens_from_eos(tokens, eos_id=EOS_ID):
    """Document boundaries of a packed batch [B, T] as cumulative lengths over the flattened B*T tokens
    (int32, as flash_attn_varlen_func wants). A document ends with its EOS; every row starts a document.
    Returns (cu_seqlens, max_seqlen)."""
    B, T = tokens.shape
    starts = torch.zeros(B, T, dtype=torch.bool, device=tokens.device)
    starts[:, 0] = True
    starts[:, 1:] = tokens[:, :-1] == eos_id
    boundaries = torch.cat([starts.flatten().nonzero().squeeze(1),
                            torch.tensor([B * T], device=tokens.device)])
    cu_seqlens = boundaries.to(torch.int32)
    max_seqlen = int((boundaries[1:] - boundaries[:-1]).max())
    return cu_seqlens, max_seqlen


def flash_attention(q, k, v, cu_seqlens=None, max_seqlen=None):
    """The same contract as sdpa_attention, on flash-attn 2 (bf16/fp16 on CUDA only). GQA is native."""
    from flash_attn import flash_attn_func, flash_attn_varlen_func
    out_dtype = v.dtype
    if q.dtype not in (torch.float16, torch.bfloat16):  # autocast leaves the QK-normed q/k in float32
        q, k, v = (t.to(torch.bfloat16) for t in (q, k, v))
    if cu_seqlens is None:
        return flash_attn_func(q, k, v, causal=True).to(out_dtype)
    B, T, H, D = q.shape
    out = flash_attn_varlen_func(q.reshape(B * T, H, D), k.reshape(B * T, -1, D), v.reshape(B * T, -1, D),
                                 cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, causal=True)
    return out.view(B, T, H, D).to(out_dtype)


document_bias_cache = []  # [(cu_seqlens, bias)]: the last batch's bias, shared by all its layers


def document_bias(cu_seqlens, B, T, dtype, device):
    """The block-diagonal causal mask of sdpa_attention as an additive bias [B, 1, T, T] (0 or -inf), built once per
    batch: every layer (and a checkpointed block's recompute) gets the same tensor, so the backward keeps one copy
    (0.5 GB at 16 x 4,096 in bf16), not one per layer."""
    if document_bias_cache and document_bias_cache[0][0] is cu_seqlens and document_bias_cache[0][1].dtype == dtype:
        return document_bias_cache[0][1]
    allowed = document_mask(cu_seqlens, B, T, device)[:, None]
    bias = torch.zeros(B, 1, T, T, dtype=dtype, device=device).masked_fill_(~allowed, float('-inf'))
    document_bias_cache[:] = [(cu_seqlens, bias)]
    return bias


def efficient_sdpa_attention(q, k, v, cu_seqlens=None, max_seqlen=None, backends=('EFFICIENT_ATTENTION',
                                                                              'CUDNN_ATTENTION')):
    """sdpa_attention's math for CUDA without flash-attn. With a mask and grouped KV heads, SDPA falls back to its math
    kernel, which materialises the [B, H, T, T] scores (17 GB a layer in float32 at 16 x 4,096). Repeating the KV
    heads (what enable_gqa means) and passing the document mask as one shared additive bias keeps it on the
    memory-efficient (or cuDNN) kernel. On CUDA those backends are pinned: a shape they refuse fails at once."""
    if cu_seqlens is None:
        return sdpa_attention(q, k, v)  # causal GQA without a mask runs on SDPA's flash kernel
    if q.is_cuda and torch.is_autocast_enabled('cuda'):  # QK-norm leaves q and k in float32 under autocast
        q, k, v = (t.to(torch.get_autocast_dtype('cuda')) for t in (q, k, v))
    B, T, H, _ = q.shape
    k, v = (t.repeat_interleave(H // t.shape[2], dim=2) for t in (k, v))
    bias = document_bias(cu_seqlens, B, T, q.dtype, q.device)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    if not q.is_cuda:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias).transpose(1, 2)
    from torch.nn.attention import SDPBackend, sdpa_kernel
    try:
        with sdpa_kernel([getattr(SDPBackend, name) for name in backends]):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=bias).transpose(1, 2)
    except RuntimeError as e:
        if 'No available kernel' not in str(e):
            raise
        raise SystemExit(f"error: no memory-efficient attention kernel for q {tuple(q.shape)} {q.dtype} "
                         f"({str(e).splitlines()[0][:120]}); install flash-attn (requirements-gpu.txt)")


def flash_available():
    """flash-attn 2 with its varlen kernel on a CUDA machine. A bare `import flash_attn` is not enough: flash-attn-4
    installs only flash_attn.cute, and the namespace package imports without the FA2 functions."""
    if not torch.cuda.is_available():
        return False
    try:
        from flash_attn import flash_attn_func, flash_attn_varlen_func  # noqa: F401
    except ImportError:
        return False
    return True


def varlen_available():
    """PyTorch's own FlashAttention-2 (torch.nn.attention.varlen, torch >= 2.10, no build) on an sm80+ card."""
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 0):
        return False
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return False
    return True


@lru_cache(maxsize=None)
def varlen_arguments(varlen_attn):
    """Causal attention and grouped KV heads in this torch's varlen_attn, read off its signature. torch 2.10 took
    is_causal=True; from 2.11 causal is window_size=(-1, 0), which varlen_attn compares with `==`, so it must be a
    tuple (a list [-1, 0] silently gives non-causal attention); enable_gqa appeared in 2.12, and before it the FA2
    kernel takes the fewer KV heads as they are."""
    parameters = inspect.signature(varlen_attn).parameters
    arguments = {'window_size': (-1, 0)} if 'window_size' in parameters else {'is_causal': True}
    if 'enable_gqa' in parameters:
        arguments['enable_gqa'] = True
    return tuple(arguments.items())


def varlen_attention(q, k, v, cu_seqlens=None, max_seqlen=None):
    """The same contract as sdpa_attention on torch.nn.attention.varlen.varlen_attn: FlashAttention-2 shipped inside
    torch (CUDA sm80+, bf16/fp16), documents given by cu_seqlens, no [T, T] mask. Without cu_seqlens every row is
    one sequence."""
    from torch.nn.attention.varlen import varlen_attn
    B, T, H, D = q.shape
    if cu_seqlens is None:
        cu_seqlens, max_seqlen = torch.arange(0, (B + 1) * T, T, dtype=torch.int32, device=q.device), T
    out_dtype = v.dtype
    if q.dtype not in (torch.float16, torch.bfloat16):  # autocast leaves the QK-normed q/k in float32
        q, k, v = (t.to(torch.bfloat16) for t in (q, k, v))
    cu_seqlens = cu_seqlens.to(torch.int32)
    out = varlen_attn(q.reshape(B * T, H, D), k.reshape(B * T, -1, D), v.reshape(B * T, -1, D), cu_seqlens,
                      cu_seqlens, int(max_seqlen), int(max_seqlen), **dict(varlen_arguments(varlen_attn)))
    return out.view(B, T, H, D).to(out_dtype)


def fa4_attention(q, k, v, cu_seqlens=None, max_seqlen=None):
    """varlen_attention on FlashAttention-4 (sm90/sm100): torch's registration, activate_flash_attention_impl('FA4'),
    puts flash-attn-4's flash_attn.cute (JIT-compiled by the CuTe DSL, no nvcc) under varlen_attn. It is process-wide:
    attention_kernel switches it on for this kernel and off for the others (use_fa4)."""
    return varlen_attention(q, k, v, cu_seqlens, max_seqlen)


def fa4_available():
    import importlib.util
    import torch.nn.attention as attention
    return (varlen_available() and torch.cuda.get_device_capability()[0] in (9, 10)
            and 'FA4' in getattr(attention, 'list_flash_attention_impls', list)()
            and importlib.util.find_spec('flash_attn') is not None and importlib.util.find_spec('flash_attn.cute') is not None)


def use_fa4(on):
    import torch.nn.attention as attention
    current = getattr(attention, 'current_flash_attention_impl', lambda: None)()
    if on and current != 'FA4':
        attention.activate_flash_attention_impl('FA4')
    elif not on and current == 'FA4':
        attention.restore_flash_attention_impl()


def cudnn_attention(q, k, v, cu_seqlens=None, max_seqlen=None):
    """efficient_sdpa_attention on SDPA's cuDNN backend alone (cuDNN's fused attention, tuned for Hopper): the same
    dense document bias, every T x T score computed."""
    return efficient_sdpa_attention(q, k, v, cu_seqlens, max_seqlen, backends=('CUDNN_ATTENTION',))


flex_masks = []  # [(cu_seqlens, BlockMask)]: the last batch's, shared by all its layers


def flex_attention(q, k, v, cu_seqlens=None, max_seqlen=None):
    """The same contract as sdpa_attention on torch's FlexAttention (compiled to a Triton kernel on CUDA) with a
    document BlockMask: blocks of 128 x 128 scores that no query may see (another document, the future) are skipped,
    not computed and masked, and no [T, T] tensor exists. The mask is built once a batch. The CPU runs it unfused and
    forward only (a test of its masking)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention as flex
    B, T, H, D = q.shape
    if cu_seqlens is None:
        cu_seqlens = torch.arange(0, (B + 1) * T, T, dtype=torch.int32, device=q.device)
    if not flex_masks or flex_masks[0][0] is not cu_seqlens:
        positions = torch.arange(B * T, device=q.device)
        documents = torch.searchsorted(cu_seqlens[1:].long(), positions, right=True).view(B, T)

        def same_document_causal(b, h, q_index, kv_index):
            return (documents[b, q_index] == documents[b, kv_index]) & (q_index >= kv_index)
        flex_masks[:] = [(cu_seqlens, create_block_mask(same_document_causal, B, None, T, T, device=q.device))]
    if q.is_cuda and torch.is_autocast_enabled('cuda'):  # QK-norm leaves q and k in float32 under autocast
        q, k, v = (t.to(torch.get_autocast_dtype('cuda')) for t in (q, k, v))
    attend = compiled(flex) if q.is_cuda else flex
    out = attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=flex_masks[0][1], enable_gqa=True)
    return out.transpose(1, 2)


def flex_available():
    try:
        from torch.nn.attention.flex_attention import flex_attention  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 0)


def cudnn_available():
    return (torch.cuda.is_available() and torch.backends.cudnn.is_available()
            and torch.cuda.get_device_capability() >= (8, 0))


# attention='auto' takes the first that is available on CUDA; on the CPU the frozen SDPA path always runs. 'fa4',
# 'cudnn' and 'flex' are chosen by name only: no GPU has measured them yet (docs/gpu.md, "Speed levers").
ATTENTION_KERNELS = {'flash_attn': flash_attention, 'varlen': varlen_attention, 'sdpa': efficient_sdpa_attention,
                     'fa4': fa4_attention, 'cudnn': cudnn_attention, 'flex': flex_attention}


def available_attention():
    """The CUDA attention kernels this machine can run, in the order attention='auto' prefers them."""
    checks = {'flash_attn': flash_available, 'varlen': varlen_available, 'sdpa': torch.cuda.is_available,
              'fa4': fa4_available, 'cudnn': cudnn_available, 'flex': flex_available}
    return [name for name in ATTENTION_KERNELS if checks[name]()]


def attention_kernel(device, attention='auto'):
    """The attention function for a device and an `attention` setting ('auto' | 'flash_attn' | 'varlen' | 'sdpa'),
    chosen once: flash-attn if it is installed, else torch's varlen_attn on sm80+, else SDPA's memory-efficient kernel
    with a dense document bias (every T x T score computed; docs/benchmarks.md times them). The CPU runs the frozen path."""
    if attention not in ('auto', *ATTENTION_KERNELS):
        raise SystemExit(f"error: attention must be 'auto' or one of {', '.join(ATTENTION_KERNELS)}, got {attention!r}")
    if not str(device).startswith('cuda'):
        return sdpa_attention
    available = available_attention()
    if attention == 'auto':
        attention = available[0]
    if attention not in available:
        hint = {'flash_attn': 'install flash-attn (requirements-gpu.txt)',
                'varlen': 'it needs torch >= 2.10 and an sm80+ card (A100, H100)',
                'fa4': 'it needs `pip install flash-attn-4`, torch >= 2.13 and an sm90/sm100 card (H100, B200)',
                'cudnn': 'it needs cuDNN and an sm80+ card', 'flex': 'it needs torch >= 2.5 and an sm80+ card'
                }.get(attention, '')
        raise SystemExit(f"error: attention={attention!r} is not available here ({hint}); available: "
                         f"{', '.join(available)}, or attention='auto'")
    use_fa4(attention == 'fa4')
    return ATTENTION_KERNELS[attention]


def attention_name(model):
    """The name of the kernel a model's attention runs on, for the banners."""
    attend = model.model_core[0].gqa.attend
    attend = getattr(attend, 'kernel', attend)  # under compile_blocks, the kernel inside its graph break
    return next((name for name, kernel in ATTENTION_KERNELS.items() if kernel is attend),
                getattr(attend, '__name__', str(attend)))


def set_attention_kernel(model, kernel):
    """Route every GQA of the model through an attention kernel of sdpa_attention's contract (flash_attention,
    varlen_attention, efficient_sdpa_attention); the frozen GQA is untouched (its `attend` is swapped per instance)."""
    for m in model.modules():
        if isinstance(m, GQA):
            m.attend = kernel
    return model


def rms_norm(x, weight, eps):
    """RMSNorm.forward's math as a plain function, for the compiler."""
    normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)
    return normed.type_as(x) * weight


def polyglu_mix(gate, up, g):
    """[sum_k g_k * act_k(gate)] * up: PolyGLU.forward's mix, the same expression as a function of tensors, for the
    compiler. Its backward, polyglu_mix_backward, is checked against autograd through this function."""
    return sum(g[..., k] * act(gate) for k, act in enumerate(ACTIVATIONS)) * up


def activations_and_slopes(x):
    """The K activations of x (float32) and their derivatives: relu' = [x > 0], tanh' = 1 - tanh^2,
    silu' = s (1 + x (1 - s)) with s = sigmoid(x), gelu' = Phi(x) + x phi(x). -> two tuples of K tensors."""
    tanh, sigmoid = torch.tanh(x), torch.sigmoid(x)
    cdf = 0.5 * (1.0 + torch.erf(x * 0.7071067811865476))
    pdf = torch.exp(-0.5 * x * x) * 0.3989422804014327
    return ((F.relu(x), tanh, x * sigmoid, x * cdf),
            ((x > 0).float(), 1.0 - tanh * tanh, sigmoid * (1.0 + x * (1.0 - sigmoid)), cdf + x * pdf))


def polyglu_mix_backward(gate, up, g, grad_h, stacked=True):
    """The backward of h = polyglu_mix(gate, up, g) -> (h, grad_gate, grad_up, grad_g), recomputing h (for W_down's
    gradient) instead of keeping it, with the derivatives in float32 (activations_and_slopes); tests check it against
    autograd through polyglu_mix. stacked: the K terms as [..., K] tensors, so that grad_g is one reduction over the
    tokens; unstacked (polyglu_mix_backward_lean), K reductions and no [tokens, d_ff, K] float32 tensor, the same
    operations in the same order."""
    x, u, dh, w = gate.float(), up.float(), grad_h.float(), g.float()
    acts, slopes = activations_and_slopes(x)
    if stacked:
        acts, slopes = torch.stack(acts, dim=-1), torch.stack(slopes, dim=-1)
        mix, slope = (w * acts).sum(-1), (w * slopes).sum(-1)
        grad_g = ((dh * u)[..., None] * acts).sum_to_size(w.shape)
    else:
        weights = w.unbind(-1)
        mix = weights[0] * acts[0] + weights[1] * acts[1] + weights[2] * acts[2] + weights[3] * acts[3]
        slope = weights[0] * slopes[0] + weights[1] * slopes[1] + weights[2] * slopes[2] + weights[3] * slopes[3]
        dh_u = dh * u
        grad_g = torch.stack([(dh_u * act).sum_to_size(weights[0].shape) for act in acts], dim=-1)
    return ((mix * u).to(grad_h.dtype), (dh * u * slope).to(gate.dtype), (dh * mix).to(up.dtype),
            grad_g.to(g.dtype))


def polyglu_mix_backward_lean(gate, up, g, grad_h):
    """lean_mix=True's backward: polyglu_mix_backward unstacked (a function of its own, compiled on its own)."""
    return polyglu_mix_backward(gate, up, g, grad_h, stacked=False)


def swiglu_mix(gate, up, g=None):
    return F.silu(gate) * up


def swiglu_mix_backward(gate, up, g, grad_h):
    x, u, dh = gate.float(), up.float(), grad_h.float()
    sigmoid = torch.sigmoid(x)
    silu = x * sigmoid
    return ((silu * u).to(grad_h.dtype), (dh * u * sigmoid * (1.0 + x * (1.0 - sigmoid))).to(gate.dtype),
            (dh * silu).to(up.dtype), None)


compiled_functions = {}


def compiled(function):
    # static shapes, the fastest kernels: each shape, dtype and grad mode compiles once (a training run sees ~10: the
    # norms over d_model and over head_dim, train and eval). Past the recompile limit (default 8) a call silently runs
    # eager, float32 copies and all, so the limit is raised. Inside a compiled block the function is traced as it is: a
    # lookup in this dict would put a guard on its length into every block's graph, and each new entry would recompile.
    if torch.compiler.is_compiling():
        return function
    if function not in compiled_functions:
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        compiled_functions[function] = torch.compile(function, dynamic=False)
    return compiled_functions[function]


class FusedGLUDown(torch.autograd.Function):
    """W_down(mix(gate, g) * up) that keeps gate, up and g for the backward but not the [tokens, d_ff] product
    (8 KiB a token a layer in bf16): the backward recomputes it inside its compiled elementwise function, which
    also yields the gradients of gate, up and g. Forward and backward elementwise work are one compiled function
    each (1 and 4 kernels on CPU); the matmuls are the usual ones. mix is polyglu_mix or swiglu_mix (g None)."""

    @staticmethod
    @torch.amp.custom_fwd(device_type='cuda')
    def forward(ctx, gate, up, g, weight, mix, mix_backward):
        ctx.save_for_backward(gate, up, g, weight)
        ctx.mix_backward = mix_backward
        return F.linear(compiled(mix)(gate, up, g), weight)

    @staticmethod
    @torch.amp.custom_bwd(device_type='cuda')
    def backward(ctx, grad_out):
        gate, up, g, weight = ctx.saved_tensors
        grad_h = grad_out @ weight.to(grad_out.dtype)
        h, grad_gate, grad_up, grad_g = compiled(ctx.mix_backward)(gate, up, g, grad_h)
        grad_weight = grad_out.reshape(-1, grad_out.shape[-1]).T @ h.reshape(-1, h.shape[-1])
        return grad_gate, grad_up, grad_g, grad_weight.to(weight.dtype), None, None


def fused_norm_forward(norm, x):
    return compiled(rms_norm)(x, norm.gama, norm.eps)


def fused_polyglu_forward(ffn, x, cu_seqlens=None, mix_backward=polyglu_mix_backward):
    """PolyGLU.forward with the four activations, their routed mix and the product with the up projection as one
    compiled function forward and one backward (FusedGLUDown). The routing (and its Gumbel noise) runs as in the frozen
    forward, uncompiled, so the same seed draws the same noise."""
    logits = ffn.routing_logits(ffn.pool(x, cu_seqlens))
    ffn.last_logits = logits.detach()
    g = ffn.routing_weights(logits).to(x.dtype)
    return FusedGLUDown.apply(ffn.W_gate(x), ffn.W_up(x), g, ffn.W_down.weight, polyglu_mix, mix_backward)


def lean_polyglu_forward(ffn, x, cu_seqlens=None):
    return fused_polyglu_forward(ffn, x, cu_seqlens, polyglu_mix_backward_lean)


def fused_swiglu_forward(ffn, x, cu_seqlens=None):
    return FusedGLUDown.apply(ffn.W_gate(x), ffn.W_up(x), None, ffn.W_down.weight, swiglu_mix, swiglu_mix_backward)


def enable_fused_kernels(model, lean_mix=False):
    """torch.compile the elementwise work of every block, PolyGLU's mix (VanillaLM's SiLU product, for a fair
    baseline) and the RMSNorms, as per-instance patches like the flash patch: the frozen classes are untouched
    and tests compare the result with them. Each patch is the same function bound to each module (MethodType), so a
    compiled block sees one function whatever the block (Dynamo guards on the function: a new object per block would
    compile every block again; tests/test_levers.py counts the graphs). What a block keeps for its backward shrinks by
    two thirds (docs/benchmarks.md)."""
    forwards = {RMSNorm: fused_norm_forward, PolyGLU: lean_polyglu_forward if lean_mix else fused_polyglu_forward,
                SwiGLU: fused_swiglu_forward}
    for m in model.modules():
        if type(m) in forwards:
            m.forward = MethodType(forwards[type(m)], m)
    return model


def enable_gradient_checkpointing(model, blocks=-1, selective=False):
    """Recompute the activations of the first `blocks` blocks (-1: all) in the backward pass: each keeps only its
    input (2 KiB a token) for ~1/3 more compute of its own. selective: keep what the matmuls and attention computed and
    recompute only the elementwise work (torch's selective activation checkpointing, SAVED_OPS), a little more memory
    for much less compute again. Wraps each block's forward in place so the parameter names stay the frozen ones."""
    context = partial(create_selective_checkpoint_contexts, keep_matmuls) if selective else noop_context_fn
    for block in model.model_core[:len(model.model_core) if blocks < 0 else blocks]:
        block.forward = partial(checkpoint, block.forward, use_reentrant=False, context_fn=context)
    return model


SAVED_OPS = {getattr(torch.ops.aten, name).default for name in (
    'mm', 'addmm', 'bmm', '_scaled_dot_product_efficient_attention', '_scaled_dot_product_flash_attention',
    '_scaled_dot_product_cudnn_attention', '_flash_attention_forward', '_efficient_attention_forward',
    '_scaled_dot_product_flash_attention_for_cpu') if hasattr(torch.ops.aten, name)}


def keep_matmuls(ctx, op, *args, **kwargs):
    return CheckpointPolicy.MUST_SAVE if op in SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def enable_block_compilation(model):
    """torch.compile every block's frozen forward whole (compile_blocks=True), so RoPE, the norms, the residuals and the
    FFN's elementwise work fuse across modules. tau and the document boundaries change every step and must not
    recompile: the attention kernel and PolyGLU's routing_weights (tau, and the Gumbel noise drawn as the frozen forward
    draws it) run eagerly in graph breaks, and the boundaries reach the kernel beside the graph (`documents`, set by the
    block's wrapper; a tensor of another length in the graph's arguments would be a guard). One set of graphs for
    training, one for evaluation (tests/test_levers.py counts them)."""
    documents = [None, None]
    for block in model.model_core:
        kernel = block.gqa.attend

        def attend(q, k, v, cu_seqlens=None, max_seqlen=None, kernel=kernel):
            return kernel(q, k, v, *documents)
        block.gqa.attend = torch.compiler.disable(attend)
        block.gqa.attend.kernel = kernel
        if isinstance(block.ffn, PolyGLU):
            block.ffn.routing_weights = torch.compiler.disable(block.ffn.routing_weights)
        compiled_forward = torch.compile(block.forward, dynamic=False)

        def forward(x, rope, cu_seqlens=None, max_seqlen=None, compiled_forward=compiled_forward):
            documents[:] = [cu_seqlens, max_seqlen]
            return compiled_forward(x, rope)
        block.forward = forward
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    return model


# segment pooling: packed requests computed each as if alone (evaluation, generation, analysis)

def segment_attention(q, k, v, cu_seqlens=None, max_seqlen=None):
    """sdpa_attention for one packed row, one causal SDPA call per segment: no [T, T] mask (268 MB at 16K tokens)."""
    if cu_seqlens is None or q.shape[0] != 1:
        return sdpa_attention(q, k, v, cu_seqlens, max_seqlen)
    bounds = segment_bounds(cu_seqlens)
    return torch.cat([sdpa_attention(q[:, a:b], k[:, a:b], v[:, a:b]) for a, b in zip(bounds[:-1], bounds[1:])], 1)


segment_bounds_cache = []  # [cu_seqlens, its Python list]: every layer of one forward asks for the same bounds


def segment_bounds(cu_seqlens):
    """cu_seqlens as a list, once per forward, not once per layer (on a GPU each .tolist() waits for the device)."""
    if not segment_bounds_cache or segment_bounds_cache[0] is not cu_seqlens:
        segment_bounds_cache[:] = [cu_seqlens, cu_seqlens.tolist()]
    return segment_bounds_cache[1]


def segment_forward(frozen_forward, ffn, x, cu_seqlens=None):
    """PolyGLU over a packed row one segment at a time, each routed on its own mean exactly as if it ran alone;
    last_logits holds every segment's, [segments, 1, d_ff, K]. Without cu_seqlens it is the frozen forward."""
    if cu_seqlens is None:
        return frozen_forward(x)
    B, T, C = x.shape
    flat, bounds = x.reshape(1, B * T, C), segment_bounds(cu_seqlens)
    outputs, logits = [], []
    for start, end in zip(bounds[:-1], bounds[1:]):
        outputs.append(frozen_forward(flat[:, start:end]))
        logits.append(ffn.last_logits)
    ffn.last_logits = torch.cat(logits)
    return torch.cat(outputs, dim=1).view(B, T, C)


def packed_hidden_states(model, sequences):
    """Final hidden states of sequences packed into one row, each at RoPE positions 0.. (the row may be longer than
    max_seq_len); wrapped with segment_pooling=True the packed forward computes what separate forwards would.
    -> (hidden [T, d_model], offsets: where each sequence starts, and T at the end)."""
    lengths = [len(s) for s in sequences]
    if max(lengths) > model.config.max_seq_len:
        raise ValueError(f"a packed sequence of {max(lengths)} tokens exceeds max_seq_len={model.config.max_seq_len}")
    device = model.embeddings.weight.device
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    idx = torch.tensor(np.concatenate(sequences), dtype=torch.long, device=device)[None]
    cu_seqlens = torch.tensor(offsets, dtype=torch.int32, device=device)
    flat = torch.arange(idx.shape[1], device=device)
    positions = flat - cu_seqlens[:-1].long()[torch.searchsorted(cu_seqlens[1:].long(), flat, right=True)]
    rope = (model.rope.cosines[positions], model.rope.sins[positions])
    x = model.embeddings(idx)
    for block in model.model_core:
        x = block(x, rope, cu_seqlens, max(lengths))
    return model.rmsnorm(x)[0], offsets


def enable_segment_pooling(model):
    """Route each cu_seqlens segment of a packed row on its own mean (SPEC.md: evaluation, generation and analysis),
    a wrapper of whatever forward the PolyGLU has; training keeps the frozen whole-row mean."""
    for m in model.modules():
        if isinstance(m, PolyGLU):
            m.forward = partial(segment_forward, m.forward, m)


# -----------------------------------------------------------------------------
# wrap_model: the one way to apply them

WRAPPING = {'attention': 'auto', 'fused': False, 'lean_mix': False, 'segment_pooling': False, 'compile_blocks': False,
            'recompute_blocks': 0, 'selective_checkpointing': False}


def unwrapped(model):
    """The model as its frozen classes compute it: every per-instance patch removed."""
    for m in model.modules():
        m.__dict__.pop('forward', None)
        if isinstance(m, GQA):
            m.attend = sdpa_attention
        if isinstance(m, PolyGLU):
            m.__dict__.pop('routing_weights', None)
            m.pool = sequence_mean
    model.wrapping = dict(WRAPPING)
    return model


def wrapping_errors(settings, n_layers):
    """The combinations wrap_model refuses, as one line each."""
    recompute = settings['recompute_blocks']
    return [message for wrong, message in (
        (settings['lean_mix'] and not settings['fused'],
         "lean_mix=True rewrites the fused kernels' PolyGLU backward: set fused=True too"),
        (not -1 <= recompute <= n_layers, f"recompute_blocks must be -1 (all), 0 (none) or 1..{n_layers}, got {recompute}"),
        (settings['selective_checkpointing'] and not recompute,
         "selective_checkpointing=True chooses what the recomputed blocks keep: set recompute_blocks too (-1: all)"),
        (settings['segment_pooling'] and (settings['compile_blocks'] or recompute),
         "segment_pooling=True is for evaluation, which runs without compile_blocks and recompute_blocks"),
    ) if wrong]


def wrap_model(model, **wrapping):
    """The one way to change how the frozen classes compute. From the model's plain state, whatever was applied before,
    and in this order: the attention kernel (attention_kernel's; on the CPU the frozen SDPA path), the compiled
    elementwise kernels (fused; lean_mix: their PolyGLU backward without stacks), segment pooling (each packed segment
    routed on its own mean, attended alone), whole-block compilation (compile_blocks), and recomputation in the
    backward of the first recompute_blocks blocks (-1: all, 0: none; selective_checkpointing: their elementwise work
    only). Settings not given take WRAPPING's values; the model's `wrapping` records them, so a caller can rewrap
    with one changed. A combination that cannot work stops in one line."""
    unknown = sorted(set(wrapping) - set(WRAPPING))
    if unknown:
        raise TypeError(f"wrap_model: unknown setting(s) {unknown}; known: {sorted(WRAPPING)}")
    settings = {**WRAPPING, **wrapping}
    for message in wrapping_errors(settings, len(model.model_core)):
        raise SystemExit(f"error: {message}")
    unwrapped(model)
    kernel = attention_kernel(model.embeddings.weight.device, settings['attention'])
    if settings['segment_pooling'] and kernel in (sdpa_attention, efficient_sdpa_attention):
        kernel = segment_attention  # one SDPA call per segment, never a [T, T] mask
    set_attention_kernel(model, kernel)
    if settings['fused']:
        enable_fused_kernels(model, settings['lean_mix'])
    if settings['segment_pooling']:
        enable_segment_pooling(model)
    if settings['compile_blocks']:
        enable_block_compilation(model)
    if settings['recompute_blocks']:
        enable_gradient_checkpointing(model, settings['recompute_blocks'], settings['selective_checkpointing'])
    model.wrapping = settings
    return model


def create_model(config, device='cpu', dtype=torch.float32, **wrapping):
    """A new model, initialised per SPEC.md, on a device and dtype, wrapped by wrap_model(**wrapping)."""
    return wrap_model(PolychromaticLM(config).to(device=device, dtype=dtype), **wrapping)


# =============================================================================
# 3. The training loss
# =============================================================================

HEAD_ROWS_MULTIPLE = 128


def padded_head(head_weight):
    """The tied head with zero rows up to a multiple of HEAD_ROWS_MULTIPLE -> (weight, the real vocabulary size).
    Qwen3's 151,669 rows leave every head GEMM unaligned, and cuBLAS then falls back to slow sm75 kernels
    (docs/benchmarks.md). The pad rows' logits never reach the softmax."""
    vocab_size = head_weight.shape[0]
    padding = -vocab_size % HEAD_ROWS_MULTIPLE
    return (F.pad(head_weight, (0, 0, 0, padding)) if padding else head_weight), vocab_size  # no copy when aligned


def chunked_cross_entropy(hidden, head_weight, targets, chunk_size=2048, ignore_index=-100):
    """Mean next-token loss over the targets that are not ignore_index, computing the head in chunks of
    chunk_size positions, each checkpointed: the [B*T, vocab] logits (5 GB in fp32 for 16 x 4,096 x 151,669)
    never exist at once, only one chunk's, in the forward and again in the backward."""
    hidden, targets = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    padded_weight, vocab_size = padded_head(head_weight)  # the pad rows' logits are sliced off before the softmax

    def chunk_loss(h, t):
        logits = F.linear(h, padded_weight)[:, :vocab_size].float()
        return F.cross_entropy(logits, t, ignore_index=ignore_index, reduction='sum')

    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], chunk_size):
        h, t = hidden[start:start + chunk_size], targets[start:start + chunk_size]
        total = total + (checkpoint(chunk_loss, h, t, use_reentrant=False) if torch.is_grad_enabled()
                         else chunk_loss(h, t))
    return total / (targets != ignore_index).sum().clamp(min=1)


def liger_cross_entropy(hidden, head_weight, targets, chunk_size=2048, ignore_index=-100):
    """chunked_cross_entropy's loss on liger-kernel's fused linear cross-entropy (loss_kernel='liger'; docs/gpu.md says
    why liger): per chunk one head GEMM, then one Triton pass that writes the loss and, over the logits, their gradient, so
    the backward only scales it: no second head forward, no float32 logits, the head's gradient summed in float32 over
    the micro-batch. The head is padded as chunked_cross_entropy pads it; a bias of -inf on the pad rows gives them
    zero probability and zero gradient. The CPU runs it in Triton's interpreter (TRITON_INTERPRET=1), for tests."""
    from liger_kernel.ops.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyFunction
    hidden, targets = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    padded_weight, vocab_size = padded_head(head_weight)
    logits_dtype = (torch.get_autocast_dtype(hidden.device.type) if torch.is_autocast_enabled(hidden.device.type)
                    else padded_weight.dtype)  # a bias of another dtype would promote every chunk's logits
    bias = torch.zeros(padded_weight.shape[0], dtype=logits_dtype, device=hidden.device)
    bias[vocab_size:] = float('-inf')
    # liger sizes its chunks as BT / ceil(V / (chunk_mem_const * H)); this constant makes them ~chunk_size positions
    chunk_mem_const = max(1, padded_weight.shape[0] * chunk_size // (hidden.shape[0] * hidden.shape[1]))
    total = LigerFusedLinearCrossEntropyFunction.apply(
        hidden, padded_weight, targets, bias, None, ignore_index, 0.0, 0.0, 'sum', None, False, torch.float32,
        False, False, False, None, None, chunk_mem_const)[0]
    return total / (targets != ignore_index).sum().clamp(min=1)  # 'sum': a micro-batch with no target gives 0, not NaN


LOSS_KERNELS = {'chunked': chunked_cross_entropy, 'liger': liger_cross_entropy}


def check_loss_kernel(loss_kernel, device):
    import importlib.util
    import os
    if loss_kernel not in LOSS_KERNELS:
        raise SystemExit(f"error: loss_kernel must be one of {', '.join(LOSS_KERNELS)}, got {loss_kernel!r}")
    if loss_kernel == 'liger' and importlib.util.find_spec('liger_kernel') is None:
        raise SystemExit("error: loss_kernel='liger' needs liger-kernel: pip install -r requirements.txt")
    if loss_kernel == 'liger' and not str(device).startswith('cuda') and os.environ.get('TRITON_INTERPRET') != '1':
        raise SystemExit("error: loss_kernel='liger' runs its Triton kernels on CUDA (on the CPU only under "
                         "TRITON_INTERPRET=1, slowly, for tests): use loss_kernel='chunked' here")


class LanguageModelLoss(nn.Module):
    """The training objective as a module, so an engine (DeepSpeed) can call it: hidden states of the frozen
    model, then the tied head and cross-entropy in chunks (loss_kernel: 'chunked', checkpointed, the reference; or
    'liger', fused). `self.model` is the PolychromaticLM."""

    def __init__(self, model, chunk_size=2048, loss_kernel='chunked'):
        super().__init__()
        check_loss_kernel(loss_kernel, model.embeddings.weight.device)
        self.model, self.chunk_size, self.loss = model, chunk_size, LOSS_KERNELS[loss_kernel]

    def forward(self, idx, targets, cu_seqlens=None, max_seqlen=None):
        hidden = self.model.hidden_states(idx, cu_seqlens, max_seqlen)
        return self.loss(hidden, self.model.embeddings.weight, targets, self.chunk_size)

# =============================================================================
# 4. The model's numbers: parameters, FLOPs, routing entropy, AdamW's groups
# =============================================================================

def count_parameters(config):
    """(total, routing) parameters, counted on the meta device; the tied head once, routing = alpha, beta, gates."""
    with torch.device('meta'):
        model = PolychromaticLM(config)
    total = sum(p.numel() for p in model.parameters())
    routing = sum(p.numel() for name, p in model.named_parameters()
                  if name.split('.')[-1] in ('alpha', 'beta') or '.gate_net.' in name)
    return total, routing


def flops_per_token(config, seq_len=None, n_params=None):
    """Training FLOPs a token, what MFU divides by: 6N for the matmuls (the tied head once) plus causal attention over
    whole rows, 6 * n_layers * d_attn * seq_len. Recomputation (recompute_flops_per_token) and the attention document
    masking skips are not counted: MFU is the useful work, not what the GPU ran."""
    seq_len = seq_len or config.max_seq_len
    n_params = n_params or count_parameters(config)[0]
    return 6 * n_params + 6 * config.n_layers * config.n_heads * config.head_dim * seq_len


def recompute_flops_per_token(config, seq_len, recomputed_blocks, loss_kernel='chunked'):
    """The forward FLOPs a step runs again: each recomputed block's forward and, with the chunked loss, the head again
    in every chunk's backward (the fused loss computes its gradient in the forward)."""
    block_params = (count_parameters(config)[0] - config.vocab_size * config.d_model) / config.n_layers
    block = 2 * block_params + 2 * config.n_heads * config.head_dim * seq_len
    return recomputed_blocks * block + (2 * config.d_model * config.vocab_size if loss_kernel == 'chunked' else 0)


def routing_entropy(model):
    """Per layer, the mean entropy (nats, and as a fraction of ln K) of the last forward's Gumbel-free routing
    softmax(logits / tau), over sequences and neurons: a flat dict for wandb, empty for VanillaLM."""
    stats, entropies = {}, []
    for i, block in enumerate(model.model_core):
        ffn = block.ffn
        if not isinstance(ffn, PolyGLU) or ffn.last_logits is None:
            continue
        log_probs = torch.log_softmax(ffn.last_logits.float() / ffn.tau, dim=-1)
        entropies.append(-(log_probs.exp() * log_probs).sum(-1).mean().item())
        stats[f'routing/entropy_layer_{i:02d}'] = entropies[-1]
    if entropies:
        stats['routing/entropy_mean'] = sum(entropies) / len(entropies)
        stats['routing/entropy_frac_mean'] = stats['routing/entropy_mean'] / math.log(model.config.n_activations)
    return stats


def optimizer_groups(model, weight_decay):
    """AdamW groups: decay on >=2-D parameters except PolyGLU's alpha (decay would pull routing back to
    uniform); 1-D parameters (norms, beta, biases) never decay."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 and not name.endswith('.alpha') else no_decay).append(p)
    return [{'params': decay, 'weight_decay': weight_decay}, {'params': no_decay, 'weight_decay': 0.0}]


# =============================================================================
# 5. A model from a state dict
# =============================================================================

# The largest value a checkpoint's config may hold (the published model is a small fraction of each): a file asking for
# more stops before anything is allocated.
CONFIG_LIMITS = {'vocab_size': 1 << 20, 'd_model': 1 << 15, 'n_layers': 1024, 'n_heads': 1024, 'n_kv_heads': 1024,
                 'd_ff': 1 << 17, 'max_seq_len': 1 << 17, 'n_activations': 64, 'gate_hidden': 1 << 12}


def checked_config(values, path):
    """A ModelConfig from a checkpoint's values: known fields of their types, within CONFIG_LIMITS, or one line."""
    types = {f.name: f.type for f in fields(ModelConfig)}
    unknown = sorted(set(values) - set(types))
    if unknown:
        raise SystemExit(f"error: {path}: unknown model config field(s) {unknown}; known: {sorted(types)}")
    for key, value in values.items():
        kind = (int, float) if types[key] is float else types[key]
        if not isinstance(value, kind) or isinstance(value, bool):
            raise SystemExit(f"error: {path} has {key}={value!r}, not {types[key].__name__}: a damaged or foreign "
                             "checkpoint")
        limit = CONFIG_LIMITS.get(key)
        if (limit and not 1 <= value <= limit) or (types[key] is float and not 0 < value < math.inf):
            raise SystemExit(f"error: {path} has {key}={value:,}, outside {f'1..{limit:,}' if limit else '(0, inf)'}"
                             ": a damaged or foreign checkpoint; nothing was allocated")
    return ModelConfig(**values)


def shape_config(weights, path):
    """The config values a state dict of the author's names implies, read off its shapes before anything is allocated
    (rope_theta and norm_eps cannot be; max_seq_len only from a stored RoPE table)."""
    def shape(key):
        if key not in weights:
            raise SystemExit(f"error: {path} has no tensor {key!r}: not a PolychromaticLM state dict "
                 f"(its first keys: {list(weights)[:4]})")
        return tuple(weights[key].shape)
    vocab_size, d_model = shape('embeddings.weight')
    layers = {k.split('.')[1] for k in weights if k.startswith('model_core.')}
    n_layers = 1 + max((int(i) for i in layers if i.isdigit()), default=-1)
    head_dim = max(1, shape('model_core.0.gqa.rmsnorm_q.gama')[0])
    ffn = 'polyglu' if 'model_core.0.polyglu.alpha' in weights else 'swiglu'
    values = dict(vocab_size=vocab_size, d_model=d_model, n_layers=n_layers,
                  n_heads=shape('model_core.0.gqa.W_q.weight')[0] // head_dim,
                  n_kv_heads=shape('model_core.0.gqa.W_k.weight')[0] // head_dim,
                  d_ff=shape(f'model_core.0.{ffn}.W_gate.weight')[0],
                  model_type='polyglu' if ffn == 'polyglu' else 'vanilla')
    if ffn == 'polyglu':
        values.update(n_activations=shape('model_core.0.polyglu.alpha')[1],
                      gate_hidden=shape('model_core.0.polyglu.gate_net.0.weight')[0])
    if 'rope.cosines' in weights:
        values['max_seq_len'] = shape('rope.cosines')[0]
    if d_model != values['n_heads'] * head_dim:
        raise SystemExit(f"error: {path}: W_q has {values['n_heads'] * head_dim} rows for d_model {d_model} and "
             f"head_dim {head_dim}; not this architecture")
    return values


def model_from_weights(weights, info, expected=None):
    """read_checkpoint's (state dict, info) -> a PolychromaticLM of its recorded config, or of the one its shapes imply
    (info gains step, tau and model_config). The recorded config is checked against the shapes and CONFIG_LIMITS before
    the model is built; the tied head is filled in when stored once, the RoPE tables and every shape are checked, and
    `expected`, a ModelConfig, is the caller's: each mismatch is one line. Built without any patch, so it loads on any
    machine."""
    path = info['file']
    prefix = next((p for p in ('_orig_mod.', 'module.') if all(k.startswith(p) for k in weights)), '')
    weights = {k[len(prefix):]: v for k, v in weights.items()}  # saved from a compiled or wrapped module
    implied = shape_config(weights, path)
    config = checked_config(info.get('model_config') or implied, path)  # read_checkpoint type-checked the mapping
    differs = {k: (getattr(config, k), v) for k, v in implied.items() if getattr(config, k) != v}
    if differs:
        raise SystemExit(f"error: {path}'s model config disagrees with its tensors; (config, tensors): {differs}: a "
                         "damaged or foreign checkpoint; nothing was allocated")
    if expected is not None and asdict(expected) != asdict(config):
        diffs = {k: (v, getattr(config, k)) for k, v in asdict(expected).items() if getattr(config, k) != v}
        raise SystemExit(f"error: {path} holds a different model than configured; (configured, checkpoint): {diffs}. "
                         "Fix the config or pick the right checkpoint")
    info.setdefault('step', 0)
    info['model_config'] = asdict(config)
    if config.model_type == 'polyglu' and info.get('tau') is None:
        print(f"{path} records no tau; using 0.1, the end of the pre-training anneal")
        info['tau'] = 0.1
    elif config.model_type != 'polyglu':
        info['tau'] = None
    model = PolychromaticLM(config)
    # the tied head: a file may store it once, under either name
    if 'output_head.weight' not in weights and 'embeddings.weight' in weights:
        weights['output_head.weight'] = weights['embeddings.weight']
    if 'embeddings.weight' not in weights and 'output_head.weight' in weights:
        weights['embeddings.weight'] = weights['output_head.weight']
    for name in ('cosines', 'sins'):  # tables computed here in float32; a file's (bf16) copy must agree with them
        table = weights.get(f'rope.{name}')
        ours = getattr(model.rope, name)
        if table is not None and table.shape == ours.shape and (table.float() - ours).abs().max() > 1e-2:
            raise SystemExit(f"error: {path}'s RoPE table rope.{name} differs from theta={config.rope_theta} by "
                             f"{(table.float() - ours).abs().max():.3f}: another rope_theta or rotation convention")
        if table is None or table.shape == ours.shape:
            weights[f'rope.{name}'] = ours
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in weights.items()}
    if shapes != found:
        missing, unexpected = sorted(set(shapes) - set(found)), sorted(set(found) - set(shapes))
        wrong = [f"{k}: checkpoint {found[k]} vs model {shapes[k]}" for k in shapes
                 if k in found and found[k] != shapes[k]]
        raise SystemExit(f"error: {path} does not match its model config: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}, wrong shape {wrong[:3]}")
    if not torch.equal(weights['embeddings.weight'], weights['output_head.weight']):
        raise SystemExit(f"error: {path} has an output head that differs from its embedding; this model ties them")
    model.load_state_dict(weights)
    if info['tau'] is not None:
        model.set_tau(info['tau'])
    return unwrapped(model)


# =============================================================================
# 6. Generation (eval.py, sample.py), on a model wrapped with segment_pooling=True
# =============================================================================

def sampler(temperature=0.0, top_k=0, seed=1337):
    """-> pick(logits [n, vocab]) -> n token ids: the argmax at temperature 0, else a draw from softmax(logits /
    temperature) over the top_k logits (0: all), from a CPU generator seeded here: the same draws on any device."""
    if temperature <= 0:
        return lambda logits: logits.argmax(-1).tolist()
    generator = torch.Generator().manual_seed(seed)

    def pick(logits):
        logits = logits.float().cpu() / temperature
        values, indices = torch.topk(logits, top_k) if 0 < top_k < logits.shape[-1] else (logits, None)
        draws = torch.multinomial(values.softmax(-1), 1, generator=generator)
        return (draws if indices is None else indices.gather(-1, draws))[:, 0].tolist()
    return pick


def pick_tokens(pick, logits, requests):
    """pick: one sampler for every row, or a list of one per request (its own draws, whatever it is batched with)."""
    if callable(pick):
        return pick(logits)
    return [pick[i](logits[row:row + 1])[0] for row, i in enumerate(requests)]


@torch.no_grad()
def generate_exact(model, prompts, budget, pick=sampler(), stop=None):
    """Exact generation: a new token moves the gate's mean and so every earlier position's FFN output, so no key/value
    is reused and each step is a full forward of every unfinished sequence, packed together. prompts: [(ids, max new
    tokens)]. Yields (i, token, finished) as tokens come; request i ends at its maximum, at EOS, or when stop(i, its
    ids). Continuous batching: a request joins while the pack's full lengths fit in `budget` tokens."""
    max_len = model.config.max_seq_len
    sequences = [list(ids)[-max_len:] for ids, _ in prompts]
    generated = [[] for _ in prompts]
    waiting = collections.deque(range(len(prompts)))
    full_length = lambda i: min(max_len, len(sequences[i]) + prompts[i][1] - len(generated[i]))  # noqa: E731
    active = []
    while waiting or active:
        while waiting and (not active or sum(map(full_length, active)) + full_length(waiting[0]) <= budget):
            i = waiting.popleft()
            if prompts[i][1] > 0:
                active.append(i)
            else:
                yield i, None, True
        if not active:
            continue
        hidden, offsets = packed_hidden_states(model, [sequences[i] for i in active])
        last = torch.as_tensor(offsets[1:] - 1, device=hidden.device)
        tokens = pick_tokens(pick, F.linear(hidden[last], model.embeddings.weight).float(), active)
        still = []
        for i, token in zip(active, tokens):
            generated[i].append(token)
            sequences[i] = (sequences[i] + [token])[-max_len:]
            finished = len(generated[i]) >= prompts[i][1] or token == EOS_ID or bool(stop and stop(i, generated[i]))
            if not finished:
                still.append(i)
            yield i, token, finished
        active = still


def step_routing(ffn):
    """The routing weights [d_ff, K] of a PolyGLU's last forward (one sequence); None for SwiGLU."""
    return torch.softmax(ffn.last_logits.float() / ffn.tau, -1)[0, -1] if isinstance(ffn, PolyGLU) else None


@contextlib.contextmanager
def hooked(block, attend, pool=None):
    """Within: a frozen block attends with `attend` and, for PolyGLU, pools its gate's input with `pool` (the hooks
    GQA.attend and PolyGLU.pool exist for); the block's own math runs around them."""
    ffn = block.ffn if isinstance(block.ffn, PolyGLU) and pool is not None else None
    saved = block.gqa.attend, ffn and ffn.pool
    block.gqa.attend = attend
    if ffn:
        ffn.pool = pool
    try:
        yield block
    finally:
        block.gqa.attend = saved[0]
        if ffn:
            ffn.pool = saved[1]


@torch.no_grad()
def full_pass(model, ids):
    """A full forward of one sequence recording, per layer, the keys/values, the FFN input sum (the state a cached step
    continues from) and the routing weights."""
    n_layers = len(model.model_core)
    state = {'k': [None] * n_layers, 'v': [None] * n_layers, 'sum': [None] * n_layers, 'n': len(ids)}
    x = model.embeddings(torch.tensor([ids], device=model.embeddings.weight.device))
    rope = model.rope(len(ids))
    for layer, block in enumerate(model.model_core):
        attend, pool = block.gqa.attend, getattr(block.ffn, 'pool', None)

        def recording_attend(q, k, v, cu_seqlens=None, max_seqlen=None):
            state['k'][layer], state['v'][layer] = k, v
            return attend(q, k, v, cu_seqlens, max_seqlen)

        def recording_pool(h, cu_seqlens=None):
            state['sum'][layer] = h.float().sum(1)
            return pool(h, cu_seqlens)
        with hooked(block, recording_attend, recording_pool):
            x = block(x, rope)
    state['routing'] = [step_routing(block.ffn) for block in model.model_core]
    return model.rmsnorm(x)[0, -1], state


@torch.no_grad()
def cached_step(model, token, state):
    """One new token through the frozen blocks, attending over the cached (stale) keys/values and pooling the gate's
    running mean. -> (the token's final hidden state, the largest routing change since the last full pass)."""
    position = state['n']
    rope = tuple(t[position:position + 1] for t in model.rope(position + 1))
    x = model.embeddings(torch.tensor([[token]], device=model.embeddings.weight.device))
    drift = 0.0
    for layer, block in enumerate(model.model_core):
        def cached_attend(q, k, v, cu_seqlens=None, max_seqlen=None):
            state['k'][layer] = torch.cat([state['k'][layer], k], 1)
            state['v'][layer] = torch.cat([state['v'][layer], v], 1)
            keys, values = state['k'][layer].transpose(1, 2), state['v'][layer].transpose(1, 2)
            return F.scaled_dot_product_attention(q.transpose(1, 2), keys, values, enable_gqa=True).transpose(1, 2)

        def running_mean(h, cu_seqlens=None):
            state['sum'][layer] = state['sum'][layer] + h.float().sum(1)
            return (state['sum'][layer] / (position + 1)).to(h.dtype)[:, None]
        with hooked(block, cached_attend, running_mean):
            x = block(x, rope)
        if isinstance(block.ffn, PolyGLU):
            drift = max(drift, (step_routing(block.ffn) - state['routing'][layer]).abs().max().item())
    state['n'] += 1
    return model.rmsnorm(x)[0, -1], drift


@torch.no_grad()
def generate_cached(model, prompts, refresh_threshold, pick=sampler(), stop=None, stats=None):
    """Approximate generation with a key/value cache, one request at a time: the full forward is redone when a routing
    weight has moved more than refresh_threshold since the last one. generate_exact's prompts, events and stops; a
    request also ends at max_seq_len. stats (a dict) counts 'refreshes' and 'cached_steps'."""
    stats = {} if stats is None else stats
    stats.setdefault('refreshes', 0)
    stats.setdefault('cached_steps', 0)
    for i, (ids, max_new) in enumerate(prompts):
        if max_new <= 0:
            yield i, None, True
            continue
        ids = list(ids)[-model.config.max_seq_len:]
        hidden, state = full_pass(model, ids)
        generated = []
        while True:
            token = pick_tokens(pick, F.linear(hidden, model.embeddings.weight).float()[None], [i])[0]
            generated.append(token)
            ids.append(token)
            finished = len(generated) >= max_new or token == EOS_ID or bool(stop and stop(i, generated)) or \
                len(ids) >= model.config.max_seq_len
            yield i, token, finished
            if finished:
                break
            hidden, drift = cached_step(model, token, state)
            stats['cached_steps'] += 1
            if drift > refresh_threshold:
                hidden, state = full_pass(model, ids)
                stats['refreshes'] += 1
