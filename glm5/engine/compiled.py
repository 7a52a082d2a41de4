"""Compiled decode steps for a CPU: the engine's static step through torch.compile (inductor), lm_head included.

At decode sizes on a CPU a step is bound by per-op overhead and by how fast the weights stream through
single-row matmuls, not by FLOPs: the eager step of `tiny-bench` runs ~2,000 aten calls, and MKL reads a
[1, 256] x [256, 768] weight at ~8 GB/s. Inductor turns the static forward (the one CUDA graphs replay, with
`StepInputs.static`: no host sync, no data-dependent shape) into fused C++ loops, and with

    freezing                   the weights are constants of the compiled step (packed once, ahead)
    max_autotune, "CPP,ATEN"   each matmul takes inductor's C++ GEMM template where it times faster than
                               aten's (a few-row kernel streaming the packed weight), else aten's
    cpp_wrapper                the step's kernels are called from generated C++, not from Python

a batch-1 step is a handful of calls. One compiled function serves every decode step of a batch bucket:

    key       (sequences bucket, sparse): the context length T is a dynamic dimension (one graph for every
              context bucket: 16, 32, ... tokens, padded and masked as the CUDA-graph steps are), and
              whether T exceeds index_topk picks the dense or the sparse (indexer) branch
    inputs    ids, positions, cache slots [S] and the padded slot table [S, T] (cuda_graphs' packing)
    output    hidden [S, hidden] and logits [S, vocab] (fp32): the engine samples from these rows

With MTP speculation (num_speculative_tokens k) a decode step is one whole speculative cycle compiled the same
way, key (sequences bucket, sparse, k): the main model verifies [last token, k drafts], the greedy choices
decide how many are accepted, and the MTP layer drafts the next k, all in one call
(`glm5.engine.speculative.verify_and_draft`). With `decode_steps` N > 1 (no speculation), a decode step of
sequences that all decode greedily without penalties, logprobs or logits processors runs N steps in one call,
key (sequences bucket, sparse, 0, N): each step's greedy token is fed to the next inside the compiled code
(`decode_steps`), and the engine appends the N tokens after it, stopping a sequence at its stop token or
max_tokens (the steps after a stop were computed for nothing): the per-call cost of a step (torch.compile's
entry, the packed inputs, the engine's bookkeeping: ~1 ms of a 4.3 ms batch-8 step on a 2-core CPU, dev/LOG.md)
is paid once per N tokens, as in vLLM's multi-step scheduling. Prefill steps, steps with a logits processor or with sequences
that did not draft, and batches over the last bucket run the eager forward. A compile
takes tens of seconds (~40-70 s for tiny-bench on 2 cores with max_autotune; the first step of each bucket pays
it), so the switch is off by default:

    llm = LLM(model, compile=True)          # EngineConfig.compile; `glm5 serve --compile`
    llm.compiled.warm_up([1, 8])            # compile the decode steps of these batch sizes ahead

The weights are frozen into the step: after changing the model's weights call `LLMEngine.refresh_weights()`,
which drops the compiled steps (the next decode step compiles again). Greedy tokens match the eager engine's
(tests/test_compiled_step.py); the arithmetic differs only in summation order.
"""

from __future__ import annotations

import types
import warnings

import torch
import torch._inductor.config as inductor_config

from glm5.engine.cuda_graphs import batch_buckets, context_bucket, cycle_inputs, host_inputs, unpack
from glm5.engine.runner import ModelRunner, StepInputs, static_step_inputs
from glm5.engine.speculative import cycle_batch, verify_and_draft

# inductor's options for the compiled step (see the module docstring); "default" compiles without autotuning
# (faster to build, slower to run: the tests use it)
MODES = {
    "max-autotune": {"freezing": True, "max_autotune": True, "max_autotune_gemm_backends": "CPP,ATEN",
                     "cpp_wrapper": True,
                     # autotuning's tables of timings, printed to stderr by default: a server's log is no place
                     "autotune_num_choices_displayed": 0, "max_autotune_report_choices_stats": False},
    "default": {"freezing": True, "cpp_wrapper": True},
}


def decode_step(runner: ModelRunner, ids: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
                ctx_slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The static forward of one decode step (one new token per sequence) -> (hidden [S, H], logits [S, V])."""
    hidden = runner.forward(static_step_inputs(ids, positions, slots, ctx_slots, runner.index_topk))
    return hidden, runner.logits(hidden)


def decode_steps(runner: ModelRunner, ids: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
                 ctx_slots: torch.Tensor, steps: int) -> torch.Tensor:
    """`steps` greedy decode steps as one static forward: ids, positions [S] (each sequence's newest token),
    slots [S, steps] (the cache slots of positions p .. p + steps - 1), ctx_slots [S, T] reaching p + steps - 1.
    Step j feeds the greedy token of step j - 1 (the first, `ids`) at position p + j. -> tokens [S, steps]."""
    tokens = []
    for j in range(steps):
        inputs = static_step_inputs(ids, positions + j, slots[:, j], ctx_slots, runner.index_topk)
        ids = runner.logits(runner.forward(inputs)).argmax(-1)
        tokens.append(ids)
    return torch.stack(tokens, 1)


class CompiledSteps:
    """Decode steps of a runner through torch.compile (see the module docstring)."""

    def __init__(self, runner: ModelRunner, max_batch: int, scratch_slot: int, mode: str = "max-autotune",
                 num_speculative_tokens: int = 0, decode_steps: int = 1) -> None:
        if mode not in MODES:
            raise ValueError(f"compile mode {mode!r}: one of {', '.join(MODES)}")
        self.runner = runner
        self.k = num_speculative_tokens  # drafts per sequence in the speculative cycles compiled
        self.steps = decode_steps if not num_speculative_tokens else 1  # greedy decode steps per call
        self.buckets = batch_buckets(max_batch)
        self.scratch_slot = scratch_slot
        self.mode = mode
        self.num_runs = 0
        self.failed: str | None = None  # why compiling failed (then every step runs eagerly)
        self.reset()
        runner.graphs = self  # refresh_weights() resets us

    def reset(self) -> None:
        """Forget the compiled steps (their frozen weights are the old ones after `refresh_weights`)."""
        self.functions: dict[tuple[int, bool, int, int], object] = {}  # (sequences, sparse, drafts, steps) -> compiled
        self.ready: set[tuple[int, bool, int, int, int]] = set()  # + context: shapes run once with guards checked

    def handles(self, batch) -> bool:
        """A decode step (one token per sequence, no drafts) of at most the last bucket's sequences."""
        return (self.failed is None and not batch.is_prefill and not any(batch.num_draft_tokens)
                and all(n == 1 for n in batch.num_new_tokens) and len(batch.seqs) <= self.buckets[-1])

    def handles_speculative(self, batch) -> bool:
        """A decode step in which every sequence verifies k drafts and none has a logits processor (the compiled
        cycle takes the plain greedy choice; processed rows run eagerly), at most the last bucket's sequences."""
        return self.failed is None and cycle_batch(batch, self.k) and len(batch.seqs) <= self.buckets[-1]

    def _bucket(self, n: int) -> int | None:
        """The batch bucket of n sequences (None: more than the last)."""
        return next((b for b in self.buckets if b >= n), None)

    def _fail(self, err: Exception) -> None:
        """A fast path must never take the engine down: warn once, and every later step runs eagerly."""
        self.failed = f"{type(err).__name__}: {str(err)[:500]}"
        warnings.warn(f"compiling the decode step failed, running steps eagerly: {self.failed}", stacklevel=3)

    def handles_steps(self, batch) -> bool:
        """A decode step that `run_steps` can run: N > 1 steps per call, every sequence decoding greedily
        without penalties, logprobs or logits processors (the greedy token is picked inside the compiled code)."""
        return self.steps > 1 and self.handles(batch) and all(
            s.params.greedy and not s.params.has_penalties and s.params.logprobs is None
            and not s.params.logits_processors for s in batch.seqs)

    def _function(self, S: int, sparse: bool, k: int = 0, steps: int = 1):
        """The compiled step of a key: a decode step (k = 0, steps = 1), a speculative cycle verifying k drafts,
        or `steps` greedy decode steps."""
        key = (S, sparse, k, steps)
        fn = self.functions.get(key)
        if fn is None:
            self.runner.build_fused()  # made once, eagerly: the compiled step reads (and freezes) them
            # the runner is closed over, not passed: then dynamo installs the model's parameters as attributes of
            # the graph (constants that freezing folds and the GEMM templates pack), not as inputs
            runner = self.runner

            if k:
                def step(ids, positions, slots, ctx_slots):
                    return verify_and_draft(runner, ids, positions, slots, ctx_slots, k)
            elif steps > 1:
                def step(ids, positions, slots, ctx_slots):
                    return decode_steps(runner, ids, positions, slots, ctx_slots, steps)
            else:
                def step(ids, positions, slots, ctx_slots):
                    return decode_step(runner, ids, positions, slots, ctx_slots)

            # dynamo keeps its compiled graphs on the code object: one of its own per key keeps every key to one
            # cache entry (no recompile limit shared between keys, no guard to tell them apart)
            name = (f"{'verify' if k else 'decode'}_step_s{S}{f'_k{k}' if k else ''}{f'_n{steps}' if steps > 1 else ''}"
                    f"_{'sparse' if sparse else 'dense'}")
            code = step.__code__.replace(co_name=name)
            step = types.FunctionType(code, step.__globals__, code.co_name, None, step.__closure__)
            fn = self.functions[key] = torch.compile(step, dynamic=False, fullgraph=True)
        return fn

    def _call(self, key: tuple[int, bool, int, int], ids, positions, slots, ctx):
        fn = self._function(*key)
        shape = (*key, ctx.shape[1])
        if shape in self.ready:
            # this exact shape has run once with every guard checked (and compiled if one failed); the inputs are
            # always the step's own int64 tensors, so the guards can only pass again, and evaluating them
            # costs ~0.2 ms a step
            with torch.compiler.set_stance(skip_guard_eval_unsafe=True):
                return fn(ids, positions, slots, ctx)
        torch._dynamo.mark_dynamic(ctx, 1)  # one graph for every context bucket
        with inductor_config.patch(MODES[self.mode]):  # read while compiling
            out = fn(ids, positions, slots, ctx)
        self.ready.add(shape)
        return out

    @torch.no_grad()
    def run(self, seqs) -> tuple[StepInputs, torch.Tensor, torch.Tensor] | None:
        """Feed each sequence's newest token -> (the step's inputs, hidden [S_bucket, H], logits [S_bucket, V]),
        row i for sequence i; None when compiling failed (the caller runs the step eagerly)."""
        n = len(seqs)
        S = self._bucket(n)
        starts = [s.num_computed_tokens for s in seqs]
        T = context_bucket(max(starts) + 1)
        packed = host_inputs(self.runner.block_size, self.scratch_slot, seqs, starts, [1] * n, S, 1, T)
        ids, positions, slots, ctx = unpack(packed.to(self.runner.device), S, 1, T)
        sparse = T > self.runner.index_topk
        try:
            hidden, logits = self._call((S, sparse, 0, 1), ids, positions, slots, ctx)
        except Exception as err:
            self._fail(err)
            return None
        self.num_runs += 1
        return static_step_inputs(ids, positions, slots, ctx, self.runner.index_topk), hidden, logits

    @torch.no_grad()
    def run_speculative(self, seqs) -> list[list[int]] | None:
        """One speculative cycle (`glm5.engine.speculative.verify_and_draft`): feed each sequence's newest token
        and its k drafts -> per sequence [k + 1 targets, drafts accepted, k next drafts]; None when compiling
        failed (the caller runs the step eagerly)."""
        n, k = len(seqs), self.k
        S = self._bucket(n)
        starts, tokens, T = cycle_inputs(seqs, k)
        packed = host_inputs(self.runner.block_size, self.scratch_slot, seqs, starts, [k + 1] * n, S, k + 1, T,
                             tokens=tokens)
        ids, positions, slots, ctx = unpack(packed.to(self.runner.device), S, k + 1, T)
        return self._rows((S, T > self.runner.index_topk, k, 1), n, ids, positions, slots, ctx)

    @torch.no_grad()
    def run_steps(self, seqs) -> list[list[int]] | None:
        """N greedy decode steps in one call (`decode_steps`; the caller has given every sequence cache slots for
        N - 1 positions past its newest token) -> per sequence its N next greedy tokens; None when compiling
        failed (the caller runs the step eagerly)."""
        n, N = len(seqs), self.steps
        S = self._bucket(n)
        starts = [s.num_computed_tokens for s in seqs]
        T = context_bucket(max(starts) + N)
        tokens = [s.token_ids[a : a + 1] + [0] * (N - 1) for s, a in zip(seqs, starts)]
        packed = host_inputs(self.runner.block_size, self.scratch_slot, seqs, starts, [N] * n, S, N, T, tokens=tokens)
        ids, positions, slots, ctx = unpack(packed.to(self.runner.device), S, N, T)
        first = slice(None, None, N)  # each sequence's first row: its newest token at its position
        return self._rows((S, T > self.runner.index_topk, 0, N), n, ids[first], positions[first], slots.view(S, N), ctx)

    def _rows(self, key, n: int, ids, positions, slots, ctx) -> list[list[int]] | None:
        """A call whose int64 output has a row per sequence -> the first n rows; None when compiling failed."""
        try:
            out = self._call(key, ids, positions, slots, ctx)
        except Exception as err:
            self._fail(err)
            return None
        self.num_runs += 1
        return out[:n].tolist()

    @torch.no_grad()
    def warm_up(self, batch_sizes: list[int]) -> int:
        """Compile the decode steps of these batch sizes now, both branches (contexts up to index_topk, and
        longer): each on a dummy step whose rows write and read only the cache's scratch slot. -> compiled shapes
        held (a failure warns and leaves every step eager, as in `run`)."""
        device = self.runner.device
        topk = self.runner.index_topk
        for n in batch_sizes:
            S = self._bucket(n)
            if S is None:
                raise ValueError(f"batch size {n}: more than the engine's {self.buckets[-1]} sequences")
            for T in sorted({context_bucket(topk), context_bucket(topk + 1)}):
                if self.failed is not None:
                    return len(self.ready)
                # the decode step, with speculation the cycle of this bucket (k + 1 rows a sequence), with
                # decode_steps N > 1 the N steps in one call
                for k, steps in sorted({(0, 1), (self.k, 1), (0, self.steps)}):
                    N = S * (k + 1)
                    ids = torch.zeros(N, dtype=torch.long, device=device)
                    slots = torch.full((N,) if steps == 1 else (S, steps), self.scratch_slot, dtype=torch.long,
                                       device=device)
                    ctx = torch.full((S, T), self.scratch_slot, dtype=torch.long, device=device)
                    try:
                        self._call((S, T > topk, k, steps), ids, ids.clone(), slots, ctx)
                    except Exception as err:
                        self._fail(err)
                        break
        return len(self.ready)
