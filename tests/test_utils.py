import os

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers

import model as M
import utils
from conftest import engine_config


def test_packaged_qwen3_tokenizer():
    tokenizer = utils.get_tokenizer('packaged')
    assert tokenizer.get_vocab_size(with_added_tokens=True) == 151_669
    assert tokenizer.encode('Hello world').ids == [9707, 1879]
    assert tokenizer.token_to_id('<|endoftext|>') == 151_643
    assert tokenizer.encode('<|im_start|>user\nhi<|im_end|>').ids == [151_644, 872, 198, 6023, 151_645]


def test_local_tokenizer_path_and_checks(tmp_path):
    vocab = {f'w{i}': i for i in range(600)}
    small = Tokenizer(models.WordLevel(vocab, unk_token='w0'))
    small.pre_tokenizer = pre_tokenizers.Whitespace()
    small.save(str(tmp_path / 'tokenizer.json'))
    assert utils.get_tokenizer(str(tmp_path), vocab_size=1000).encode('w5 w7').ids == [5, 7]
    with pytest.raises(SystemExit, match="has 600 tokens but the model's vocab_size is 512"):
        utils.get_tokenizer(str(tmp_path / 'tokenizer.json'), vocab_size=512)
    with pytest.raises(SystemExit, match='it is not the Qwen3 tokenizer'):
        utils.get_tokenizer(str(tmp_path))
    with pytest.raises(SystemExit, match='no tokenizer.json in'):
        utils.get_tokenizer(str(tmp_path / '..'))


def test_cosine_lr():
    lr = lambda step: utils.cosine_lr(step, max_lr=1e-4, warmup_steps=2000, total_steps=19_531)  # noqa: E731
    assert lr(0) == pytest.approx(5e-8)
    assert lr(1999) == pytest.approx(1e-4)
    assert lr(2000) == pytest.approx(1e-4)
    assert lr(2000 + (19_531 - 2000) // 2) == pytest.approx(5e-5, rel=1e-3)
    assert lr(19_531) == pytest.approx(0.0, abs=1e-12)


ENGINE_ERRORS = [  # make_engine's settings over engine_config's -> the line it stops with
    ({'backend': 'deepspeed', 'zero_stage': 3}, r'zero_stage must be 0, 1 or 2, got 3: ZeRO-3 partitions the weights'),
    # DeepSpeed 0.19.8 would raise NotImplementedError deep in its engine: one line before it starts
    ({'backend': 'deepspeed', 'dtype': 'bfloat16', 'zero_stage': 0},
     r"zero_stage=0 with dtype='bfloat16' would accumulate gradients in bf16 .* use zero_stage=1"),
]


@pytest.mark.parametrize('settings, line', ENGINE_ERRORS)
def test_engine_settings_that_cannot_work_are_one_line(settings, line):
    model = torch.nn.Linear(2, 2)
    with pytest.raises(SystemExit, match=f'^error: {line}'):
        utils.make_engine(model, model, engine_config(**settings))


def test_the_engine_reads_the_settings_it_states():
    """make_engine reads ENGINE_KEYS of a stage's config: train.py's, sft.py's and bench.py's hold them all."""
    import bench
    import sft
    import train
    assert all(set(utils.ENGINE_KEYS) <= set(vars(module)) for module in (train, sft))
    assert set(bench.engine_settings()) == set(utils.ENGINE_KEYS)
    settings = engine_config()
    del settings['adam_eps']
    model = torch.nn.Linear(2, 2)
    with pytest.raises(TypeError, match=r"make_engine: the settings lack \['adam_eps'\]"):
        utils.make_engine(model, model, settings)


def test_wandb_missing_is_a_clear_error(monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, 'wandb', None)  # what a pod without wandb gives: ImportError at import
    with pytest.raises(SystemExit, match='wandb_log=True but wandb is not installed: .* --wandb_log=False'):
        utils.init_wandb(True, 'polychromatic', 'run', {})
    assert utils.init_wandb(False, 'polychromatic', 'run', {}) is None


def test_save_line_gives_size_and_seconds(tmp_path, capsys):
    (tmp_path / 'portable_5.pt').write_bytes(b'x' * 2_500_000)
    (tmp_path / 'ds' / 'step_5').mkdir(parents=True)
    (tmp_path / 'ds' / 'step_5' / 'states.pt').write_bytes(b'x' * 500_000)
    utils.report_save(5, str(tmp_path / 'portable_5.pt'), 3.14)
    utils.report_save(5, str(tmp_path / 'portable_5.pt'), 31.0, str(tmp_path / 'ds' / 'step_5'))
    first, second = capsys.readouterr().out.splitlines()
    assert first.endswith('portable_5.pt (0.0025 GB in 3.1 s)')
    assert '(0.003 GB in 31.0 s; over the launchers' in second


def test_peak_flops_per_card(monkeypatch):
    import torch
    for name, peak in (('NVIDIA H100 80GB HBM3', 989e12), ('NVIDIA H100 PCIe', 756e12), ('NVIDIA H100 NVL', 835e12),
                       ('NVIDIA H800', 989e12), ('NVIDIA H800 PCIe', 756e12), ('NVIDIA A100-SXM4-80GB', 312e12),
                       ('NVIDIA H200', 989e12), ('Tesla T4', 0.0)):
        monkeypatch.setattr(torch.cuda, 'get_device_name', lambda *a, name=name: name)
        assert utils.peak_flops('cuda:0') == peak, name


@pytest.mark.skipif(__import__('torch').cuda.is_available(), reason='checks the CPU-only failure')
def test_gpu_config_without_cuda_and_torch_backend_with_ranks(monkeypatch):
    with pytest.raises(SystemExit, match=r"device='cuda' but CUDA is not available .*--device=cpu"):
        utils.resolve_device('cuda', 'bfloat16')
    monkeypatch.setenv('WORLD_SIZE', '2')
    with pytest.raises(SystemExit, match="backend='torch' runs one process, but WORLD_SIZE=2"):
        utils.init_distributed('torch', 'cpu')


def test_a_signal_during_the_stop_flag_reduction_stops_every_rank_one_step_later(monkeypatch):
    """The SIGTERM lands on this rank while the stop flag is being all-reduced, after its snapshot: the other rank
    reduced a 0 and trains on, so this one must too (stopping alone was a collective mismatch: gloo aborted the rank,
    NCCL would hang). The next step's reduction stops both."""
    import torch.distributed as dist
    stop_signal = []
    monkeypatch.setattr(dist, 'get_backend', lambda: 'gloo')
    monkeypatch.setattr(dist, 'all_reduce', lambda flag, op: stop_signal.append(15))
    assert utils.end_of_session(stop_signal, 0, 5, world_size=2) is None
    monkeypatch.setattr(dist, 'all_reduce', lambda flag, op: None)
    assert utils.end_of_session(stop_signal, 0, 6, world_size=2) == 'signal 15'
    assert utils.end_of_session([], 6, 6, world_size=2) == 'stop_after_steps=6'


def test_recorded_configs_keep_every_key_but_a_secret():
    namespace = {'hf_token': 'hf_x', 'wandb_api_key': 'k', 'val_tokens': 3, 'tokenizer': 'packaged', 'max_steps': 9,
                 'TOKEN': 'constant', '_private': 1}
    assert utils.plain_config(namespace) == {'val_tokens': 3, 'tokenizer': 'packaged', 'max_steps': 9}


ENGINES = """
import torch, model as M, utils
utils.init_distributed('deepspeed', 'cpu')
config = M.ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48, max_seq_len=16)
rows = [torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(i)) for i in range(4)]
for accumulation in (1, 2):
    results = {}
    for backend in ('torch', 'deepspeed'):
        torch.manual_seed(0)
        model = M.create_model(config)
        engine, optimizer, _ = utils.make_engine(M.LanguageModelLoss(model), model, {
            'backend': backend, 'dtype': 'bfloat16', 'zero_stage': 1, 'micro_batch_size': 2,
            'grad_accum_steps': accumulation, 'grad_clip': 1.0, 'learning_rate': 1e-2, 'weight_decay': 0.1,
            'beta1': 0.9, 'beta2': 0.95, 'adam_eps': 1e-8, 'fused_adamw': False})
        for step in range(2):  # train.py's step, each backend's way
            for micro in range(accumulation):
                torch.manual_seed(step * accumulation + micro)
                loss = engine(rows[step * accumulation + micro], rows[step * accumulation + micro])
                if backend == 'deepspeed':
                    engine.backward(loss)
                    engine.step()
                else:
                    (loss / accumulation).backward()
            if backend == 'torch':
                torch.nn.utils.clip_grad_norm_(utils.optimizer_weights(optimizer), 1.0)
                optimizer.step()
                nbytes = [sum(p.nbytes for p in model.parameters()),
                          sum(m.nbytes + m.grad.nbytes for m in utils.optimizer_weights(optimizer)),
                          sum(t.nbytes for s in optimizer.state.values() for k, t in s.items() if k != 'step')]
                optimizer.zero_grad(set_to_none=False)  # DeepSpeed keeps its gradient buffer: count it alike
        if backend == 'deepspeed':
            zero = engine.optimizer
            if accumulation == 2:
                print('ENGINE', type(zero).__name__, engine.get_data_types(),
                      sorted({str(t.dtype) for t in zero.fp32_groups_gradients_flat}), engine.was_step_applied())
            nbytes = [sum(t.nbytes for t in zero.bf16_groups_flat),
                      sum(t.nbytes for t in (*zero.fp32_groups_flat_partition, *zero.fp32_groups_gradients_flat)),
                      sum(t.nbytes for s in zero.optimizer.state.values() for k, t in s.items() if k != 'step')]
        state = utils.export_training_state(engine, optimizer, model, backend)
        results[backend] = ([state[k][n] for k in ('master', 'exp_avg', 'exp_avg_sq') for n in sorted(state['master'])]
                            + [p.detach().float() for p in model.parameters()]), nbytes, state['adam_step']
    (torch_state, torch_bytes, torch_step), (ds_state, ds_bytes, ds_step) = results['torch'], results['deepspeed']
    worst = max(((a - b).norm() / b.norm().clamp(min=1e-30)).item() for a, b in zip(torch_state, ds_state))
    print('RESULT', accumulation, worst, torch_bytes == ds_bytes, ','.join(map(str, torch_bytes)), torch_step == ds_step == 2.0)
"""


@pytest.mark.slow
@pytest.mark.xdist_group('ports')
def test_plain_pytorch_in_bf16_is_deepspeeds_bf16_zero1():
    """backend='torch' with dtype='bfloat16' (utils.fp32_masters) against DeepSpeed's bf16 ZeRO-1: two steps of one
    micro-batch give bit-identical masters, Adam moments and bf16 weights, and the two hold the same bytes of state
    (bf16 weights, float32 masters and gradients, float32 moments). With two micro-batches a step they part: DeepSpeed
    0.19.8's float32 gradient buffer holds the micro-batches' bf16 sum (grad_accum_dtype fp32 notwithstanding; measured
    equal to it exactly), plain PyTorch adds each micro-batch into float32 (test_bf16_engine_sums_micro_batches...).
    Without data_types.grad_accum_dtype=fp32 DeepSpeed would sum them in bf16 buffers: with it ZeRO-1 runs
    BF16_Optimizer, whose gradient buffers are float32. On the CPU it builds no shared-memory op."""
    import subprocess
    import sys
    from conftest import ROOT
    env = {**os.environ, 'MASTER_PORT': str(29_800 + os.getpid() % 150)}
    result = subprocess.run([sys.executable, '-c', ENGINES], cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = [line.split()[1:] for line in result.stdout.splitlines() if line.startswith('RESULT')]
    (_, worst_one, same_bytes, nbytes, same_step), (_, worst_two, *_) = lines
    assert float(worst_one) == 0.0 and same_bytes == 'True' and same_step == 'True', lines
    assert nbytes == '40736,162944,162944'  # 20,368 parameters: 2 bytes of weight, 4 + 4 of master and gradient, 8 of moments
    assert 1e-4 < float(worst_two) < 2e-2  # bf16's rounding of a sum of two: DeepSpeed's, not ours
    engine = next(line for line in result.stdout.splitlines() if line.startswith('ENGINE'))
    assert engine == "ENGINE BF16_Optimizer (torch.bfloat16, torch.float32) ['torch.float32'] True"
    assert 'shm_comm' not in result.stdout + result.stderr  # no gcc build of an all-reduce only inference calls


def test_bf16_engine_sums_micro_batches_in_float32():
    """The float32 gradient of plain PyTorch's bf16 engine after two micro-batches is the float32 sum of their bf16
    gradients, not their bf16 sum; the module holds no gradient of its own (each was added into the master and
    dropped), and after the update the module's weights are the masters' rounding."""
    config = M.ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, d_ff=48, max_seq_len=16)
    rows = [torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    torch.manual_seed(0)
    reference = M.create_model(config).bfloat16()
    grads = []
    for i, x in enumerate(rows):
        torch.manual_seed(i)
        M.LanguageModelLoss(reference)(x, x).backward()
        grads.append(reference.model_core[0].ffn.W_up.weight.grad.float().clone())
        reference.zero_grad(set_to_none=True)
    torch.manual_seed(0)
    model = M.create_model(config)
    engine, optimizer, _ = utils.make_engine(M.LanguageModelLoss(model), model, engine_config(dtype='bfloat16'))
    for i, x in enumerate(rows):
        torch.manual_seed(i)
        engine(x, x).backward()
    master = utils.named_masters(model, optimizer)['model_core.0.polyglu.W_up.weight']
    assert torch.equal(master.grad, grads[0] + grads[1])
    assert not torch.equal(master.grad, (grads[0].bfloat16() + grads[1].bfloat16()).float())
    assert all(p.grad is None and p.dtype == torch.bfloat16 for p in model.parameters())
    optimizer.step()
    assert torch.equal(model.model_core[0].ffn.W_up.weight, master.bfloat16()) and master.dtype == torch.float32


def test_adam_step_where_torch_wants_it():
    """A DeepSpeed or bf16 resume creates Adam's step: fused AdamW wants it on the weight's device (on a GPU a CPU step
    fails in the fused kernel), the default AdamW on the CPU. A 'meta' weight stands in for a GPU's."""
    weight = torch.empty(3, device='meta')
    for fused, where in ((True, 'meta'), (False, 'cpu')):
        optimizer = torch.optim.AdamW([torch.zeros(3)], **({'fused': True} if fused else {}))
        step = utils.adam_step(5.0, weight, optimizer)
        assert step.device.type == where and step.item() == 5.0 if where == 'cpu' else step.device.type == where
