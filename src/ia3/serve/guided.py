"""Structured output: a row's tokens constrained to a JSON schema, any JSON object, one of some strings, a regular
expression or an EBNF grammar, with xgrammar (an optional extra: `pip install 'ia3[structured]'`).

A request's constraint is compiled once per distinct spec (an LRU cache of compiled grammars) on a worker thread of
the event loop, so a bad schema fails its own request (400 naming the problem) before anything is queued; so does a
constraint that no token of the model's vocabulary can start (a word-level vocabulary without `{` cannot write
JSON). Each row then gets its own matcher (`XGrammarGuide`). Before each pick the decoder masks, in one call for all
of a step's constrained rows (`XGrammarGuide.mask_rows`), the tokens each row's grammar forbids at that point: every
matcher fills its row of one token bitmask, and the bitmask is applied to those rows' logits at once, as a bias of 0
(allowed) or -inf (forbidden) added in place, so the allowed logits keep their exact values. After the pick the
matcher takes the token. The grammar allows the model's end tokens once the output is complete, so a constrained
row ends with "stop".
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
MASK_ROWS = 4  # rows masked at a time: their bias (4 x V floats) stays in the core's cache
_TO_SIGN = 31 - torch.arange(32, dtype=torch.int32)  # bit k of a bitmask word (token 32 * word + k) to bit 31
_NEG_INF_BITS = int(torch.tensor(float("-inf")).view(torch.int32))  # -inf's float32 bits, as an int32


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
        self.vocab_size = vocab_size

    @classmethod
    def mask_rows(cls, logits: torch.Tensor, rows: list[int], guides: list[XGrammarGuide]) -> list[int]:
        """Each guide's forbidden tokens at -inf in its row of `logits` (B, V), in place: one token bitmask (a row
        per guide, filled by its matcher), turned into a bias of 0 (allowed) or -inf and added to those rows, a
        few rows at a time (`MASK_ROWS`) in a buffer kept per thread (a fresh one each step costs page faults).
        Returns the rows whose grammar allows no token here.

        xgrammar's `apply_token_bitmask_inplace` writes the same values, but its CPU kernel takes ~3x as long on a
        49k vocabulary (bench/profile_guided.py)."""
        width = guides[0].vocab_size
        vocab = min(width, logits.shape[-1])
        bitmask = torch.empty(len(guides), (width + 31) // 32, dtype=torch.int32)
        for k, guide in enumerate(guides):
            guide.matcher.fill_next_token_bitmask(bitmask, k)
        index = torch.tensor(rows)
        with torch.inference_mode():  # logits made under inference mode may be written in place only there
            buffer = _bias_buffer(bitmask.shape[1])
            for start in range(0, len(rows), MASK_ROWS):
                words = ~bitmask[start : start + MASK_ROWS]  # 1 where forbidden
                bias = buffer[: len(words)]
                # bit k of each word to the sign bit, then spread over the word: -1 (forbidden) or 0, then -inf or 0
                torch.bitwise_left_shift(words.unsqueeze(-1), _TO_SIGN, out=bias)
                bias.bitwise_right_shift_(31).bitwise_and_(_NEG_INF_BITS)
                bias = bias.view(len(words), -1)[:, :vocab].view(torch.float32)
                logits[:, :vocab].index_add_(0, index[start : start + MASK_ROWS], bias)
        return [rows[k] for k in (~bitmask.any(-1)).nonzero().flatten().tolist()]

    def accept(self, token: int) -> bool:
        return bool(self.matcher.accept_token(token))


_buffers = threading.local()


def _bias_buffer(words: int) -> torch.Tensor:
    """This thread's (MASK_ROWS, words, 32) int32 buffer for the mask's bias."""
    buffer = getattr(_buffers, "bias", None)
    if buffer is None or buffer.shape[1] != words:
        buffer = _buffers.bias = torch.empty(MASK_ROWS, words, 32, dtype=torch.int32)
    return buffer


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
            self._check_startable(compiled, spec)
            with self.lock:
                self.cache[key] = compiled
                while len(self.cache) > self.cache_size:
                    self.cache.popitem(last=False)
        vocab = self.vocab_size
        return lambda: XGrammarGuide(compiled, vocab)

    def _check_startable(self, compiled: Any, spec: GuideSpec) -> None:
        """ApiError 400 when no token of the vocabulary can start an output the grammar allows (its rows would fail
        at their first token)."""
        bitmask = torch.zeros(1, (self.vocab_size + 31) // 32, dtype=torch.int32)
        XGrammarGuide(compiled, self.vocab_size).matcher.fill_next_token_bitmask(bitmask)
        if not bitmask.any():
            raise ApiError(
                400,
                "invalid_request_error",
                f"{spec.param}: no token of this model's vocabulary can start an output it allows: the vocabulary "
                "cannot spell it (a word-level vocabulary, for one, may have no token for the '{' and '\"' that "
                "JSON needs)",
                param=spec.param,
            )

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
