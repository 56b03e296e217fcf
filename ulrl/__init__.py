"""ulrl: interpretable text-to-video search trained with (un)likelihood objectives."""

__version__ = "0.1.0"
