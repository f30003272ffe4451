"""The serving engine: requests in, token streams out.

`LLMEngine.step()` runs one scheduler step (a flat batch of decode tokens and prefill
chunks) and returns what each request produced. It is single-threaded; servers drive it from
one loop. Two hooks serve disaggregation: a prefill node adds requests with
`hold_blocks=True` (their KV stays put after the first token so it can be shipped, until
`release()`), and a decode node `reserve()`s blocks, has the KV written into them, then
`add_prefilled()` joins the request to its running batch.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from engine.audit import AuditReport, BlockLedger, audit_pool
from engine.block_pool import BlockPool, block_hashes, chain_mismatch
from engine.config import EngineConfig, ModelConfig
from engine.errors import InvalidRequestError, OutOfBlocksError
from engine.kv_cache import KVCache
from engine.loader import DEFAULT_MODEL, load_model
from engine.logprobs import TokenLogprob
from engine.model import LlamaModel
from engine.model_runner import ModelRunner
from engine.request import FinishReason, Request, RequestStatus, sample_id
from engine.sampling import SamplerState, SamplingParams, checks_greedy_pick
from engine.scheduler import Scheduler, SchedulerOutput
from engine.structured.backend import GrammarBackend, backend_for
from engine.structured.matcher import GrammarState, MaskComputer
from engine.tiers import TierConfig, TierManager
from engine.tokenizer import IncrementalDetokenizer, Message, Tokenizer

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class RequestOutput:
    """What one request produced in one step."""

    request_id: str
    new_token_ids: tuple[int, ...]
    text_delta: str
    finished: bool
    finish_reason: FinishReason | None
    num_prompt_tokens: int
    num_cached_tokens: int
    num_output_tokens: int
    error: str | None = None  # set when a failed engine step ended the request (EngineWorker)
    logprobs: tuple[TokenLogprob, ...] = ()  # one per sampled new token, when the request asks for logprobs
    index: int = 0  # which parallel sample (`n` > 1); `request_id` is `sample_id(id, index)`
    num_forced_tokens: int = 0  # of `new_token_ids`, those the grammar forced (no model step of their own)


@dataclass(frozen=True, slots=True)
class EngineStats:
    num_waiting: int
    num_running: int
    num_blocks_total: int
    num_blocks_free: int
    num_blocks_cached: int
    prefix_queries_tokens: int
    prefix_hits_tokens: int
    num_preemptions: int
    num_prefill_tokens: int = 0  # tokens computed in prefill chunks (prompts, recomputes, forced tokens)
    num_forced_tokens: int = 0  # output tokens a grammar forced (fast-forward)
    # steps that only decoded (no prefill chunk) since the engine started: how many, their
    # seconds, and the rows and context tokens (each row's tokens before its new one) summed
    decode_steps: int = 0
    decode_step_s: float = 0.0
    decode_step_rows: int = 0
    decode_step_tokens: int = 0


class LLMEngine:
    def __init__(self, model: str | os.PathLike = DEFAULT_MODEL, config: EngineConfig | None = None,
                 *, kv_tensor: torch.Tensor | None = None, tiers: TierConfig | None = None,
                 progress: bool = False) -> None:
        self.config = config or EngineConfig()
        self.config.validate()
        if self.config.num_threads:
            torch.set_num_threads(self.config.num_threads)
        loaded = load_model(model, dtype=self.config.dtype, progress=progress)
        self.model_config: ModelConfig = loaded.config
        self.model_dir: Path = loaded.model_dir
        self.tokenizer = Tokenizer(loaded.model_dir)
        self.max_model_len = min(self.config.max_model_len or loaded.config.max_position_embeddings,
                                 loaded.config.max_position_embeddings)
        self.kv = KVCache(loaded.config, self.config.num_blocks, self.config.block_size, kv_tensor,
                          dtype=self.config.kv_torch_dtype)
        self.pool = BlockPool(self.config.num_blocks, self.config.block_size)
        self.scheduler = Scheduler(self.config, self.pool)
        self.runner = ModelRunner(LlamaModel(loaded.config, loaded.weights, self.config.act_group), self.kv)
        self._requests: dict[str, Request] = {}
        self._detok: dict[str, IncrementalDetokenizer] = {}
        self._preemptions = 0
        self.refused_hashes = 0  # block-hash chains sent with requests that failed the check
        self._eos = set(loaded.config.eos_token_ids)
        self._grammar: GrammarBackend | None = None  # built on the first constrained request (~0.5 s)
        self.masks = MaskComputer(loaded.config.vocab_size)  # grammar masks, overlapped with the forward pass
        self.runner.mask_stats = self.masks.stats
        self.num_prefill_tokens = 0
        self.num_forced_tokens = 0
        self._decode_steps = (0, 0.0, 0, 0)  # EngineStats.decode_step_*: steps, seconds, rows, tokens
        self.fast_forward = True  # take the tokens a grammar forces without a model step each (benchmarks turn it off)
        self._groups: dict[str, list[Request]] = {}  # n > 1: sample 0's id -> every sample, until all end
        self.held = BlockLedger()  # blocks a node holds outside requests (reservations, pins): engine/audit.py
        self.tiers: TierManager | None = None  # host / disk / cluster tiers under the KV region (engine/tiers)
        if tiers is not None and tiers.enabled:
            TierManager.attach(self, tiers)

    # --- request intake ---------------------------------------------------------------
    def encode_prompt(self, prompt: str | None = None, messages: list[Message] | None = None,
                      prompt_token_ids: list[int] | None = None) -> list[int]:
        given = [x is not None for x in (prompt, messages, prompt_token_ids)]
        if sum(given) != 1:
            raise InvalidRequestError("prompt", "give exactly one of prompt, messages, prompt_token_ids")
        if messages is not None:
            ids = self.tokenizer.encode_chat(messages)
        elif prompt is not None:
            if not prompt:
                raise InvalidRequestError("prompt", "must not be empty")
            ids = self.tokenizer.encode(prompt)
        else:
            ids = list(prompt_token_ids)
        self.validate_prompt(ids)
        return ids

    def validate_prompt(self, ids: list[int], field: str = "prompt") -> None:
        if not ids:
            raise InvalidRequestError(field, "must not be empty")
        if len(ids) >= self.max_model_len:
            raise InvalidRequestError(field, f"{len(ids)} tokens does not fit the context window of "
                                             f"{self.max_model_len} (prompt + at least one new token)")
        bad = next((t for t in ids if not 0 <= t < self.model_config.vocab_size), None)
        if bad is not None:
            raise InvalidRequestError("prompt_token_ids", f"token id {bad} outside [0, {self.model_config.vocab_size})")
        need = -(-(len(ids) + 1) // self.config.block_size)
        if need > self.config.num_blocks:
            raise InvalidRequestError(field, f"{len(ids)} tokens need {need} KV blocks; this node has "
                                             f"{self.config.num_blocks}")

    @property
    def grammar(self) -> GrammarBackend:
        """The constrained-decoding backend for this model's tokenizer."""
        if self._grammar is None:
            mc = self.model_config
            self._grammar = backend_for(self.model_dir / "tokenizer.json", mc.vocab_size, mc.eos_token_ids)
        return self._grammar

    def check_params(self, params: SamplingParams) -> None:
        """`params.validate()`, and what needs the model: token ids in its vocabulary, a
        constraint that compiles with its tokenizer."""
        params.validate()
        params.check_vocab(self.model_config.vocab_size)
        if params.constraint is not None:
            self.grammar.check(params.constraint)

    def _sampler(self, params: SamplingParams, prompt: list[int], index: int = 0) -> SamplerState:
        """Sample `index`'s sampler state; sample 0's also holds the states of samples 1..n-1
        until their first tokens are drawn (from the row that draws sample 0's)."""
        grammar = None
        if params.constraint is not None:
            grammar = GrammarState(self.grammar.matcher(params.constraint), self.model_config.vocab_size,
                                   fast_forward=self.fast_forward and params.logprobs is None)
        st = SamplerState.for_params(params, index, prompt=prompt, vocab_size=self.model_config.vocab_size,
                                     grammar=grammar)
        if index == 0 and params.n > 1:
            st.forks = [self._sampler(params, prompt, i) for i in range(1, params.n)]
        return st

    def add_request(self, request_id: str, params: SamplingParams, *, prompt: str | None = None,
                    messages: list[Message] | None = None, prompt_token_ids: list[int] | None = None,
                    hold_blocks: bool = False, resume_token_ids: list[int] | None = None,
                    block_hashes: Sequence[int] = ()) -> Request:
        """Queue a request. `resume_token_ids`: tokens it already generated elsewhere (a
        migrated request): they are recomputed with the prompt, count towards `max_tokens`,
        and their text is known to stop strings, so generation continues as if uninterrupted.
        `block_hashes`: the chain of the prompt's full blocks, computed by the sender (the
        conductor): used instead of hashing the prompt again when it passes the check
        (`Request.adopt_hashes`)."""
        if request_id in self._requests:
            raise InvalidRequestError("request_id", f"{request_id!r} is already running")
        self.check_params(params)
        ids = self.encode_prompt(prompt, messages, prompt_token_ids)
        resumed = list(resume_token_ids or ())
        if resumed:
            self.validate_prompt(ids + resumed, "resume_token_ids")
            if len(resumed) >= params.max_tokens:
                raise InvalidRequestError("resume_token_ids", f"{len(resumed)} tokens leave nothing of "
                                                              f"max_tokens={params.max_tokens} to generate")
            if params.n > 1:
                raise InvalidRequestError("resume_token_ids", "a request with n > 1 parallel samples cannot resume")
        req = Request(request_id, ids, params, hold_blocks=hold_blocks, output_token_ids=resumed,
                      sampler=self._sampler(params, ids))
        self._adopt_hashes(req, block_hashes)
        detok = IncrementalDetokenizer(self.tokenizer)
        for i, token in enumerate(resumed):  # replay the detokenizer and the grammar as the first engine ran them
            req.text += detok.push([token])
            if not req.sampler.accept(token):
                raise InvalidRequestError(f"resume_token_ids[{i}]", f"the request's grammar does not allow token "
                                                                    f"{token} here: {req.sampler.grammar.error}")
        self._requests[request_id] = req
        self._detok[request_id] = detok
        if self.tiers is None or not self.tiers.park(req):  # parked: its lower-tier blocks load first
            self.scheduler.add(req)
        return req

    # --- disaggregation hooks ------------------------------------------------------------
    def reserve(self, num_tokens: int) -> list[int]:
        """Blocks for `num_tokens` of imported KV (plus room for the first decode token)."""
        n = -(-(num_tokens + 1) // self.config.block_size)
        blocks = self.pool.allocate(n)
        if blocks is None:
            raise OutOfBlocksError(f"need {n} free KV blocks, {self.pool.num_free} free")
        return blocks

    def unreserve(self, blocks: list[int]) -> None:
        self.pool.free(blocks)

    def add_prefilled(self, request_id: str, params: SamplingParams, prompt_token_ids: list[int],
                      first_token: int | list[int], block_ids: list[int], num_cached_tokens: int = 0,
                      first_logprobs: list[TokenLogprob] | None = None,
                      block_hashes: Sequence[int] = ()) -> list[RequestOutput]:
        """Join a request whose prompt KV is already in `block_ids` (written by a prefill node);
        `first_token` was sampled there (one per parallel sample when `params.n` > 1: the
        samples share the prompt's blocks). A constrained request's grammar starts here and
        takes the first token like any other, so it continues where the prefill node's left
        off. `first_logprobs`: theirs, computed there, when asked for. `block_hashes`: as for
        `add_request`. Returns the first tokens' outputs (they may finish)."""
        if request_id in self._requests:
            raise InvalidRequestError("request_id", f"{request_id!r} is already running")
        self.check_params(params)
        firsts = [first_token] if isinstance(first_token, int) else list(first_token)
        if len(firsts) != params.n:
            raise InvalidRequestError("first_tokens", f"{len(firsts)} first tokens for n={params.n} samples")
        prompt = list(prompt_token_ids)
        req = Request(request_id, prompt, params, block_ids=list(block_ids),
                      num_computed_tokens=len(prompt), num_cached_tokens=num_cached_tokens,
                      sampler=self._sampler(params, prompt))
        self._adopt_hashes(req, block_hashes)
        self._requests[request_id] = req
        self._detok[request_id] = IncrementalDetokenizer(self.tokenizer)
        self.scheduler.add_running(req)
        req.sampler.fork_tokens = firsts[1:]
        if first_logprobs:
            for st, lp in zip([req.sampler, *req.sampler.forks], first_logprobs):
                st.logprob = lp
        return self._append_sampled(req, firsts[0])

    def _adopt_hashes(self, req: Request, hashes: Sequence[int]) -> None:
        if len(hashes):
            why = req.adopt_hashes(hashes, self.config.block_size)
            if why is not None:  # hashed here instead: slower, never wrong
                self.refused_hashes += 1
                log.warning("%s: block_hashes refused (%s); hashing the prompt here", req.request_id, why)

    def release(self, request_id: str) -> None:
        """Free the blocks of a finished `hold_blocks` request."""
        req = self._requests.pop(request_id, None)
        if req is not None:
            self.scheduler.release(req)
            self._detok.pop(request_id, None)

    # --- prefix sharing between nodes (KV-centric pulls) -------------------------------------
    def _chain(self, token_ids: list[int], hashes: Sequence[int]) -> list[int]:
        """The chain of `token_ids`' full blocks: `hashes` (the sender's) once they pass the
        check of `Request.adopt_hashes`, else hashed here."""
        bs = self.config.block_size
        if len(hashes):
            why = chain_mismatch(hashes, token_ids, bs)
            if why is None:
                return list(hashes)
            self.refused_hashes += 1
            log.warning("block_hashes refused (%s); hashing the prefix here", why)
        return block_hashes(token_ids, bs)

    def cached_prefix_blocks(self, token_ids: list[int], hashes: Sequence[int] = ()) -> int:
        """How many leading whole blocks of `token_ids` this engine has cached (`hashes`:
        their chain, when the sender has it)."""
        return len(self.pool.match_prefix(self._chain(token_ids, hashes), token_ids))

    def pin_prefix(self, token_ids: list[int], hashes: Sequence[int] = ()) -> list[int]:
        """Reference the cached blocks of the longest prefix of `token_ids` so a peer can read
        them without their being evicted; `unpin` them afterwards."""
        blocks = self.pool.match_prefix(self._chain(token_ids, hashes), token_ids)
        self.pool.touch(blocks)
        return blocks

    def unpin(self, blocks: list[int]) -> None:
        self.pool.free(blocks)

    def allocate_blocks(self, n: int) -> list[int] | None:
        return self.pool.allocate(n)

    def import_prefix(self, token_ids: list[int], first_block: int, blocks: list[int],
                      hashes: Sequence[int] = ()) -> None:
        """`blocks` now hold the KV of whole blocks `first_block, ...` of `token_ids` (written
        by a peer): publish them in the prefix cache and drop the allocation's references.
        `hashes`: the chain of `token_ids`' full blocks (or of a prefix of it), when the sender has it."""
        bs = self.config.block_size
        end = first_block + len(blocks)
        hashes = self._chain(token_ids[: end * bs], hashes[:end] if len(hashes) >= end else ())
        for i, b in enumerate(blocks):
            j = first_block + i
            self.pool.cache_block(b, hashes[j], token_ids[j * bs:(j + 1) * bs], hashes[j - 1] if j else None)
        self.pool.free(blocks)

    def get_request(self, request_id: str) -> Request | None:
        return self._requests.get(request_id)

    # --- stepping ---------------------------------------------------------------------
    def has_unfinished(self) -> bool:
        return self.scheduler.has_work() or (self.tiers is not None and self.tiers.num_parked > 0)

    def step(self) -> list[RequestOutput]:
        t0 = time.perf_counter()
        if self.tiers is not None:  # parked requests whose blocks are now in the host pool join the queue
            for req in self.tiers.take_ready(wait=not self.scheduler.has_work()):
                self.scheduler.add(req)
        sched = self.scheduler.schedule()
        self._preemptions += len(sched.preempted)
        if sched.empty:
            return []
        # masks for the constrained requests that need one whatever they pick; a greedy pick is
        # checked against its grammar first, and masked only when refused (sampling.checks_greedy_pick)
        self.masks.start([r.sampler.grammar for r in _sampled_by(sched)
                          if r.sampler.grammar is not None and not checks_greedy_pick(r.params, r.sampler)])
        decode_only = not sched.prefills
        if decode_only:
            context = sum(r.num_tokens for r in sched.decodes)
        sampled = self.runner.run(sched)
        for chunk in sched.prefills:
            chunk.request.num_computed_tokens += chunk.num_tokens
            self.num_prefill_tokens += chunk.num_tokens
        for req in sched.decodes:
            req.num_computed_tokens += 1
        for req in list(sched.decodes) + [c.request for c in sched.prefills]:
            self._cache_full_blocks(req)
        outputs: list[RequestOutput] = []
        for req, tok in sampled.items():
            outputs += self._append_sampled(req, tok)
        if decode_only:
            n, secs, rows, tokens = self._decode_steps
            self._decode_steps = (n + 1, secs + time.perf_counter() - t0, rows + len(sched.decodes), tokens + context)
        return outputs

    def _append_sampled(self, req: Request, token: int) -> list[RequestOutput]:
        """`token` for `req`, and for its parallel samples (forked from it now, before its own
        token may finish it) the first tokens drawn with it."""
        children = self._fork(req) if req.sampler.fork_tokens else []
        return [self._append_token(req, token)] + [self._append_token(c, t) for c, t in children]

    def _fork(self, parent: Request) -> list[tuple[Request, int]]:
        """Samples 1..n-1 of `parent`, whose prompt is computed: each shares the prompt's full
        blocks (one more reference each) and gets a copy of the partial last block. A sample
        that ends with its first token (max_tokens 1: a prefill node) takes no blocks; one for
        which no block is free waits to be recomputed from the prefix cache."""
        st = parent.sampler
        forks, tokens = st.forks, st.fork_tokens
        st.forks, st.fork_tokens = [], []
        bs = self.config.block_size
        n_prompt = len(parent.prompt_token_ids)
        full = n_prompt // bs
        out: list[tuple[Request, int]] = []
        for fst, tok in zip(forks, tokens):
            i = len(parent.children) + 1
            child = Request(sample_id(parent.request_id, i), list(parent.prompt_token_ids), parent.params,
                            arrival_time=parent.arrival_time, num_cached_tokens=parent.num_cached_tokens,
                            sampler=fst, index=i, parent_id=parent.request_id)
            child.share_hashes(parent, bs, full)  # the prompt's chain: not hashed again for the sample
            parent.children.append(child)
            self._groups.setdefault(parent.request_id, [parent]).append(child)
            self._requests[child.request_id] = child
            self._detok[child.request_id] = IncrementalDetokenizer(self.tokenizer)
            own = self.pool.allocate(len(parent.block_ids) - full) if parent.params.max_tokens > 1 else None
            if own is not None:
                shared = parent.block_ids[:full]
                self.pool.touch(shared)
                if n_prompt % bs:
                    self.kv.tensor[own[0]].copy_(self.kv.tensor[parent.block_ids[full]])
                child.block_ids = shared + own
                child.block_hashes = list(parent.block_hashes[:full])
                child.num_computed_tokens = n_prompt
                self.scheduler.add_running(child)
            elif parent.params.max_tokens > 1:
                self.scheduler.add(child)  # no free block now: recomputed (its prompt blocks are cached)
            else:
                child.status = RequestStatus.RUNNING  # ends with its first token
            out.append((child, tok))
        return out

    def _cache_full_blocks(self, req: Request) -> None:
        bs = self.config.block_size
        full = req.num_computed_tokens // bs
        if len(req.block_hashes) >= full:
            return
        toks = req.all_token_ids
        hashes = req.chain_hashes(bs, full)  # (the prefix of them admission matched: computed once)
        for i in range(len(req.block_hashes), full):
            parent = hashes[i - 1] if i else None
            req.block_hashes.append(hashes[i])
            self.pool.cache_block(req.block_ids[i], hashes[i], toks[i * bs:(i + 1) * bs], parent)

    def _append_token(self, req: Request, token: int) -> RequestOutput:
        """Add a sampled token (and the tokens the grammar then forces) and apply the stop rules."""
        st, p = req.sampler, req.params
        logprob = st.take_logprob()
        new = [token]
        allowed = st.accept(token)
        grammar_end = st.grammar is not None and st.grammar.done
        if allowed and st.grammar is not None and not grammar_end:
            room = min(p.max_tokens - len(req.output_token_ids) - 1, self.max_model_len - req.num_tokens - 1)
            forced = st.grammar.forced(room)
            for t in forced:
                st.accept_forced(t)
            new += forced
            req.num_forced_tokens += len(forced)
            self.num_forced_tokens += len(forced)
            grammar_end = st.grammar.done
        reason: FinishReason | None = None
        delta = ""
        kept: list[int] = []
        for t in new:
            req.output_token_ids.append(t)
            kept.append(t)
            if (t in self._eos and not p.ignore_eos) or t in p.stop_token_ids:
                reason = FinishReason.STOP
                break
            piece = self._detok[req.request_id].push([t])
            if p.stop and piece:
                text = req.text + piece
                cut = min((i for i in (text.find(s, max(0, len(req.text) - len(s) + 1)) for s in p.stop) if i >= 0),
                          default=-1)
                if cut >= 0:
                    piece = text[:cut][len(req.text):]
                    reason = FinishReason.STOP
            req.text += piece
            delta += piece
            if reason is not None:
                break
        if not allowed:  # a token the grammar refuses (a handoff that skipped the grammar): end it
            req.error = f"the request's grammar refused token {token}: {st.grammar.error}"
            reason = FinishReason.ABORT
        elif reason is None and grammar_end:
            reason = FinishReason.STOP  # the grammar is complete: nothing more may follow
        if reason is None and (len(req.output_token_ids) >= p.max_tokens or req.num_tokens >= self.max_model_len):
            reason = FinishReason.LENGTH
        if reason is not None:
            self._finish(req, reason)
        return RequestOutput(req.request_id, tuple(kept), delta, reason is not None, reason,
                             len(req.prompt_token_ids), req.num_cached_tokens, len(req.output_token_ids),
                             error=req.error, logprobs=(logprob,) if logprob is not None else (), index=req.index,
                             num_forced_tokens=len(kept) - 1)

    def _finish(self, req: Request, reason: FinishReason) -> None:
        req.status = RequestStatus.FINISHED
        req.finish_reason = reason
        group = req.parent_id or req.request_id
        if group in self._groups and all(r.finished for r in self._groups[group]):
            del self._groups[group]
        if self.tiers is not None:
            self.tiers.write_back(req)  # decode write-back: its KV to the cluster store (when configured)
        self.scheduler.remove(req)
        if not req.hold_blocks:
            self._requests.pop(req.request_id, None)
            self._detok.pop(req.request_id, None)

    def abort(self, request_id: str) -> bool:
        """Stop a request and free its blocks (including held ones), and its parallel samples'.
        False if unknown."""
        if self.tiers is not None:
            self.tiers.cancel(request_id)
        req = self._requests.pop(request_id, None)
        group = self._groups.pop(request_id, [])  # its samples, also those running after it finished
        for sample in group[1:]:
            self.abort(sample.request_id)
        if req is None:
            return bool(group)
        self._detok.pop(request_id, None)
        if not req.finished:
            req.status = RequestStatus.FINISHED
            req.finish_reason = FinishReason.ABORT
            self.scheduler.remove(req)
        self.scheduler.release(req)
        if req.parent_id in self._groups and all(r.finished for r in self._groups[req.parent_id]):
            del self._groups[req.parent_id]
        return True

    def audit(self) -> AuditReport:
        """Reclaim block references no live request and no `held` entry accounts for."""
        return audit_pool(self.pool, [*(r.block_ids for r in self._requests.values()), *self.held])

    def stats(self) -> EngineStats:
        parked = self.tiers.num_parked if self.tiers is not None else 0
        return EngineStats(len(self.scheduler.waiting) + parked, len(self.scheduler.running), self.pool.num_blocks,
                           self.pool.num_free, self.pool.num_cached, self.pool.prefix_queries,
                           self.pool.prefix_hits, self._preemptions, self.num_prefill_tokens, self.num_forced_tokens,
                           *self._decode_steps)

    def add_kv_listener(self, fn) -> None:
        self.pool.add_listener(fn)

    # --- convenience --------------------------------------------------------------------
    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]) -> list[list[int]]:
        """Run token-id prompts to completion together; return each one's output ids."""
        plist = params if isinstance(params, list) else [params] * len(prompts)
        ids = [f"gen-{time.monotonic_ns()}-{i}" for i in range(len(prompts))]
        for rid, prompt, p in zip(ids, prompts, plist):
            self.add_request(rid, p, prompt_token_ids=prompt)
        out: dict[str, list[int]] = {rid: [] for rid in ids}
        while self.has_unfinished():
            for o in self.step():
                if o.request_id in out:
                    out[o.request_id].extend(o.new_token_ids)
        return [out[r] for r in ids]


def _sampled_by(sched: SchedulerOutput) -> list[Request]:
    """The requests a step will sample a token for: its decodes and the prefills it completes."""
    return list(sched.decodes) + [c.request for c in sched.prefills if c.completes]
