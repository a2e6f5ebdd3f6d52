"""`ia3`: the command line, a thin table from command to library function.

    ia3 train [--config FILE] [--resume [CHECKPOINT]] [--train.lr 3e-3 ...]   (no config: the bundled demo)
    ia3 eval ADAPTER_DIR [--split val|all] [--output FILE]
    ia3 predict ADAPTER_DIR [TEXT ...] [--file FILE] [--mode rank|generate]   (no text, no file: stdin)
    ia3 merge ADAPTER_DIR --output DIR
    ia3 inspect ADAPTER_DIR
    ia3 push ADAPTER_DIR REPO_ID [--private]
    ia3 serve --model MODEL --adapters DIR [--task seq2seq|causal|cls] [--port 8000] ...   (needs ia3[serve])
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

# Short flags for the settings people change most; every setting also has its dotted flag (--train.lr).
ALIASES = {
    "--model": "model.name", "--task": "model.task", "--dataset": "data.dataset", "--subset": "data.subset",
    "--text-column": "data.text_column", "--label-column": "data.label_column", "--label-names": "data.label_names",
    "--epochs": "train.epochs", "--lr": "train.lr", "--batch-size": "train.batch_size", "--seed": "train.seed",
    "--loss": "train.loss", "--output-dir": "output_dir",
}
DEMO_CONFIG = Path(__file__).resolve().parent / "demo" / "demo.yaml"


def _add_settings(parser: argparse.ArgumentParser) -> None:
    from ia3.recipe.config import all_keys

    group = parser.add_argument_group("settings (defaults < --config file < these flags)")
    for key, default in all_keys():
        flags = [f"--{key}"] + [alias for alias, target in ALIASES.items() if target == key and alias != f"--{key}"]
        group.add_argument(*flags, dest=f"set:{key}", default=None, metavar="V", help=f"(default: {default})")


def _overrides(args: argparse.Namespace) -> dict:
    return {k[4:]: v for k, v in vars(args).items() if k.startswith("set:") and v is not None}


def cmd_train(args: argparse.Namespace) -> int:
    from ia3.recipe.config import build_config
    from ia3.recipe.train import train

    config = args.config
    if config is None and not any(k.startswith(("model.", "data.")) for k in _overrides(args)):
        config = DEMO_CONFIG
        print(f"no --config given: running the bundled demo ({DEMO_CONFIG.name})", file=sys.stderr)
    cfg = build_config(config, _overrides(args))
    resume = True if args.resume == "latest" else args.resume or False
    metrics = train(cfg, resume=resume, progress=not args.quiet)
    if metrics:
        summary = {k: metrics[k] for k in ("accuracy", "macro_f1", "generation_accuracy", "eval_loss", "seconds_per_epoch")
                   if metrics.get(k) is not None}
        print(json.dumps({"output_dir": cfg.output_dir, **summary}))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from ia3.recipe.inference import evaluate_run

    metrics, predictions, _ = evaluate_run(args.adapter, _overrides(args), split=args.split, progress=not args.quiet)
    if args.output:
        from ia3.serialization import atomic_write_text

        atomic_write_text(args.output, "".join(json.dumps(p) + "\n" for p in predictions))
    print(json.dumps(metrics, indent=2))
    return 0


def _read_inputs(args: argparse.Namespace) -> list[str]:
    if args.texts and args.file:
        raise ValueError("Give texts as arguments or --file, not both")
    if args.texts:
        return list(args.texts)
    source = open(args.file, encoding="utf-8") if args.file else sys.stdin  # noqa: SIM115
    try:
        lines = [line.rstrip("\n") for line in source]
    except UnicodeDecodeError as err:
        raise ValueError(f"{args.file or 'stdin'} is not UTF-8 text: {err}") from None
    finally:
        if args.file:
            source.close()
    texts = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if line.lstrip().startswith("{"):
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{args.file or 'stdin'}, line {number}: invalid JSON ({err.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise ValueError(f"{args.file or 'stdin'}, line {number}: a JSON line needs a string field 'text'")
            texts.append(record["text"])
        else:
            texts.append(line)
    if not texts:
        raise ValueError("No input texts: pass them as arguments, with --file, or on stdin (one per line)")
    return texts


def cmd_predict(args: argparse.Namespace) -> int:
    from ia3.recipe.inference import predict

    for row in predict(args.adapter, _read_inputs(args), mode=args.mode, overrides=_overrides(args)):
        print(json.dumps(row, ensure_ascii=False))
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from ia3.recipe.adapters import merge_to_full_model

    print(merge_to_full_model(args.adapter, args.output))
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from ia3.recipe.adapters import inspect_adapter

    print(json.dumps(inspect_adapter(args.adapter), indent=2))
    return 0


def cmd_push(args: argparse.Namespace) -> int:
    from ia3.recipe.adapters import push_adapter

    info = push_adapter(args.adapter, args.repo_id, private=args.private or None)
    print(getattr(info, "commit_url", info))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        from ia3.serve import ServeConfig
        from ia3.serve.app import run
    except ImportError as err:
        raise ValueError(f"ia3 serve needs fastapi and uvicorn ({err}): pip install 'ia3[serve]'") from None

    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be at least 1; got {args.threads}")
        import torch

        torch.set_num_threads(args.threads)
    labels = [n.strip() for n in args.label_names.split(",") if n.strip()] if args.label_names else None
    config = ServeConfig(
        model=args.model, adapters_dir=args.adapters, task=args.task, label_names=labels, device=args.device,
        max_batch_size=args.max_batch_size, max_wait_ms=args.max_wait_ms, max_queue=args.max_queue,
        max_inputs=args.max_inputs, max_input_chars=args.max_input_chars, max_input_tokens=args.max_input_tokens,
        max_new_tokens=args.max_new_tokens, max_body_bytes=args.max_body_bytes,
        request_timeout_s=args.request_timeout_s, api_key=args.api_key or os.environ.get("IA3_API_KEY") or None,
        allow_hub=not args.no_hub,
    )
    run(config, host=args.host, port=args.port, log_level=args.log_level)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ia3", description="(IA)^3 fine-tuning: train, evaluate, predict, merge, share")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars or per-epoch lines")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train an adapter (no --config: the bundled offline demo)")
    p.add_argument("--config", type=Path, help="YAML file with output_dir and model/data/train sections")
    p.add_argument("--resume", nargs="?", const="latest", default=None,
                   help="continue from the output dir's latest checkpoint, or from the given checkpoint path")
    _add_settings(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="metrics of a trained adapter on its validation split")
    p.add_argument("adapter", help="output folder of `ia3 train` (or an adapter folder)")
    p.add_argument("--split", choices=["val", "all"], default="val")
    p.add_argument("--output", help="also write each example's prediction as JSON lines to this file")
    _add_settings(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("predict", help="labels for texts (arguments, --file, or stdin); JSON lines out")
    p.add_argument("adapter")
    p.add_argument("texts", nargs="*")
    p.add_argument("--file", help="one text per line, or JSON lines with a 'text' field")
    p.add_argument("--mode", choices=["rank", "generate"], default="rank")
    _add_settings(p)
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("merge", help="merge the adapter into its base model and save the full model")
    p.add_argument("adapter")
    p.add_argument("--output", required=True)
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("inspect", help="base model, targets, counts and size of an adapter")
    p.add_argument("adapter")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("push", help="upload an adapter folder to the Hugging Face Hub")
    p.add_argument("adapter")
    p.add_argument("repo_id")
    p.add_argument("--private", action="store_true")
    p.set_defaults(func=cmd_push)

    p = sub.add_parser("serve", help="HTTP API: one base model, many adapters mixed in every batch (ia3[serve])")
    p.add_argument("--model", required=True, help="base model: Hub id or local folder (with its tokenizer)")
    p.add_argument("--adapters", required=True, help="folder of adapter folders (each loaded under its folder name)")
    p.add_argument("--task", choices=["seq2seq", "causal", "cls"], default="seq2seq")
    p.add_argument("--host", default="127.0.0.1", help="(default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--label-names", help="comma-separated labels for /v1/classify (default: the adapters' recipe.yaml)")
    p.add_argument("--max-batch-size", type=int, default=32, help="inputs per model call (default: 32)")
    p.add_argument("--max-wait-ms", type=float, default=10.0, help="wait for a batch to fill (default: 10)")
    p.add_argument("--max-queue", type=int, default=256, help="requests waiting before 503 (default: 256)")
    p.add_argument("--max-inputs", type=int, default=64, help="inputs per request (default: 64)")
    p.add_argument("--max-input-chars", type=int, default=4000, help="characters per input (default: 4000)")
    p.add_argument("--max-input-tokens", type=int, default=512, help="inputs are truncated to this (default: 512)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="cap on max_new_tokens (default: 128)")
    p.add_argument("--max-body-bytes", type=int, default=2 * 1024 * 1024, help="(default: 2 MiB)")
    p.add_argument("--request-timeout-s", type=float, default=30.0, help="(default: 30)")
    p.add_argument("--api-key", help="require this key (Authorization: Bearer / X-API-Key); default: $IA3_API_KEY")
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    p.add_argument("--no-hub", action="store_true", help="refuse loading adapters from the Hub at run time")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.add_argument("--threads", type=int, help="torch CPU threads for the model (default: torch's); 1 is often fastest "
                   "on a small, busy machine, where spinning OpenMP threads compete with the HTTP workers")
    p.set_defaults(func=cmd_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command == "predict":  # texts may also come after options: `predict DIR --mode generate "text"`
        args.texts += [e for e in extra if not e.startswith("-")]
        extra = [e for e in extra if e.startswith("-")]
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.logging.set_verbosity_error()
    if args.quiet:
        transformers.utils.logging.disable_progress_bar()  # "Loading weights" bars
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError) as err:
        print(f"ia3 {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
