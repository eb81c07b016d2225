"""DART: pruning by token duplication inside the LLM."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tokprune.core.budget import Budget
from tokprune.methods.base import ImageTokens, LLMMethod, Selection
from tokprune.methods.options import check_choice, check_int, check_llm_layer

QUOTAS = ("code", "exact")
PIVOT_ORDERS = ("set", "norm")
# key_positions -> the key signal: "row" numbers every row from its first real token before taking the keys
# L1 norms (as the code sees its one unpadded row), "given" takes them at the positions the caller gave
KEY_SIGNALS = {"row": "keys_from_start", "given": "keys"}
POSITION = "position"  # the engine's per-token input position (see `DART`, difference 1)


def set_visit_order(positions: list[int]) -> list[int]:
    """Indices into `positions` (distinct non-negative ints) in the order CPython iterates
    `set(positions)` built from that list, the order in which the authors' code visits its pivots (a
    Python set of sequence indices; an int hashes to itself, so the order is a fixed function of the
    indices and their insertion order, the same in every run)."""
    where = {p: i for i, p in enumerate(positions)}
    return [where[p] for p in set(positions)]


def code_count(n: int, budget: Budget, pivots: int) -> int:
    """The authors' kept count for an image of n tokens: their `max_num_trunction` = budget.kept(n) shared
    as floor(B / P) per pivot, plus the image pivots, which their code keeps on top (4 + 8 * 16 = 132
    for B = 128, P = 8); at most n, and n when the budget covers the image (nothing to prune)."""
    b = budget.kept(n)
    if b >= n:
        return n
    return min(n, pivots - pivots // 2 + pivots * (b // pivots))


@dataclass
class DART(LLMMethod):
    """DART — Wen et al., "Stop Looking for Important Tokens in Multimodal Language Models: Duplication
    Matters More", EMNLP 2025, arXiv:2502.11494. Default: the authors' released LLaVA code
    (github.com/ZichenWen1/DART, the `DART_K_norm` fork of `LlamaModel.forward`,
    `get_retained_image_token`, `llava/eval/model_vqa_loader.py` defaults; README commit 0c88867).

    What the paper fixes (abstract): tokens are pruned by their duplication with a few pivot tokens rather
    than by an importance score, inside the LLM, without attention maps (so it works with fused kernels).

    Selection at the boundary `layer` = K (layers < K see every token, layers >= K the kept ones), as the
    code does it:
      * pivots: the `pivots` - `pivots` // 2 image tokens and the `pivots` // 2 text tokens after the image
        (every real token after the row's last image, the "ASSISTANT:" suffix included) of largest L1 norm
        of layer K - 1's keys (post-RoPE, as its KV cache holds them; KV heads concatenated); default
        8 = 4 + 4;
      * duplication: the cosine similarity of the states entering layer K, after the model's final norm;
      * the image pivots are kept (text pivots never: only visual tokens are pruned); then every pivot in
        turn keeps the not-yet-kept image tokens least similar to it, each pivot the same share;
      * positions: the kept tokens keep their own (the code's `position_ids = keep_indexs`).

    Options:
      quota: "code" (default): the user's budget B is the code's `max_num_trunction`: every pivot takes
          floor(B / P) tokens and the image pivots are kept on top, so an image keeps 4 + 8 * floor(B / 8)
          tokens (132 for budget=128, the published "128" setting); "exact": the image keeps exactly B,
          the image pivots counting towards it, shares differing by at most one (tokprune's earlier rule);
      pivot_order: the order in which the pivots take their shares (it matters: the tokens least similar
          to different pivots overlap). "set" (default): the code's, the iteration order of a Python set
          of the pivots' sequence indices (`set_visit_order`), from the engine's "position" signal;
          "norm": image pivots by descending key norm, then text pivots by descending key norm (tokprune's
          earlier, deliberate order).

    Default budget: 128 (the README's `textvqa.sh 0.778 128`), i.e. 132 kept tokens under quota="code".

    Remaining differences from the code:
      (1) the set order is read from the engine's "position" signal: every token's index in its row
          counted from the row's first real token (the code's sequence index for its batch-1, unpadded
          prompts), so a padded row in a batch visits its pivots as the code visits the row alone;
      (2) with fewer than `pivots` // 2 instruction tokens the missing text pivots become image pivots
          (the code's topk fails there); with k below the number of image pivots only the k image tokens
          of largest key norm are kept; under quota="code" a pivot's leftover (when the image pivots are
          more than `pivots` - `pivots` // 2) goes to the first pivots, one each;
      (3) all visual tokens of an image are ranked together: an AnyRes image or a video is one selection
          with one budget (the code's LLaVA path handles one image span; its LLaVA-NeXT path caps the
          budget at 320 tokens by its own argument);
      (4) a follow-up turn on a reused cache numbers its rows from the turn's first real token.
    key_positions: the L1 norm of post-RoPE keys depends on absolute positions (RoPE keeps the L2 norm, not
    the L1 norm): "row" (default) takes the keys as if every row were numbered from its first real token,
    as the code's single unpadded row is (`signals.llm.keys_from_start`), so a row keeps the same tokens alone,
    in a batch, left-padded, with or without position_ids; "given" takes them at the caller's positions
    (tokprune's former behaviour; a plain forward numbers a left-padded row from its padding).
    """

    name = "dart"
    family = "duplication"
    default_budget = Budget(tokens=128)
    paper = "Wen et al., EMNLP 2025, arXiv:2502.11494 (DART)"
    code_families = ("llava", "llava_next")
    layer: int = 2
    pivots: int = 8
    quota: str = "code"
    pivot_order: str = "set"
    key_positions: str = "row"

    def __post_init__(self) -> None:
        check_int(self, "layer", 1)
        check_int(self, "pivots", 1)
        check_choice(self, "quota", QUOTAS)
        check_choice(self, "pivot_order", PIVOT_ORDERS)
        check_choice(self, "key_positions", tuple(KEY_SIGNALS))

    @property
    def key_signal(self) -> str:
        return KEY_SIGNALS[self.key_positions]

    @property
    def signals(self) -> tuple[str, ...]:  # type: ignore[override]
        own = (self.key_signal, "hidden")
        return (*own, POSITION) if self.pivot_order == "set" else own

    def boundaries(self, num_layers: int) -> list[int]:
        check_llm_layer(self.layer, num_layers, "layer", self.name)
        return [self.layer]

    def stage_counts(self, n: int, budget: Budget) -> list[int]:
        if self.quota == "code":
            return [code_count(n, budget, self.pivots)]
        return [budget.kept(n)]

    def select(self, image: ImageTokens, k: int) -> Selection:
        text_keys = image.text.get(self.key_signal)
        n_text = min(self.pivots // 2, 0 if text_keys is None else text_keys.shape[0])
        n_image = min(self.pivots - n_text, k)
        image_pivots = image.signals[self.key_signal].float().abs().sum(-1).topk(n_image).indices
        hidden = F.normalize(image.signals["hidden"].float(), dim=-1)  # (n, D)
        pivot_hidden = [hidden[image_pivots]]
        text_pivots = image_pivots[:0]
        if n_text:
            text_pivots = text_keys.float().abs().sum(-1).topk(n_text).indices
            pivot_hidden.append(F.normalize(image.text["hidden"][text_pivots].float(), dim=-1))
        pivot_hidden = torch.cat(pivot_hidden)  # (P, D): image pivots, then text pivots, each by norm
        visit = self._visit_order(image, image_pivots, text_pivots)
        taken = torch.zeros(image.n, dtype=torch.bool, device=hidden.device)
        taken[image_pivots] = True
        remaining = k - n_image
        n_pivots = pivot_hidden.shape[0]
        similarity = pivot_hidden @ hidden.T  # (P, n)
        for turn, p in enumerate(visit):
            share = remaining // n_pivots + (1 if turn < remaining % n_pivots else 0)
            if share == 0:
                continue
            picks = similarity[p].masked_fill(taken, float("inf")).topk(share, largest=False).indices
            taken[picks] = True
        return Selection(keep=taken.nonzero().squeeze(1))

    def _visit_order(
        self, image: ImageTokens, image_pivots: torch.Tensor, text_pivots: torch.Tensor
    ) -> list[int]:
        """The pivots' turns as indices into [image pivots, text pivots] (see `pivot_order`)."""
        count = image_pivots.numel() + text_pivots.numel()
        image_pos, text_pos = image.signals.get(POSITION), image.text.get(POSITION)
        if self.pivot_order == "norm":
            return list(range(count))
        if image_pos is None or (text_pivots.numel() and text_pos is None):
            raise ValueError("dart: pivot_order='set' needs the 'position' signal (the engine gives it)")
        positions = image_pos[image_pivots].tolist()
        if text_pivots.numel():
            positions += text_pos[text_pivots].tolist()
        return set_visit_order([int(p) for p in positions])
