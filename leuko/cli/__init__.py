"""The `leuko` command: `leuko.cli.app.main` parses the arguments and dispatches to one module per command group."""


def main(argv: list[str] | None = None) -> int:
    # Imported here so that `import leuko.cli` (and `leuko --help`) stays instant.
    from leuko.cli.app import main as _main

    return _main(argv)
