"""`python -m sidpipe.cli`: the same as the `sidpipe` command."""

from sidpipe.cli import app

app(prog_name="sidpipe")
