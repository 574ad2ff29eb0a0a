"""The `ftcore` command: ls, cp, cat, validate, run, download, data check.

Config errors print one line to stderr and exit with status 2; no traceback.
"""

from __future__ import annotations

import argparse
import os
import sys

from ftcore.cli.commands import cmd_cat, cmd_cp, cmd_data, cmd_download, cmd_ls, cmd_validate
from ftcore.cli.run import add_torchrun_flags, cmd_run
from ftcore.config import ConfigError

OVERRIDES_HELP = "overrides: key.path=value, +new.key=value, ~key.path (typed by YAML rules)"
EPILOG = """examples:
  ftcore ls
  ftcore cp llama3_1/8B_lora my.yaml
  ftcore validate lora_finetune --config my.yaml batch_size=4
  ftcore run lora_finetune --config my.yaml checkpoint_dir=/ckpt ~dataset_val
  ftcore run --nproc_per_node 8 lora_finetune --config llama3_1/70B_qlora"""


def _add_overrides(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("overrides", nargs="*", metavar="OVERRIDE", help=OVERRIDES_HELP)
    parser.set_defaults(takes_overrides=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ftcore", description="Config-driven LLM fine-tuning.", epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("ls", help="list built-in recipes and their configs")
    p.set_defaults(handler=cmd_ls)

    p = sub.add_parser("cp", help="copy a built-in config or recipe to edit it")
    p.add_argument("name", help="built-in config (e.g. llama3_1/8B_lora) or recipe name")
    p.add_argument("dest", help="file or folder to copy to")
    p.add_argument("--force", action="store_true", help="overwrite DEST if it exists")
    p.set_defaults(handler=cmd_cp)

    p = sub.add_parser("cat", help="print a config, with overrides applied")
    p.add_argument("name", help="built-in config name or path to a .yaml file")
    p.add_argument("--resolve", action="store_true", help="resolve ${...} interpolations")
    _add_overrides(p)
    p.set_defaults(handler=cmd_cat)

    p = sub.add_parser("validate", help="check a config (and overrides) without running anything")
    p.add_argument("recipe", nargs="?", help="recipe name or .py path whose CONFIG_KEYS to check against")
    p.add_argument("--config", required=True, help="built-in config name or path to a .yaml file")
    _add_overrides(p)
    p.set_defaults(handler=cmd_validate)

    p = sub.add_parser("run", help="run a recipe in-process, or on every rank through torchrun")
    add_torchrun_flags(p)
    p.add_argument("recipe", help="built-in recipe name/alias, or path to a recipe .py file")
    p.add_argument("--config", required=True, help="built-in config name or path to a .yaml file")
    _add_overrides(p)
    p.set_defaults(handler=cmd_run)

    p = sub.add_parser("download", help="download a model from the Hugging Face Hub")
    p.add_argument("repo_id", help="e.g. meta-llama/Llama-3.1-8B-Instruct")
    p.add_argument("--output-dir", required=True, help="folder to save the files in")
    p.add_argument("--hf-token", default=None, help="access token (default: $HF_TOKEN)")
    p.add_argument("--ignore-patterns", nargs="*", default=None, help="glob patterns of files to skip")
    p.set_defaults(handler=cmd_download)

    p = sub.add_parser("data", help="dataset tools")
    p.add_argument("action", choices=["check"], help="check: validate a dataset against a config")
    p.add_argument(
        "args", nargs=argparse.REMAINDER, help="arguments for `ftcore data check` (see its --help)"
    )
    p.set_defaults(handler=cmd_data)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # argparse hands positionals that follow an option (`--config x a=1`) back as extras.
    overrides = list(getattr(args, "overrides", [])) + extra
    bad = [a for a in extra if a.startswith("-") or not getattr(args, "takes_overrides", False)]
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)}")
    try:
        status = args.handler(args, overrides)
        sys.stdout.flush()  # here, so a closed pipe is caught below rather than at interpreter exit
        return status
    except BrokenPipeError:  # `ftcore ls | head`: the reader has all it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing left to flush at exit
        return 141  # 128 + SIGPIPE, as a shell reports a program that a closed pipe stopped
    except ConfigError as exc:
        print(f"ftcore: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: the recipe has said what it kept; no traceback
        return 130  # 128 + SIGINT, as a shell reports it


if __name__ == "__main__":
    sys.exit(main())
