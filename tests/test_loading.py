import pytest
import torch
from transformers import BertConfig, BertModel

from model.loading import ModelLoadError, load_for_autocast, load_lm
from model.tiny import tiny_model, tiny_tokenizer


def test_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_lm(str(tmp_path / "nope"), tmp_path)


def test_a_file_that_is_not_gguf_is_rejected(tmp_path):
    f = tmp_path / "weights.bin"
    f.write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="not a .gguf"):
        load_lm(str(f), tmp_path)


def test_a_folder_without_config_is_rejected(tmp_path):
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_lm(str(tmp_path), tmp_path)


def test_an_encoder_only_model_is_not_a_causal_lm(tmp_path):
    BertModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32)).save_pretrained(tmp_path / "bert")
    tiny_tokenizer().save_pretrained(tmp_path / "bert")
    with pytest.raises(ModelLoadError, match="not a causal language model"):
        load_lm(str(tmp_path / "bert"), tmp_path)


def test_a_hugging_face_folder_loads_with_identical_logits(tmp_path):
    tiny_model().save_pretrained(tmp_path / "m")
    tiny_tokenizer().save_pretrained(tmp_path / "m")
    lm = load_lm(str(tmp_path / "m"), tmp_path, device="cpu")
    x = torch.tensor([[5, 6, 7, 8]])
    assert torch.equal(lm(None, input_ids=x).logits, tiny_model()(input_ids=x).logits)
    assert lm.dtype == torch.float32 and len(lm.sha256) == 64
    assert load_lm(str(tmp_path / "m"), tmp_path).sha256 == lm.sha256  # memoised, stable


def test_training_and_evaluation_load_fp32_with_sdpa(tmp_path):
    """The one loader meta-training and evaluation share: on CPU the weights load fp32 as they are."""
    lm = load_for_autocast("tiny", tmp_path, device="cpu")
    x = torch.tensor([[5, 6, 7, 8]])
    assert lm.dtype == torch.float32 and lm.model.config._attn_implementation == "sdpa"
    assert torch.equal(lm(None, input_ids=x).logits, load_lm("tiny", tmp_path, device="cpu")(None, input_ids=x).logits)


def test_worker_threads_follow_the_cores_it_may_use(tmp_path):
    """A docker --cpus quota caps the threads below the machine's cores; no quota leaves the affinity."""
    import os

    from worker.runtime import cores

    mine = len(os.sched_getaffinity(0))
    quota = tmp_path / "cpu.max"
    quota.write_text("50000 100000\n")  # half a core: still one thread
    assert cores(quota) == 1
    quota.write_text(f"{100000 * (mine + 4)} 100000\n")  # a quota above the affinity: the affinity
    assert cores(quota) == mine
    quota.write_text("max 100000\n")
    assert cores(quota) == mine
    assert cores(tmp_path / "absent") == mine
