"""Stage 1 distillation (attention transfer) on a tiny random teacher."""

import torch

from models.distill import DistillConfig, distill, lln_parameters
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


def test_only_lln_parameters_change():
    model = student()
    weights = {n: p.clone() for n, p in model.named_parameters() if "proj" in n}
    distill(model, TOKENS, DistillConfig(steps_per_layer=5, seq_len=32), progress=False)
    for name, p in model.named_parameters():
        if name in weights:
            assert torch.equal(p, weights[name]), name
    assert set(lln_parameters(model)) == {
        f"model.layers.{i}.self_attn.{n}" for i in (0, 1) for n in ("alpha", "beta", "mix")
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
