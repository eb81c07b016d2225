"""Test-only re-implementation of DivPrune's token selection as the authors' LLaVA code makes it.

Source: github.com/vbdi/divprune at commit 799e2d950aa01ba7860907f5a6d86061f885dca6,
`LLaVA/llava/model/llava_arch.py`: `LlavaMetaForCausalLM.DivPrune` and `pairwise_cosine_similarity`,
called at the end of `prepare_inputs_labels_for_multimodal` (env LAYER_INDEX=0, SUBSET_RATIO=0.098 in
`run_Divprune.sh`). Written from reading that code, not copied.

What the code computes on the LLM input embeddings of the image (`new_input_embeds[0][35:35 + n]`, 35
being LLaVA-1.5's system-prompt length; here the image's placeholder rows):
  * count = int(round(ratio * n)) (Python round: half to even);
  * D = 1 - cosine similarity of the n embeddings (n x n);
  * first pick: the column whose second-smallest entry (its nearest other token's distance; the
    smallest is the token's own ~0) is largest;
  * every next pick: the column whose minimum over the rows of the tokens picked so far is largest
    (picked columns have their own ~0 distance in that minimum, so they are not picked again);
  * kept = the picks, sorted (the code sorts the kept positions together with the text's).
Ties follow torch.argmax (the first maximum).
"""

from __future__ import annotations

import torch


def count(ratio: float, n: int) -> int:
    return int(round(ratio * n))


def select(embeds: torch.Tensor, k: int) -> torch.Tensor:
    """embeds: (n, D). Returns (k,) the kept indices, sorted."""
    unit = embeds / embeds.norm(dim=1, keepdim=True)
    distance = 1.0 - unit @ unit.T
    picks = torch.empty(k, dtype=torch.long)
    for i in range(k):
        if i == 0:
            score = torch.topk(distance, 2, dim=0, largest=False).values[1]
        else:
            score = distance[picks[:i]].min(dim=0).values
        picks[i] = score.argmax()
    return picks.sort().values
