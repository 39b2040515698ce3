import pytest
import torch
from torch.testing import assert_close

from palm_rlhf.model.lora import LoRA
from tests.helpers import randomize_lora, tiny_palm

ALL_TARGETS = ("q", "k", "v", "o", "ff_in", "ff_out")


def test_lora_at_init_is_the_identity():
    model = tiny_palm()
    model.add_finetune_params("actor", lora_r=4, targets=ALL_TARGETS)
    seq = torch.randint(0, 32, (2, 10))
    assert_close(model(seq, finetune_scope="actor"), model(seq), atol=0, rtol=0)


def test_lora_forward_equals_its_dense_weight():
    lora = LoRA(6, 5, r=2, alpha=4)
    torch.nn.init.normal_(lora.B)
    x = torch.randn(3, 6)
    assert_close(lora(x), x @ lora.weight, atol=1e-6, rtol=1e-6)
    assert lora.scale == 2.0


def test_scopes_are_isolated():
    model = tiny_palm()
    model.add_finetune_params("actor")
    model.add_finetune_params("critic")
    randomize_lora(model, "actor")
    seq = torch.randint(0, 32, (2, 10))
    base = model(seq)
    assert (model(seq, finetune_scope="actor") - base).abs().max() > 1e-3
    assert_close(model(seq, finetune_scope="critic"), base, atol=0, rtol=0)
    assert_close(model(seq, finetune_scope="actor", disable_lora=True), base, atol=0, rtol=0)
    # gradients of a scope's loss reach only that scope's adapters among all adapters
    model(seq, finetune_scope="actor", return_loss=True).backward()
    assert all(p.grad is not None for p in model.finetune_parameters("actor"))
    assert all(p.grad is None for p in model.finetune_parameters("critic"))
    actor_ids = {id(p) for p in model.finetune_parameters("actor")}
    assert not actor_ids & {id(p) for p in model.palm_parameters()}


@pytest.mark.parametrize("flash_attn", [True, False])
def test_merged_lora_equals_unmerged(flash_attn):
    model = tiny_palm(flash_attn=flash_attn).double()
    model.add_finetune_params("sft", targets=ALL_TARGETS)
    randomize_lora(model, "sft")
    seq = torch.randint(0, 32, (2, 10))
    unmerged = model(seq, finetune_scope="sft")
    model.merge_finetune_params("sft")
    assert "sft" not in model.finetune_scopes
    assert_close(model(seq), unmerged, atol=1e-10, rtol=1e-10)


def test_duplicate_and_unknown_scopes_are_clear_errors():
    model = tiny_palm()
    model.add_finetune_params("actor")
    with pytest.raises(ValueError, match="already exists"):
        model.add_finetune_params("actor")
    assert model.add_finetune_params("actor", exist_ok=True) is model.finetune_modules["actor"]
    with pytest.raises(KeyError, match="'critic' not found"):
        model(torch.zeros(1, 3, dtype=torch.long), finetune_scope="critic")
    with pytest.raises(ValueError, match="LoRA targets"):
        model.add_finetune_params("x", targets=("qkv",))


def test_finetune_scopes_keyword_of_the_constructor():
    model = tiny_palm(finetune_scopes=("actor", "critic"), lora_r=3)
    assert model.finetune_scopes == ("actor", "critic")
    assert model.finetune_modules["actor"][0]["q"].A.shape[1] == 3


def test_input_adapters_in_place_without_autograd_equal_the_graph_path():
    """The block adds LoRA deltas in place when no graph is recorded (decoding) and out of
    place otherwise: both give the same outputs, for every target."""
    model = tiny_palm().eval()
    model.add_finetune_params("all", targets=("q", "k", "v", "o", "ff_in", "ff_out"))
    model.add_finetune_params("ff_only", targets=("ff_in",))
    model.add_finetune_params("k_only", targets=("k",))
    seq = torch.randint(0, 32, (2, 9))
    for scope in ("all", "ff_only", "k_only"):
        randomize_lora(model, scope, std=0.3)
        with_graph = model(seq, finetune_scope=scope)
        with torch.no_grad():
            in_place = model(seq, finetune_scope=scope)
        assert_close(in_place, with_graph.detach(), atol=1e-6, rtol=1e-6)
        assert not torch.allclose(with_graph, model(seq))  # the scope did change the logits
