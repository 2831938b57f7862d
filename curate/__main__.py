"""`python -m curate` runs the command-line interface."""

from curate.cli.app import main

if __name__ == "__main__":
    main()
