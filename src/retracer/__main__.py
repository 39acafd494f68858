"""`python -m retracer` runs the command line."""

from retracer.cli import main

if __name__ == "__main__":  # not when multiprocessing imports it
    main()
