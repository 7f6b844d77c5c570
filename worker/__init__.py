"""refold: streaming ALS video recommendations with exact per-user fold-in on Kafka."""

__version__ = "0.1.0"
