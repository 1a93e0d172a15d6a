"""Expressive attention (EA), C. Gros, arXiv:2407.18601, as a constant-state linear attention.

What the paper says (checked)
-----------------------------
Sources: the abstract of arXiv:2407.18601 at https://arxiv.org/abs/2407.18601 and at
https://arxiv.org/html/2407.18601v2 (v2, 8 Jan 2025, "Reorganizing attention-space geometry
with expressive attention"), and https://ar5iv.labs.arxiv.org/html/2407.18601 (v1, 26 Jul 2024,
"Climbing the Complexity Ladder with Expressive Attention"), as stored by the project's search
corpora. They state that:

- dot-product attention (DPA) compares query and key by Q^T K "together with a subsequent
  softmax normalization";
- EA "is based on (Q^T K)^2, the squared dot product": attention is enhanced when query and key
  are parallel *or* antiparallel and suppressed when they are orthogonal;
- EA "can be introduced into any attention-based code without additional compute costs or memory
  requirements", i.e. it is a drop-in change of the score-to-weight map, the rest of the
  attention pipeline (projections, masking, weighted sum of values) staying as it is;
- it is evaluated on autoregressive prediction tasks (so it is used with a causal mask).

What could not be checked
-------------------------
The corpora only hold the opening (abstract and introduction) of those pages; the paper's
section with the defining equation was not reachable, nor any code from the author. So three
details are NOT confirmed from the paper: (1) the exact normalisation, which from memory of the
paper (unverified) is a_ij = (Q_i.K_j)^2 / (eps + sum_l (Q_i.K_l)^2) with a small eps > 0;
(2) whether the 1/sqrt(d) of DPA is kept; (3) the value of eps.

Definition implemented here (choices where the paper could not be read)
----------------------------------------------------------------------
Per KV head, with q, k in R^D (after RoPE) and v in R^Dv::

    s_ts = q_t . k_s / sqrt(D)
    a_ts = s_ts^2 / (eps + sum_{u<=t} s_tu^2)          (s <= t; 0 for s > t)
    y_t  = sum_{s<=t} a_ts v_s

- Squared scores, row-normalised by their sum: the form in the abstract and in DESIGN.md.
- 1/sqrt(D) is kept (the squared score carries 1/D). The weights are scale-invariant except
  against eps, so the scale only sets how small eps is relative to the scores; keeping DPA's
  scale keeps that ratio the same for a model converted from a softmax checkpoint.
- eps is additive in the denominator, after the sum; default DEFAULT_EPS = 1e-6. A row then sums
  to 1 - eps / (eps + sum_{u<=t} s_tu^2) < 1, and a query orthogonal to every key (or q = 0)
  gives y = 0 instead of 0/0.
- Causal masking zeroes the squared scores of future keys before the sum (the analogue of -inf
  logits in softmax); the normalisation runs only over visible keys u <= t.
- GQA: q head h uses KV head h // (Hq / Hkv) (the repeat_interleave convention of Llama's
  repeat_kv).

Linear form. (q.k)^2 = phi(q).phi(k) with phi(x) the D(D+1)/2 distinct entries of x (x) x
(x_a^2, and sqrt(2) x_a x_b for a < b, in torch.triu_indices order), so
y_t = phi(q_t/sqrt(D)) S_t / (eps + phi(q_t/sqrt(D)) z_t), S_t = sum_{s<=t} phi(k_s) v_s^T,
z_t = sum_{s<=t} phi(k_s). phi has no 1/sqrt(D) inside: the scale is applied to q, so the state
(EAState) holds unscaled phi(k) sums. It has no exponentials and no running max: the entries of
S and z grow at most linearly with the number of tokens, which float32 holds for any practical
context. phi(q) has signed entries, so phi(q).z (a sum of squares in exact arithmetic) is
clamped at 0 against rounding; its relative error is about D * 2^-24 in float32. EA has no
forgetting: every past key keeps its weight.

Files: naive.py (quadratic float64-checkable reference), chunk.py (prefill, the feature map),
recurrent.py (one decode step).
"""

from lln_core.ops.ea.chunk import DEFAULT_EPS, ea_attention, ea_features, num_ea_features
from lln_core.ops.ea.naive import naive_ea_attention
from lln_core.ops.ea.recurrent import ea_step

__all__ = [
    "DEFAULT_EPS",
    "ea_attention",
    "ea_features",
    "ea_step",
    "naive_ea_attention",
    "num_ea_features",
]
