"""`python -m retracer` runs the command line."""

from retracer.cli import main

main()
