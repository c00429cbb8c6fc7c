"""``evaluate`` modules defined in the project (the Hugging Face Hub is not needed to load them).

``evaluate.load(TOP_K_ACCURACY)`` loads the top-k accuracy metric from its file in this package.
"""

import os

TOP_K_ACCURACY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "top_k_accuracy.py")


def load_top_k_accuracy(**kwargs):
    """``evaluate.load`` of the project's top-k accuracy module (works offline)."""
    import evaluate

    return evaluate.load(TOP_K_ACCURACY, **kwargs)


__all__ = ["TOP_K_ACCURACY", "load_top_k_accuracy"]
