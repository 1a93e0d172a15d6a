"""Perplexity on held-out text, the measure of a converted model's quality."""

from __future__ import annotations

import html.parser
import math
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch
from torch import Tensor
from tqdm.auto import tqdm

from models.errors import ConversionError
from models.modeling_lln import LLNForCausalLM

# English prose that ships with every Debian system (package base-files); calibration uses
# other texts (models.convert.CALIBRATION_FILES).
EVALUATION_FILE = "/usr/share/common-licenses/GPL-3"


def evaluation_text() -> str:
    return Path(EVALUATION_FILE).read_text()


# A larger held-out text, from a source neither training nor calibration use: The Debian
# Administrator's Handbook (Debian package debian-handbook, GPL-2+ / CC-BY-SA-3.0), about 300K
# tokens of English technical prose with some commands.
HANDBOOK_PACKAGE = "debian-handbook"
HANDBOOK_HTML = "usr/share/doc/debian-handbook/html/en-US"


def handbook_text() -> str:
    """The handbook's English text, chapters in the book's order: from the installed package,
    else from its .deb fetched with `apt-get download` into $LLN_SERVE_HOME/downloads."""
    installed = Path("/") / HANDBOOK_HTML
    folder = installed if (installed / "index.html").is_file() else _fetch_handbook()
    return html_book_text(folder)


def html_book_text(folder: Path) -> str:
    """Text of an HTML book: the pages its index.html links to, in that order, navigation
    stripped, paragraphs apart by blank lines."""
    index = (folder / "index.html").read_text(encoding="utf-8")
    pages = dict.fromkeys(re.findall(r'href="([^"#/:]+\.html)', index))
    pages.pop("index.html", None)
    return "\n\n".join(_page_text((folder / page).read_text(encoding="utf-8")) for page in pages)


def _fetch_handbook() -> Path:
    from models.registry import lln_home  # registry imports the model stack; only needed here

    root = lln_home() / "downloads" / HANDBOOK_PACKAGE
    if not (root / HANDBOOK_HTML / "index.html").is_file():
        root.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=root.parent) as tmp:
            _run(["apt-get", "download", HANDBOOK_PACKAGE], cwd=tmp)
            deb = next(Path(tmp).glob(f"{HANDBOOK_PACKAGE}_*.deb"))
            _run(["dpkg-deb", "-x", str(deb), f"{tmp}/tree"], cwd=tmp)
            shutil.rmtree(root, ignore_errors=True)
            Path(tmp, "tree").rename(root)  # atomic: an interrupted fetch never looks complete
    return root / HANDBOOK_HTML


def _run(command: list[str], cwd: str) -> None:
    try:
        result = subprocess.run(command, cwd=cwd, capture_output=True, text=True)
    except FileNotFoundError as exc:
        raise ConversionError(f"{command[0]} is needed to fetch {HANDBOOK_PACKAGE}") from exc
    if result.returncode != 0:
        raise ConversionError(
            f"could not fetch {HANDBOOK_PACKAGE} ({' '.join(command)}): {result.stderr[-500:]}"
        )


class _PageText(html.parser.HTMLParser):
    """Collects a page's body text, skipping scripts, styles and the navigation bars."""

    BLOCKS = {"p", "div", "br", "li", "h1", "h2", "h3", "h4", "h5", "pre", "tr", "dt", "dd"}

    def __init__(self) -> None:
        super().__init__()
        self.parts: list[str] = []
        self.skipping: tuple[str, int] | None = None  # (tag, nesting depth) of a skipped element

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if self.skipping:
            name, depth = self.skipping
            self.skipping = (name, depth + (tag == name))
            return
        attributes = dict(attrs)
        classes = (attributes.get("class") or "").split()
        navigation = attributes.get("id") in ("banner", "title") or "docnav" in classes
        if tag in ("head", "script", "style") or navigation:
            self.skipping = (tag, 1)
        elif tag in self.BLOCKS:
            self.parts.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if self.skipping and tag == self.skipping[0]:
            depth = self.skipping[1] - 1
            self.skipping = (tag, depth) if depth else None

    def handle_data(self, data: str) -> None:
        if not self.skipping:
            self.parts.append(data)


def _page_text(page: str) -> str:
    parser = _PageText()
    parser.feed(page)
    lines = (line.strip() for line in "".join(parser.parts).splitlines())
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


@torch.no_grad()
def perplexity(
    model: LLNForCausalLM,
    token_ids: Tensor,
    *,
    window: int = 1024,
    progress: bool = False,
    decode_tail: int = 0,
    piece: int = 4,
) -> float:
    """exp(mean next-token NLL) over non-overlapping windows of `window` tokens.

    token_ids: [N]. Each window is scored on its own from an empty state (as a fresh request
    would be); a trailing part shorter than a window is dropped. With `decode_tail`, each
    window's last `decode_tail` tokens go through the model `piece` tokens at a time after a
    prefill of the rest (so through the few-row kernels of a decode step), and only they are
    scored.
    """
    num_windows = token_ids.numel() // window
    if num_windows == 0:
        raise ValueError(f"need at least {window} tokens, got {token_ids.numel()}")
    if not 0 <= decode_tail < window:
        raise ValueError(f"decode_tail must be in [0, {window}), got {decode_tail}")
    total_nll, count = 0.0, 0
    for i in tqdm(range(num_windows), desc="perplexity", disable=not progress):
        ids = token_ids[i * window : (i + 1) * window][None].to(model.device)
        logits = _window_logits(model, ids, decode_tail, piece)
        targets = ids[0, 1:][-logits.shape[1] + 1 :] if decode_tail else ids[0, 1:]
        nll = torch.nn.functional.cross_entropy(logits[0, :-1].float(), targets, reduction="sum")
        total_nll += nll.item()
        count += targets.numel()
    return math.exp(total_nll / count)


def _window_logits(model: LLNForCausalLM, ids: Tensor, decode_tail: int, piece: int) -> Tensor:
    """Logits of the whole window, or (decode_tail) of the token before the tail and the
    tail's tokens, the tail fed `piece` tokens at a time."""
    if not decode_tail:
        return model.forward_states(ids)[0]
    split = ids.shape[1] - decode_tail
    logits, states = model.forward_states(ids[:, :split])
    parts = [logits[:, -1:]]
    for start in range(split, ids.shape[1], piece):
        logits, states = model.forward_states(ids[:, start : start + piece], states)
        parts.append(logits)
    return torch.cat(parts, dim=1)
