"""The ``jaxinfra`` command line: ``jaxinfra doctor``, ``jaxinfra bench NAME``,
``jaxinfra eplb``, ``jaxinfra profile-report TRACE``."""

from __future__ import annotations

import argparse
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="jaxinfra", description=__doc__)
  commands = parser.add_subparsers(dest="command", required=True)
  doctor = commands.add_parser(
      "doctor", help="versions, devices, custom calls, and a custom-call self-test")
  doctor.add_argument("--no-self-test", action="store_true",
                      help="skip running each custom call against its xla path")
  bench = commands.add_parser(
      "bench", help="time every available implementation of an op family on this device")
  bench.add_argument("name", help="benchmark to run ('list' shows them)")
  bench.add_argument("--size", choices=("small", "full"), default=None,
                     help="small (CPU-sized) or full (published configurations); "
                          "default: small on CPU, full on accelerators")
  bench.add_argument("--iters", type=int, default=10, help="timed repetitions per case")
  bench.add_argument("--json", default=None, help="also write the results to this JSON file")
  from jaxinfra.eplb import cli as eplb_cli  # pylint: disable=g-import-not-at-top
  eplb_cli.add_parser(commands)
  from jaxinfra import profile  # pylint: disable=g-import-not-at-top
  profile.add_parser(commands)
  args = parser.parse_args(argv)
  if args.command == "doctor":
    from jaxinfra import doctor as doctor_lib  # pylint: disable=g-import-not-at-top
    return doctor_lib.run(self_test=not args.no_self_test)
  if args.command == "bench":
    from jaxinfra import bench as bench_lib  # pylint: disable=g-import-not-at-top
    if args.name == "list":
      for spec in sorted(bench_lib.registered().values(), key=lambda s: s.name):
        print(f"{spec.name:<10} {spec.help}")
      return 0
    return bench_lib.main(args.name, size=args.size, iters=args.iters, json_path=args.json)
  if args.command == "eplb":
    return eplb_cli.run(args)
  if args.command == "profile-report":
    return profile.run(args)
  parser.error(f"unknown command {args.command}")
  return 2
