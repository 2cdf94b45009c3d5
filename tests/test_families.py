""""Any HF model" breadth: Swin, ConvNeXt, DeiT, DINOv2, a CLIP vision classifier and Wav2Vec2 (audio), each on a
tiny seeded config, at the defaults. For every family: the resolved config and row-by-row gating, one short
FairTrainer run that moves the LoRA and the detector, save/load with equal logits, the detector's pooled input
against a hand computation from `output_hidden_states`, and z = what the classification head receives."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers as T
from datasets import Dataset
from peft import PeftModel, get_peft_model

import fairnet_peft  # noqa: F401  (registers FairLoRA)
from fairnet_peft import FairLoraConfig, FairTrainer, FairTrainingArguments, force_gate, gate_record
from fairnet_peft.tuner.detector import as_tokens
from fairnet_peft.tuner.layer import FairLoraLayer
from fairnet_peft.tuner.representation import capture_head_input, find_head

from .helpers import TINY_RUN_FILTERS  # noqa: E402

# tiny sizes trigger FairTrainer's small-data diagnostics by design (asserted in test_selection.py and
# test_trainer_defaults.py); here they are expected, not news
pytestmark = [pytest.mark.filterwarnings(f) for f in TINY_RUN_FILTERS]

T.logging.set_verbosity_error()
FAMILIES = ["swin", "convnext", "deit", "dinov2", "clip", "wav2vec2"]
VIT_SMALL = dict(image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=2, num_attention_heads=2)
AUDIO_LEN, AUDIO_VALID = 1600, (1600, 800, 1600, 1200)  # samples per row: rows 1 and 3 are right-padded


def build(kind: str, seed: int = 0) -> torch.nn.Module:
    """A tiny seeded classifier of `kind`, built from its config (no download), in eval mode."""
    torch.manual_seed(seed)
    if kind == "swin":
        cfg = T.SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[2, 2], window_size=2,
                           num_labels=2)
        return T.SwinForImageClassification(cfg).eval()
    if kind == "convnext":
        cfg = T.ConvNextConfig(num_stages=2, hidden_sizes=[16, 32], depths=[1, 1], patch_size=4, image_size=32,
                               num_labels=2)
        return T.ConvNextForImageClassification(cfg).eval()
    if kind == "deit":
        return T.DeiTForImageClassification(T.DeiTConfig(intermediate_size=64, num_labels=2, **VIT_SMALL)).eval()
    if kind == "dinov2":
        return T.Dinov2ForImageClassification(T.Dinov2Config(mlp_ratio=2, num_labels=2, **VIT_SMALL)).eval()
    if kind == "clip":
        text = dict(vocab_size=50, hidden_size=24, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
        cfg = T.CLIPConfig(text_config=text, vision_config=dict(intermediate_size=64, **VIT_SMALL), num_labels=2)
        return T.CLIPForImageClassification(cfg).eval()
    if kind == "wav2vec2":
        cfg = T.Wav2Vec2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                               conv_dim=(16, 16), conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=8,
                               num_conv_pos_embedding_groups=2, classifier_proj_size=24, num_labels=2, vocab_size=10)
        return T.Wav2Vec2ForSequenceClassification(cfg).eval()
    raise ValueError(kind)


def inputs(kind: str, n: int = 4, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    if kind != "wav2vec2":
        size = 32 if kind in ("swin", "convnext") else 16
        return {"pixel_values": torch.randn(n, 3, size, size, generator=g)}
    values, mask = torch.randn(n, AUDIO_LEN, generator=g), torch.zeros(n, AUDIO_LEN, dtype=torch.long)
    for row in range(n):
        valid = AUDIO_VALID[row % len(AUDIO_VALID)]
        mask[row, :valid] = 1
        values[row, valid:] = 0.0
    return {"input_values": values, "attention_mask": mask}


def fair(kind: str, seed: int = 0, **kw):
    return get_peft_model(build(kind, seed), FairLoraConfig(**kw)).eval()


# (detector reads, its width, z width, a few default targets): what the defaults resolve to. z is the head's input:
# DINOv2 concatenates [CLS] and the mean patch token (2 × 32), Wav2Vec2 projects to classifier_proj_size (24).
RESOLVED = {
    "swin": ("swin.encoder.layers.1", 32, 32, {"q_proj", "v_proj", "fc1"}),
    "convnext": ("convnext.encoder.stages.1", 16, 32, {"dwconv", "pwconv1", "downsampling_layer.1"}),
    "deit": ("deit.layers.1", 32, 32, {"q_proj", "v_proj", "fc1"}),
    "dinov2": ("dinov2.encoder.layer.1", 32, 64, {"q_proj", "v_proj", "fc1"}),
    "clip": ("vision_model.encoder.layers.1", 32, 32, {"q_proj", "v_proj", "fc1"}),
    "wav2vec2": ("wav2vec2.encoder.layers.1", 32, 24, {"q_proj", "v_proj", "intermediate_dense"}),
}


# ---------------------------------------------------------------------------- config and gating
@torch.no_grad()
@pytest.mark.parametrize("kind", FAMILIES)
def test_defaults_resolve_and_gate_row_by_row(kind):
    model, batch = fair(kind, init_weights=False), inputs(kind)
    cfg = model.peft_config["default"]
    read, width, z_width, targets = RESOLVED[kind]
    assert (cfg.detector_module, cfg.detector_input_dim, cfg.representation_dim) == (read, width, z_width)
    assert targets <= set(cfg.target_modules)
    gate = torch.tensor([1, 0, 1, 0])
    on, off, mixed = (model(**batch, fair_gate=g).logits for g in (torch.ones(4), torch.zeros(4), gate))
    assert not torch.allclose(on, off, atol=1e-4)  # the LoRA changes the output
    torch.testing.assert_close(mixed[gate == 1], on[gate == 1], rtol=0, atol=1e-5)  # Swin: every window of a row
    torch.testing.assert_close(mixed[gate == 0], off[gate == 0], rtol=0, atol=1e-5)
    model(**batch)
    assert gate_record(model).risk.shape == (4,) and gate_record(model).source == "detector"


# ---------------------------------------------------------------------------- train one epoch, save, load
def dataset(kind: str, n: int = 16) -> Dataset:
    batch = inputs(kind, n=n, seed=2)
    columns = {k: v.numpy() for k, v in batch.items()}
    columns["labels"] = np.arange(n) % 2
    columns["sensitive"] = (np.arange(n) // 2) % 2  # both groups in both classes
    return Dataset.from_dict(columns).with_format("torch")


@pytest.mark.parametrize("kind", FAMILIES)
def test_one_epoch_moves_lora_and_detector_and_round_trips(kind, tmp_path):
    model = fair(kind)
    detector = model.base_model.model.fair_bias_detector.fairlora_detector["default"]
    before = {n: p.detach().clone() for n, p in detector.named_parameters()}
    args = FairTrainingArguments(str(tmp_path / "out"), num_train_epochs=1, per_device_train_batch_size=8,
                                 detector_epochs=1, detector_min_updates=2, lora_min_updates=2,
                                 detector_holdout_fraction=0.0, train_lora_when_blind=True,  # random features: blind
                                 report_to=[], save_strategy="no", disable_tqdm=True,
                                 seed=0, dataloader_num_workers=0, use_cpu=True)
    FairTrainer(model=model, args=args, train_dataset=dataset(kind)).train()
    assert model.base_model.lora_relative_update("default") > 0  # B started at zero
    assert any(not torch.equal(before[n], p) for n, p in detector.named_parameters())
    assert model.base_model.model.fair_bias_detector.fairlora_prototype_counts["default"].sum() > 0

    model.eval().save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(build(kind), str(tmp_path / "adapter")).eval()
    batch = inputs(kind)
    with torch.no_grad():
        expected, risk = model(**batch).logits, gate_record(model).risk
        torch.testing.assert_close(reloaded(**batch).logits, expected)
        torch.testing.assert_close(gate_record(reloaded).risk, risk)


# ---------------------------------------------------------------------------- what the detector reads
def hand_tokens(kind: str, hidden_states: tuple) -> torch.Tensor:
    """Input of the detector's block (hidden_states[1]: input of block / stage 1) as (B, positions, d)."""
    hidden = hidden_states[1]
    return hidden.flatten(2).transpose(1, 2) if kind == "convnext" else hidden  # ConvNeXt: (B, C, H, W) → H×W


def hand_frame_mask(n_frames: int, batch: dict) -> torch.Tensor:
    """Wav2Vec2 frames after the conv feature extractor (kernels 10, 3; strides 5, 2) of each row's valid samples."""
    valid = batch["attention_mask"].sum(1)
    frames = ((valid - 10) // 5 + 1 - 3) // 2 + 1
    return (torch.arange(n_frames) < frames.unsqueeze(1)).float()


@torch.no_grad()
@pytest.mark.parametrize("kind", FAMILIES)
def test_detector_pools_over_the_positions_of_its_block(kind):
    model, batch = fair(kind, detector_pooling="mean"), inputs(kind)
    net = model.base_model.model.fair_bias_detector.fairlora_detector["default"]
    seen, logits = {}, net.logits

    def spy(hidden, mask=None):  # the detector's input positions and its logits, as the forward computes them
        seen["tokens"], seen["logits"] = as_tokens(hidden), logits(hidden, mask)
        return seen["logits"]

    net.logits = spy
    try:
        out = model(**batch, output_hidden_states=True)
    finally:
        del net.logits
    tokens = hand_tokens(kind, out.hidden_states)
    torch.testing.assert_close(seen["tokens"], tokens)
    normed = net.in_norm(tokens)
    if kind == "wav2vec2":  # the mean runs over each row's real frames only
        assert tokens.shape[1] == 159
        mask = hand_frame_mask(tokens.shape[1], batch).unsqueeze(-1)
        expected = (normed * mask).sum(1) / mask.sum(1)
        assert not torch.allclose(expected[1], normed[1].mean(0), atol=1e-4)  # row 1 is half padding
    else:
        # Swin: 4×4 merged patches; ConvNeXt: 8×8 positions; DeiT: [CLS], [DIST] and 16 patches; others [CLS] + 16
        assert tokens.shape[1] == {"swin": 16, "convnext": 64, "deit": 18}.get(kind, 17)
        expected = normed.mean(1)
    torch.testing.assert_close(seen["logits"], net.risk_mlp(expected).squeeze(-1))


# ---------------------------------------------------------------------------- z is the head's input
@torch.no_grad()
@pytest.mark.parametrize("kind", FAMILIES)
def test_z_is_what_the_classification_head_receives(kind):
    model, batch = fair(kind, init_weights=False), inputs(kind)
    cfg = model.peft_config["default"]
    _, head = find_head(model, cfg.representation_module)
    received = []
    hook = head.register_forward_pre_hook(lambda m, a: received.append(a[0]))
    try:
        with force_gate(model, True), capture_head_input(model, batch, pooling=cfg.representation_pooling,
                                                          head_name=cfg.representation_module) as cap:
            out = model(**batch)
    finally:
        hook.remove()
    assert len(received) == 1 and received[0].shape == (4, cfg.representation_dim)
    torch.testing.assert_close(cap.z, received[0], rtol=0, atol=0)
    torch.testing.assert_close(head(cap.z), out.logits)


# ---------------------------------------------------------------------------- what a family must be told
def test_missing_head_and_targets_errors_name_the_field_and_an_example():
    torch.manual_seed(0)
    teacher = T.DeiTForImageClassificationWithTeacher(T.DeiTConfig(intermediate_size=64, num_labels=2, **VIT_SMALL))
    with pytest.raises(ValueError, match=r"representation_module='distillation_classifier'"):
        get_peft_model(teacher, FairLoraConfig(representation_pooling="head"))
    plain = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.LazyLinear(2))
    with pytest.raises(ValueError, match=r"target_modules=\['0', '3'\]"):
        get_peft_model(plain, FairLoraConfig())


# ---------------------------------------------------------------------------- text layouts a gate must handle
def build_text(kind: str, seed: int = 0) -> torch.nn.Module:
    """Tiny seeded text classifiers whose layouts are unusual for a per-example gate: OPT flattens the tokens to
    (B·T, d) before its MLP; DeBERTa-v2 projects a relative-position table shared by the batch (v3 style,
    `share_att_key`: through the query and key projections too); ALBERT runs one shared layer at every depth."""
    torch.manual_seed(seed)
    small = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                 num_labels=2, pad_token_id=0)
    if kind == "opt":
        return T.OPTForSequenceClassification(T.OPTConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2,
                                                          ffn_dim=64, num_attention_heads=2, word_embed_proj_dim=32,
                                                          num_labels=2, pad_token_id=0)).eval()
    if kind.startswith("deberta"):
        cfg = T.DebertaV2Config(**small, relative_attention=True, pos_att_type=["p2c", "c2p"], max_relative_positions=8,
                                position_buckets=4, share_att_key=kind == "deberta-v3")
        return T.DebertaV2ForSequenceClassification(cfg).eval()
    if kind == "albert":
        return T.AlbertForSequenceClassification(T.AlbertConfig(**small, embedding_size=16)).eval()
    if kind == "mobilebert":  # the block's first module reads the bottleneck (32), the block reads 64
        return T.MobileBertForSequenceClassification(T.MobileBertConfig(
            **{**small, "hidden_size": 64}, embedding_size=32, intra_bottleneck_size=32, true_hidden_size=32)).eval()
    if kind == "longformer":  # its self-attention transposes to (T, B, d) before the projections
        return T.LongformerForSequenceClassification(T.LongformerConfig(**small, attention_window=4,
                                                                        max_position_embeddings=80)).eval()
    if kind == "squeezebert":  # its blocks are nn.Conv1d layers over (B, d, T), grouped
        return T.SqueezeBertForSequenceClassification(T.SqueezeBertConfig(
            **{k: v for k, v in small.items() if k != "num_attention_heads"}, num_attention_heads=4, embedding_size=32,
            q_groups=2, k_groups=2, v_groups=2, post_attention_groups=2, intermediate_groups=4,
            output_groups=4)).eval()
    if kind in MOE_FAMILIES:
        config = MOE_FAMILIES[kind](**{**small, "num_attention_heads": 4}, num_key_value_heads=4, head_dim=8,
                                    num_local_experts=4, num_experts=4, num_experts_per_tok=2,
                                    moe_intermediate_size=32, shared_expert_intermediate_size=32, kv_channels=8,
                                    n_routed_experts=4, n_shared_experts=1, first_k_dense_replace=0,
                                    kv_lora_rank=8, q_lora_rank=8, qk_rope_head_dim=4, qk_nope_head_dim=4,
                                    v_head_dim=8, max_position_embeddings=64)
        return T.AutoModelForSequenceClassification.from_config(config).eval()
    raise ValueError(kind)


#: Mixture-of-experts decoders: their blocks flatten the tokens to (B·T, d) for the router and the experts (and,
#: in Qwen2-MoE, for the shared expert), so a per-example gate can follow only the shared parts.
MOE_FAMILIES = {"mixtral": T.MixtralConfig, "qwen2-moe": T.Qwen2MoeConfig, "deepseek-v2": T.DeepseekV2Config,
                "phimoe": T.PhimoeConfig, "jetmoe": T.JetMoeConfig, "hunyuan-moe": T.HunYuanMoEV1Config}
TEXT_FAMILIES = ["opt", "deberta-v2", "deberta-v3", "albert", "mobilebert", "longformer", *MOE_FAMILIES]


def padded_batch_gates_row_by_row(model) -> tuple[torch.Tensor, torch.Tensor]:
    """Four seeded rows of 7 tokens (row 1 padded after 5): the gate forced on and off changes the logits, and a
    mixed gate gives each row what the forced gate gives it. Returns the batch (ids, attention mask)."""
    ids = torch.randint(1, 64, (4, 7), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0  # a padded row
    ids[1, 5:] = 0
    gate = torch.tensor([1, 0, 1, 0])
    on, off, mixed = (model(input_ids=ids, attention_mask=mask, fair_gate=x).logits
                      for x in (torch.ones(4), torch.zeros(4), gate))
    assert not torch.allclose(on, off, atol=1e-4)
    torch.testing.assert_close(mixed[gate == 1], on[gate == 1], rtol=0, atol=1e-5)
    torch.testing.assert_close(mixed[gate == 0], off[gate == 0], rtol=0, atol=1e-5)
    return ids, mask


@torch.no_grad()
@pytest.mark.parametrize("kind", TEXT_FAMILIES)
def test_text_layouts_gate_row_by_row_and_each_row_as_alone(kind):
    model = get_peft_model(build_text(kind), FairLoraConfig(task_type="SEQ_CLS", init_weights=False)).eval()
    targets = set(model.peft_config["default"].target_modules)
    if kind.startswith("deberta"):  # the batch-shared table's projections are not adapted
        assert not targets & {"pos_key_proj", "pos_query_proj"} and "value_proj" in targets
        assert ({"query_proj", "key_proj"} & targets) == (set() if kind == "deberta-v3" else {"query_proj", "key_proj"})
    if kind == "mobilebert":  # measured by a probe forward: the width the block reads, not its first module's
        assert model.peft_config["default"].detector_input_dim == 64
    if kind == "longformer":  # the projections fed (T, B, d) gate dim 1; the others get (B, T, d)
        first = {k.rpartition(".")[2] for k, m in model.named_modules()
                 if isinstance(m, FairLoraLayer) and m.sequence_first}
        assert first == {"query", "key", "value", "query_global", "key_global", "value_global"} & targets, first
    if kind in MOE_FAMILIES:  # no router and no routed expert is adapted; the shared expert is, row by row
        adapted = [key for key, module in model.named_modules() if isinstance(module, FairLoraLayer)]
        assert adapted and not [key for key in adapted if {"router", "gate", "experts"} & set(key.split("."))]
        shared = [key for key in adapted if "shared_expert" in key.split(".")]
        assert bool(shared) == (kind == "qwen2-moe") and all(model.get_submodule(k).windowed for k in shared)
    ids, mask = padded_batch_gates_row_by_row(model)
    # the detector's gate: a τ between the rows' risks gives a mixed gate, each row scored as when it is alone
    risk = (model(input_ids=ids, attention_mask=mask), gate_record(model).risk)[1]
    model.peft_config["default"].threshold = float(risk.median())
    batch = model(input_ids=ids, attention_mask=mask).logits
    record = gate_record(model)
    assert torch.equal(record.gate, record.risk > float(risk.median()))  # the risk reported is the one that gated
    assert 0 < int(record.gate.sum()) < 4
    for row in (0, 2, 3):  # unpadded rows (a padded row's positions differ alone)
        alone = model(input_ids=ids[row:row + 1], attention_mask=mask[row:row + 1]).logits
        torch.testing.assert_close(alone[0], batch[row], rtol=0, atol=1e-5)
        assert bool(gate_record(model).gate[0]) == bool(record.gate[row])


@torch.no_grad()
def test_albert_detector_trains_on_the_read_that_gates(tmp_path):
    """ALBERT calls its shared layer, and so the detector's read module, at every depth. The frozen pass the detector
    stage trains on must capture the first read (the one that decided the gate), not the last."""
    model = get_peft_model(build_text("albert"), FairLoraConfig(task_type="SEQ_CLS"))
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 64, (8, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[1::2, 4:] = 0  # padded rows: the pool runs over real tokens only
    ids[mask == 0] = 0
    data = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": mask.tolist(),
                              "labels": [i % 2 for i in range(8)],
                              "sensitive": [(i // 2) % 2 for i in range(8)]}).with_format("torch")
    args = FairTrainingArguments(str(tmp_path / "out"), per_device_train_batch_size=4, report_to=[],
                                 save_strategy="no", disable_tqdm=True, use_cpu=True)
    passed = FairTrainer(model=model, args=args, train_dataset=data).frozen_pass()
    out = model.eval()(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    weights = mask.unsqueeze(-1).float()
    first, second = ((h * weights).sum(1) / weights.sum(1) for h in out.hidden_states[:2])  # inputs of depth 0, 1
    assert not torch.allclose(first, second, atol=1e-2)
    np.testing.assert_allclose(passed["feat"], first.numpy(), rtol=0, atol=1e-5)
    np.testing.assert_allclose(passed["risk"], gate_record(model).risk.numpy(), rtol=0, atol=1e-6)


@torch.no_grad()
def test_xlnet_defaults_name_the_read_point_that_works_and_it_gates_row_by_row():
    """XLNet's blocks read (T, B, d): the default read point (a block's input) is refused with the settings that
    work, and with them (the head's input, backtracking; the feed-forward layers, gated along dim 1) each row of a
    mixed batch gives what it gives alone."""
    torch.manual_seed(0)
    xlnet = T.XLNetForSequenceClassification(T.XLNetConfig(vocab_size=64, d_model=32, n_layer=2, n_head=4,
                                                           d_inner=64, num_labels=2, pad_token_id=0)).eval()
    with pytest.raises(ValueError, match=r"detector_module='sequence_summary'.*target_modules=\['layer_1', 'layer_2'\]"):
        get_peft_model(xlnet, FairLoraConfig(task_type="SEQ_CLS"))
    model = get_peft_model(xlnet, FairLoraConfig(task_type="SEQ_CLS", init_weights=False,
                                                 detector_module="sequence_summary",
                                                 target_modules=["layer_1", "layer_2"])).eval()
    assert all(m.sequence_first for m in model.modules() if isinstance(m, FairLoraLayer))
    ids = torch.randint(1, 64, (4, 9), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    model(input_ids=ids, attention_mask=mask)
    risk = gate_record(model).risk
    assert risk.shape == (4,)
    model.peft_config["default"].threshold = float(risk.median())
    batch, gate = model(input_ids=ids, attention_mask=mask).logits, gate_record(model).gate
    assert 0 < int(gate.sum()) < 4
    forced = model(input_ids=ids, attention_mask=mask, fair_gate=torch.ones(4)).logits
    assert not torch.allclose(forced[~gate], batch[~gate], atol=1e-4)  # the adapter changes the rows it skips
    for row in range(4):
        alone = model(input_ids=ids[row:row + 1], attention_mask=mask[row:row + 1]).logits
        torch.testing.assert_close(alone[0], batch[row], rtol=0, atol=1e-5)


@torch.no_grad()
def test_squeezebert_conv1d_layers_adapt_and_the_defaults_name_a_read_point_its_encoder_calls():
    """SqueezeBERT: its layers are nn.Conv1d over (B, d, T), which FairLoRA adapts (A with the base's geometry, one
    group); its encoder calls each block's forward directly, so no hook on a block runs: the default read point is
    refused with the module that works (the pooler's input, backtracking), and a read point that is never called is
    a warning on the first forward, not a silent adapter off. With the named read point each row of a mixed batch
    gives what it gives alone."""
    with pytest.raises(ValueError, match=r"calls its blocks' forward method directly.*"
                                         r"detector_module='transformer.pooler'"):
        get_peft_model(build_text("squeezebert"), FairLoraConfig(task_type="SEQ_CLS"))
    missed = get_peft_model(build_text("squeezebert"), FairLoraConfig(
        task_type="SEQ_CLS", detector_module="transformer.encoder.layers.1", target_modules=["query", "value"]))
    ids = torch.randint(1, 64, (4, 7), generator=torch.Generator().manual_seed(3))
    with pytest.warns(RuntimeWarning, match=r"detector of adapter\(s\) \['default'\] did not run in this forward: "
                                            r"its read module \(transformer.encoder.layers.1\)"):
        missed(input_ids=ids)
    model = get_peft_model(build_text("squeezebert"), FairLoraConfig(
        task_type="SEQ_CLS", init_weights=False, detector_module="transformer.pooler",
        target_modules=["query", "value", "conv1d"])).eval()  # 2 layers: query, value and three Conv1d of 1x1
    convs = [m for m in model.modules() if isinstance(m, FairLoraLayer)]
    assert len(convs) == 2 * (2 + 3) and all(isinstance(m.get_base_layer(), torch.nn.Conv1d) for m in convs)
    assert {m.groups for m in convs} == {2, 4} and all(m.fairlora_A["default"].groups == 1 for m in convs)
    ids, mask = padded_batch_gates_row_by_row(model)
    model(input_ids=ids, attention_mask=mask)
    risk = gate_record(model).risk.sort().values  # τ in the middle of the widest gap: no row sits at the threshold
    widest = int(torch.argmax(risk.diff()))
    model.peft_config["default"].threshold = float(risk[widest:widest + 2].mean())
    batch, gated = model(input_ids=ids, attention_mask=mask).logits, gate_record(model).gate
    assert 0 < int(gated.sum()) < 4
    for row in range(4):
        alone = model(input_ids=ids[row:row + 1], attention_mask=mask[row:row + 1]).logits
        torch.testing.assert_close(alone[0], batch[row], rtol=0, atol=1e-5)
        assert bool(gate_record(model).gate[0]) == bool(gated[row])


# ---------------------------------------------------------------------------- vision layouts a gate must handle
VISION_LAYOUTS = {  # default configs at 64 px: each layout below failed at the defaults before it was handled
    "pvt_v2": T.PvtV2Config,  # a wrapper module named like the Conv2d it holds (`dwconv.dwconv`)
    "segformer": T.SegformerConfig,  # the same, for its sequence reduction
    "mobilenet_v2": T.MobileNetV2Config,  # model code reads the wrapped convolution's `stride`
    "mobilevit": T.MobileViTConfig,  # stages of two block types; its transformer reads unfolded patches
    "swinv2": T.Swinv2Config,  # its position-bias MLP (renamed in transformers 5) reads a table the batch shares
}


@torch.no_grad()
@pytest.mark.parametrize("kind", sorted(VISION_LAYOUTS))
def test_vision_layouts_gate_row_by_row_and_each_row_as_alone(kind):
    torch.manual_seed(0)
    base = T.AutoModelForImageClassification.from_config(VISION_LAYOUTS[kind](image_size=64, num_labels=2)).eval()
    model = get_peft_model(base, FairLoraConfig(init_weights=False)).eval()
    x = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    gate = torch.tensor([1, 0, 1, 0])
    on, off, mixed = (model(pixel_values=x, fair_gate=g).logits for g in (torch.ones(4), torch.zeros(4), gate))
    assert not torch.equal(on, off)
    torch.testing.assert_close(mixed[gate == 1], on[gate == 1], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(mixed[gate == 0], off[gate == 0], rtol=1e-4, atol=1e-6)
    for row in range(4):  # each row of the mixed batch as alone (the untrained detector of a random CNN may
        alone = model(pixel_values=x[row:row + 1], fair_gate=gate[row:row + 1].float()).logits  # give one risk)
        torch.testing.assert_close(alone[0], mixed[row], rtol=1e-4, atol=1e-6)
    model(pixel_values=x)
    assert gate_record(model).risk.shape == (4,)  # one risk per image: read where the input is one row per image
    if kind == "mobilevit":
        assert model.peft_config["default"].detector_module.endswith("encoder.layer.2")
        assert all(m.windowed for k, m in model.named_modules() if isinstance(m, FairLoraLayer) and ".transformer." in k)


def test_stages_held_as_lists_are_no_stack_and_the_error_asks_for_target_modules():
    """PoolFormer keeps each stage's blocks in a ModuleList inside `encoder.block`: a list is never called, so its
    input cannot be read; the defaults stop and name the field with modules of the model."""
    torch.manual_seed(0)
    base = T.PoolFormerForImageClassification(T.PoolFormerConfig(image_size=64, num_labels=2)).eval()
    with pytest.raises(ValueError, match=r"Pass target_modules=\[\.\.\.\].*e\.g\. target_modules=\["):
        get_peft_model(base, FairLoraConfig())
