"""Peak host memory of (IA)^3 training on an mt0-large-sized base model (1.23 B parameters, 4.92 GB in fp32).

1. A subprocess builds the mt0-large architecture with random weights and saves it once (safetensors) to a temp
   folder (or `--model-dir`, reused when it already holds a model).
2. A fresh subprocess loads it with `AutoModelForSeq2SeqLM.from_pretrained(dir)` (transformers' low-memory path:
   meta-device init, then the safetensors tensors are mapped in), wraps it with `ia3.get_peft_model`, and runs two
   AdamW steps on the vectors (batch 2, 32 input tokens, 8 label tokens). It reports, after each phase, the
   resident set (`VmRSS`, split into anonymous and file-backed pages) and the peak (`VmHWM`, reset between phases
   through /proc/self/clear_refs when the kernel allows it), and at the end `ru_maxrss` for the whole process.

A second full copy of the weights would show as a phase peak of about twice the weights' size. Writes JSON to
`bench/results/large_model_memory.json`. Needs ~12 GB free RAM and ~5 GB of disk; a few minutes on 2 CPU cores.

Usage: python bench/large_model_memory.py [--model-dir DIR] [--out bench/results/large_model_memory.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GB = 1e9


def mt0_large_config(**sizes):
    """mt0-large's config; `sizes` overrides its dimensions (e.g. a tiny model of the same shape for smoke runs)."""
    from transformers import MT5Config

    dims = dict(vocab_size=250112, d_model=1024, d_kv=64, d_ff=2816, num_layers=24, num_decoder_layers=24, num_heads=16)
    dims.update(sizes)
    cfg = MT5Config(**dims, feed_forward_proj="gated-gelu", decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    # MT5Config forces tie_word_embeddings=True on construction; mt0-large's lm_head is untied (its encoder/decoder
    # embed_tokens share `shared`). transformers keeps the saved lm_head untied on load since the values differ.
    cfg.tie_word_embeddings = False
    return cfg


# -- step 1: build and save ------------------------------------------------------------------------------------------
def build(model_dir: Path) -> dict:
    import torch
    from transformers import MT5ForConditionalGeneration

    torch.manual_seed(0)
    start = time.perf_counter()
    model = MT5ForConditionalGeneration(mt0_large_config())
    # with tie_word_embeddings=False transformers ties nothing; mt0-large shares `shared` with both stacks
    model.encoder.embed_tokens = model.shared
    model.decoder.embed_tokens = model.shared
    assert model.encoder.embed_tokens.weight is model.shared.weight
    assert model.decoder.embed_tokens.weight is model.shared.weight
    assert model.lm_head.weight is not model.shared.weight
    params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(model_dir, safe_serialization=True)
    files = sorted(model_dir.glob("*.safetensors"))
    return {
        "parameters": params,
        "weights_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
        "safetensors_files": [f.name for f in files],
        "safetensors_bytes": sum(f.stat().st_size for f in files),
        "build_seconds": round(time.perf_counter() - start, 1),
    }


# -- step 2: load, wrap, train ----------------------------------------------------------------------------------------
def _status() -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon, RssFile of this process in bytes."""
    out = {}
    with open("/proc/self/status") as handle:
        for line in handle:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
                out[key] = int(value.split()[0]) * 1024
    return out


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def measure(model_dir: Path, steps: int) -> dict:
    import resource

    phases: dict[str, dict] = {}
    resettable = _reset_peak()

    def phase(name: str, start: float) -> None:
        s = _status()
        phases[name] = {
            "seconds": round(time.perf_counter() - start, 1),
            "peak_gb": round(s["VmHWM"] / GB, 3),
            "rss_gb": round(s["VmRSS"] / GB, 3),
            "rss_anon_gb": round(s["RssAnon"] / GB, 3),
            "rss_file_gb": round(s["RssFile"] / GB, 3),
        }
        _reset_peak()

    t = time.perf_counter()
    import torch
    from transformers import AutoModelForSeq2SeqLM

    import ia3

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    phase("imports", t)

    t = time.perf_counter()
    model = AutoModelForSeq2SeqLM.from_pretrained(model_dir)
    phase("from_pretrained", t)
    weights_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    tied = model.encoder.embed_tokens.weight is model.shared.weight and model.lm_head.weight is not model.shared.weight

    t = time.perf_counter()
    peft_model = ia3.get_peft_model(model, ia3.IA3Config(task_type="SEQ_2_SEQ_LM"))
    trainable, total = peft_model.get_nb_trainable_parameters()
    phase("get_peft_model", t)

    t = time.perf_counter()
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    g = torch.Generator().manual_seed(0)
    batch = {
        "input_ids": torch.randint(2, 250112, (2, 32), generator=g),
        "attention_mask": torch.ones(2, 32, dtype=torch.long),
        "labels": torch.randint(2, 250112, (2, 8), generator=g),
    }
    peft_model.train()
    losses = []
    for _ in range(steps):
        loss = peft_model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss))
    phase("train_steps", t)
    base_grads = [n for n, p in peft_model.named_parameters() if not p.requires_grad and p.grad is not None]

    usage = resource.getrusage(resource.RUSAGE_SELF)
    peak_phase = max(phases.values(), key=lambda p: p["peak_gb"])
    return {
        "weights_bytes": weights_bytes,
        "weights_gb": round(weights_bytes / GB, 3),
        "parameters": total,
        "trainable_parameters": trainable,
        "embeddings_tied_lm_head_untied": tied,
        "ru_maxrss_gb": round(usage.ru_maxrss * 1024 / GB, 3),  # Linux reports KiB
        "vmhwm_peak_gb": max(p["peak_gb"] for p in phases.values()),  # VmHWM, the highest of the phases'
        "peak_over_weights": round(max(usage.ru_maxrss * 1024, peak_phase["peak_gb"] * GB) / weights_bytes, 3),
        "second_copy_of_weights": max(usage.ru_maxrss * 1024, peak_phase["peak_gb"] * GB) > 1.5 * weights_bytes,
        "peak_phase": next(k for k, v in phases.items() if v is peak_phase),
        "phases": phases,
        "peak_reset_per_phase": resettable,
        "losses": losses,
        "frozen_params_with_grad": len(base_grads),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--model-dir", type=Path, default=None, help="where to save the random model (default: a temp dir)"
    )
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "large_model_memory.json")
    parser.add_argument("--_phase", choices=["build", "measure"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._phase:  # child process
        result = build(args.model_dir) if args._phase == "build" else measure(args.model_dir, args.steps)
        print("RESULT " + json.dumps(result))
        return

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}

    def child(phase: str, model_dir: Path) -> dict:
        done = subprocess.run(
            [sys.executable, __file__, "--_phase", phase, "--model-dir", str(model_dir), "--steps", str(args.steps)],
            capture_output=True,
            text=True,
            env=env,
        )
        if done.returncode:
            sys.exit(f"{phase} failed ({done.returncode}):\n{done.stderr[-4000:]}")
        line = next(line for line in reversed(done.stdout.splitlines()) if line.startswith("RESULT "))
        return json.loads(line[len("RESULT ") :])

    with tempfile.TemporaryDirectory(prefix="mt0-large-random-") as tmp:
        model_dir = args.model_dir or Path(tmp)
        built = None
        if not any(model_dir.glob("*.safetensors")):
            print(f"building the mt0-large architecture with random weights in {model_dir} ...", file=sys.stderr)
            built = child("build", model_dir)
        print("loading it in a fresh process, wrapping and training ...", file=sys.stderr)
        measured = child("measure", model_dir)
    import torch
    import transformers

    report = {
        "model": "mt0-large architecture (MT5, random weights, fp32)",
        "build": built,
        **measured,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "machine_ram_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GB, 1),
        "cpus": os.cpu_count(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
