"""Queries for text-prompted segmentation as token ids: `prefix + query + answer (+ suffix)`.

The answer holds the `[SEG]` token whose hidden state becomes SAM's prompt; for a causal LM it
is also the supervised part (labels), the query is context only. Query and answer are
tokenised separately so that a too-long query can be cut without ever cutting `[SEG]`.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from visiontune.errors import ConfigError

log = logging.getLogger(__name__)

SEG_TOKEN = "[SEG]"


class QueryEncoder:
    """Queries -> input ids `prefix + query + answer (+ suffix)`, `[SEG]` index, answer labels.

    A query longer than the budget is cut (never the answer, which holds `[SEG]`) and named in
    a warning once per sample, so a too-long prompt is visible rather than silently clipped.
    """

    def __init__(self, tokenizer: Any, kind: str, answer: str, max_length: int) -> None:
        self.tokenizer = tokenizer
        self.causal = kind == "causal_lm"
        self.seg_id = tokenizer.convert_tokens_to_ids(SEG_TOKEN)
        bare = tokenizer("a", add_special_tokens=False).input_ids
        full = tokenizer("a").input_ids
        start = next(i for i in range(len(full)) if full[i : i + len(bare)] == bare)
        self.prefix = full[:start]
        self.suffix = [] if self.causal else full[start + len(bare) :]
        self.answer = tokenizer(" " + answer, add_special_tokens=False).input_ids
        if self.causal and tokenizer.eos_token_id is not None:
            self.answer.append(tokenizer.eos_token_id)
        self.budget = max_length - len(self.prefix) - len(self.answer) - len(self.suffix)
        if self.budget < 1:
            raise ConfigError(
                [f"task.text_model.max_length: {max_length} tokens leave no room for a query"]
            )
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.warned: set[str] = set()

    def encode(self, texts: list[str], sample_ids: list[str]) -> dict[str, torch.Tensor]:
        rows, labels, seg_index = [], [], []
        for text, sample_id in zip(texts, sample_ids, strict=True):
            query = self.tokenizer(text, add_special_tokens=False).input_ids
            if len(query) > self.budget:
                if sample_id not in self.warned:
                    self.warned.add(sample_id)
                    log.warning(
                        "%s: query of %d tokens truncated to %d (task.text_model.max_length)",
                        sample_id,
                        len(query),
                        self.budget,
                    )
                query = query[: self.budget]
            head = len(self.prefix) + len(query)
            rows.append(self.prefix + query + self.answer + self.suffix)
            labels.append([-100] * head + self.answer + [-100] * len(self.suffix))
            seg_index.append(head + self.answer.index(self.seg_id))
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        label_ids = torch.full((len(rows), width), -100, dtype=torch.long)
        for i, (row, label) in enumerate(zip(rows, labels, strict=True)):
            ids[i, : len(row)] = torch.tensor(row)
            mask[i, : len(row)] = 1
            label_ids[i, : len(label)] = torch.tensor(label)
        out = {"input_ids": ids, "attention_mask": mask, "seg_index": torch.tensor(seg_index)}
        if self.causal:
            out["labels"] = label_ids
        return out
