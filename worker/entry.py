"""A task's weights as a worker process holds them (Entry), and as they travel in a blob: the
options' prior in the safetensors' metadata, the retrieval embeddings beside the tensors."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import torch

from model.head import Head
from model.lm import Params
from model.prefix import Prefix


@dataclass
class Entry:
    params: Params  # every override to predict with: checkpoint params + the adapted ones
    adapted: Params  # the adapted part alone (LoRA weights, or the full-mode weights)
    prior: dict[str, float] | None = None  # option -> calibrated log prior (Recipe.calibrate)
    prefixes: dict[int, Prefix] = field(default_factory=dict)  # demonstrations used -> encoded prefix
    embeddings: torch.Tensor | None = None  # the demonstrations', where predictions retrieve (Recipe.retrieve)
    # the bag-of-words head (Recipe.head), fit from the stored demonstrations on a worker's first
    # prediction (deterministic, about a second for 1,000 of them): nothing more to store or ship
    head: Head | None = None
    head_fit: bool = False



def _meta(prior: dict[str, float] | None) -> dict[str, str]:
    return {"prior": json.dumps(prior)}


def _prior(meta: dict[str, str] | None) -> dict[str, float] | None:
    return json.loads((meta or {}).get("prior", "null"))


# The demonstrations' retrieval embeddings travel in the weights' safetensors beside the prior
# (stored once with the task's adapted state, found wherever the weights are), under a name no
# model parameter has; fp16 halves them (5,000 x 576 in 5.8 MB) and cosine ranks hardly move.
EMBEDDINGS = "mamlserve.retrieval.embeddings"


def _with_embeddings(params: Params, embeddings: torch.Tensor | None) -> Params:
    return params if embeddings is None else {**params, EMBEDDINGS: embeddings.half()}


def _split(tensors: Params) -> tuple[Params, torch.Tensor | None]:
    got = tensors.pop(EMBEDDINGS, None)
    return tensors, None if got is None else got.float().cpu()

