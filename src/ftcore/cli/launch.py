"""What each torchrun rank executes: `python -m ftcore.cli.launch RECIPE --config FILE [overrides]`.

Every rank loads, overrides and validates the same config and calls the same `recipe_main(cfg)`; a rank
that fails prints `ftcore: rank R/W on HOST failed: <error>` and exits non-zero, so torchrun stops the rest.
"""

from __future__ import annotations

import argparse
import sys

from ftcore.cli.lifetime import interrupt_on_sigterm, stop_when_parent_dies
from ftcore.cli.run import run_in_process
from ftcore.config import ConfigError
from ftcore.config.errors import RunSetupError
from ftcore.distributed.env import exit_process, rank_label, report_rank_failure


@report_rank_failure
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ftcore.cli.launch", description=__doc__)
    parser.add_argument("recipe")
    parser.add_argument("--config", required=True)
    args, overrides = parser.parse_known_args(argv)
    stop_when_parent_dies()  # torchrun killed: this rank stops too, rather than train on unseen
    interrupt_on_sigterm()  # torchrun's SIGTERM ends the rank as Ctrl-C does
    try:
        return run_in_process(args.recipe, args.config, overrides)
    except RunSetupError as exc:  # may be this rank's own (a node-local path, its GPU): say which rank
        print(f"ftcore: {rank_label()} failed: {exc}", file=sys.stderr)
        return 2
    except ConfigError as exc:  # the same config on every rank: the same line
        print(f"ftcore: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM (torchrun forwards both): 130, through exit_process
        return 130


if __name__ == "__main__":
    exit_process(main())
