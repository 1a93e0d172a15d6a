import math

import torch

from models.analyze import VARIANTS, analyze, layer_matrices
from tests.models.conftest import tiny_model


def test_analyze_writes_its_files_with_one_row_per_layer(tmp_path):
    model = tiny_model("lln_diag", dtype=torch.float32)
    ids = torch.randint(0, 64, (48,), generator=torch.Generator().manual_seed(0))
    rows = analyze(model, ids, tmp_path)
    assert [r["layer"] for r in rows] == [0, 1]
    assert all(math.isfinite(v) for r in rows for v in r.values())
    table = (tmp_path / "analysis.md").read_text()
    assert table.count("\n| ") == 3  # header + 2 layers
    assert (tmp_path / "analysis.png").stat().st_size > 10_000


def test_every_variant_is_a_row_stochastic_matrix():
    gen = torch.Generator().manual_seed(1)
    q, k = (torch.randn(2, 20, 8, generator=gen, dtype=torch.float64) for _ in range(2))
    alpha = beta = torch.tensor([1.5, 2.0], dtype=torch.float64)
    matrices = layer_matrices(q, k, alpha, beta, block=8)
    assert set(matrices) == set(VARIANTS)
    for name, p in matrices.items():
        assert torch.allclose(p.sum(-1), torch.ones(2, 20, dtype=torch.float64), atol=1e-5), name
        assert (p >= 0).all(), name


def test_lln_matrix_uses_the_learned_feature_maps():
    """With maps, the LLN matrix is LLN over the mapped q and k (the kernel's features)."""
    gen = torch.Generator().manual_seed(2)
    q, k = (torch.randn(2, 20, 8, generator=gen, dtype=torch.float64) for _ in range(2))
    alpha = beta = torch.tensor([1.5, 2.0], dtype=torch.float64)
    w_q, w_k = (torch.randn(2, 8, 8, generator=gen, dtype=torch.float64) for _ in range(2))
    mapped = layer_matrices(q, k, alpha, beta, block=8, maps=(w_q, w_k))
    plain = layer_matrices(q @ w_q.transpose(-1, -2), k @ w_k.transpose(-1, -2), alpha, beta, 8)
    assert torch.allclose(mapped["lln"], plain["lln"])
    assert torch.equal(mapped["softmax"], layer_matrices(q, k, alpha, beta, block=8)["softmax"])


def test_analyze_runs_on_a_model_with_feature_maps(tmp_path):
    model = tiny_model("lln_diag", dtype=torch.float32, feature_map="linear")
    ids = torch.randint(0, 64, (48,), generator=torch.Generator().manual_seed(0))
    rows = analyze(model, ids, tmp_path)
    assert all(math.isfinite(v) for r in rows for v in r.values())
