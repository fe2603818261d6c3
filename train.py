"""Train a GPT-2: ``python train.py --config configs/<name>.yaml [section.key=value ...]``."""

from __future__ import annotations

import time

STARTED = time.perf_counter()  # before the imports, whose time is the run's too

import argparse  # noqa: E402
import sys  # noqa: E402

from jaxgpt2.config import load_config  # noqa: E402
from jaxgpt2.errors import report_errors  # noqa: E402
from jaxgpt2.metrics import PhaseTimes, say  # noqa: E402
from jaxgpt2.trainer import Trainer  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", help="YAML config file, e.g. configs/shakespeare_char_cpu.yaml")
    parser.add_argument("--resume", metavar="RUN_DIR",
                        help="continue the run in RUN_DIR (same as train.out_dir=RUN_DIR train.resume=true)")
    parser.add_argument("overrides", nargs="*", help="section.key=value, e.g. train.max_steps=500")
    args = parser.parse_args(argv)
    overrides = list(args.overrides)
    if args.resume:
        overrides += [f"train.out_dir={args.resume}", "train.resume=true"]
    phases = PhaseTimes()
    phases.seconds["imports"] = time.perf_counter() - STARTED

    def train() -> None:
        config = load_config(args.config, overrides)
        trainer = Trainer(config, phases)
        summary = trainer.run()
        if "stopped_by" not in summary and config.train.sample_tokens:
            with phases.phase("sample"):
                text = trainer.sample()
            say("sample:\n" + text)
        say(phases.line())

    return report_errors(train)


if __name__ == "__main__":
    sys.exit(main())
