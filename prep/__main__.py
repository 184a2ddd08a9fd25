"""``python -m prep`` runs the same command group as the ``prep`` console script."""

from prep.cli import main

if __name__ == "__main__":
    main()
