"""recsys: a real-time recommendation reference application."""
__version__ = "0.1.0"
