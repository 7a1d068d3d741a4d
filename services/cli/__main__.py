"""``python -m wisp.services.cli``: the same as the ``wisp-cli`` console script."""

from wisp.services.cli.main import main

if __name__ == "__main__":
    main()
