import os

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

import utils


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


def test_dotenv_fills_but_never_overrides(tmp_path, monkeypatch):
    env = tmp_path / '.env'
    env.write_text("# secrets\nPOLY_TEST_TOKEN='abc'\nPOLY_TEST_SET=from_file\n")
    monkeypatch.setenv('POLY_TEST_SET', 'from_env')
    monkeypatch.delenv('POLY_TEST_TOKEN', raising=False)
    utils.load_dotenv(str(env))
    assert os.environ['POLY_TEST_TOKEN'] == 'abc'
    assert os.environ['POLY_TEST_SET'] == 'from_env'


def test_cosine_lr():
    lr = lambda step: utils.cosine_lr(step, max_lr=1e-4, warmup_steps=2000, total_steps=19_531)  # noqa: E731
    assert lr(0) == pytest.approx(5e-8)
    assert lr(1999) == pytest.approx(1e-4)
    assert lr(2000) == pytest.approx(1e-4)
    assert lr(2000 + (19_531 - 2000) // 2) == pytest.approx(5e-5, rel=1e-3)
    assert lr(19_531) == pytest.approx(0.0, abs=1e-12)


def test_zero3_is_a_clear_error():
    import torch
    model = torch.nn.Linear(2, 2)
    with pytest.raises(SystemExit, match='zero_stage must be 0, 1 or 2, got 3: ZeRO-3 partitions the weights'):
        utils.make_engine(model, model, 'deepspeed', 'float32', 3, 1, 1, 1.0, 1e-4, 0.1, (0.9, 0.95), 1e-8)
