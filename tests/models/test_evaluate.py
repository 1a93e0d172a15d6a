import math

import pytest
import torch

from models import evaluate
from models.errors import ConversionError
from models.evaluate import html_book_text, perplexity
from tests.models.conftest import tiny_model

PAGE = """<html><head><title>T</title><style>p {{ color: red }}</style></head><body>
<div id="banner"><a href="x"><span>Download the ebook</span></a></div>
<p id="title"><a href="index.html"><img alt="logo" src="a.png" /></a></p>
<ul class="docnav top"><li><a href="prev.html"><strong>Prev</strong></a></li></ul>
<div class="section"><h2>{title}</h2><div class="para">
\t\t\t\t{body} <code>apt install</code> done.
</div><div class="para">Second <em>paragraph</em>.</div></div>
<script>var skipped = 1;</script>
<ul class="docnav"><li><a href="next.html"><strong>Next</strong><div>nested</div></a></li></ul>
</body></html>"""


def write_book(folder, pages: dict[str, str]) -> None:
    links = "".join(f'<a href="{name}">x</a><a href="{name}#anchor">y</a>' for name in pages)
    (folder / "index.html").write_text(f'<a href="index.html">home</a>{links}')
    for name, (title, body) in pages.items():
        (folder / name).write_text(PAGE.format(title=title, body=body))


def test_html_book_text_follows_the_index_and_drops_navigation(tmp_path):
    write_book(tmp_path, {"b.html": ("2. Two", "Beta text"), "a.html": ("1. One", "Alpha text")})
    text = html_book_text(tmp_path)
    assert text.index("2. Two") < text.index("Beta text") < text.index("1. One")
    assert "Beta text apt install done.\n\nSecond paragraph." in text
    assert not text.startswith("T\n")  # the <head> (page title) is not text
    for removed in ("Download the ebook", "Prev", "Next", "nested", "skipped", "color", "\t"):
        assert removed not in text
    assert text.count("Alpha text") == 1  # a page linked twice (with an anchor) is read once


def test_handbook_fetch_without_apt_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(evaluate, "HANDBOOK_HTML", "no/such/folder")
    monkeypatch.setenv("LLN_SERVE_HOME", str(tmp_path))
    monkeypatch.setenv("PATH", str(tmp_path))  # no apt-get, no dpkg-deb
    with pytest.raises(ConversionError, match="apt-get is needed"):
        evaluate.handbook_text()
    assert not (tmp_path / "downloads" / "debian-handbook").exists()  # nothing half-written


def test_perplexity_is_exp_mean_nll_over_windows():
    model = tiny_model("lln_diag")
    ids = torch.randint(0, 64, (50,))
    nll = []
    for start in (0, 16, 32):  # three full windows of 16; the last 2 tokens are dropped
        logits = model(ids[None, start : start + 16]).logits[0, :-1]
        nll.append(torch.nn.functional.cross_entropy(logits, ids[start + 1 : start + 16]))
    expected = math.exp(torch.stack(nll).mean().item())
    # perplexity() scores in float32
    assert perplexity(model, ids, window=16) == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match="need at least"):
        perplexity(model, ids[:10], window=16)


def test_perplexity_of_a_decoded_tail_scores_only_the_tail():
    """decode_tail feeds each window's last tokens a few at a time after a prefill: the same
    logits as one forward pass (the model's forms agree), scored on the tail alone."""
    model = tiny_model("lln_diag", dtype=torch.float64)
    ids = torch.randint(0, 64, (40,), generator=torch.Generator().manual_seed(1))
    nll = []
    for start in (0, 16):
        logits = model(ids[None, start : start + 16]).logits[0, :-1]
        nll.append(torch.nn.functional.cross_entropy(logits[-5:], ids[start + 11 : start + 16]))
    expected = math.exp(torch.stack(nll).mean().item())
    got = perplexity(model, ids, window=16, decode_tail=5, piece=2)
    assert got == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="decode_tail"):
        perplexity(model, ids, window=16, decode_tail=16)
