"""`python -m fam COMMAND`: the commands of the standalone package."""

import importlib
import sys

COMMANDS = {
    "generate": ("fam.standalone.cli", "a FAM image (default model: the shipped toy), with --compare "
                                       "beside the plain Hires fix (same seed)"),
}


def usage() -> str:
    lines = ["usage: python -m fam COMMAND [options]   (python -m fam COMMAND --help)", "",
             "commands:"]
    lines += [f"  {name:<10}{doc}" for name, (_, doc) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage(), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    if argv[0] not in COMMANDS:
        print(f"{usage()}\n\nerror: unknown command {argv[0]!r}", file=sys.stderr)
        return 2
    return importlib.import_module(COMMANDS[argv[0]][0]).main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
