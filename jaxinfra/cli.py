"""The ``jaxinfra`` command line: ``jaxinfra doctor``."""

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
  args = parser.parse_args(argv)
  if args.command == "doctor":
    from jaxinfra import doctor as doctor_lib  # pylint: disable=g-import-not-at-top
    return doctor_lib.run(self_test=not args.no_self_test)
  parser.error(f"unknown command {args.command}")
  return 2
