"""``python -m pipeline``: the same CLI as ``gpt2-pipeline``."""

from pipeline.cli import main

if __name__ == "__main__":
    main()
