"""`python -m surgery` runs the command line."""

from .cli import main

main(prog_name="surgery")
