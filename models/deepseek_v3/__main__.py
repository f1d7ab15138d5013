"""``python -m models.deepseek_v3 --config 671b``: a config's sizes and abstract parameter count."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from rich.console import Console
from rich.table import Table

from models.deepseek_v3 import config as config_lib
from models.deepseek_v3 import model as model_lib


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m models.deepseek_v3", description=__doc__)
  parser.add_argument("--config", default="671b", choices=sorted(config_lib.CONFIGS))
  args = parser.parse_args(argv)
  config = config_lib.get_config(args.config)
  console = Console()
  console.print(f"[bold]{args.config}[/]: {config_lib.describe(config)}")
  with console.status("building the abstract model (nnx.eval_shape)"):
    count = model_lib.param_count(config)
  table = Table("part", "parameters", "billions")
  rows = [("main model", count.main), ("  activated per token", count.activated),
          ("MTP module (own)", count.mtp),
          ("MTP module (checkpoint, with embedding + head copies)", count.mtp_checkpoint),
          ("checkpoint total (main + MTP as stored)", count.total_checkpoint)]
  for name, n in rows:
    table.add_row(name, f"{n:,}", f"{n / 1e9:.2f}B")
  console.print(table)
  return 0


if __name__ == "__main__":
  sys.exit(main())
