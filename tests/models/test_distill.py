"""Distillation (attention transfer, layer selection, logits) on a tiny random teacher."""

import pytest
import torch

from models.calibrate import softmax_twin
from models.distill import (
    DistillConfig,
    LogitConfig,
    distill,
    distill_logits,
    first_differing_position,
    kl_loss,
    lln_parameters,
    select_layers,
    teacher_log_probs,
)
from tests.models.conftest import tiny_model

TOKENS = torch.randint(0, 64, (256,), generator=torch.Generator().manual_seed(0))


def student():
    model = tiny_model("lln_diag", dtype=torch.float32, local_size=4, num_sinks=1)
    with torch.no_grad():  # start far from the teacher, as an uncalibrated conversion would
        for layer in model.model.layers:
            layer.self_attn.mix.fill_(2.0)
    return model


def test_attention_transfer_reduces_every_layers_loss():
    model = student()
    config = DistillConfig(steps_per_layer=40, learning_rate=0.1, seq_len=32)
    report = distill(model, TOKENS, config, progress=False)
    assert [r.layer for r in report.layers] == [0, 1]
    for result in report.layers:
        assert result.loss_after < 0.7 * result.loss_before


def test_attention_transfer_trains_linear_feature_maps():
    """With feature_map="linear" the per-head maps are trained too (and saved with the rest)."""
    model = tiny_model(
        "lln_diag", dtype=torch.float32, local_size=4, num_sinks=1, feature_map="linear"
    )
    maps = {n: p.clone() for n, p in model.named_parameters() if n.endswith("_map")}
    config = DistillConfig(steps_per_layer=40, learning_rate=0.03, seq_len=32)
    report = distill(model, TOKENS, config, progress=False)
    for result in report.layers:
        assert result.loss_after < 0.7 * result.loss_before
    params = lln_parameters(model)
    for name, before in maps.items():
        assert not torch.equal(params[name], before), name


def test_only_lln_parameters_change():
    model = student()
    weights = {n: p.clone() for n, p in model.named_parameters() if "proj" in n}
    distill(model, TOKENS, DistillConfig(steps_per_layer=5, seq_len=32), progress=False)
    for name, p in model.named_parameters():
        if name in weights:
            assert torch.equal(p, weights[name]), name
    assert set(lln_parameters(model)) == {
        f"model.layers.{i}.self_attn.{n}"
        for i in (0, 1)
        for n in ("alpha", "beta", "mix", "count_power")
    }


def test_resume_from_checkpoint_gives_the_same_result(tmp_path):
    config = DistillConfig(steps_per_layer=10, seq_len=32)
    whole = student()
    distill(whole, TOKENS, config, progress=False)

    resumed = student()
    first = DistillConfig(steps_per_layer=10, seq_len=32, layers=[0])
    distill(resumed, TOKENS, first, checkpoint=tmp_path, progress=False)
    fresh = student()  # a new process: parameters come back from the checkpoint
    report = distill(fresh, TOKENS, config, checkpoint=tmp_path, progress=False)
    assert [r.layer for r in report.layers] == [0, 1]
    for name, value in lln_parameters(whole).items():
        assert torch.allclose(lln_parameters(fresh)[name], value), name


# Stage 2: logit distillation

LONG_TOKENS = torch.randint(0, 64, (192,), generator=torch.Generator().manual_seed(1))


def test_first_differing_position_is_where_the_student_leaves_the_teacher():
    model = student()
    first = first_differing_position(model.config)
    assert first == 4 + 1  # window + sinks
    ids = LONG_TOKENS[:24][None]
    teacher = softmax_twin(model)
    with torch.no_grad():
        ours, _ = model.forward_states(ids)
        theirs, _ = teacher.forward_states(ids)
    assert torch.allclose(ours[0, :first], theirs[0, :first], atol=1e-5)
    assert not torch.allclose(ours[0, first:], theirs[0, first:], atol=1e-3)


def test_logit_distillation_lowers_the_kl_to_the_teacher():
    model = student()
    with torch.no_grad():  # peaked next-token distributions, as a trained model's are
        model.lm_head.weight.mul_(10)
    config = LogitConfig(steps=30, learning_rate=0.1, seq_len=48)
    report = distill_logits(model, LONG_TOKENS, config, progress=False)
    assert report.first_position == 5 and len(report.losses) == 30
    assert report.kl_after < 0.5 * report.kl_before


def test_logit_distillation_changes_only_lln_parameters():
    model = student()
    weights = {n: p.clone() for n, p in model.named_parameters() if "proj" in n or "norm" in n}
    before = lln_parameters(model)
    distill_logits(model, LONG_TOKENS, LogitConfig(steps=3, seq_len=48), progress=False)
    for name, p in model.named_parameters():
        if name in weights:
            assert torch.equal(p, weights[name]), name
    after = lln_parameters(model)
    assert any(not torch.equal(before[n], after[n]) for n in before)


def test_logit_distillation_resumes_to_the_same_result(tmp_path):
    config = LogitConfig(steps=6, seq_len=48, learning_rate=0.05, checkpoint_every=3)
    whole = student()
    distill_logits(whole, LONG_TOKENS, config, progress=False)

    half = student()
    distill_logits(half, LONG_TOKENS, LogitConfig(**{**vars(config), "steps": 3}),
                   checkpoint=tmp_path, progress=False)  # fmt: skip
    fresh = student()  # a new process: everything comes back from the checkpoint
    report = distill_logits(fresh, LONG_TOKENS, config, checkpoint=tmp_path, progress=False)
    assert len(report.losses) == 6
    for name, value in lln_parameters(whole).items():
        assert torch.allclose(lln_parameters(fresh)[name], value, atol=1e-6), name


def test_logit_distillation_stops_when_its_time_budget_is_spent(tmp_path):
    config = LogitConfig(steps=1000, seq_len=48, max_seconds=1e-9)
    report = distill_logits(student(), LONG_TOKENS, config, checkpoint=tmp_path, progress=False)
    assert len(report.losses) == 1 and report.kl_after is not None
    assert (tmp_path / "stage2.pt").is_file()  # the stopped run is saved, so it can resume


def test_logit_distillation_needs_positions_past_the_window():
    with pytest.raises(ValueError, match="past the local window"):
        distill_logits(student(), LONG_TOKENS, LogitConfig(steps=1, seq_len=6), progress=False)


# Layer selection


def test_layer_selection_switches_off_a_harmful_lln_part():
    model = tiny_model("lln_diag", dtype=torch.float32, local_size=24, num_sinks=1)
    with torch.no_grad():
        model.lm_head.weight.mul_(10)
        attn = model.model.layers[0].self_attn  # layer 0: a peaked LLN part swamps the window
        attn.beta.fill_(10.0)
        attn.mix.fill_(8.0)
    before = [layer.self_attn.mix.clone() for layer in model.model.layers]
    report = select_layers(model, LONG_TOKENS, seq_len=48, progress=False)
    assert report.disabled == [0]  # layer 1's LLN part helps and is kept
    assert report.disabled == [i for i in (0, 1) if report.kl_without[i] < report.kl_all]
    assert report.kl_selected < report.kl_all
    for i, layer in enumerate(model.model.layers):
        expected = torch.full_like(before[i], float("-inf")) if i in report.disabled else before[i]
        assert torch.equal(layer.self_attn.mix, expected)
    # the reported KLs are the model's: recomputed independently
    first = first_differing_position(model.config)
    sequences = LONG_TOKENS.view(4, 48)
    targets = teacher_log_probs(model, sequences, first)
    with torch.no_grad():
        selected = (
            sum(kl_loss(model, s, t).item() for s, t in zip(sequences, targets, strict=True)) / 4
        )
        for layer in model.model.layers:
            layer.self_attn.mix.fill_(float("-inf"))
        local = (
            sum(kl_loss(model, s, t).item() for s, t in zip(sequences, targets, strict=True)) / 4
        )
    assert abs(selected - report.kl_selected) < 1e-6
    assert abs(local - report.kl_local) < 1e-6


def test_layer_selection_refuses_other_kernels():
    model = tiny_model("lln", dtype=torch.float32)
    with pytest.raises(ValueError, match="joint"):
        select_layers(model, LONG_TOKENS, seq_len=48, progress=False)
