"""Top-k accuracy as an ``evaluate`` module (the Hub's ``accuracy`` needs the network; this one is local).

Predictions are *ranked class ids* (best first), e.g. ``logits.topk(5).indices``: the Trainer can reduce the
logits to them on the device with ``preprocess_logits_for_metrics``, so evaluating ImageNet keeps 5 integers
per image instead of 1,000 floats. A bare class id per example (argmax) is accepted too and gives top-1.

    >>> import evaluate
    >>> metric = evaluate.load(hf_win.metrics.TOP_K_ACCURACY)     # the path of this file
    >>> metric.compute(predictions=[[3, 1, 0], [2, 0, 1]], references=[1, 2], k=(1, 2))
    {'top1_accuracy': 0.5, 'top2_accuracy': 1.0}
"""

import datasets
import evaluate

_DESCRIPTION = """Top-k accuracy: the fraction of examples whose reference label is among the first k ranked
predictions. `k` is an int or a sequence of ints (default (1, 5)); the result has one key `top{k}_accuracy` per k.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `list` of `int`): ranked class ids per example, best first (or `list` of `int`).
    references (`list` of `int`): the true class id per example.
    k (`int` or `list` of `int`, default `(1, 5)`): the cut-offs. Each must be >= 1 and at most the number of
        ranked predictions given per example.
Returns:
    `top{k}_accuracy` (`float` in [0, 1]) for each k.
"""

_CITATION = ""


class TopKAccuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=[
                datasets.Features(
                    {"predictions": datasets.Sequence(datasets.Value("int64")), "references": datasets.Value("int64")}
                ),
                datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
            ],
        )

    def _compute(self, predictions, references, k=(1, 5)):
        ks = [k] if isinstance(k, int) else list(k)
        ranked = [p if isinstance(p, (list, tuple)) else [p] for p in predictions]
        width = min((len(p) for p in ranked), default=0)
        for kk in ks:
            if not isinstance(kk, int) or kk < 1 or (ranked and kk > width):
                raise ValueError(
                    f"k={kk!r} is not valid: k must be an int between 1 and the number of ranked predictions "
                    f"per example ({width})"
                )
        n = len(references)
        out = {}
        for kk in ks:
            hits = sum(1 for p, r in zip(ranked, references) if r in p[:kk])
            out[f"top{kk}_accuracy"] = float(hits / n) if n else 0.0
        return out
