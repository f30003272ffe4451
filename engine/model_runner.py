"""Turns a scheduler step into one flat forward batch, runs it, and samples."""
from __future__ import annotations

import torch

from engine.attention import AttentionMetadata, DecodeGroup, PrefillChunk
from engine.kv_cache import KVCache
from engine.model import LlamaModel
from engine.request import Request
from engine.sampling import sample
from engine.scheduler import SchedulerOutput


class ModelRunner:
    def __init__(self, model: LlamaModel, kv: KVCache) -> None:
        self.model = model
        self.kv = kv
        self.block_size = kv.block_size
        self.mask_stats = None  # engine.structured.matcher.MaskStats: greedy picks checked against a grammar

    def run(self, sched: SchedulerOutput) -> dict[Request, int]:
        """Feed the scheduled tokens; return the sampled next token of every request whose
        scheduled tokens reach its end."""
        bs = self.block_size
        ids: list[int] = []
        pos: list[int] = []
        slot_b: list[int] = []
        slot_o: list[int] = []
        logit_rows: list[int] = []
        sampled_reqs: list[Request] = []

        decode = None
        if sched.decodes:
            max_blocks = max(len(r.block_ids) for r in sched.decodes)
            rows: list[list[int]] = []  # block tables padded with block 0, built as one tensor
            lens = []
            for i, r in enumerate(sched.decodes):
                p = r.num_tokens - 1
                ids.append(r.all_token_ids[-1])
                pos.append(p)
                slot_b.append(r.block_ids[p // bs])
                slot_o.append(p % bs)
                rows.append(r.block_ids + [0] * (max_blocks - len(r.block_ids)))
                lens.append(r.num_tokens)
                logit_rows.append(i)
                sampled_reqs.append(r)
            decode = DecodeGroup(len(sched.decodes), torch.tensor(rows, dtype=torch.long),
                                 context_lens=torch.tensor(lens))

        prefills: list[PrefillChunk] = []
        for chunk in sched.prefills:
            r = chunk.request
            start = len(ids)
            first = r.num_computed_tokens
            end_tok = first + chunk.num_tokens
            toks = r.all_token_ids
            ids.extend(toks[first:end_tok])
            rng = range(first, end_tok)
            pos.extend(rng)
            slot_b.extend(r.block_ids[p // bs] for p in rng)
            slot_o.extend(p % bs for p in rng)
            n_ctx_blocks = -(-end_tok // bs)
            prefills.append(PrefillChunk(start, len(ids), torch.tensor(r.block_ids[:n_ctx_blocks]), end_tok))
            if chunk.completes:
                logit_rows.append(len(ids) - 1)
                sampled_reqs.append(r)

        meta = AttentionMetadata(torch.tensor(slot_b), torch.tensor(slot_o), decode, prefills)
        logits = self.model.forward(torch.tensor(ids), torch.tensor(pos), meta, self.kv,
                                    torch.tensor(logit_rows, dtype=torch.long))
        if not sampled_reqs:
            return {}
        tokens = sample(logits, [r.params for r in sampled_reqs], [r.sampler for r in sampled_reqs], self.mask_stats)
        return dict(zip(sampled_reqs, tokens))
