"""Shared helpers of the command-line tests."""

from jaxdiff.cli import main


def cli_error(argv, capsys) -> str:
    """Run the CLI on ``argv``, expect exit status 2 and one line on stderr (no traceback)."""
    capsys.readouterr()  # only this call's output
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err  # one clear line, no traceback
    return err
