"""`python -m launch.plan [plan.<option>=<value> ...] <overrides>`: the report, then the JSON line."""

from __future__ import annotations

import json
import sys

from launch.compose import CONFIG_ERRORS, compose_run, config_error, split_flags
from launch.plan.memory import PlanOptions, plan
from launch.plan.report import report, summary


def main(argv: list[str]) -> int:
    from parallel import patches

    patches.apply()  # the parameter count builds the model (on the meta device)
    try:
        flags, overrides = split_flags(argv, "plan")
        options = PlanOptions.from_flags(flags)
        p = plan(compose_run(overrides), options)
    except CONFIG_ERRORS as e:
        print(config_error(e), file=sys.stderr)
        return 2
    print(report(p))
    print(json.dumps(summary(p)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
