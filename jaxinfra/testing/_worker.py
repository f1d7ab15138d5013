"""One worker of jaxinfra.testing.multiprocess (``python -m`` entry point)."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--file", required=True)
  parser.add_argument("--function", required=True)
  parser.add_argument("--process-id", type=int, required=True)
  parser.add_argument("--num-processes", type=int, required=True)
  parser.add_argument("--port", type=int, required=True)
  parser.add_argument("--devices", type=int, required=True)
  parser.add_argument("--args", default="[]")
  parser.add_argument("--core", type=int, default=None)
  args = parser.parse_args()
  if args.core is not None:  # before jax starts: its thread pools size to the cores allowed
    os.sched_setaffinity(0, {args.core})

  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_num_cpu_devices", args.devices)
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(
      coordinator_address=f"127.0.0.1:{args.port}", num_processes=args.num_processes,
      process_id=args.process_id, cluster_detection_method="deactivate",
      initialization_timeout=120)

  spec = importlib.util.spec_from_file_location("_jaxinfra_multiprocess_target", args.file)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  result = getattr(module, args.function)(*json.loads(args.args))

  from jaxinfra.testing.multiprocess import RESULT_MARKER  # pylint: disable=g-import-not-at-top
  print(RESULT_MARKER + json.dumps(result), flush=True)
  jax.distributed.shutdown()


if __name__ == "__main__":
  sys.exit(main())
