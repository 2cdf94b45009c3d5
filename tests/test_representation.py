"""representation.py: z is exactly what the classification head receives, for every supported family, plain and
through PEFT (FairLoRA, modules_to_save, backtracking), and it stays differentiable into the LoRA."""

from __future__ import annotations

import pytest
import torch
import transformers as T
from peft import get_peft_model

import fairnet_peft  # noqa: F401  (registers FairLoRA)
from fairnet_peft import FairLoraConfig, force_gate, gate_record
from fairnet_peft.tuner.detector import pool_tokens
from fairnet_peft.tuner.representation import (
    capture_head_input,
    find_head,
    last_token_index,
    representation_from_hidden,
    resolve_pooling,
)

T.logging.set_verbosity_error()
SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
PAD = 0


def small_model(kind: str, seed: int = 0):
    torch.manual_seed(seed)
    if kind == "bert":
        cfg = T.BertConfig(vocab_size=50, num_labels=3, **SMALL)
    elif kind == "roberta":
        cfg = T.RobertaConfig(vocab_size=50, num_labels=3, pad_token_id=1, **SMALL)
    elif kind == "distilbert":
        cfg = T.DistilBertConfig(vocab_size=50, dim=32, n_layers=2, n_heads=2, hidden_dim=64, num_labels=3)
    elif kind == "llama":
        cfg = T.LlamaConfig(vocab_size=50, num_key_value_heads=2, pad_token_id=PAD, num_labels=3, **SMALL)
    elif kind == "gpt2":
        cfg = T.GPT2Config(vocab_size=50, n_embd=32, n_layer=2, n_head=2, pad_token_id=PAD, num_labels=3)
    elif kind == "vit":
        cfg = T.ViTConfig(image_size=16, patch_size=4, num_channels=3, num_labels=3, **SMALL)
        return T.ViTForImageClassification(cfg).eval()
    else:
        raise ValueError(kind)
    return T.AutoModelForSequenceClassification.from_config(cfg).eval()


def small_batch(kind: str, padding: str = "right", batch: int = 5) -> dict:
    g = torch.Generator().manual_seed(1)
    if kind == "vit":
        return {"pixel_values": torch.randn(batch, 3, 16, 16, generator=g)}
    pad = 1 if kind == "roberta" else PAD
    ids = torch.randint(3, 50, (batch, 9), generator=g)
    mask = torch.ones(batch, 9, dtype=torch.long)
    for row, n_pad in ((1, 3), (3, 5)):
        cols = slice(9 - n_pad, None) if padding == "right" else slice(0, n_pad)
        ids[row, cols], mask[row, cols] = pad, 0
    return {"input_ids": ids, "attention_mask": mask}


def run(model, batch, **kw):
    with capture_head_input(model, batch, **kw) as cap:
        out = model(**batch, output_hidden_states=True)
    return cap.z, out


def close(a, b):
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------- one test per family (plain models)
@torch.no_grad()
def test_bert_z_is_the_pooler_output():
    model, batch = small_model("bert"), small_batch("bert")
    z, out = run(model, batch)
    close(model.classifier(z), out.logits)
    close(z, model.bert.pooler(out.hidden_states[-1]))  # dense+tanh of [CLS], not the raw [CLS]
    assert not torch.allclose(z, out.hidden_states[-1][:, 0])


@torch.no_grad()
def test_roberta_z_is_the_first_token_the_head_pools():
    model, batch = small_model("roberta"), small_batch("roberta")
    z, out = run(model, batch)
    head = model.classifier
    close(head.out_proj(torch.tanh(head.dense(z))), out.logits)
    close(z, out.hidden_states[-1][:, 0])


@torch.no_grad()
def test_distilbert_z_is_relu_pre_classifier():
    model, batch = small_model("distilbert"), small_batch("distilbert")
    z, out = run(model, batch)
    close(model.classifier(z), out.logits)
    close(z, torch.relu(model.pre_classifier(out.hidden_states[-1][:, 0])))


@torch.no_grad()
def test_vit_z_is_the_layernormed_cls_token():
    model, batch = small_model("vit"), small_batch("vit")
    z, out = run(model, batch)
    close(model.classifier(z), out.logits)
    close(z, model.vit.layernorm(out.hidden_states[-1])[:, 0])
    assert not torch.allclose(z, out.hidden_states[-1][:, 0], atol=1e-3)  # the old rule read pre-LayerNorm


@torch.no_grad()
@pytest.mark.parametrize("padding", ["left", "right"])
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_decoder_z_is_the_last_real_token(kind, padding):
    model, batch = small_model(kind), small_batch(kind, padding)
    z, out = run(model, batch)
    close(model.score(z), out.logits)
    hidden = out.hidden_states[-1]
    last = 8 if padding == "left" else torch.tensor([8, 5, 8, 3, 8])
    close(z, hidden[torch.arange(5), last])
    assert not torch.allclose(z, hidden[:, 0])


def test_last_token_index_follows_pad_ids_then_mask():
    ids = torch.tensor([[5, 6, 0, 0], [0, 0, 7, 8], [5, 6, 7, 8]])
    mask = (ids != 0).long()
    assert last_token_index(3, 4, "cpu", ids, None, 0).tolist() == [1, 3, 3]
    assert last_token_index(3, 4, "cpu", None, mask, 0).tolist() == [1, 3, 3]  # no ids: the mask
    assert last_token_index(3, 4, "cpu", ids, mask, None).tolist() == [1, 3, 3]  # no pad id: the mask
    assert last_token_index(3, 4, "cpu").tolist() == [3, 3, 3]


# ---------------------------------------------------------------------------- through PEFT
def fair(kind, **kw):
    kw.setdefault("init_weights", False)
    task = None if kind == "vit" else "SEQ_CLS"
    return get_peft_model(small_model(kind), FairLoraConfig(task_type=task, **kw)).eval()


@torch.no_grad()
@pytest.mark.parametrize("kind,padding", [("bert", "right"), ("distilbert", "right"), ("llama", "left")])
def test_fairlora_z_is_the_head_input_with_lora_on(kind, padding):
    model, batch = fair(kind), small_batch(kind, padding)
    name, head = find_head(model)
    assert type(head).__name__ == "ModulesToSaveWrapper"  # SEQ_CLS wraps classifier / score
    with force_gate(model, True):
        z_on, out = run(model, batch)
    close(head(z_on), out.logits)
    with force_gate(model, False):
        z_off, _ = run(model, batch)
    assert not torch.allclose(z_on, z_off, atol=1e-4)  # the LoRA moves z


@torch.no_grad()
def test_vit_with_modules_to_save_classifier():
    model, batch = fair("vit", modules_to_save=["classifier"]), small_batch("vit")
    name, head = find_head(model)
    assert name == "classifier" and type(head).__name__ == "ModulesToSaveWrapper"
    with force_gate(model, True):
        z, out = run(model, batch)
    close(head(z), out.logits)
    close(z, model.get_base_model().vit.layernorm(out.hidden_states[-1])[:, 0])


@torch.no_grad()
def test_backtracked_rows_replace_the_first_pass():
    """Adapted layers before the detector: FairLoRA reruns the gated rows; z must hold the rerun's rows."""
    model, batch = fair("bert", layers_to_transform=[0, 1]), small_batch("bert")
    with force_gate(model, False):
        model(**batch)
    model.peft_config["default"].threshold = float(gate_record(model).risk.median())
    z, out = run(model, batch)
    gate = gate_record(model).gate
    assert 0 < int(gate.sum()) < gate.numel()
    close(find_head(model)[1](z), out.logits)


def test_z_carries_gradient_into_the_lora():
    model, batch = fair("llama", init_weights=True), small_batch("llama", "left")
    model.train()
    with force_gate(model, True), capture_head_input(model, batch) as cap:
        model(**batch)
    assert cap.z.requires_grad
    cap.z.pow(2).sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if "lora_B" in n and p.requires_grad}
    assert grads and any(g is not None and g.abs().sum() > 0 for g in grads.values())


# ---------------------------------------------------------------------------- options and errors
@torch.no_grad()
@pytest.mark.parametrize("how", ["cls", "mean", "last"])
def test_hidden_state_poolings_keep_the_old_rule(how):
    model, batch = small_model("llama"), small_batch("llama")
    with capture_head_input(model, batch, pooling=how) as cap:
        out = model(**batch, output_hidden_states=True)
    assert cap.needs_hidden_states
    expected = pool_tokens(out.hidden_states[-1], batch["attention_mask"].float(), how)
    close(cap.representation(out), expected)
    close(representation_from_hidden(out, batch["attention_mask"], how), expected)
    with pytest.raises(ValueError, match="representation"):
        cap.z


def test_resolve_pooling_and_find_head_errors():
    bert, bare = small_model("bert"), T.BertModel(T.BertConfig(vocab_size=50, **SMALL))
    assert resolve_pooling("auto", bert) == "head" and resolve_pooling("mean", bert) == "mean"
    assert resolve_pooling("auto", bare) == "cls"
    with pytest.raises(ValueError, match="representation_module"):
        resolve_pooling("head", bare)
    with pytest.raises(ValueError, match="representation_pooling"):
        resolve_pooling("pooled", bert)
    assert find_head(bare, "pooler.dense")[0] == "pooler.dense"
    with pytest.raises(ValueError, match="representation_module='nope'"):
        find_head(bert, "nope")


def test_head_that_did_not_run_is_an_error():
    model = small_model("bert")
    with capture_head_input(model, {}) as cap:
        pass
    with pytest.raises(RuntimeError, match="did not run"):
        cap.z
    assert not model.classifier._forward_pre_hooks  # hooks are gone after the block


def test_head_dropout_off_gives_the_noise_free_head_input_in_train_mode():
    model, batch = small_model("bert").train(), small_batch("bert")
    torch.manual_seed(0)
    with torch.no_grad(), capture_head_input(model, batch, head_dropout=False) as cap:
        out = model(**batch, output_hidden_states=True)
    assert model.dropout.training  # restored after the block
    close(cap.z, model.bert.pooler(out.hidden_states[-1]))
    close(model.classifier(cap.z), out.logits)
    with torch.no_grad(), capture_head_input(model, batch) as cap:  # default: what the head reads, dropout included
        out = model(**batch, output_hidden_states=True)
    close(model.classifier(cap.z), out.logits)
    assert not torch.allclose(cap.z, model.bert.pooler(out.hidden_states[-1]))


def test_find_head_through_ddp_style_wrappers():
    model = small_model("bert")
    wrapped = torch.nn.DataParallel(model)
    assert find_head(wrapped)[1] is model.classifier
