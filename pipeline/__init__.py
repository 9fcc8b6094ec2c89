"""gpt2-pipeline: GPT-2-family models at cluster scale, offline (Ray Data) and online (Ray Serve).

Read the package in data-flow order: ``config`` → ``models`` → ``engine`` → ``records`` →
``io`` / ``batch`` (offline job) and ``serving`` (online endpoint) → ``cli``.
"""

__version__ = "0.1.0"
