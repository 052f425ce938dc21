"""`python -m qkvconv ...`: the same as the `qkvconv` command (for an environment where the script is not on PATH)."""

from qkvconv.cli import app

app(prog_name="qkvconv")
