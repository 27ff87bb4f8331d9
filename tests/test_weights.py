import io
import json
import zipfile

import pytest
import torch
from peft import PeftModel

from model.adapt import adapt
from model.recipe import Recipe
from model.tiny import tiny_model
from model.weights import export_peft, from_bytes, import_peft, load, peft_zip, save, to_bytes

from helpers import sentiment_task, tiny_lm


@pytest.fixture(scope="module")
def lm():
    return tiny_lm()


@pytest.fixture(scope="module")
def lora(lm):
    return adapt(lm, sentiment_task(), Recipe(epochs=2, lr=2e-2, calibrate=False), "lora").params


def test_peft_export_import_round_trip_reproduces_logits_exactly(lm, lora, tmp_path):
    x = torch.tensor([lm.encode("the movie was great\npositive")])
    ours = lm(lora, input_ids=x).logits
    export_peft(lm, lora, tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["peft_type"] == "LORA"
    # plain peft, on a fresh copy of the base: the standard way a user loads it
    theirs = PeftModel.from_pretrained(tiny_model(), tmp_path / "adapter").eval()(input_ids=x).logits
    assert torch.equal(ours, theirs)
    back = import_peft(lm, tmp_path / "adapter")
    assert torch.equal(lm(back, input_ids=x).logits, ours)
    assert not torch.equal(ours, lm(None, input_ids=x).logits)  # the adapter does change the model


def test_safetensors_bytes_and_file_round_trip_exactly(lm, lora, tmp_path):
    back = from_bytes(to_bytes(lora, {"task": "t1"}))
    assert back.keys() == lora.keys() and all(torch.equal(back[k], lora[k]) for k in lora)
    assert list(back) == sorted(lora)  # one order in every process (safetensors' own varies)
    save(lora, tmp_path / "w.safetensors")
    again = load(tmp_path / "w.safetensors")
    assert all(torch.equal(again[k], lora[k]) for k in lora)
    assert not to_bytes(lora).startswith(b"\x80")  # no pickle


def test_full_mode_delta_restores_the_adapted_weights(lm):
    start = lm.params("full")
    a = adapt(lm, sentiment_task(), Recipe(epochs=1, lr=1e-3, calibrate=False), "full")
    delta = from_bytes(to_bytes(a.delta(start)))
    assert set(delta) == set(lm.full_names)
    restored = {k: start[k] + delta[k] for k in delta}
    assert all(torch.allclose(restored[k], a.params[k], atol=1e-7) for k in delta)


def test_peft_zip_holds_a_loadable_adapter(lm, lora, tmp_path):
    with zipfile.ZipFile(io.BytesIO(peft_zip(lm, lora))) as z:
        assert sorted(z.namelist()) == ["adapter_config.json", "adapter_model.safetensors"]
        z.extractall(tmp_path)
    assert all(torch.equal(v, lora[k]) for k, v in import_peft(lm, tmp_path).items())


def test_import_rejects_a_mismatched_adapter(lm, lora, tmp_path):
    export_peft(lm, {k: v for k, v in lora.items() if "layers.0." in k}, tmp_path)
    with pytest.raises(ValueError, match="does not match the model's LoRA layout"):
        import_peft(lm, tmp_path)


def test_a_peft_lora_of_lower_rank_and_other_alpha_fits_this_layout_exactly(lm):
    from peft import LoraConfig, get_peft_model

    from model.weights import fit_lora

    for rslora in (False, True):
        theirs = get_peft_model(tiny_model(), LoraConfig(r=4, lora_alpha=32, target_modules=["v_proj"], use_rslora=rslora,
                                                         layers_to_transform=[0], lora_dropout=0.0)).eval()
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for n, p in theirs.named_parameters():
                if "lora_B" in n:
                    p.copy_(torch.randn(p.shape, generator=g))
        tensors = {n.replace(".default", ""): p.detach() for n, p in theirs.named_parameters() if "lora_" in n}
        ours = fit_lora(lm, theirs.peft_config["default"].to_dict(), tensors)
        assert set(ours) == set(lm.lora_names)
        x = torch.tensor([lm.encode("the movie was great\npositive")])
        assert torch.allclose(lm(ours, input_ids=x).logits, theirs(input_ids=x).logits, atol=1e-5)
        assert not torch.allclose(lm(None, input_ids=x).logits, theirs(input_ids=x).logits, atol=1e-3)


def test_merged_weights_are_what_peft_merges(lm, lora, tmp_path):
    from model.weights import merged

    state = merged(lm, lora)
    theirs = PeftModel.from_pretrained(tiny_model(), export_peft(lm, lora, tmp_path)).merge_and_unload()
    assert state.keys() == {k for k in theirs.state_dict() if k != "lm_head.weight"}  # tied to the embeddings
    assert all(torch.allclose(state[k], v, atol=1e-6) for k, v in theirs.state_dict().items() if k in state)
