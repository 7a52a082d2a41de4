"""The inference engine: add requests (token ids), step, collect tokens. Knows no tokenizer.

    from glm5.engine import LLM, SamplingParams
    llm = LLM.from_preset("nano")                       # or LLM.from_pretrained("runs/x/model")
    out = llm.generate([[1, 2, 3], [4, 5]], SamplingParams(temperature=0, max_tokens=32))
    out[0].token_ids                                    # the generated ids of the first prompt

Step-wise (what the server drives from its engine thread):
    engine.add_request(ids, params, request_id)  ->  engine.step() -> [StepOutput, ...]  ->  engine.abort(id)

Each step: the scheduler picks a prefill or decode batch, the runner runs one forward over the paged latent
cache, the sampler picks tokens, finished requests free their blocks. With `num_speculative_tokens` k > 0
the MTP layer drafts k tokens per greedy sequence and the next decode step verifies them in the same forward
(see glm5/engine/speculative.py).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from glm5.config import GLM5Config
from glm5.engine.block_manager import BlockManager
from glm5.engine.compiled import CompiledSteps
from glm5.engine.config import EngineConfig
from glm5.engine.cuda_graphs import StepGraphs
from glm5.engine.kv_cache import LatentKVCache
from glm5.engine.runner import ModelRunner
from glm5.engine.sampler import Sampler, apply_processors
from glm5.engine.scheduler import Scheduler
from glm5.engine.sequence import SamplingParams, Sequence, SequenceStatus, TokenLogprob
from glm5.engine.speculative import MTPDrafter, accept_drafts
from glm5.model.transformer import GLM5ForCausalLM


@dataclass
class StepOutput:
    """What one request got from one step."""

    request_id: str
    new_token_ids: list[int]
    new_logprobs: list[TokenLogprob]
    finished: bool
    finish_reason: str | None
    num_prompt_tokens: int
    num_output_tokens: int
    num_cached_tokens: int = 0


@dataclass
class Completion:
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    finish_reason: str | None
    logprobs: list[TokenLogprob] = field(default_factory=list)
    num_cached_tokens: int = 0
    num_drafted: int = 0
    num_accepted: int = 0


@dataclass
class EngineStats:
    steps: int = 0
    prefill_tokens: int = 0
    decode_tokens: int = 0  # tokens produced by decode steps (bonus + accepted drafts)
    verify_steps: int = 0  # sequence-steps that verified drafts
    drafted: int = 0
    accepted: int = 0
    preemptions: int = 0

    @property
    def mean_accept_length(self) -> float:
        """Tokens produced per verifying sequence-step (1 + accepted drafts on average); 0 before any."""
        return (self.verify_steps + self.accepted) / self.verify_steps if self.verify_steps else 0.0


class LLMEngine:
    """The engine over one model. Its knobs are an `EngineConfig` (glm5/engine/config.py); keyword arguments
    with the config's field names still work and override it: `LLMEngine(model, kv_cache_tokens=8192)`."""

    def __init__(self, model: GLM5ForCausalLM, config: EngineConfig | None = None, **options) -> None:
        engine_config = (config or EngineConfig()).replace(**options) if options else (config or EngineConfig())
        self.engine_config = engine_config
        cfg = model.config
        self.model = model.eval()
        self.config = cfg
        num_speculative_tokens = engine_config.num_speculative_tokens
        if num_speculative_tokens and not len(model.mtp):
            raise ValueError("num_speculative_tokens > 0 needs a model with an MTP layer (num_nextn_predict_layers)")
        self.num_speculative_tokens = num_speculative_tokens
        block_size = self.block_size = engine_config.block_size
        num_blocks = engine_config.num_blocks
        max_model_len = engine_config.max_model_len
        self.max_model_len = min(max_model_len or cfg.max_position_embeddings, cfg.max_position_embeddings)
        param = next(model.parameters())
        num_mtp = 1 if num_speculative_tokens else 0
        self.cache = LatentKVCache(cfg, num_blocks, block_size, model.model.embed_tokens.weight.dtype, param.device, num_mtp)
        self.block_manager = BlockManager(num_blocks, block_size)
        self.scheduler = Scheduler(self.block_manager, engine_config.max_num_seqs, engine_config.max_num_batched_tokens,
                                   num_speculative_tokens)
        self.runner = ModelRunner(model, self.cache, block_size)
        # steps of at most cuda_graph_max_tokens padded tokens replayed from captured CUDA graphs (see
        # glm5/engine/cuda_graphs.py; with speculation, whole speculative cycles): on by default on CUDA;
        # True on another device runs the same static forward uncaptured
        on_cuda = param.device.type == "cuda"
        cuda_graphs = engine_config.cuda_graphs
        if cuda_graphs is None:
            cuda_graphs = on_cuda
        self.graphs = (StepGraphs(self.runner, engine_config.max_num_seqs, self.cache.scratch_slot, capture=on_cuda,
                                  max_tokens=engine_config.cuda_graph_max_tokens,
                                  num_speculative_tokens=num_speculative_tokens) if cuda_graphs else None)
        # on a CPU, decode steps compiled by inductor (glm5/engine/compiled.py); CUDA replays graphs instead
        self.compiled = None
        if engine_config.compile:
            if param.device.type != "cpu":
                raise ValueError(f"compile=True compiles CPU decode steps; this model is on {param.device.type} "
                                 "(CUDA steps are replayed from CUDA graphs)")
            if self.graphs is not None:
                raise ValueError("compile=True and cuda_graphs=True: choose one form of the static step")
            self.compiled = CompiledSteps(self.runner, engine_config.max_num_seqs, self.cache.scratch_slot,
                                          engine_config.compile_mode, num_speculative_tokens,
                                          engine_config.decode_steps)
        self.sampler = Sampler()
        self.drafter = MTPDrafter(self.runner, self.block_manager, num_speculative_tokens) if num_speculative_tokens else None
        eos_token_ids = engine_config.eos_token_ids
        self.eos_token_ids = set(cfg.eos_token_ids if eos_token_ids is None else eos_token_ids)
        # a sequence never needs more than the whole cache (minus room for drafts)
        self.capacity_tokens = num_blocks * block_size - 2 * num_speculative_tokens - 1
        self.requests: dict[str, Sequence] = {}
        self.suspended: dict[str, Sequence] = {}  # out of the batch, KV cache kept (see suspend)
        self.stats = EngineStats()

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, config: EngineConfig | None = None, *,
                        device: str | None = None, dtype: torch.dtype | str | None = None, **options) -> LLMEngine:
        """Any checkpoint glm5 writes (bf16/fp32, FP8 or low-bit: glm5.quant.load.load_any_checkpoint), onto
        `device` (default: the config's, else the CPU) in `dtype` (default: the config's)."""
        from glm5.quant.load import load_any_checkpoint

        config = (config or EngineConfig()).replace(**options)
        device = device or config.device or "cpu"
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else (dtype or config.torch_dtype())
        return cls(load_any_checkpoint(directory, device=device, dtype=dtype), config)

    @classmethod
    def from_preset(cls, name: str, config: EngineConfig | None = None, *, seed: int = 0, device: str | None = None,
                    **options) -> LLMEngine:
        """Random weights (for smoke tests and benchmarks)."""
        config = (config or EngineConfig()).replace(**options)
        torch.manual_seed(seed)
        model = GLM5ForCausalLM(GLM5Config.from_preset(name)).to(device or config.device or "cpu")
        if config.dtype:
            model = model.to(config.torch_dtype())
        return cls(model, config)

    # ------------------------------------------------------------------ requests
    def validate_prompt(self, prompt_token_ids: list[int]) -> None:
        """ValueError with a message a client can read, if the engine cannot take this prompt."""
        if not prompt_token_ids:
            raise ValueError("the prompt is empty")
        vocab = self.config.vocab_size
        if any(not isinstance(t, int) or t < 0 or t >= vocab for t in prompt_token_ids):
            raise ValueError(f"prompt token ids must be integers in [0, {vocab})")
        limit = min(self.max_model_len, self.capacity_tokens)
        if len(prompt_token_ids) >= limit:
            raise ValueError(
                f"the prompt has {len(prompt_token_ids)} tokens; this model's context allows at most {limit - 1}"
            )

    def add_request(self, prompt_token_ids: list[int], params: SamplingParams | None = None,
                    request_id: str | None = None) -> Sequence:
        self.validate_prompt(prompt_token_ids)
        seq = Sequence(prompt_token_ids, params or SamplingParams(), request_id)
        if seq.request_id in self.requests:
            raise ValueError(f"request id {seq.request_id!r} is already running")
        self.requests[seq.request_id] = seq
        self.scheduler.add(seq)
        return seq

    def abort(self, request_id: str) -> bool:
        seq = self.requests.pop(request_id, None)
        if seq is None:
            return self.release(request_id)  # a suspended request: its kept blocks go back
        self._drop(seq)
        return True

    def suspend(self, request_id: str) -> Sequence | None:
        """Take a request out of the batch but keep its KV cache, to `resume` it later where it stopped (even
        after `refresh_weights`: its cached latents then come from the earlier weights). Its blocks go back to
        the pool first when a step needs them, and the request is then recomputed on resume. -> its Sequence."""
        seq = self.requests.pop(request_id, None)
        if seq is None:
            return None
        self.scheduler.suspend(seq)
        self.suspended[request_id] = seq
        return seq

    def resume(self, request_id: str) -> Sequence:
        """A suspended request back in the batch; it samples on from its own generator."""
        if request_id not in self.suspended:
            raise ValueError(f"request id {request_id!r} is not suspended")
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already running")
        seq = self.suspended.pop(request_id)
        self.scheduler.resume(seq)
        self.requests[request_id] = seq
        return seq

    def release(self, request_id: str) -> bool:
        """Drop a suspended request and free its blocks."""
        seq = self.suspended.pop(request_id, None)
        if seq is None:
            return False
        self._drop(seq)
        return True

    def _drop(self, seq: Sequence) -> None:
        """An aborted or released request: out of the scheduler, its blocks freed."""
        self.scheduler.remove(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = "abort"

    def refresh_weights(self) -> None:
        """After the model's weights changed in place (an RL update, a new checkpoint copied in): rebuild the
        runner's fused weights, drop the CUDA graphs that read them, and forget the prefix cache, whose
        latents the old weights computed."""
        self.runner.refresh_weights()
        self.block_manager.reset_prefix_cache()

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    # ------------------------------------------------------------------ one step
    def _append(self, seq: Sequence, token: int, logprob: TokenLogprob | None) -> bool:
        """Add a generated token; True when the sequence is finished."""
        seq.token_ids.append(token)
        if logprob is not None:
            seq.logprobs.append(logprob)
        p = seq.params
        if (token in self.eos_token_ids and not p.ignore_eos) or token in p.stop_token_ids:
            seq.finish_reason = "stop"
        elif seq.num_output_tokens >= p.max_tokens or len(seq.token_ids) >= min(self.max_model_len, self.capacity_tokens):
            seq.finish_reason = "length"
        return seq.finish_reason is not None

    @torch.no_grad()
    def step(self) -> list[StepOutput]:
        batch = self.scheduler.schedule()
        self.stats.preemptions = self.scheduler.num_preemptions
        if batch is None:
            return []
        self.stats.steps += 1
        if self.compiled is not None and self.compiled.handles_steps(batch) and self._room_for_steps(batch):
            tokens = self.compiled.run_steps(batch.seqs)
            if tokens is not None:
                return self._finish_steps(batch, tokens)
        step_logits = None  # [rows, vocab] when the step computed them (a compiled decode step: row i, sequence i)
        cycle = None  # per sequence [targets, accepted, next drafts] when a compiled speculative cycle ran
        compiled = None
        if self.compiled is not None and self.compiled.handles_speculative(batch):
            cycle = self.compiled.run_speculative(batch.seqs)
        elif self.graphs is not None and self.graphs.handles_speculative(batch):
            cycle = self.graphs.run_speculative(batch.seqs)
        elif self.compiled is not None and self.compiled.handles(batch):
            compiled = self.compiled.run(batch.seqs)
        if cycle is not None:
            inputs = hidden = None
        elif compiled is not None:
            inputs, hidden, step_logits = compiled
        elif self.graphs is not None and self.graphs.handles(batch):
            inputs, hidden = self.graphs.run(batch.seqs, batch.num_new_tokens)
        else:
            inputs = self.runner.prepare_batch(batch)
            hidden = self.runner.forward(inputs)
        # which rows need logits: the last fed token of a sequence whose prompt is complete, all rows when verifying
        sample_seqs, rows, verify = [], [], []
        computed_before = [s.num_computed_tokens for s in batch.seqs]
        for i, (seq, n, k) in enumerate(zip(batch.seqs, batch.num_new_tokens, batch.num_draft_tokens)):
            if k:
                verify.append((seq, None if cycle is not None else list(range(inputs.query_starts[i], inputs.query_starts[i] + n))))
            elif seq.num_computed_tokens + n == len(seq.token_ids):
                sample_seqs.append(seq)
                rows.append(inputs.query_starts[i] + n - 1)
            if batch.is_prefill:
                self.stats.prefill_tokens += n
        new_tokens: dict[int, list[int]] = {id(s): [] for s in batch.seqs}
        new_logprobs: dict[int, list[TokenLogprob]] = {id(s): [] for s in batch.seqs}
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            if not seq.draft_token_ids:
                seq.num_computed_tokens += n
        if rows:
            index = torch.tensor(rows, device=hidden.device)
            logits = step_logits[index] if step_logits is not None else self.runner.logits(hidden[index])
            tokens, logprobs = self.sampler(logits, sample_seqs)
            for seq, token, logprob in zip(sample_seqs, tokens, logprobs):
                self._append(seq, token, logprob)
                new_tokens[id(seq)].append(token)
                if logprob is not None:
                    new_logprobs[id(seq)].append(logprob)
                if not batch.is_prefill:
                    self.stats.decode_tokens += 1
        targets = []  # per verifying sequence, the main model's greedy choice at [last token, drafts...]
        if cycle is not None:
            targets = [row[: len(seq.draft_token_ids) + 1] for seq, row in zip(batch.seqs, cycle)]
        elif verify:  # one lm_head and one max over every verified row of the batch
            flat_rows = [r for _, seq_rows in verify for r in seq_rows]
            logits = self.runner.logits(hidden[torch.tensor(flat_rows, device=hidden.device)])
            row_seqs = [seq for seq, seq_rows in verify for _ in seq_rows]
            if any(seq.params.logits_processors for seq in row_seqs):  # stateless ones (can_speculate): row j
                prefixes = [seq.output_token_ids + seq.draft_token_ids[:j]  # follows the output and j drafts
                            for seq, seq_rows in verify for j in range(len(seq_rows))]
                logits = apply_processors(logits, row_seqs, prefixes)
            flat = logits.max(-1).indices.tolist()
            offset = 0
            for _, seq_rows in verify:
                targets.append(flat[offset : offset + len(seq_rows)])
                offset += len(seq_rows)
        for (seq, _), seq_targets in zip(verify, targets):
            drafts = seq.draft_token_ids
            accepted, tokens = accept_drafts(seq_targets, drafts)
            seq.draft_token_ids = []
            seq.num_computed_tokens += 1 + accepted  # the last token and the accepted drafts are now cached
            kept = 0
            for token in tokens:
                self.stats.decode_tokens += 1
                kept += 1
                new_tokens[id(seq)].append(token)
                if self._append(seq, token, None):
                    break
            # accepted drafts that were kept: a stop token or max_tokens may cut the step's tokens short
            kept_drafts = min(accepted, kept - 1) if kept else 0
            seq.num_drafted += len(drafts)
            seq.num_accepted += kept_drafts
            self.stats.verify_steps += 1
            self.stats.drafted += len(drafts)
            self.stats.accepted += kept_drafts
        if cycle is not None:  # the cycle drafted already: keep the drafts where the drafter would draft
            for seq, row in zip(batch.seqs, cycle):
                if self.drafter.may_draft(seq):
                    seq.draft_token_ids = row[self.num_speculative_tokens + 2 :]
        elif self.drafter is not None:
            self.drafter.after_step(batch, inputs, hidden, computed_before)
        return self._outputs(batch, new_tokens, new_logprobs)

    def _room_for_steps(self, batch) -> bool:
        """Cache slots for the compiled multi-step decode: every sequence's N - 1 positions past its newest
        token, within the context length (else this step decodes one token, as without decode_steps)."""
        N = self.compiled.steps
        need = [len(s.token_ids) + N - 1 for s in batch.seqs]
        limit = min(self.max_model_len, self.capacity_tokens)
        if any(n > limit for n in need) or sum(self.block_manager.blocks_needed(s, n) for s, n in zip(batch.seqs, need)) \
                > self.block_manager.num_free_blocks:
            return False
        for seq, n in zip(batch.seqs, need):
            self.block_manager.allocate(seq, n)
        return True

    def _finish_steps(self, batch, tokens: list[list[int]]) -> list[StepOutput]:
        """The tokens of a compiled multi-step decode, appended one by one: a sequence stops at its stop token or
        max_tokens, and the tokens computed after that are dropped."""
        new_tokens = {id(s): [] for s in batch.seqs}
        for seq, row in zip(batch.seqs, tokens):
            for token in row:
                seq.num_computed_tokens += 1  # the token fed at this position is now cached
                new_tokens[id(seq)].append(token)
                self.stats.decode_tokens += 1
                if self._append(seq, token, None):
                    break
        return self._outputs(batch, new_tokens, {id(s): [] for s in batch.seqs})

    def _outputs(self, batch, new_tokens: dict, new_logprobs: dict) -> list[StepOutput]:
        """Commit each sequence's full blocks, retire the finished ones, and report what each produced."""
        outputs = []
        for seq in batch.seqs:
            self.block_manager.commit(seq)
            finished = seq.finish_reason is not None
            if finished:
                seq.status = SequenceStatus.FINISHED
                seq.draft_token_ids = []
                self.scheduler.remove(seq)
                self.requests.pop(seq.request_id, None)
            if new_tokens[id(seq)] or finished:
                outputs.append(StepOutput(
                    seq.request_id, new_tokens[id(seq)], new_logprobs[id(seq)], finished, seq.finish_reason,
                    seq.num_prompt_tokens, seq.num_output_tokens, seq.num_cached_prefix_tokens,
                ))
        return outputs

    # ------------------------------------------------------------------ offline API
    def generate(
        self, prompts: list[list[int]] | list[int], params: SamplingParams | list[SamplingParams] | None = None,
    ) -> list[Completion]:
        """Run prompts to completion (continuous batching); results in the order of `prompts`."""
        if prompts and isinstance(prompts[0], int):
            prompts = [prompts]  # type: ignore[list-item]
        if not isinstance(params, list):
            params = [params or SamplingParams()] * len(prompts)
        for p in prompts:  # all or none: a bad prompt must not leave the ones before it queued
            self.validate_prompt(list(p))
        seqs = [self.add_request(list(p), sp) for p, sp in zip(prompts, params)]
        while any(s.finish_reason is None for s in seqs):
            self.step()
        return [
            Completion(s.request_id, s.token_ids[: s.num_prompt_tokens], s.output_token_ids, s.finish_reason,
                       s.logprobs, s.num_cached_prefix_tokens, s.num_drafted, s.num_accepted)
            for s in seqs
        ]


LLM = LLMEngine
