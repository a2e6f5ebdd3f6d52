"""Structured output: a row's tokens constrained to a JSON schema, any JSON object, one of some strings, a regular
expression or an EBNF grammar, with xgrammar (an optional extra: `pip install 'ia3[structured]'`).

A request's constraint is compiled once per distinct spec (an LRU cache of compiled grammars) on a worker thread of
the event loop, so a bad schema fails its own request (400 naming the problem) before anything is queued. Each row
then gets its own matcher (`XGrammarGuide`): before each pick the decoder masks the tokens the grammar forbids at
that point (a token bitmask applied to that row's logits only), and after it the matcher takes the token. The
grammar allows the model's end tokens once the output is complete, so a constrained row ends with "stop".
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ia3.serve.decoding import Guide
from ia3.serve.errors import ApiError

KINDS = ("json_object", "json_schema", "choice", "regex", "grammar")


@dataclass(frozen=True)
class GuideSpec:
    """What a request constrains its output to: `kind` (one of `KINDS`) and its text (a schema as JSON, the
    choices as a JSON list, a regex, an EBNF grammar; empty for `json_object`). `param` names the request field."""

    kind: str
    text: str = ""
    param: str = "response_format"


class XGrammarGuide(Guide):
    """One row's matcher over a compiled grammar."""

    def __init__(self, compiled: Any, vocab_size: int) -> None:
        import xgrammar as xgr

        self.matcher = xgr.GrammarMatcher(compiled)
        self.bitmask = xgr.allocate_token_bitmask(1, vocab_size)
        self.vocab_size = vocab_size
        self.apply = xgr.apply_token_bitmask_inplace

    def mask(self, scores: torch.Tensor) -> torch.Tensor:
        self.matcher.fill_next_token_bitmask(self.bitmask)
        scores = scores.contiguous()
        self.apply(scores.view(1, -1), self.bitmask, vocab_size=min(self.vocab_size, scores.numel()))
        return scores

    def accept(self, token: int) -> bool:
        if self.matcher.is_terminated():
            return True
        return bool(self.matcher.accept_token(token))


class Grammars:
    """Compiles `GuideSpec`s for one tokenizer, caching the last `cache_size` compiled grammars."""

    def __init__(
        self, tokenizer: Any, vocab_size: int, stop_ids: list[int], max_chars: int, cache_size: int = 64
    ) -> None:
        try:
            import xgrammar as xgr
        except ImportError:
            raise ApiError(
                400,
                "invalid_request_error",
                "structured output needs xgrammar on the server: pip install 'ia3[structured]'",
            ) from None
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=stop_ids)
        self.compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
        self.vocab_size = vocab_size
        self.max_chars = max_chars
        self.cache_size = cache_size
        self.cache: OrderedDict[tuple[str, str], Any] = OrderedDict()
        self.lock = threading.Lock()

    def compile(self, spec: GuideSpec) -> Callable[[], Guide]:
        """A maker of fresh per-row guides for `spec`; ApiError 400 naming the problem when it does not compile."""
        if len(spec.text) > self.max_chars:
            raise ApiError(
                400,
                "invalid_request_error",
                f"{spec.param}: {len(spec.text)} characters; this server compiles at most {self.max_chars} "
                f"(--max-schema-chars)",
                param=spec.param,
            )
        key = (spec.kind, spec.text)
        with self.lock:
            compiled = self.cache.get(key)
            if compiled is not None:
                self.cache.move_to_end(key)
        if compiled is None:
            try:
                compiled = self._compile(spec)
            except ApiError:
                raise
            except Exception as err:  # xgrammar's message names the problem
                message = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
                raise ApiError(
                    400, "invalid_request_error", f"{spec.param}: cannot be compiled: {message}", param=spec.param
                ) from None
            with self.lock:
                self.cache[key] = compiled
                while len(self.cache) > self.cache_size:
                    self.cache.popitem(last=False)
        vocab = self.vocab_size
        return lambda: XGrammarGuide(compiled, vocab)

    def _compile(self, spec: GuideSpec) -> Any:
        c = self.compiler
        if spec.kind == "json_object":
            return c.compile_builtin_json_grammar()
        if spec.kind == "json_schema":
            return c.compile_json_schema(spec.text, any_whitespace=False)
        if spec.kind == "regex":
            return c.compile_regex(spec.text)
        if spec.kind == "grammar":
            return c.compile_grammar(spec.text)
        if spec.kind == "choice":
            choices = json.loads(spec.text)
            if not choices or not all(isinstance(x, str) and x for x in choices):
                raise ApiError(
                    400,
                    "invalid_request_error",
                    f"{spec.param}: a non-empty list of non-empty strings",
                    param=spec.param,
                )
            alternatives = " | ".join(_ebnf_string(x) for x in choices)
            return c.compile_grammar(f"root ::= {alternatives}")
        raise ApiError(400, "invalid_request_error", f"{spec.param}: unknown kind {spec.kind!r}", param=spec.param)


def _ebnf_string(text: str) -> str:
    """`text` as an EBNF string literal."""
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\r", "\\r")
    return '"' + escaped.replace("\t", "\\t") + '"'
