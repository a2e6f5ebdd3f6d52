"""Everything behind the endpoints: the model (`Engine`), the queue (`Batcher`), the adapters, the metrics, and one
generation core that both the native API and the OpenAI-compatible API call.

A request goes through three stages, each failing that request alone:

1. validation on the event loop (text that is not valid Unicode, sizes, the compute budget): 4xx;
2. tokenisation, one request at a time on the tokenizer thread: 4xx naming the input;
3. the model on the worker thread: continuous decoding (`Decoder`) for generation, static batches for
   classification, beam search and models the decoder cannot batch by row. A static batch that fails is re-run request by request, so only the
   request that causes the failure gets an error.

A request whose client disconnects or whose deadline passes is cancelled: its rows leave the decode batch at the next
token (a static batch stops early once every request in it has given up) and it is not counted as answered (status
499 for a client that went away, 504 for a deadline).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import itertools
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ia3.serve.adapters import AdapterPool
from ia3.serve.batcher import Batch, Batcher, Job
from ia3.serve.budget import classify_cost, generation_cost
from ia3.serve.config import ServeConfig
from ia3.serve.decoding import Guide, Row, RowError, Sampling, TokenLogprob
from ia3.serve.engine import Engine, Generated, GenerateParams, labels_from_recipes
from ia3.serve.errors import ApiError, ShuttingDown, adapter_not_found
from ia3.serve.guided import Grammars, GuideSpec
from ia3.serve.metrics import Metrics
from ia3.serve.registry import Registry, check_name
from ia3.tasks import Task
from ia3.tuner import BASE_ADAPTER

log = logging.getLogger("ia3.serve")
_seeded = itertools.count()
_requests = itertools.count(1)


class ClientGone(Exception):
    """The client disconnected before its answer was ready."""


def check_text(text: str, where: str) -> None:
    """422 unless `text` can be encoded as UTF-8 (JSON allows lone surrogates such as "\\ud800"; tokenizers don't)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ApiError(
            422,
            "invalid_input",
            f"{where} is not valid Unicode text (a lone surrogate at character {err.start}); send UTF-8 text",
        ) from None


@dataclass
class Prompt:
    """One tokenised prompt: its ids and how many tokens truncation dropped from its start."""

    ids: list[int]
    dropped: int = 0


@dataclass
class GenerationRequest:
    """What to generate, independent of the API that asked: `n` completions for each prompt."""

    prompts: list[Prompt]
    adapter: str
    max_new_tokens: int
    n: int = 1
    num_beams: int = 1
    sampling: Sampling = Sampling()
    top_k_static: int = 50  # transformers' default top-k of the static path (native API)
    stop: tuple[str, ...] = ()
    logprobs: int | None = None  # each token's logprob and its k most likely alternatives (None: none)
    echo: bool = False  # the prompt's logprobs too
    best_of: int = 0  # > n: generate best_of per prompt, answer the n with the highest cumulative logprob
    guide: Callable[[], Guide] | None = None  # a fresh structured-output constraint per row

    @property
    def width(self) -> int:
        """Rows generated per prompt."""
        return max(self.n, self.best_of)

    @property
    def rows(self) -> int:
        return len(self.prompts) * self.width

    @property
    def plain(self) -> bool:
        """Whether only the continuous decoder's per-row features are left out (the static path can run it)."""
        s = self.sampling
        return (
            self.logprobs is None
            and not self.echo
            and self.best_of <= self.n
            and self.guide is None
            and not (s.shapes or s.ignore_eos or s.min_p)
        )


@dataclass
class Completion:
    """One answer: which prompt and choice, the text, its token count and why it ended."""

    prompt: int
    index: int
    text: str
    tokens: int
    finish_reason: str
    token_logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob] | None = None
    stop_reason: str | None = None

    @property
    def cumulative_logprob(self) -> float:
        return sum(e.logprob or 0.0 for e in self.token_logprobs)


@dataclass
class StreamEvent:
    """A piece of a streamed answer: new `text` of choice `index`, or its end (`finish_reason` set)."""

    index: int
    text: str = ""
    finish_reason: str | None = None
    tokens: int = 0
    error: ApiError | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)  # of the tokens since the choice's last event
    stop_reason: str | None = None


@dataclass
class Watch:
    """Who asked, and how a waiting request learns that its client went away: `disconnected()` resolves when it
    does. `client` names the client for fair admission (requests of one client share its turns)."""

    disconnected: Callable[[], Any] | None = None
    deadline: float = field(default_factory=lambda: time.monotonic() + 3600.0)
    client: str = ""


class Service:
    """Everything behind the endpoints. `create_app` makes one; tests reach it as `app.state.service`."""

    def __init__(self, config: ServeConfig) -> None:
        self.config = config
        task = config.task_class  # resolved once; passed on as the class
        self.registry = Registry(config.adapters_dir, task, config.allow_hub)
        folders = self.registry.startup_folders()
        labels = config.label_names or labels_from_recipes([folder for _, folder in folders])
        self.engine = Engine(config, task, labels)
        self.metrics = Metrics()
        mib = config.max_adapter_mb
        self.adapters = AdapterPool(
            self.registry,
            self.engine,
            max_loaded=config.max_loaded_adapters,
            max_bytes=int(mib * 2**20) if mib is not None else None,
            pins=config.pin_adapters,
            hub_on_demand=config.hub_on_demand,
        )
        self.adapters.preload(folders)
        if self.registry.root is not None:  # adapters will come on demand: the vector tables ready for them now
            self.engine.prepare_vectors()
        self.batcher = Batcher(
            self._run_batch,
            max_batch_size=config.max_batch_size,
            max_wait_s=config.max_wait_ms / 1000,
            max_queue=config.max_queue,
            on_batch=self._on_batch,
            decoder=self.engine.decoder,
            max_batch_cost=self.engine.budgets.batch_tokens,
        )
        # one thread tokenises requests, one at a time: a fast tokenizer is not shared between threads
        self.tokenizer_pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="ia3-serve-tokenizer")
        self.grammars: Grammars | None = None  # structured output's compiler, made at the first constrained request

    def summary(self) -> str:
        """The startup line: model, device, adapters, batching and limits."""
        cfg, engine = self.config, self.engine
        names = sorted(self.registry.names())
        budget = cfg.max_loaded_adapters
        if budget is not None or cfg.max_adapter_mb is not None or self.registry.root is not None:
            more = len(self.loadable_adapters())
            budget_text = f" (at most {budget}" if budget is not None else " (no limit"
            budget_text += f", {cfg.max_adapter_mb:g} MiB" if cfg.max_adapter_mb is not None else ""
            budget_text += f"; {more} more on demand)" if more else ")"
        else:
            budget_text = ""
        batching = f"static ({engine.static_reason})"
        if engine.decoder is not None:
            batching = "continuous" + (", packed steps" if engine.decoder.packed else "")
        return (
            f"ia3 serve: model {cfg.model} ({cfg.task}) on {engine.device}; {len(names)} adapter(s)"
            f"{': ' + ', '.join(names[:8]) + (' ...' if len(names) > 8 else '') if names else ''}{budget_text}; "
            f"batching {batching}, {cfg.max_batch_size} rows; limits: {cfg.max_inputs} inputs x "
            f"{engine.max_input_tokens} tokens (truncation {cfg.truncation}), {cfg.max_new_tokens} new tokens, "
            f"{engine.budgets.describe()}, queue {cfg.max_queue}, "
            f"{cfg.max_connections} connections; timeouts: request {cfg.request_timeout_s:g} s, headers "
            f"{cfg.header_timeout_s:g} s, body {cfg.body_timeout_s:g} s, idle {cfg.idle_timeout_s:g} s"
        )

    def close(self) -> None:
        self.batcher.stop()
        self.tokenizer_pool.shutdown(wait=False, cancel_futures=True)

    # -- what the routes read --------------------------------------------------------------------------------------
    @property
    def task(self) -> Task:
        """The served model's task (bound to the server's tokenizer)."""
        return self.engine.task

    @property
    def label_names(self) -> list[str] | None:
        """The labels `/v1/classify` ranks by default."""
        return self.engine.label_names

    def budgets(self) -> dict:
        """The compute budgets in force and the measured speed they came from (`ia3.serve.budget`)."""
        return dataclasses.asdict(self.engine.budgets)

    def alive(self) -> bool:
        """Whether the worker thread runs."""
        return self.batcher.alive()

    def has_adapter(self, name: str) -> bool:
        """Whether a request may name adapter `name`: resident, or loadable on demand."""
        return self.adapters.servable(name)

    def adapter_infos(self) -> list[dict]:
        """The loaded adapters, as `/v1/adapters` lists them."""
        return self.registry.infos()

    def loadable_adapters(self, limit: int = 100_000) -> list[str]:
        """Adapter folders under `--adapters` that are not resident (loaded on demand when a request names them)."""
        resident = set(self.registry.names())
        return [n for n in self.registry.available(limit) if n not in resident]

    def adapter_stats(self) -> dict:
        """Routing signals: resident adapters (LRU first), rows by adapter (running in the decode batch, waiting:
        queued, in a static batch or waiting on a load), the budget, loads and evictions."""
        in_use = self.adapters.in_use()
        decoder = self.engine.decoder
        running = decoder.adapter_rows() if decoder is not None else {}
        waiting = {a: n - running.get(a, 0) for a, n in in_use.items() if n > running.get(a, 0)}
        cfg = self.config
        return {
            "resident": self.registry.names(),
            "resident_bytes": self.registry.resident_bytes(),
            "pinned": sorted(self.adapters.pins),
            "running": {a: n for a, n in running.items() if a != BASE_ADAPTER},
            "waiting": {a: n for a, n in waiting.items() if a != BASE_ADAPTER},
            "max_loaded": cfg.max_loaded_adapters,
            "max_lora": cfg.max_loaded_adapters or cfg.max_batch_size,
            "loads": self.adapters.loads,
            "evictions": self.adapters.evictions,
            "load_seconds": list(self.adapters.load_seconds),
        }

    def has_chat_template(self) -> bool:
        return bool(getattr(self.engine.tokenizer, "chat_template", None))

    def check_generates(self) -> None:
        """422 unless the served model generates text."""
        if not self.task.generates:
            raise ApiError(
                422, "unsupported", f"This server runs a classifier (task {self.task.name}); use /v1/classify"
            )

    # -- adapters (request side) -----------------------------------------------------------------------------------
    async def load_adapter(self, name: str, source: str | None = None, revision: str | None = None) -> dict:
        """Load adapter `name` from the adapters folder, or from Hub repo `source` (at `revision`); its info."""
        check_name(name)
        if self.registry.has(name):
            raise ApiError(409, "adapter_exists", f"Adapter {name!r} is already loaded; DELETE it first")
        if source is not None:
            folder = await asyncio.to_thread(self.registry.hub_folder, source, revision)
            origin = f"hub:{source}" + (f"@{revision}" if revision else "")
        else:
            if revision is not None:
                raise ApiError(422, "invalid_request", "revision needs a Hub 'source'")
            folder = await asyncio.to_thread(self.registry.local_folder, name)
            origin = f"local:{name}"
        return await self.adapters.load(name, folder, origin, self.on_worker)

    async def load_lora_adapter(self, name: str, path: str) -> dict:
        """vLLM's `/v1/load_lora_adapter`: load the adapter folder at `path` (inside `--adapters`, unless
        `--lora-paths-anywhere`) as `name`; it is loaded from there again after an eviction."""
        check_name(name)
        anywhere = self.config.lora_paths_anywhere
        folder = await asyncio.to_thread(self.registry.path_folder, path, anywhere)
        root = self.registry.root
        shown = folder.resolve().relative_to(root) if root and folder.resolve().is_relative_to(root) else folder.name
        return await self.adapters.load(name, folder, f"path:{shown}", self.on_worker)

    async def delete_adapter(self, name: str) -> None:
        """Unload adapter `name` now; requests for it still queued get 404 (a later request for an adapter on disk
        loads it again; a Hub repo loaded on demand is unloaded by its id)."""
        if not self.registry.has(name):
            check_name(name)
        await self.adapters.unload(name, self.on_worker)

    # -- static batches (the worker thread) ------------------------------------------------------------------------
    def _run_batch(self, batch: Batch) -> list[Any]:
        results: list[Any] = [None] * len(batch.items)
        loaded = set(self.registry.names())
        run: list[int] = []
        for i, adapter in enumerate(batch.adapters):
            if adapter == BASE_ADAPTER or adapter in loaded:
                run.append(i)
            else:  # deleted while the request waited
                results[i] = ApiError(404, "adapter_not_found", f"Adapter {adapter!r} was unloaded")
        if not run:
            return results
        rows = [batch.rows[i] for i in run]
        adapters = [batch.adapters[i] for i in run]
        jobs = list(dict.fromkeys(job for job, _ in batch.items))
        if batch.kind == "generate":
            outputs: list[Any] = self.engine.generate(
                rows, adapters, batch.params, stop=lambda: self.batcher.checkpoint(jobs)
            )
        else:
            labels = batch.params
            outputs = []
            for scores in self.engine.classify(rows, adapters, labels):
                best = max(range(len(scores)), key=scores.__getitem__)
                outputs.append({"label": labels[best], "scores": dict(zip(labels, scores))})
        for i, out in zip(run, outputs):
            results[i] = out
        return results

    def _on_batch(self, batch: Batch, seconds: float) -> None:
        self.metrics.record_batch(
            len(batch.items), len({id(job) for job, _ in batch.items}), len(set(batch.adapters)), seconds
        )

    # -- request side (event loop) ---------------------------------------------------------------------------------
    def check_inputs(self, inputs: str | list[str], field: str = "inputs") -> list[str]:
        texts = [inputs] if isinstance(inputs, str) else list(inputs)
        cfg = self.config
        if not texts:
            raise ApiError(422, "invalid_request", f"{field} is empty: give a text or a non-empty list of texts")
        if len(texts) > cfg.max_inputs:
            raise ApiError(413, "too_many_inputs", f"{len(texts)} {field}; at most {cfg.max_inputs} per request")
        for i, text in enumerate(texts):
            where = f"{field}[{i}]" if not isinstance(inputs, str) else field
            if len(text) > cfg.max_input_chars:
                raise ApiError(
                    413, "input_too_long", f"{where} has {len(text)} characters; at most {cfg.max_input_chars}"
                )
            if not text.strip():
                raise ApiError(422, "invalid_request", f"{where} is empty")
            check_text(text, where)
        return texts

    def check_adapter(self, adapter: str, field: str = "adapter") -> None:
        """404 unless `adapter` is resident or loadable on demand."""
        if not self.adapters.servable(adapter):
            err = adapter_not_found(adapter[:100], self.registry.names()[-20:])
            err.param = field
            raise err

    def check_stop(self, stop: str | list[str] | None) -> tuple[str, ...]:
        if stop is None:
            return ()
        stops = [stop] if isinstance(stop, str) else list(stop)
        if len(stops) > self.config.max_stop:
            raise ApiError(422, "invalid_request", f"stop: at most {self.config.max_stop} sequences", param="stop")
        for i, s in enumerate(stops):
            if not s or len(s) > 200:
                raise ApiError(422, "invalid_request", f"stop[{i}]: 1 to 200 characters", param="stop")
            check_text(s, f"stop[{i}]")
        return tuple(stops)

    async def tokenize(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run `fn(*args)` on the tokenizer thread."""
        return await asyncio.get_running_loop().run_in_executor(self.tokenizer_pool, fn, *args)

    async def encode_prompts(self, prompts: list[str | list[int]], field: str) -> list[Prompt]:
        """Tokenise OpenAI-style prompts (texts as they are, or token ids) on the tokenizer thread."""
        engine = self.engine

        def work() -> list[Prompt]:
            where = (lambda i: f"{field}[{i}]") if len(prompts) > 1 else (lambda i: field)
            return [Prompt(*engine.encode_raw(x, where(i))) for i, x in enumerate(prompts)]

        return await self.tokenize(work)

    async def encode_chat(self, messages: list[dict[str, str]]) -> list[Prompt]:
        """Tokenise chat `messages` rendered with the tokenizer's chat template, on the tokenizer thread."""
        engine = self.engine

        def work() -> list[Prompt]:
            tok = engine.request_task.tokenizer
            try:
                text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            except Exception as err:
                raise ApiError(
                    422,
                    "invalid_request",
                    f"messages: the chat template refuses them ({str(err)[:200]})",
                    param="messages",
                ) from None
            ids = tok(text, add_special_tokens=False)["input_ids"]
            return [Prompt(*engine.encode_raw(ids, "messages"))]

        return await self.tokenize(work)

    async def token_pieces(self, ids: list[int], start: int | None = 0) -> tuple[list[str], list[int]]:
        """Each token's text and where it starts (characters from `start`) in the text of `ids`, as OpenAI's
        logprobs give them (on the tokenizer thread); `start` None: no offsets."""
        tok = self.engine.request_task.tokenizer

        def work() -> tuple[list[str], list[int]]:
            pieces = [tok.decode([t]) for t in ids]
            if start is None:
                return pieces, []
            offsets = [start + len(tok.decode(ids[:i], skip_special_tokens=True)) for i in range(len(ids))]
            return pieces, offsets

        return await self.tokenize(work)

    async def tokenize_text(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """`text`'s token ids (vLLM's `/tokenize`), on the tokenizer thread."""
        check_text(text, "prompt")
        tok = self.engine.request_task.tokenizer
        return await self.tokenize(lambda: tok(text, add_special_tokens=add_special_tokens)["input_ids"])

    async def detokenize(self, ids: list[int]) -> str:
        """The text of token ids (vLLM's `/detokenize`), on the tokenizer thread."""
        tok = self.engine.request_task.tokenizer
        bad = next((t for t in ids if not 0 <= t < len(tok)), None)
        if bad is not None:
            raise ApiError(400, "invalid_request_error", f"token id {bad} is not in the vocabulary", param="tokens")
        return await self.tokenize(lambda: tok.decode(ids))

    def vocab_size(self) -> int:
        """Token ids run from 0 to this (the model's logits; at least the tokenizer's vocabulary)."""
        return self.engine.vocab_size

    async def guide(self, spec: GuideSpec) -> Callable[[], Guide]:
        """A maker of per-row constraints for `spec`, compiled (or taken from the cache) off the event loop;
        400 naming the problem when it does not compile."""
        if self.engine.decoder is None:
            raise ApiError(400, "invalid_request_error", "structured output needs continuous batching")
        if self.grammars is None:
            engine, cfg = self.engine, self.config
            eos = sorted(engine.decoder.eos)
            self.grammars = await asyncio.to_thread(
                Grammars, engine.tokenizer, engine.vocab_size, eos, cfg.max_schema_chars
            )
        return await asyncio.to_thread(self.grammars.compile, spec)

    def tokenizer_info(self) -> dict:
        """The served tokenizer's special tokens, chat template and limits (vLLM's `/tokenizer_info`)."""
        tok = self.engine.tokenizer
        return {
            "tokenizer_class": type(tok).__name__,
            "eos_token": tok.eos_token,
            "bos_token": tok.bos_token,
            "pad_token": tok.pad_token,
            "unk_token": tok.unk_token,
            "chat_template": getattr(tok, "chat_template", None),
            "add_bos_token": getattr(tok, "add_bos_token", None),
            "vocab_size": len(tok),
            "model_max_length": self.engine.max_input_tokens,
        }

    def save_tokenizer(self, folder: str | Path) -> Path:
        """Write the served model's tokenizer as a folder (`save_pretrained`): what lm-eval's `tokenizer=` and
        transformers' `AutoTokenizer` read, also for a GGUF base, which has no folder."""
        path = Path(folder)
        path.mkdir(parents=True, exist_ok=True)
        self.engine.tokenizer.save_pretrained(path)
        return path

    async def encode_inputs(self, texts: list[str], field: str = "inputs", raw: bool = False) -> list[Prompt]:
        """Tokenise each input of one request (the recipe's prompt around it, unless `raw`)."""
        engine = self.engine

        def work() -> list[Prompt]:
            encode = engine.encode_raw if raw else engine.encode_one
            return [Prompt(*encode(t, f"{field}[{i}]" if len(texts) > 1 else field)) for i, t in enumerate(texts)]

        return await self.tokenize(work)

    def check_budget(self, request: GenerationRequest) -> None:
        """413 when the request's work (`ia3.serve.budget`) is over the request budget."""
        prompt = sum(len(p.ids) for p in request.prompts)
        cost = generation_cost(
            [len(p.ids) for p in request.prompts], request.max_new_tokens, request.n, request.num_beams
        )
        self._within_budget(
            cost,
            f"{len(request.prompts)} prompt(s) of {prompt} tokens in all, each with {request.n} choice(s) x "
            f"{request.num_beams} beam(s) x (its tokens + {request.max_new_tokens} new tokens)",
            "send fewer or shorter prompts, or ask for fewer tokens or choices",
        )
        longest = max(len(p.ids) for p in request.prompts)
        step = self.engine.budgets.step_tokens
        if request.num_beams > 1 and longest * request.num_beams > step:
            raise ApiError(
                413,
                "request_too_large",
                f"A beam search prefills every beam's copy of its prompt in one step that cannot be cut: "
                f"{longest} prompt tokens x {request.num_beams} beams = {longest * request.num_beams} tokens; this "
                f"server allows {step} in one step (about a second of its measured speed, or --max-batch-tokens "
                f"when larger): shorten the input or use fewer beams",
            )

    def _within_budget(self, cost: int, what: str, advice: str) -> None:
        budget = self.engine.budgets.request_tokens
        if cost > budget:
            raise ApiError(
                413,
                "request_too_large",
                f"This request asks for {what} = {cost} tokens of work; this server allows {budget} per request "
                f"(--max-request-tokens): {advice}",
            )

    async def _wait(self, job: Job, future: concurrent.futures.Future, watch: Watch) -> Any:
        """The job's result, or ApiError 504 at the deadline, or ClientGone; the job is cancelled either way."""
        waiter = asyncio.ensure_future(asyncio.wrap_future(future))
        gone = asyncio.ensure_future(watch.disconnected()) if watch.disconnected is not None else None
        try:
            timeout = max(0.0, min(watch.deadline - time.monotonic(), self.config.request_timeout_s))
            done, _ = await asyncio.wait(
                {waiter} | ({gone} if gone else set()), timeout=timeout, return_when="FIRST_COMPLETED"
            )
            if waiter in done:
                return waiter.result()
            self.batcher.cancel(job)
            if gone is not None and gone in done:
                raise ClientGone()
            raise ApiError(504, "timeout", f"No answer within {self.config.request_timeout_s:g} s")
        except asyncio.CancelledError:
            self.batcher.cancel(job)
            raise
        finally:
            if gone is not None:
                gone.cancel()
            if not waiter.done():
                waiter.cancel()

    async def submit(
        self, kind: str, key: Any, rows: list[Any], adapter: str, params: Any, watch: Watch, row_cost: int
    ) -> list:
        """A static job (classification, or generation when not decoding continuously): per-row results. Its rows
        run in batches of at most the batch budget (`row_cost`: the work of its costliest row)."""
        if not self.config.mix_adapters:
            key = (key, adapter)
        job = Job(kind, key, rows, adapter, params)
        job.cost = row_cost
        future = self.batcher.submit(job)
        return await self._wait(job, future, watch)

    def _rows(self, request: GenerationRequest, client: str, on_text=None, on_done=None) -> list[Row]:
        rows = []
        rid = next(_requests)
        ranked = request.best_of > request.n  # ranking needs each token's logprob
        for p, prompt in enumerate(request.prompts):
            for j in range(request.width):
                k = p * request.width + j
                row = Row(prompt.ids, request.adapter, request.max_new_tokens, request.sampling, request.stop, index=k)
                row.client, row.request = client, rid
                row.logprobs = 0 if ranked and request.logprobs is None else request.logprobs
                row.echo = request.echo
                row.guide = request.guide() if request.guide is not None else None
                if on_text is not None:
                    row.on_text = lambda r, piece, k=k: on_text(k, piece, r)
                if on_done is not None:
                    row.on_done = lambda r, k=k: on_done(k, r)
                rows.append(row)
        return rows

    @staticmethod
    def _completions(request: GenerationRequest, rows: list[Row]) -> list[Completion]:
        """The answers of finished rows, prompt-major; with `best_of`, each prompt's n of highest cumulative
        logprob (best first)."""
        out = []
        width = request.width
        for r in rows:
            logprobs = r.token_logprobs if request.logprobs is not None else []
            c = Completion(r.index // width, r.index % width, r.text, len(r.tokens), r.finish_reason or "stop")
            c.token_logprobs, c.prompt_logprobs, c.stop_reason = logprobs, r.prompt_logprobs, r.stop_reason
            out.append((sum(e.logprob or 0.0 for e in r.token_logprobs), c))
        if request.best_of <= request.n:
            return [c for _, c in out]
        best = []
        for p in range(len(request.prompts)):
            mine = sorted((pair for pair in out if pair[1].prompt == p), key=lambda pair: -pair[0])[: request.n]
            for j, (_, c) in enumerate(mine):
                c.index = j
                best.append(c)
        return best

    def _static_params(self, request: GenerationRequest) -> tuple[GenerateParams, Any]:
        s = request.sampling
        if s.greedy:
            params = GenerateParams(request.max_new_tokens, request.num_beams)
        else:
            params = GenerateParams(
                request.max_new_tokens, request.num_beams, True, s.temperature, s.top_p, request.top_k_static, s.seed
            )
        key = ("generate", params, next(_seeded) if params.seed is not None else None)
        return params, key

    @staticmethod
    def _cut(text: str, stops: tuple[str, ...]) -> tuple[str, bool]:
        at = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
        return (text[:at], True) if at >= 0 else (text, False)

    def check_plain(self, request: GenerationRequest) -> None:
        """400 when `request` needs the continuous decoder's per-row features and this server has none."""
        if not request.plain and (self.engine.decoder is None or request.num_beams != 1):
            reason = self.engine.static_reason or "beam search"
            raise ApiError(
                400,
                "invalid_request_error",
                f"logprobs, echo, best_of, penalties, logit_bias, min_tokens, ignore_eos, min_p and structured "
                f"output need continuous batching; this server generates in static batches ({reason})",
            )

    def _row_error(self, row: Row) -> ApiError:
        err = row.error
        if isinstance(err, ApiError):
            return err
        if isinstance(err, RowError):
            return ApiError(422, "invalid_request", f"Generation failed for this request: {err}")
        log.error("generation failed: %s: %s", type(err).__name__, err)
        return ApiError(500, "internal_error", "Generation failed on the server; the server goes on")

    async def generate(self, request: GenerationRequest, watch: Watch) -> list[Completion]:
        """Every completion of `request`, in prompt-major order (its adapter loaded on demand and held meanwhile)."""
        self.check_budget(request)
        await self.adapters.acquire(request.adapter, request.rows, self.on_worker)
        try:
            return await self._generate(request, watch)
        finally:
            self.adapters.release(request.adapter, request.rows, self.on_worker)

    async def _generate(self, request: GenerationRequest, watch: Watch) -> list[Completion]:
        if self.engine.decoder is not None and request.num_beams == 1:
            return await self._decode(request, watch)
        self.check_plain(request)
        params, key = self._static_params(request)
        ids = [p.ids for p in request.prompts for _ in range(request.n)]
        row_cost = generation_cost([max(map(len, ids))], params.max_new_tokens, beams=params.num_beams)
        results: list[Generated] = await self.submit("generate", key, ids, request.adapter, params, watch, row_cost)
        out = []
        for k, g in enumerate(results):
            text, stopped = self._cut(g.text, request.stop)
            reason = "stop" if stopped else g.finish_reason
            out.append(Completion(k // request.n, k % request.n, text, len(g.tokens), reason))
        self.metrics.record_tokens(
            request.adapter, sum(len(p.ids) for p in request.prompts), sum(c.tokens for c in out)
        )
        return out

    async def _decode(self, request: GenerationRequest, watch: Watch) -> list[Completion]:
        rows = self._rows(request, watch.client)
        job = Job("decode", None, rows, request.adapter)
        future = self.batcher.submit_rows(job, rows)
        try:
            done = await self._wait(job, future, watch)
        finally:  # answered or cut off (deadline, client gone, shutdown): the tokens generated count
            self._record_tokens(request, rows)
        for row in done:
            if row.error is not None:
                raise self._row_error(row)
        return self._completions(request, done)

    async def stream(self, request: GenerationRequest, watch: Watch) -> AsyncIterator[StreamEvent]:
        """The completions of `request` as they are generated: text pieces, then one end event per choice."""
        self.check_budget(request)
        await self.adapters.acquire(request.adapter, request.rows, self.on_worker)
        try:
            async for event in self._stream(request, watch):
                yield event
        finally:
            self.adapters.release(request.adapter, request.rows, self.on_worker)

    async def _stream(self, request: GenerationRequest, watch: Watch) -> AsyncIterator[StreamEvent]:
        if self.engine.decoder is None or request.num_beams != 1:  # static: each answer arrives whole
            self.check_plain(request)
            for c in await self._generate(request, watch):
                k = c.prompt * request.n + c.index
                if c.text:
                    yield StreamEvent(k, c.text)
                yield StreamEvent(k, finish_reason=c.finish_reason, tokens=c.tokens)
            return
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[StreamEvent] = asyncio.Queue()

        def put(event: StreamEvent) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, event)

        sent: dict[int, int] = {}  # choice -> its token logprobs already streamed

        def fresh(k: int, row: Row) -> list[TokenLogprob]:
            new = row.token_logprobs[sent.get(k, 0) :]
            sent[k] = len(row.token_logprobs)
            return list(new)

        def text(k: int, piece: str, row: Row) -> None:
            put(StreamEvent(k, piece, logprobs=fresh(k, row)))

        def done(k: int, row: Row) -> None:
            if row.error is not None:
                put(StreamEvent(k, error=self._row_error(row)))
            else:
                reason = row.finish_reason or "cancelled"
                put(StreamEvent(k, "", reason, len(row.tokens), logprobs=fresh(k, row), stop_reason=row.stop_reason))

        rows = self._rows(request, watch.client, on_text=text, on_done=done)
        job = Job("decode", None, rows, request.adapter)
        self.batcher.submit_rows(job, rows)
        remaining = len(rows)
        deadline = min(watch.deadline, time.monotonic() + self.config.request_timeout_s)
        try:
            while remaining:
                try:
                    event = await asyncio.wait_for(queue.get(), max(0.001, deadline - time.monotonic()))
                except TimeoutError:
                    raise ApiError(504, "timeout", f"No answer within {self.config.request_timeout_s:g} s") from None
                if event.error is not None:
                    raise event.error
                if event.finish_reason is not None:
                    remaining -= 1
                yield event
        finally:
            if remaining:
                self.batcher.cancel(job)
            self._record_tokens(request, rows)

    def _record_tokens(self, request: GenerationRequest, rows: list[Row]) -> None:
        """Count the tokens `rows` generated (all of them, also when the request was cut off)."""
        prompt_tokens = sum(len(p.ids) for p in request.prompts)
        self.metrics.record_tokens(request.adapter, prompt_tokens, sum(len(r.tokens) for r in rows))

    async def classify(self, texts: list[str], adapter: str, labels: tuple[str, ...], watch: Watch) -> list[dict]:
        prompts = await self.encode_inputs(texts)
        choices: list[list[int]] = []
        if self.engine.task.generates:  # unencodable or too long labels: 422, this request only
            choices = await self.tokenize(self.engine.choices, labels)
        ids = [p.ids for p in prompts]
        lengths = [len(c) for c in choices]
        self._within_budget(
            classify_cost([len(i) for i in ids], lengths),
            f"{len(ids)} input(s) of {sum(map(len, ids))} tokens in all"
            + (f", each followed by {len(labels)} labels of {sum(lengths)} tokens in all" if choices else ""),
            "send fewer or shorter inputs, or fewer labels",
        )
        await self.adapters.acquire(adapter, len(ids), self.on_worker)
        try:
            row_cost = classify_cost([max(map(len, ids))], lengths)
            return await self.submit("classify", ("classify", labels), ids, adapter, labels, watch, row_cost)
        finally:
            self.adapters.release(adapter, len(ids), self.on_worker)

    async def on_worker(self, fn) -> Any:
        future = self.batcher.call(fn)
        try:
            return await asyncio.wait_for(
                asyncio.shield(asyncio.wrap_future(future)), max(self.config.request_timeout_s, 60.0)
            )
        except TimeoutError:
            raise ApiError(504, "timeout", "The worker did not get to this in time; it will still run") from None


__all__ = ["ClientGone", "Completion", "GenerationRequest", "Prompt", "Service", "ShuttingDown", "StreamEvent", "Watch"]
