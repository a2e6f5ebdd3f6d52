"""`ia3`: the command line, a thin table from command to library function.

    ia3 train [--config FILE] [--resume [CHECKPOINT]] [--train.lr 3e-3 ...]   (no config: the bundled demo)
    ia3 eval ADAPTER_DIR [--split val|all] [--output FILE]
    ia3 predict ADAPTER_DIR [TEXT ...] [--file FILE] [--mode rank|generate]   (no text, no file: stdin)
    ia3 merge ADAPTER_DIR --output DIR
    ia3 inspect ADAPTER_DIR
    ia3 push ADAPTER_DIR REPO_ID [--private]
    ia3 serve --model MODEL --adapters DIR [--task seq2seq|causal|cls] [--port 8000] ...   (needs ia3[serve])

Every recipe setting is a flag (`--train.lr`) and every `ServeConfig` field a flag of `serve` (`--max-batch-size`),
derived from the dataclasses: their docstrings are the help, their annotations say how a value is read. `-q` goes
before or after the command. Bad input and failures of the environment (ValueError, RuntimeError, OSError) end as
one `ia3 CMD: error: ...` line and exit status 2; IA3_DEBUG=1 shows their traceback instead.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import difflib
import json
import logging
import os
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

# The commands import the library (torch, transformers), the recipe and the server inside their functions, on
# purpose: `ia3 --help` and argument errors answer without loading them, and `ia3 serve`'s modules need the optional
# fastapi extra, so the other commands must not import them.

if TYPE_CHECKING:
    from ia3.serve.config import ServeConfig

# Short flags for the settings people change most; every setting also has its dotted flag (--train.lr).
ALIASES = {
    "--model": "model.name",
    "--task": "model.task",
    "--dataset": "data.dataset",
    "--subset": "data.subset",
    "--text-column": "data.text_column",
    "--label-column": "data.label_column",
    "--label-names": "data.label_names",
    "--epochs": "train.epochs",
    "--lr": "train.lr",
    "--batch-size": "train.batch_size",
    "--seed": "train.seed",
    "--loss": "train.loss",
    "--output-dir": "output_dir",
}
BUNDLED_CONFIGS = Path(__file__).resolve().parent / "demo"  # `--config NAME` for NAME.yaml here
DEMO_CONFIG = BUNDLED_CONFIGS / "smollm2.yaml"  # the embedded default: SmolLM2 learns to generate the label
# Loggers of optional backends that print notices when imported (bitsandbytes looks for a CPU kernel on the Hub,
# torchao for its compiled libraries) although nothing is quantised; their errors still show.
NOISY_LOGGERS = ("bitsandbytes", "kernels", "torchao", "torch.utils._pytree")
# what a command may raise for bad input or a failing environment: a one-line error, exit 2 (other errors are bugs)
EXPECTED_ERRORS = (ValueError, RuntimeError, OSError)


def _show(value: object) -> str:
    """A default as one would type it on the command line."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return ",".join(value)
    if isinstance(value, str) and (not value or value != value.strip() or "\n" in value):
        return repr(value)
    return str(value)


def _help(doc: str, default: object = None, show_default: bool = True) -> str:
    text = doc.replace("%", "%%")
    return f"{text} (default: {_show(default).replace('%', '%%')})" if show_default else text


def _add_settings(parser: argparse.ArgumentParser) -> None:
    """One flag per recipe setting, derived from the config dataclasses: help from their docs, the value read by
    its annotation in `build_config` (so every bad value is reported at once)."""
    from ia3.recipe.config import settings
    from ia3.settings import metavar

    group = parser.add_argument_group(
        "settings (defaults < --config file < these flags; lists are comma-separated, `none` unsets an optional one)"
    )
    for s in settings():
        flags = [f"--{s.key}"] + [
            alias for alias, target in ALIASES.items() if target == s.key and alias != f"--{s.key}"
        ]
        kwargs: dict = {
            "dest": f"set:{s.key}",
            "default": None,
            "help": _help(s.help, s.default),
            "metavar": "{" + ",".join(s.choices) + "}" if s.choices else metavar(s.hint),
        }
        if s.hint is bool:  # `--train.plots` alone means true
            kwargs.update(nargs="?", const="true")
        group.add_argument(*flags, **kwargs)


def _overrides(args: argparse.Namespace) -> dict:
    return {k[4:]: v for k, v in vars(args).items() if k.startswith("set:") and v is not None}


def bundled_config(config: Path | None) -> Path | None:
    """`--config` as given, or the bundled config of that name (`--config minilm`) when no such file exists."""
    if config is None or config.exists() or config.suffix or len(config.parts) > 1:
        return config
    bundled = BUNDLED_CONFIGS / f"{config}.yaml"
    if bundled.is_file():
        return bundled
    names = sorted(p.stem for p in BUNDLED_CONFIGS.glob("*.yaml"))
    raise ValueError(f"--config {config}: no such file, and no bundled config of that name (bundled: {names})")


def cmd_train(args: argparse.Namespace) -> int:
    from accelerate import PartialState

    from ia3.recipe.config import build_config
    from ia3.recipe.train import train

    config = args.config
    if config is None and not any(k.startswith(("model.", "data.")) for k in _overrides(args)):
        config = DEMO_CONFIG
        if not args.quiet:  # -q: results and errors only
            print(f"no --config given: running the bundled demo ({DEMO_CONFIG.name})", file=sys.stderr)
    cfg = build_config(bundled_config(config), _overrides(args))
    resume = True if args.resume == "latest" else args.resume or False
    metrics = train(cfg, resume=resume, progress=not args.quiet)
    if PartialState().is_main_process:  # every process of a multi-process run returns the metrics; one prints
        summary = {
            k: metrics[k]
            for k in ("zero_shot", "accuracy", "macro_f1", "generation_accuracy", "eval_loss", "seconds_per_epoch")
            if metrics.get(k) is not None
        }
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
        from ia3.serve.app import run
    except ImportError as err:
        raise ValueError(f"ia3 serve needs fastapi and uvicorn ({err}): pip install 'ia3[serve]'") from None

    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be at least 1; got {args.threads}")
        import torch

        torch.set_num_threads(args.threads)
    if args.ray:
        try:
            from ia3.serve.ray import run as run_ray
        except ImportError as err:
            raise ValueError(f"ia3 serve --ray needs Ray Serve ({err}): pip install 'ia3[ray]'") from None
        run_ray(serve_config(args), args.replicas, args.host, args.port, args.max_adapters_per_replica)
        return 0
    run(serve_config(args), host=args.host, port=args.port, log_level=args.log_level)
    return 0


def serve_config(args: argparse.Namespace) -> ServeConfig:
    """The `ServeConfig` of parsed `ia3 serve` flags (each value read by its field's annotation; all problems at
    once); `--api-key` defaults to $IA3_API_KEY."""
    from ia3.serve.config import ServeConfig, flag_name
    from ia3.settings import ConfigError, coerce, field_types

    kwargs, problems = {}, []
    for name, hint in field_types(ServeConfig).items():
        value = getattr(args, f"serve:{name}")
        if name == "api_key":
            value = value or os.environ.get("IA3_API_KEY") or None
        if value is None:
            continue
        try:
            kwargs[name] = coerce(value, hint, flag_name(name))
        except ValueError as err:
            problems.append(str(err))
    try:
        config = ServeConfig(**kwargs)
    except ConfigError as err:
        problems.extend(err.problems)
    if problems:
        raise ConfigError(problems, "Invalid serve config")
    return config


def _add_serve_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per `ServeConfig` field (`--max-batch-size`), help from its docstring, then the server's own."""
    from ia3.serve.config import ServeConfig, flag_name
    from ia3.settings import field_docs, field_types, metavar
    from ia3.tasks import TASKS

    docs, hints = field_docs(ServeConfig), field_types(ServeConfig)
    for f in dataclasses.fields(ServeConfig):
        flag, hint, doc = flag_name(f.name), hints[f.name], docs.get(f.name, "")
        kwargs: dict = {"dest": f"serve:{f.name}", "default": None}
        if f.name == "api_key":
            kwargs.update(metavar="KEY", help=_help(doc + " Default: $IA3_API_KEY.", show_default=False))
        elif hint is bool:  # a flag that flips the default: `--no-hub` (allow_hub), `--no-mix-adapters`
            kwargs.update(
                action="store_const",
                const=not f.default,
                help=_help(("turn off: " if f.default else "") + doc, show_default=False),
            )
        else:
            required = f.name in ("model", "adapters_dir")
            kwargs.update(
                metavar={"model": "MODEL", "adapters_dir": "DIR"}.get(f.name, metavar(hint)),
                required=required,
                help=_help(doc, f.default, not required),
            )
        if f.name == "task":
            kwargs.update(choices=list(TASKS), metavar="{" + ",".join(TASKS) + "}")
        parser.add_argument(flag, **kwargs)
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)"
    )
    parser.add_argument("--port", type=int, default=8000, help="port to listen on (default: 8000)")
    parser.add_argument(
        "--log-level",
        default="info",
        choices=["critical", "error", "warning", "info", "debug"],
        help="uvicorn's log level (default: info)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        help="torch CPU threads for the model (default: torch's); 1 is often "
        "fastest on a small, busy machine, where spinning OpenMP threads compete with the HTTP workers",
    )
    parser.add_argument(
        "--ray",
        action="store_true",
        help="serve replicas of the engine on Ray Serve (ia3[ray]; joins the cluster in $RAY_ADDRESS, else starts one)",
    )
    parser.add_argument("--replicas", type=int, default=1, help="--ray: engine replicas (default: 1)")
    parser.add_argument(
        "--max-adapters-per-replica",
        type=int,
        help="--ray: adapters each replica keeps (Ray's multiplexing cap; default --max-loaded-adapters, else 64)",
    )


def _quiet_gguf_bar(transformers) -> None:
    """transformers' GGUF loader draws its "Converting and de-quantizing" bar with plain tqdm, which
    `disable_progress_bar` does not reach: give it transformers' own (switchable) tqdm."""
    try:
        from transformers import modeling_gguf_pytorch_utils
    except ImportError:  # another transformers layout: the bar stays
        return
    modeling_gguf_pytorch_utils.tqdm = transformers.utils.logging.tqdm


def _add_quiet(parser: argparse.ArgumentParser, default: object = False) -> None:
    parser.add_argument(
        "-q", "--quiet", action="store_true", default=default, help="no progress bars or per-epoch lines"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ia3", description="(IA)^3 fine-tuning: train, evaluate, predict, merge, share"
    )
    _add_quiet(parser)
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, func, summary: str, usage: str | None = None) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=summary, description=summary, usage=usage)
        _add_quiet(p, default=argparse.SUPPRESS)  # also after the command; SUPPRESS keeps `ia3 -q CMD`'s value
        p.set_defaults(func=func)
        return p

    settings_usage = "[--SECTION.KEY VALUE ...]"
    p = command(
        "train",
        cmd_train,
        "train an adapter (no --config: the bundled offline demo)",
        f"ia3 train [-q] [--config FILE] [--resume [CHECKPOINT]] {settings_usage}",
    )
    p.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help="YAML file with output_dir and model/data/train sections, or the name of a bundled config: "
        "smollm2 (the default: SmolLM2 generates the label), minilm (MiniLM with a classifier head)",
    )
    p.add_argument(
        "--resume",
        nargs="?",
        const="latest",
        default=None,
        metavar="CHECKPOINT",
        help="continue from the output dir's latest checkpoint, or from the given checkpoint path",
    )
    _add_settings(p)

    p = command(
        "eval",
        cmd_eval,
        "metrics of a trained adapter on its validation split",
        f"ia3 eval [-q] ADAPTER_DIR [--split {{val,all}}] [--output FILE] {settings_usage}",
    )
    p.add_argument("adapter", help="output folder of `ia3 train` (or an adapter folder)")
    p.add_argument(
        "--split",
        choices=["val", "all"],
        default="val",
        help="the run's validation split, or all the examples of its dataset (default: val)",
    )
    p.add_argument("--output", metavar="FILE", help="also write each example's prediction as JSON lines to this file")
    _add_settings(p)

    p = command(
        "predict",
        cmd_predict,
        "labels for texts (arguments, --file, or stdin); JSON lines out",
        f"ia3 predict [-q] ADAPTER_DIR [TEXT ...] [--file FILE] [--mode {{rank,generate}}] {settings_usage}",
    )
    p.add_argument("adapter", help="output folder of `ia3 train` (or an adapter folder)")
    p.add_argument("texts", nargs="*", help="texts to label (none and no --file: one per line on stdin)")
    p.add_argument("--file", metavar="FILE", help="one text per line, or JSON lines with a 'text' field")
    p.add_argument(
        "--mode",
        choices=["rank", "generate"],
        default="rank",
        help="rank: the most likely of the label names; generate: the label the model writes (default: rank)",
    )
    _add_settings(p)

    p = command("merge", cmd_merge, "merge the adapter into its base model and save the full model")
    p.add_argument("adapter", help="output folder of `ia3 train` (or an adapter folder)")
    p.add_argument("--output", required=True, help="folder for the merged model (must not exist)")

    p = command("inspect", cmd_inspect, "base model, targets, counts and size of an adapter")
    p.add_argument("adapter", help="output folder of `ia3 train` (or an adapter folder)")

    p = command("push", cmd_push, "upload an adapter folder to the Hugging Face Hub")
    p.add_argument("adapter", help="output folder of `ia3 train` (or an adapter folder)")
    p.add_argument("repo_id", help="the Hub repository to create or update, e.g. you/finsent-ia3")
    p.add_argument("--private", action="store_true", help="create the repository private")

    p = command(
        "serve",
        cmd_serve,
        "HTTP API: one base model, many adapters mixed in every batch (ia3[serve])",
        "ia3 serve --model MODEL --adapters DIR [--task TASK] [--port PORT] [options]",
    )
    _add_serve_flags(p)
    return parser


def _subparser(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices[command]


def _unknown_flags(parser: argparse.ArgumentParser, extra: list[str]) -> str:
    """`unrecognized arguments: --train.lrr 1; did you mean --train.lr?` (the close matches of each unknown flag)."""
    from ia3.settings import close_matches

    options = [o for a in parser._actions for o in a.option_strings if o.startswith("--")]
    dotted = [o[2:] for o in options if "." in o]
    flags = [e.split("=", 1)[0] for e in extra if e.startswith("--")]
    hints = []
    for flag in flags:
        close = ["--" + k for k in close_matches(flag[2:], dotted)] if "." in flag else []
        close = close or difflib.get_close_matches(flag, options, n=3, cutoff=0.75)
        if close:
            hints.append(" or ".join(close) + (f" for {flag}" if len(flags) > 1 else ""))
    message = f"unrecognized arguments: {' '.join(extra)}"
    return message + (f"; did you mean {', '.join(hints)}?" if hints else f" ({parser.prog} --help lists the flags)")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command == "predict":  # texts may also come after options: `predict DIR --mode generate "text"`
        args.texts += [e for e in extra if not e.startswith("-")]
        extra = [e for e in extra if e.startswith("-")]
    if extra:
        sub = _subparser(parser, args.command)
        sub.error(_unknown_flags(sub, extra))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch  # noqa: F401 - first: importing torch resets the levels of torch's loggers, set below
    import transformers

    transformers.logging.set_verbosity_error()
    for noisy in NOISY_LOGGERS:
        logging.getLogger(noisy).setLevel(logging.ERROR)
    if args.quiet:
        transformers.utils.logging.disable_progress_bar()  # "Loading weights" bars
        _quiet_gguf_bar(transformers)
    try:
        with _only_errors(args.quiet):
            return args.func(args)
    except EXPECTED_ERRORS as err:
        if os.environ.get("IA3_DEBUG"):
            raise
        print(f"ia3 {args.command}: error: {err}", file=sys.stderr)
        return 2


@contextlib.contextmanager
def _only_errors(quiet: bool) -> Iterator[None]:
    """With `quiet`, no log record below ERROR and no Python warning while the command runs (`-q` shows results
    and errors only); both are restored after, for callers that run `main` in their own process."""
    if not quiet:
        yield
        return
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(previous)


if __name__ == "__main__":
    sys.exit(main())
