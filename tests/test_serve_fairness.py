"""Issue 19, "no request can stall the others": fair admission to the decode batch (round-robin over clients, a row
cap per request), per-client connection caps, a bounded log under file-descriptor exhaustion, and smaller faults
(shutdown answers, tiny temperatures, token counters of cut-off requests, adapter symlinks, error paths)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from ia3.families import DecodeState
from ia3.serve.decoding import Decoder, Row, Sampling


# -- fair admission ----------------------------------------------------------------------------------------------
def _decoder(max_rows: int, per_request: int, prefill: int = 4096) -> Decoder:
    tokenizer = SimpleNamespace(pad_token_id=0, eos_token_id=1)
    return Decoder(
        torch.nn.Module(), tokenizer, torch.device("cpu"), None, DecodeState, max_rows, prefill, None, None, per_request
    )


def _rows(client: str, request: int, count: int, prompt: int = 3) -> list[Row]:
    return [Row([5] * prompt, "a", 4, client=client, request=request, index=i) for i in range(count)]


def test_admission_is_round_robin_over_clients_with_a_row_cap_per_request():
    decoder = _decoder(max_rows=8, per_request=4)
    big = _rows("attacker", 1, 32)  # one request filling the batch four times over
    decoder.add(big)
    decoder.add(_rows("attacker", 2, 2))
    decoder.add(_rows("alice", 3, 1))
    decoder.add(_rows("bob", 4, 2))
    first = decoder._admit()
    who = [(r.client, r.request) for r in first]
    assert who[:3] == [("attacker", 1), ("alice", 3), ("bob", 4)]  # one row per client per turn
    assert who.count(("alice", 3)) == 1 and who.count(("bob", 4)) == 2
    assert who.count(("attacker", 1)) <= 4 and len(first) == 8  # the cap holds; the free rows are used
    decoder.running = list(first)
    assert decoder._admit() == []  # full
    decoder.running = [r for r in first if r.client != "bob"]  # bob's rows finish: two free rows
    again = decoder._admit()  # request 1 has its 4 rows running: only request 2's last row may join
    assert [(r.client, r.request) for r in again] == [("attacker", 2)]


def test_admission_keeps_the_prefill_budget():
    decoder = _decoder(max_rows=8, per_request=8, prefill=10)
    decoder.add(_rows("x", 1, 4, prompt=4))
    assert len(decoder._admit()) == 2  # 4 + 4 tokens; a third would pass 10
    decoder = _decoder(max_rows=8, per_request=8, prefill=10)
    decoder.add(_rows("x", 1, 2, prompt=30))
    assert len(decoder._admit()) == 1  # a longer prompt joins alone


def test_tiny_temperatures_are_greedy():
    assert Sampling(1e-50).greedy and Sampling(0.0).greedy and Sampling(9e-5).greedy
    assert not Sampling(1e-3).greedy
